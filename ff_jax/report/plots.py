"""The report's plots (forgetting histograms per kind, P/R/F1 against ϕ, forgetting curves), and
how every plot of the project is drawn and saved (`headless_pyplot`, `save_figure`).

Drawn with matplotlib's Agg backend (no display on TPU hosts or CI) and saved without metadata,
so the same run directory always gives byte-identical PNGs.
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


def headless_pyplot() -> Any:
  """matplotlib.pyplot on the Agg backend, imported on first use: matplotlib is slow to import
  and only the report needs it."""
  import matplotlib

  matplotlib.use("Agg")  # headless: runs on TPU hosts and CI without a display
  import matplotlib.pyplot as plt

  return plt


def save_figure(fig: Any, path: Path, dpi: int = 100) -> Path:
  """Lays `fig` out tight, writes it to `path` as a PNG atomically (ff_jax.atomic_io: a reader
  never sees half a file) and closes it; returns `path`."""
  plt = headless_pyplot()
  buf = io.BytesIO()
  try:
    fig.tight_layout()
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

  fig, axes = plt.subplots(1, len(s.signals), figsize=(5 * len(s.signals), 3.8), squeeze=False)
  for ax, signal in zip(axes[0], s.signals):
    r = s.columns[f"r_{signal}"]
    finite = r[np.isfinite(r)]
    bins = np.histogram_bin_edges(finite, bins=int(np.clip(np.sqrt(finite.size), 10, 40)))
    for k in order:
      vals = r[(kinds == k) & np.isfinite(r)]
      if vals.size:
        ax.hist(vals, bins=bins, histtype="stepfilled", alpha=0.35, color=colors[k],
                edgecolor=colors[k], label=f"{k} (n={vals.size})")
    if signal == a.signal and math.isfinite(phi):
      ax.axvline(phi, color="black", linestyle="--", label=f"ϕ = {phi:.3g}")
    ax.set_xlabel(f"forgetting r ({signal})")
    ax.set_ylabel("examples")
    ax.set_title(signal + (" (filter signal)" if signal == a.signal else ""))
    ax.legend(fontsize=8)
  plots["forgetting_hist"] = save_figure(fig, out_dir / "forgetting_hist.png")

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
    fig, axes = plt.subplots(1, len(s.curves), figsize=(5 * len(s.curves), 3.8), squeeze=False)
    for ax, (signal, curve) in zip(axes[0], s.curves.items()):
      for k in order:
        ax.plot(curve.steps, curve.per_kind[k], marker="o", color=colors[k], label=k)
      ax.axhline(0.0, color="gray", linewidth=0.5)
      ax.set_xlabel("safety finetuning step")
      ax.set_ylabel(f"mean forgetting r ({signal})")
      ax.set_title(f"Forgetting curves ({signal})")
      ax.legend(fontsize=8)
    plots["forgetting_curves"] = save_figure(fig, out_dir / "forgetting_curves.png")
  return plots
