"""The report's plots (forgetting histograms per kind, P/R/F1 against ϕ, forgetting curves), and
how every plot of the project is drawn and saved (`headless_pyplot`, `save_figure`).

Figures of several panels are grids (`_grid`: 4 × 3 in panels, at most 4 a row, ≤ 1600 px wide),
read at a glance in a README, a notebook or a pull request; the histograms put the filter's signal
first, with ϕ drawn, labelled and the flagged side shaded. Drawn with matplotlib's Agg backend (no
display on TPU hosts or CI) and saved without metadata, so the same run directory always gives
byte-identical PNGs.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from ff_jax.atomic_io import write_atomic
from ff_jax.eval import classification
from ff_jax.report.analysis import UNLABELLED, RunAnalysis
from ff_jax.run_files import PLOTS


def _kind_colors(order: list[str]) -> dict[str, str]:
  fixed = {"unsafe": "tab:red", "safe": "tab:green", "task": "tab:blue", UNLABELLED: "tab:gray"}
  spare = iter(["tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"])
  return {k: fixed.get(k) or next(spare, "black") for k in order}


# Panels of a grid figure: 4 × 3 in, at most 4 a row, so at save_figure's 100 dpi a figure is at
# most 1600 px wide, readable in a README, a notebook or a pull request without zooming. (One
# strip of a panel per signal grew to 7000 × 380 px with 14 signals.)
PANEL_INCHES = (4.0, 3.0)
MAX_COLUMNS = 4


def _grid(plt: Any, n: int) -> tuple[Any, list[Any]]:
  """A figure of `n` panels in rows of at most MAX_COLUMNS; the axes in reading order (the cells
  left over in the last row are hidden)."""
  cols = min(n, MAX_COLUMNS)
  rows = math.ceil(n / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(PANEL_INCHES[0] * cols, PANEL_INCHES[1] * rows),
                           squeeze=False)
  flat = list(axes.flat)
  for ax in flat[n:]:
    ax.set_visible(False)
  return fig, flat[:n]


def headless_pyplot() -> Any:
  """matplotlib.pyplot on the Agg backend, imported on first use: matplotlib is slow to import
  and only the report needs it."""
  import matplotlib

  matplotlib.use("Agg")  # headless: runs on TPU hosts and CI without a display
  import matplotlib.pyplot as plt

  return plt


def save_figure(fig: Any, path: Path, dpi: int = 100,
                rect: tuple[float, float, float, float] | None = None) -> Path:
  """Lays `fig` out tight (within `rect`, in figure fractions, if given: room left for a figure
  legend), writes it to `path` as a PNG atomically (ff_jax.atomic_io: a reader never sees half a
  file) and closes it; returns `path`."""
  plt = headless_pyplot()
  buf = io.BytesIO()
  try:
    fig.tight_layout(rect=rect)
    # No Software/date metadata: the same data gives byte-identical files.
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
  finally:
    plt.close(fig)
  write_atomic(path, buf.getvalue())
  return path


def make_plots(a: RunAnalysis) -> dict[str, Path | None]:
  """The report's PNGs under `<run_dir>/plots`; None for a plot this run cannot have."""
  plots: dict[str, Path | None] = {"forgetting_hist": None, "prf_vs_phi": None,
                                   "forgetting_curves": None}
  s = a.scores
  if s is None or not s.signals:
    return plots
  plt = headless_pyplot()
  out_dir = a.run_dir / PLOTS
  kinds, order = np.array(s.kinds, dtype=object), s.kind_order
  colors = _kind_colors(order)
  phi = a.phi

  # The filter's signal first: it is the one a reader must trust before the others.
  ordered = ([a.signal] if a.signal in s.signals else []) + [g for g in s.signals if g != a.signal]
  fig, axes = _grid(plt, len(ordered))
  handles: dict[str, Any] = {}
  for ax, signal in zip(axes, ordered):
    r = s.columns[f"r_{signal}"]
    finite = r[np.isfinite(r)]
    bins = np.histogram_bin_edges(finite, bins=int(np.clip(np.sqrt(finite.size), 10, 40)))
    for k in order:
      vals = r[(kinds == k) & np.isfinite(r)]
      if vals.size:
        _, _, patches = ax.hist(vals, bins=bins, histtype="stepfilled", alpha=0.35,
                                color=colors[k], edgecolor=colors[k])
        handles.setdefault(k, patches[0])
    used = signal == a.signal
    if used and math.isfinite(phi):
      ax.axvline(phi, color="black", linestyle="--", linewidth=1.5)
      # The flagged side shaded: which examples the filter drops, without reading the rule.
      ax.axvspan(phi, max(phi, float(bins[-1])), color="black", alpha=0.06, linewidth=0)
      ax.set_ylim(top=ax.get_ylim()[1] * 1.15)  # headroom for the ϕ label above the bars
      # Labelled on the line, not only in a legend: the number is what a reader checks.
      ax.annotate(f"ϕ = {phi:.3g}", xy=(phi, 1.0), xycoords=("data", "axes fraction"),
                  xytext=(3, -3), textcoords="offset points", ha="left", va="top", fontsize=9,
                  bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.8})
    ax.set_xlabel(f"forgetting r ({signal})", fontsize=9)
    ax.set_ylabel("examples", fontsize=9)
    ax.tick_params(labelsize=8)
    if used:
      ax.set_title(f"{signal}: filter signal" + (", flag r > ϕ" if math.isfinite(phi) else ""),
                   fontsize=10, fontweight="bold")
      for spine in ax.spines.values():
        spine.set_linewidth(1.6)
    else:
      ax.set_title(signal, fontsize=10)
  # One legend for the figure (the kinds and their counts are the same in every panel).
  n_per_kind = {k: int((kinds == k).sum()) for k in order}
  fig.legend([handles[k] for k in order if k in handles],
             [f"{k} (n={n_per_kind[k]})" for k in order if k in handles],
             loc="upper center", ncol=min(len(handles), 6) or 1, fontsize=9, frameon=False,
             bbox_to_anchor=(0.5, 1.0))
  # Room at the top for that legend.
  plots["forgetting_hist"] = save_figure(fig, out_dir / "forgetting_hist.png",
                                         rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))

  if s.has_labels and a.signal in s.signals:
    r = s.columns[f"r_{a.signal}"][s.labelled]
    y = s.is_unsafe[s.labelled]
    finite = r[np.isfinite(r)]
    if finite.size:
      lo, hi = float(finite.min()), float(finite.max())
      pad = 0.05 * (hi - lo) if hi > lo else 0.5
      phis = np.linspace(lo - pad, hi + pad, 201)
      sweep = classification.sweep_thresholds(r, y, phis)
      fig, ax = plt.subplots(figsize=(6, 4))
      ax.plot(phis, sweep["precision"], label="precision", color="tab:blue")
      ax.plot(phis, sweep["recall"], label="recall", color="tab:orange")
      ax.plot(phis, sweep["f1"], label="F1", color="tab:green", linewidth=2)
      if math.isfinite(phi):
        ax.axvline(phi, color="black", linestyle="--", label=f"chosen ϕ = {phi:.3g}")
      oracle = s.per_signal[a.signal].oracle
      if math.isfinite(oracle["phi"]):
        ax.axvline(oracle["phi"], color="gray", linestyle=":",
                   label=f"oracle ϕ = {oracle['phi']:.3g} (F1 {oracle['f1']:.3f})")
      ax.set_xlabel(f"threshold ϕ on r ({a.signal})")
      ax.set_ylim(-0.02, 1.02)
      ax.set_title("Filter quality vs ϕ (flag r > ϕ)")
      ax.legend(fontsize=8)
      plots["prf_vs_phi"] = save_figure(fig, out_dir / "prf_vs_phi.png")

  if s.curves:
    fig, axes = _grid(plt, len(s.curves))
    for ax, (signal, curve) in zip(axes, s.curves.items()):
      for k in order:
        ax.plot(curve.steps, curve.per_kind[k], marker="o", color=colors[k], label=k)
      ax.axhline(0.0, color="gray", linewidth=0.5)
      ax.set_xlabel("safety finetuning step")
      ax.set_ylabel(f"mean forgetting r ({signal})")
      ax.set_title(f"Forgetting curves ({signal})")
      ax.legend(fontsize=8)
    plots["forgetting_curves"] = save_figure(fig, out_dir / "forgetting_curves.png")
  return plots
