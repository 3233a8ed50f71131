"""The sweep's report (ff_jax.experiments.sweep): `report.md` and three F1 plots, made from the
rows of `results.json` and the sweep's config."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ff_jax.atomic_io import write_atomic
from ff_jax.forgetting.thresholds import Threshold
from ff_jax.report.fmt import fmt, markdown_table
from ff_jax.report.plots import headless_pyplot, save_figure

_DPI = 110  # the sweep's PNGs (the run report's are at save_figure's default)


class SweepSetup(Protocol):
  """What the report reads of the sweep's config (ff_jax.experiments.sweep.SweepConfig)."""

  run_dir: str
  safe_sizes: tuple[int, ...]
  steps: tuple[int, ...]
  seeds: tuple[int, ...]
  batch_size: int
  chunk_size: int
  threshold: str  # the data-driven threshold reported beside the fixed ϕ
  optim: Any  # its learning_rate and schedule are quoted


def _mean_spread(rows: list[dict[str, Any]], group: tuple[str, ...],
                 metric: str = "f1") -> dict[tuple, tuple[float, float, float, float]]:
  """group values -> (mean, std, min, max) of `metric` over the seeds."""
  acc: dict[tuple, list[float]] = {}
  for row in rows:
    if row[metric] is not None:
      acc.setdefault(tuple(row[g] for g in group), []).append(row[metric])
  return {k: (float(np.mean(v)), float(np.std(v)), float(np.min(v)), float(np.max(v)))
          for k, v in acc.items()}


def sweep_plots(cfg: SweepSetup, rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
  """F1 against safe-set size, safety steps and ϕ, under `out_dir`; none without labels."""
  if not any(r["f1"] is not None for r in rows):
    return []
  plt = headless_pyplot()
  auto, t_max = str(Threshold.parse(cfg.threshold)), max(cfg.steps)
  sizes, steps = sorted(set(cfg.safe_sizes)), sorted(set(cfg.steps))
  stats = _mean_spread([r for r in rows if r["threshold"] == auto], ("n", "t"))
  paths = []

  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for t in steps:
    pts = [(n, *stats[(n, t)]) for n in sizes if (n, t) in stats]
    x, mean, _, lo, hi = map(np.asarray, zip(*pts))
    ax.plot(x, mean, marker="o", label=f"t={t}")
    ax.fill_between(x, lo, hi, alpha=0.15)  # the spread over seeds (min..max)
  ax.set(xlabel="safe-set size n", ylabel=f"F1 ({auto})", ylim=(0, 1.02),
         title="filter F1 vs safe-set size (mean, seed min..max)")
  ax.legend(fontsize=8)
  paths.append(save_figure(fig, out_dir / "f1_vs_safe_size.png", _DPI))

  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for n in sizes:
    pts = [(t, *stats[(n, t)]) for t in steps if (n, t) in stats]
    x, mean, std, _, _ = map(np.asarray, zip(*pts))
    ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=f"n={n}")
  ax.set(xlabel="safety steps t", ylabel=f"F1 ({auto})", ylim=(0, 1.02),
         title="filter F1 vs safety steps (mean ± std over seeds)")
  ax.legend(fontsize=8)
  paths.append(save_figure(fig, out_dir / "f1_vs_steps.png", _DPI))

  fixed = [r for r in rows if r["threshold"].startswith("fixed") and r["t"] == t_max]
  by_phi = _mean_spread(fixed, ("n", "phi"))
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for n in sizes:
    pts = sorted((phi, *v) for (nn, phi), v in by_phi.items() if nn == n)
    x, mean, std, _, _ = map(np.asarray, zip(*pts))
    ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=f"n={n}")
  ax.set(xlabel="threshold ϕ on r_nll", ylabel="F1", ylim=(0, 1.02),
         title=f"filter F1 vs ϕ at t={t_max} (mean ± std over seeds)")
  ax.legend(fontsize=8)
  paths.append(save_figure(fig, out_dir / "f1_vs_phi.png", _DPI))
  return paths


def _mean_std(stats: tuple[float, float, float, float] | None) -> str | None:
  # Three decimals, fixed, as every number here: F1 and AUROC are in [0, 1], and the std of
  # equal F1s over seeds is ~1e-16, rounding, not a value to show.
  if stats is None:
    return None
  return f"{fmt(stats[0], 3, exponent=False)} ± {fmt(stats[1], 3, exponent=False)}"


def write_sweep_report(cfg: SweepSetup, rows: list[dict[str, Any]], out_dir: Path,
                       plots: list[Path], seconds: dict[str, float], optimizer: str) -> Path:
  """Writes `<out_dir>/report.md`: the optimizer the variants trained with (`optimizer`: the
  run's safety optimizer or the sweep's override), F1 and AUROC per (n, t) over the seeds, the
  best setting, the plots and the time taken; returns its path."""
  auto = str(Threshold.parse(cfg.threshold))
  sizes, steps = sorted(set(cfg.safe_sizes)), sorted(set(cfg.steps))
  f1 = _mean_spread([r for r in rows if r["threshold"] == auto], ("n", "t"))
  area = _mean_spread([r for r in rows if r["threshold"] == auto], ("n", "t"), "auroc")
  lines = ["# ForgetFilter sweep", "",
           f"Run: `{cfg.run_dir}`. Variants: safe sizes {list(sizes)} × seeds {list(cfg.seeds)}, "
           f"scored at t = {steps}; batch {cfg.batch_size}, lr {cfg.optim.learning_rate:g} "
           f"({cfg.optim.schedule}); {cfg.chunk_size} replicas per chunk, vmapped.", "",
           f"Optimizer: {optimizer}.", ""]
  if f1:
    header = ["n", *(f"t={t}" for t in steps)]
    lines += [f"## F1 with the {auto} threshold (mean ± std over seeds)", ""]
    lines += markdown_table(header, [[n, *(_mean_std(f1.get((n, t))) for t in steps)]
                                     for n in sizes])
    lines += ["", "## AUROC of r_nll (mean over seeds)", ""]
    lines += markdown_table(header, [
        [n, *(fmt(area[(n, t)][0], 3, exponent=False) if (n, t) in area else None
              for t in steps)] for n in sizes])
    best = max((r for r in rows if r["f1"] is not None), key=lambda r: r["f1"])
    lines += ["", f"Best single setting: n={best['n']}, seed={best['seed']}, t={best['t']}, "
              f"{best['threshold']} (ϕ={fmt(best['phi'], 3, exponent=False)}): "
              f"F1 {fmt(best['f1'], 3, exponent=False)}, kept {best['kept']}.", ""]
  else:
    lines += ["The noisy set has no labels: only kept/flagged counts are in results.csv.", ""]
  lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
  lines += ["", "## Time", "",
            *(f"- {k}: {fmt(v, 1, exponent=False)}s" for k, v in seconds.items()), ""]
  path = out_dir / "report.md"
  write_atomic(path, "\n".join(lines))
  return path
