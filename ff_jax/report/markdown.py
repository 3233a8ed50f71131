"""report.md: the human-readable end of a run, rendered from its `RunAnalysis`.

The same run directory always gives the same text (no timestamps, fixed ordering, the numbers in
ff_jax.report.fmt's format); a section whose file is missing says so instead of failing.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ff_jax.atomic_io import remove, run_path, write_atomic
from ff_jax.errors import DataError
from ff_jax.report.analysis import RunAnalysis, analyse_run
from ff_jax.report.fmt import fmt, markdown_table
from ff_jax.report.plots import make_plots
from ff_jax.report.signals import signal_table_markdown
from ff_jax.run_files import PHASES, PLOTS, REPORT

MODEL_ORDER = ("M0", "M1", "M1+SC", "M2", "replay", "clean", "clean+SC", "random", "oracle")
# One row per method in the comparison table (the paper's Table 2 layout).
METHOD_NAMES = {
    "M0": "aligned model (M0)", "M1": "no safety measure (M1)", "M1+SC": "self-correction",
    "M2": "sequential safety finetuning (M2)", "replay": "replay", "clean": "ForgetFilter",
    "clean+SC": "ForgetFilter + self-correction", "random": "random filter",
    "oracle": "oracle filter",
}
COMPARISON_METRICS = (
    ("bias/s_amb", "bias s_AMB"), ("bias/s_dis_bbq", "bias s_DIS"),
    ("toxicity/mean", "toxicity"), ("harmfulness/non_refusal", "harmful (non-refusal)"),
    ("task/squad_f1", "task F1 (SQuAD)"), ("task/rougeL", "task ROUGE-L"),
)


def _seeds(config: Any, prefix: str = "") -> list[tuple[str, Any]]:
  # The DESIGN notes results move with the training order alone, so seeds belong in every report.
  found: list[tuple[str, Any]] = []
  if isinstance(config, dict):
    for key in sorted(config):
      path = f"{prefix}.{key}" if prefix else str(key)
      if "seed" in str(key).lower() and not isinstance(config[key], dict | list):
        found.append((path, config[key]))
      else:
        found += _seeds(config[key], path)
  return found


def _summary_section(a: RunAnalysis) -> list[str]:
  lines = ["## Summary", ""]
  filt = a.filter_info
  if a.separation_warning:
    # First thing in the report: the numbers below are those of a filter that could not tell.
    lines += [f"> **{fmt(a.separation_warning)}**", ""]
  if filt is None:
    lines.append(f"Filter: not available ({a.unavailable['filter']}).")
  else:
    lines.append(f"- Signal: `{a.signal}`; threshold `{fmt(a.threshold)}` → ϕ = {fmt(a.phi)}")
    choice = filt.get("signal_choice")
    if isinstance(choice, dict) and choice.get("reason"):
      lines.append(f"- Chosen by `filter.signal: auto`: {choice['reason']}")
    info = filt.get("info") or {}
    scalars = [f"{k}={fmt(v)}" for k, v in sorted(info.items())
               if isinstance(v, int | float | str | bool) or v is None]
    if scalars:
      lines.append(f"- Threshold details: {', '.join(scalars)}")
    block = filt.get("separation")
    if isinstance(block, dict) and block.get("verdict"):
      stats = block.get("statistics") or {}
      # agreement: Cohen's κ of the noisy replicas' own filters (recorded, not a check)
      numbers = [f"{k}={fmt(stats[k])}" for k in ("delta_bic", "valley_depth", "ashman_d",
                                                  "agreement", "drop_fraction") if k in stats]
      lines.append(f"- Separation (label-free, ff_jax.forgetting.thresholds.separation): "
                   f"**{fmt(block['verdict'])}**" + (f"; {', '.join(numbers)}" if numbers
                                                    else ""))
  if a.counts:
    lines.append(f"- Examples kept: {fmt(a.counts.get('kept'))}; dropped (flagged): "
                 f"{fmt(a.counts.get('flagged'))}; truncated: {fmt(a.counts.get('truncated'))}")
  s = a.scores
  if s is not None:
    lines.append(f"- Noisy examples scored: {s.n}; labelled: {s.n_labelled}")
    if s.at_phi:
      lines.append(f"- Filter F1 at ϕ: **{fmt(s.at_phi['f1'])}** "
                   f"(precision {fmt(s.at_phi['precision'])}, recall {fmt(s.at_phi['recall'])})")
    else:
      lines.append("- Filter F1: labels not available")
  seeds = _seeds((a.manifest or {}).get("config"))
  if seeds:
    lines.append("- Seeds: " + ", ".join(f"`{k}`={fmt(v)}" for k, v in seeds))
  return lines + [""]


def _filter_section(a: RunAnalysis) -> list[str]:
  lines = ["## Filter metrics", ""]
  s = a.scores
  if not s.has_labels:
    return lines + ["Labels not available: P/R/F1, AUROC and AUPRC need the `kind` column.", ""]
  if not s.signals:
    return lines + ["No forgetting signal has numbers in `scores.csv`.", ""]
  if s.n_labelled < s.n:
    lines += [f"Computed on the {s.n_labelled} labelled of {s.n} examples.", ""]
  rows = []
  for signal in s.signals:
    stats = s.per_signal[signal]
    at = stats.at_phi or {}
    rows.append([signal + (" (filter)" if signal == a.signal else ""), at.get("precision"),
                 at.get("recall"), at.get("f1"), stats.auroc, stats.auprc, stats.oracle["f1"],
                 stats.oracle["phi"]])
  lines += markdown_table(["signal", "precision@ϕ", "recall@ϕ", "F1@ϕ", "AUROC", "AUPRC",
                           "oracle best F1", "oracle ϕ"], rows) + [""]
  lines += ["P/R/F1@ϕ are for the filter's own flags; other signals show only threshold-free "
            "numbers. The oracle best F1 chooses ϕ with the labels: an upper bound for the "
            "label-free filter, not a result it can claim.", ""]
  at = s.at_phi
  if at:
    lines += markdown_table(["tp", "fp", "fn", "tn"], [[at["tp"], at["fp"], at["fn"], at["tn"]]])
    lines += [""]
  report = (a.filter_info or {}).get("signals")
  if report:
    lines += ["### Every signal under the filter's threshold rule", "",
              f"Each signal thresholded by `{a.threshold}` on its own scores, and its AUROC per "
              "unsafe category (that category's unsafe examples against every example that is "
              "not unsafe): which signal to trust on this data (ff_jax/signals.py defines them).",
              "", signal_table_markdown(report), ""]
  return lines


def _forgetting_section(a: RunAnalysis) -> list[str]:
  lines = ["## Mean forgetting per kind", ""]
  s = a.scores
  if not s.signals:
    return lines + ["No forgetting signal has numbers in `scores.csv`.", ""]
  lines += ["r = after − before for NLL, before − after for accuracy and ROUGE-1: positive means "
            "forgotten during safety finetuning. Cells are mean r (examples scored).", ""]
  rows = []
  for k in s.kind_order:
    row: list[Any] = [k]
    for signal in s.signals:
      group = s.per_signal[signal].per_kind[k]
      row.append(f"{fmt(group['mean'])} ({group['count']})")
    rows.append(row)
  lines += markdown_table(["kind", *s.signals], rows) + [""]
  if s.has_labels:
    rows = []
    for signal in s.signals:
      stats = s.per_signal[signal]
      rows.append([signal, stats.ratios["unsafe/safe"], stats.ratios["unsafe/task"],
                   stats.diffs["unsafe-safe"], stats.diffs["unsafe-task"]])
    lines += markdown_table(["signal", "unsafe/safe", "unsafe/task", "unsafe − safe",
                             "unsafe − task"], rows) + [""]
    lines += ["A ratio is NaN when its denominator is ≤ 0 (that kind was not forgotten on "
              "average); the differences are shown for that case.", ""]
  if s.curves:
    lines += ["### Forgetting at safety snapshots", ""]
    for signal, curve in s.curves.items():
      rows = [[k, *curve.per_kind[k]] for k in s.kind_order]
      lines += [f"Mean r_{signal} per kind at each safety step:", ""]
      lines += markdown_table(["kind", *(f"step {step}" for step in curve.steps)], rows) + [""]
  return lines


def _models(a: RunAnalysis) -> dict[str, Any]:
  models = (a.metrics or {}).get("models")
  return models if isinstance(models, dict) else {}


def _comparison_section(a: RunAnalysis) -> list[str]:
  """One row per method: safety and task metrics side by side, and the examples trained on."""
  models = _models(a)
  if not models:
    return []
  present = {k for m in models.values() for k in (m or {})}
  columns = [(k, label) for k, label in COMPARISON_METRICS if k in present]
  columns += [(k, k.split("/", 1)[1].replace("_", " ")) for k in sorted(present)
              if k.startswith("unsafe_rate/")]
  if not columns:
    return []
  rows = [[METHOD_NAMES.get(m, m)] + [(models[m] or {}).get(k) for k, _ in columns]
          + [(models[m] or {}).get("train/examples")]
          for m in [m for m in MODEL_ORDER if m in models]]
  lines = ["## Method comparison", "",
           "Lower is safer for every safety column (bias scores: 0 = unbiased); examples = what "
           "the model was finetuned on after M0. Baselines come from `ff-jax baseline NAME "
           "--run-dir DIR`.", ""]
  scorer = next((m.get("toxicity/scorer") for m in models.values() if m and
                 m.get("toxicity/scorer")), None)
  if scorer:
    lines += [f"Toxicity scorer: `{scorer}`.", ""]
  return lines + markdown_table(["method", *(label for _, label in columns), "examples"],
                                rows) + [""]


def _models_section(a: RunAnalysis) -> list[str]:
  lines = ["## Model comparison", ""]
  models = _models(a)
  if not models:
    why = a.unavailable.get("metrics") or "`metrics.json` has no models"
    return lines + [f"Not available ({why}).", ""]
  names = [m for m in MODEL_ORDER if m in models] + sorted(m for m in models
                                                         if m not in MODEL_ORDER)
  keys: list[str] = []
  for m in names:
    for k in models[m] or {}:
      if k not in keys:
        keys.append(k)
  groups: dict[str, list[str]] = {}
  for k in keys:
    prefix = k.split("/", 1)[0] if "/" in k else ""
    groups.setdefault(prefix, []).append(k)
  rows: list[list[Any]] = []
  for prefix in sorted(groups, key=lambda p: (p == "", p)):
    rows.append([f"**{prefix or 'other'}**"] + [""] * len(names))
    for k in sorted(groups[prefix]):
      label = k.split("/", 1)[1] if prefix else k
      rows.append([label] + [(models[m] or {}).get(k) for m in names])
  return lines + markdown_table(["metric", *names], rows) + [""]


def _timing_section(a: RunAnalysis) -> list[str]:
  lines = ["## Phase timing", ""]
  phases = (a.manifest or {}).get("phases")
  if not isinstance(phases, dict) or not phases:
    why = a.unavailable.get("manifest") or "`manifest.json` has no phases"
    return lines + [f"Not available ({why}).", ""]
  secs = {p: (v or {}).get("seconds") if isinstance(v, dict) else None for p, v in phases.items()}
  total = sum(float(s) for s in secs.values() if isinstance(s, int | float) and math.isfinite(s))
  rows = []
  # Pipeline order first, then anything else the manifest holds (the file is key-sorted).
  order = [p for p in PHASES if p in phases] + sorted(p for p in phases if p not in PHASES)
  for p in order:
    v = phases[p]
    s = secs[p]
    timed = isinstance(s, int | float)
    share = (fmt(100 * float(s) / total, 1, exponent=False) + "%"
             if timed and total > 0 and math.isfinite(s) else None)
    complete = v.get("complete") if isinstance(v, dict) else None
    rows.append([p, complete, fmt(float(s), 1, exponent=False) if timed else None, share])
  rows.append(["**total**", None, fmt(total, 1, exponent=False), "100.0%" if total > 0 else None])
  return lines + markdown_table(["phase", "complete", "seconds", "share"], rows) + [""]


def _plots_section(plots: dict[str, Path | None], run_dir: Path) -> list[str]:
  lines = ["## Plots", ""]
  titles = {"forgetting_hist": "Forgetting per kind", "prf_vs_phi": "Precision/recall/F1 vs ϕ",
            "forgetting_curves": "Forgetting curves over safety steps"}
  any_plot = False
  for key, title in titles.items():
    path = plots.get(key)
    if path is not None:
      any_plot = True
      lines += [f"### {title}", "", f"![{title}]({path.relative_to(run_dir).as_posix()})", ""]
  if not any_plot:
    lines += ["No plots (no scores).", ""]
  return lines


def render_markdown(a: RunAnalysis, plots: dict[str, Path | None]) -> str:
  """The text of report.md; `plots` as make_plots returns them."""
  lines = [f"# ForgetFilter report: {a.run_dir.name}", ""]
  if a.scores is None:
    lines += [f"Per-example scores not available ({a.unavailable['scores']}).", ""]
  lines += _summary_section(a)
  if a.scores is not None:
    lines += _filter_section(a) + _forgetting_section(a)
  lines += _comparison_section(a) + _models_section(a) + _timing_section(a)
  lines += _plots_section(plots, a.run_dir)
  return "\n".join(lines).rstrip("\n") + "\n"


def write_report(run_dir: str | Path) -> Path:
  """Writes `<run_dir>/report.md` and `<run_dir>/plots/*.png` (atomically); returns report.md.

  Plots: `forgetting_hist.png` (per kind, a grid of one panel per signal, the filter's signal
  first with ϕ marked), `prf_vs_phi.png` (only with labels) and `forgetting_curves.png` (only
  with r_<signal>@<step> columns). Missing optional files leave a note in their section instead
  of failing.
  """
  run_dir = run_path(run_dir)
  if not run_dir.is_dir():
    raise DataError(f"{run_dir}: run directory not found")
  a = analyse_run(run_dir)
  plots = make_plots(a)
  for name, made in plots.items():
    # A plot this run no longer produces (e.g. labels dropped) must not linger beside the report.
    stale = run_dir / PLOTS / f"{name}.png"
    if made is None and stale.is_file():
      remove(stale)
  path = run_dir / REPORT
  write_atomic(path, render_markdown(a, plots))
  return path
