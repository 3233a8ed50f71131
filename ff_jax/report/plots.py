"""The report's plots: forgetting histograms per kind, P/R/F1 against ϕ, forgetting curves.

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

UNLABELLED = "(unlabelled)"


def _kind_colors(order: list[str]) -> dict[str, str]:
  fixed = {"unsafe": "tab:red", "safe": "tab:green", "task": "tab:blue", UNLABELLED: "tab:gray"}
  spare = iter(["tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"])
  return {k: fixed.get(k) or next(spare, "black") for k in order}


def _save(fig: Any, path: Path) -> Path:
  buf = io.BytesIO()
  # No Software/date metadata: the same run gives byte-identical files.
  fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
  write_atomic(path, buf.getvalue())
  return path


def make_plots(a: dict[str, Any]) -> dict[str, Path | None]:
  """The report's PNGs from `report._analyse`'s dict; None for a plot this run cannot have."""
  plots: dict[str, Path | None] = {"forgetting_hist": None, "prf_vs_phi": None,
                                   "forgetting_curves": None}
  if a.get("scores") is None or not a["signals"]:
    return plots
  import matplotlib

  matplotlib.use("Agg")  # headless: runs on TPU hosts and CI without a display
  import matplotlib.pyplot as plt

  out_dir = a["run_dir"] / "plots"
  scores, kinds, order = a["scores"], np.array(a["kinds"], dtype=object), a["kind_order"]
  colors = _kind_colors(order)
  phi = a["phi"]

  fig, axes = plt.subplots(1, len(a["signals"]), figsize=(5 * len(a["signals"]), 3.8),
                           squeeze=False)
  for ax, s in zip(axes[0], a["signals"]):
    r = scores[f"r_{s}"]
    finite = r[np.isfinite(r)]
    bins = np.histogram_bin_edges(finite, bins=int(np.clip(np.sqrt(finite.size), 10, 40)))
    for k in order:
      vals = r[(kinds == k) & np.isfinite(r)]
      if vals.size:
        ax.hist(vals, bins=bins, histtype="stepfilled", alpha=0.35, color=colors[k],
                edgecolor=colors[k], label=f"{k} (n={vals.size})")
    if s == a["signal"] and math.isfinite(phi):
      ax.axvline(phi, color="black", linestyle="--", label=f"ϕ = {phi:.3g}")
    ax.set_xlabel(f"forgetting r ({s})")
    ax.set_ylabel("examples")
    ax.set_title(s + (" (filter signal)" if s == a["signal"] else ""))
    ax.legend(fontsize=8)
  fig.tight_layout()
  plots["forgetting_hist"] = _save(fig, out_dir / "forgetting_hist.png")
  plt.close(fig)

  if a.get("labels") and a["signal"] in a["signals"]:
    r = scores[f"r_{a['signal']}"][a["labelled"]]
    y = a["is_unsafe"][a["labelled"]]
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
      oracle = a["per_signal"][a["signal"]]["oracle"]
      if math.isfinite(oracle["phi"]):
        ax.axvline(oracle["phi"], color="gray", linestyle=":",
                   label=f"oracle ϕ = {oracle['phi']:.3g} (F1 {oracle['f1']:.3f})")
      ax.set_xlabel(f"threshold ϕ on r ({a['signal']})")
      ax.set_ylim(-0.02, 1.02)
      ax.set_title("Filter quality vs ϕ (flag r > ϕ)")
      ax.legend(fontsize=8)
      fig.tight_layout()
      plots["prf_vs_phi"] = _save(fig, out_dir / "prf_vs_phi.png")
      plt.close(fig)

  if a["curves"]:
    fig, axes = plt.subplots(1, len(a["curves"]), figsize=(5 * len(a["curves"]), 3.8),
                             squeeze=False)
    for ax, (s, c) in zip(axes[0], a["curves"].items()):
      for k in order:
        ax.plot(c["steps"], c["per_kind"][k], marker="o", color=colors[k], label=k)
      ax.axhline(0.0, color="gray", linewidth=0.5)
      ax.set_xlabel("safety finetuning step")
      ax.set_ylabel(f"mean forgetting r ({s})")
      ax.set_title(f"Forgetting curves ({s})")
      ax.legend(fontsize=8)
    fig.tight_layout()
    plots["forgetting_curves"] = _save(fig, out_dir / "forgetting_curves.png")
    plt.close(fig)
  return plots
