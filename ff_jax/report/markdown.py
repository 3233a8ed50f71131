"""The human-readable end of a run: `report.md` and plots, from the artifacts in a run directory.

Everything here is read back from files the pipeline wrote (`scores.csv`, `filter.json`,
`metrics.json`, `manifest.json`), never from live objects, so `ff-jax report` can regenerate a
report for any finished or half-finished run, and the same files always give the same text
(no timestamps, fixed ordering, fixed number formats). Only `scores.csv` carries the per-example
numbers; the other files are optional and their sections say so when they are missing.

Labels (`kind`) exist only in experiments. Metrics that need them (P/R/F1, AUROC, AUPRC, the oracle
best F1) are computed on the labelled rows only and are left out, with a note, when there are none.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from ff_jax.atomic_io import write_atomic
from ff_jax.errors import DataError
from ff_jax.eval import classification
from ff_jax.forgetting.signals import SIGNALS, signal_table_markdown
from ff_jax.forgetting.thresholds import flag_fixed
from ff_jax.pipeline.layout import BASELINE_NAMES, BASELINES_DIR, PHASES
from ff_jax.report.plots import UNLABELLED, make_plots

KIND_ORDER = ("unsafe", "safe", "task")
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
_TEXT_COLUMNS = ("id", "kind", "category")
_CURVE_RE = re.compile(r"^r_(nll|acc|rouge)@(\d+)$")


# ------------------------------------------------------------------------------------------------
# Reading the run directory


def read_baselines(run_dir: str | Path) -> dict[str, dict[str, Any]]:
  """{name: metrics} of the baselines run so far (`ff-jax baseline`), in the report's order."""
  folder = Path(run_dir) / BASELINES_DIR
  out = {}
  for name in BASELINE_NAMES:
    path = folder / f"{name}.json"
    if path.is_file():
      out[name] = json.loads(path.read_text())["metrics"]
  return out


def load_scores(run_dir: str | Path) -> dict[str, Any]:
  """Reads `<run_dir>/scores.csv` into columns.

  Returns {column: values} for every column in the file: `id` and `category` as lists of str,
  `kind` as a list of str or None (empty = unknown label), `flagged` as a bool array, `tokens` as
  an int64 array (empty = 0) and every other column (nll_*, acc_*, rouge_*, r_*, r_nll@<step>) as a
  float64 array with NaN where the cell is empty (e.g. ROUGE not computed, example not scored).
  Raises DataError naming the file and line for a missing file, header or bad number.
  """
  path = Path(run_dir) / "scores.csv"
  if not path.is_file():
    raise DataError(f"{path}: not found (the scoring phases have not run)")
  with path.open(newline="", encoding="utf-8") as handle:
    reader = csv.reader(handle)
    header = next(reader, None)
    if not header:
      raise DataError(f"{path}: empty file, expected a header line")
    header = [h.strip() for h in header]
    if "id" not in header:
      raise DataError(f"{path}: header has no 'id' column")
    if len(set(header)) != len(header):
      raise DataError(f"{path}: duplicate column names in the header")
    raw: dict[str, list[str]] = {h: [] for h in header}
    for line_no, row in enumerate(reader, start=2):
      if not row:
        continue
      if len(row) != len(header):
        raise DataError(f"{path}:{line_no}: {len(row)} fields, expected {len(header)}")
      for h, cell in zip(header, row):
        raw[h].append(cell.strip())
  out: dict[str, Any] = {}
  for h, cells in raw.items():
    if h in _TEXT_COLUMNS:
      out[h] = [c or None for c in cells] if h == "kind" else list(cells)
    elif h == "flagged":
      out[h] = np.array([_parse_flag(path, h, i, c) for i, c in enumerate(cells)], dtype=bool)
    elif h == "tokens":
      out[h] = np.array([int(_parse_float(path, h, i, c) or 0) for i, c in enumerate(cells)],
                        dtype=np.int64)
    else:
      vals = [_parse_float(path, h, i, c) for i, c in enumerate(cells)]
      out[h] = np.array([math.nan if v is None else v for v in vals], dtype=np.float64)
  return out


def _parse_float(path: Path, column: str, row: int, cell: str) -> float | None:
  if cell == "":
    return None
  try:
    return float(cell)
  except ValueError:
    raise DataError(f"{path}:{row + 2}: column {column!r}: {cell!r} is not a number") from None


def _parse_flag(path: Path, column: str, row: int, cell: str) -> bool:
  text = cell.lower()
  if text in ("1", "true", "1.0"):
    return True
  if text in ("", "0", "false", "0.0"):
    return False
  raise DataError(f"{path}:{row + 2}: column {column!r}: {cell!r} is not 0/1")


def _load_json(path: Path) -> tuple[Any, str | None]:
  """(value, None) or (None, why) — optional files never stop a report."""
  if not path.is_file():
    return None, f"`{path.name}` not found"
  try:
    return json.loads(path.read_text(encoding="utf-8")), None
  except (OSError, ValueError) as e:
    return None, f"`{path.name}` could not be read ({type(e).__name__})"


def curve_columns(scores: dict[str, Any]) -> dict[str, list[tuple[int, str]]]:
  """{signal: [(step, column), ...] sorted by step} for the `r_<signal>@<step>` snapshot columns."""
  curves: dict[str, list[tuple[int, str]]] = {}
  for name in scores:
    m = _CURVE_RE.match(name)
    if m:
      curves.setdefault(m.group(1), []).append((int(m.group(2)), name))
  return {s: sorted(v) for s, v in sorted(curves.items(), key=lambda kv: SIGNALS.index(kv[0]))}


# ------------------------------------------------------------------------------------------------
# Analysis (shared by the report and the CLI summary)


def _signals(scores: dict[str, Any]) -> list[str]:
  # A signal "exists" when its column has at least one number: ROUGE columns are present but empty
  # when generation was not asked for.
  return [s for s in SIGNALS
          if f"r_{s}" in scores and np.isfinite(scores[f"r_{s}"]).any()]


def _kinds(scores: dict[str, Any]) -> list[str]:
  n = len(scores["id"])
  raw = scores.get("kind") or [None] * n
  return [k if k else UNLABELLED for k in raw]


def _kind_order(kinds: list[str]) -> list[str]:
  present = list(dict.fromkeys(kinds))
  known = [k for k in KIND_ORDER if k in present]
  rest = sorted(k for k in present if k not in KIND_ORDER and k != UNLABELLED)
  return known + rest + ([UNLABELLED] if UNLABELLED in present else [])


def _ratio(num: float, den: float) -> float:
  # A ratio against a mean that is ≤ 0 (e.g. safe examples *learned* during safety finetuning,
  # common for NLL) has no "times more forgotten" reading and flips sign, so it is left undefined;
  # the difference is reported beside it and is always meaningful.
  if not (math.isfinite(num) and math.isfinite(den)) or den <= 0:
    return math.nan
  return num / den


def _phi(filter_info: dict[str, Any] | None) -> float:
  if not filter_info or filter_info.get("phi") is None:
    return math.nan
  try:
    return float(filter_info["phi"])
  except (TypeError, ValueError):
    return math.nan


def _analyse(run_dir: Path) -> dict[str, Any]:
  """All numbers the report shows, computed once."""
  a: dict[str, Any] = {"run_dir": run_dir, "notes": {}}
  a["filter"], a["notes"]["filter"] = _load_json(run_dir / "filter.json")
  a["metrics"], a["notes"]["metrics"] = _load_json(run_dir / "metrics.json")
  baselines = read_baselines(run_dir)
  if baselines and isinstance(a["metrics"], dict) and isinstance(a["metrics"].get("models"), dict):
    a["metrics"]["models"].update(baselines)
  a["manifest"], a["notes"]["manifest"] = _load_json(run_dir / "manifest.json")
  filt = a["filter"] if isinstance(a["filter"], dict) else None
  a["signal"] = (filt or {}).get("signal") or "nll"
  a["phi"] = _phi(filt)
  a["threshold"] = (filt or {}).get("threshold")
  if not (run_dir / "scores.csv").is_file():
    a["scores"] = None
    a["notes"]["scores"] = "`scores.csv` not found"
    return a
  scores = load_scores(run_dir)
  a["scores"] = scores
  n = len(scores["id"])
  a["n"] = n
  kinds = _kinds(scores)
  a["kinds"] = kinds
  a["kind_order"] = _kind_order(kinds)
  a["signals"] = _signals(scores)
  labelled = np.array([k != UNLABELLED for k in kinds], dtype=bool)
  a["n_labelled"] = int(labelled.sum())
  a["labels"] = bool(labelled.any())
  is_unsafe = np.array([k == "unsafe" for k in kinds], dtype=bool)

  if "flagged" in scores:
    flags = scores["flagged"]
  elif f"r_{a['signal']}" in scores and math.isfinite(a["phi"]):
    flags = flag_fixed(scores[f"r_{a['signal']}"], a["phi"])
  else:
    flags = np.zeros(n, dtype=bool)
  counts = dict((filt or {}).get("counts") or {})
  a["counts"] = {"flagged": counts.get("flagged", int(flags.sum())),
                 "kept": counts.get("kept", int(n - flags.sum())),
                 "truncated": counts.get("truncated")}

  per_signal: dict[str, dict[str, Any]] = {}
  for s in a["signals"]:
    r = scores[f"r_{s}"]
    entry: dict[str, Any] = {"n_nan": int(np.isnan(r).sum())}
    groups = classification.per_group_mean(r, kinds)
    entry["per_kind"] = {k: groups[k] for k in a["kind_order"]}
    mean = {k: float(v["mean"]) for k, v in groups.items()}
    unsafe = mean.get("unsafe", math.nan)
    entry["ratios"] = {f"unsafe/{other}": _ratio(unsafe, mean.get(other, math.nan))
                       for other in ("safe", "task")}
    entry["diffs"] = {f"unsafe-{other}": unsafe - mean.get(other, math.nan)
                      for other in ("safe", "task")}
    if a["labels"]:
      r_l, y_l = r[labelled], is_unsafe[labelled]
      entry["auroc"] = classification.auroc(r_l, y_l)
      entry["auprc"] = classification.auprc(r_l, y_l)
      entry["oracle"] = classification.best_f1(r_l, y_l)
      if s == a["signal"]:
        entry["at_phi"] = classification.filter_metrics(flags[labelled], y_l)
    per_signal[s] = entry
  a["per_signal"] = per_signal
  if a["labels"] and a["signal"] not in per_signal:
    # The filter's signal column is missing or empty, but the flags themselves can still be scored.
    a["at_phi"] = classification.filter_metrics(flags[labelled], is_unsafe[labelled])
  else:
    a["at_phi"] = per_signal.get(a["signal"], {}).get("at_phi")

  curves = curve_columns(scores)
  a["curves"] = {}
  for s, cols in curves.items():
    means = [classification.per_group_mean(scores[c], kinds) for _, c in cols]
    a["curves"][s] = {"steps": [step for step, _ in cols],
                      "per_kind": {k: [m[k]["mean"] for m in means] for k in a["kind_order"]}}
  a["flags"] = flags
  a["is_unsafe"] = is_unsafe
  a["labelled"] = labelled
  return a


def _separation_text(filt: Any) -> str | None:
  """The warning for a filter.json whose `separation` verdict is "no separation", else None."""
  block = filt.get("separation") if isinstance(filt, dict) else None
  if not isinstance(block, dict) or block.get("verdict") in (None, "separated"):
    return None
  reasons = "; ".join(str(r) for r in block.get("reasons") or []) or "no reason recorded"
  counts = filt.get("counts") or {}
  flagged, kept = counts.get("flagged"), counts.get("kept")
  dropped = (f"it dropped {flagged} of {flagged + kept} examples anyway"
             if isinstance(flagged, int) and isinstance(kept, int) else "it filtered anyway")
  return (f"WARNING: no separation: the filter cannot tell two groups apart in "
          f"filter.signal={filt.get('signal')} ({reasons}); {dropped} "
          "(filter.on_no_separation=warn). Check scores.csv, try another filter.signal or "
          "filter.threshold, or set filter.on_no_separation=refuse to stop instead.")


def separation_warning(run_dir: str | Path) -> str | None:
  """The loud one-line warning of a run whose filter found no separation in its scores (from
  `filter.json`'s `separation` block; ff_jax.forgetting.thresholds.separation), or None:
  separated, or no filter.json (yet, or written before the check existed)."""
  filt, _ = _load_json(Path(run_dir) / "filter.json")
  return _separation_text(filt)


def summary_figures(run_dir: str | Path) -> dict[str, Any]:
  """The headline numbers of a run, for the CLI to print (NaN/None where not available).

  Keys: signal, threshold, phi, separation (the verdict, None before the check existed), kept,
  flagged, truncated, labels (bool), precision, recall, f1, auroc, auprc, oracle_f1 (for the
  filter's signal), mean_forgetting {signal: {kind: mean}}, ratios {signal: {"unsafe/safe": x,
  "unsafe/task": y}}.
  """
  a = _analyse(Path(run_dir))
  block = (a["filter"] or {}).get("separation") if isinstance(a["filter"], dict) else None
  out: dict[str, Any] = {"signal": a["signal"], "threshold": a["threshold"], "phi": a["phi"],
                         "separation": block.get("verdict") if isinstance(block, dict) else None,
                         "labels": bool(a.get("labels", False))}
  counts = a.get("counts") or dict((a["filter"] or {}).get("counts") or {})
  for key in ("kept", "flagged", "truncated"):
    out[key] = counts.get(key)
  at_phi = a.get("at_phi") or {}
  main = (a.get("per_signal") or {}).get(a["signal"], {})
  for key in ("precision", "recall", "f1"):
    out[key] = float(at_phi[key]) if key in at_phi else math.nan
  out["auroc"] = float(main.get("auroc", math.nan))
  out["auprc"] = float(main.get("auprc", math.nan))
  out["oracle_f1"] = float(main.get("oracle", {}).get("f1", math.nan))
  out["mean_forgetting"] = {s: {k: float(v["mean"]) for k, v in e["per_kind"].items()}
                            for s, e in (a.get("per_signal") or {}).items()}
  out["ratios"] = {s: dict(e["ratios"]) for s, e in (a.get("per_signal") or {}).items()}
  return out


# ------------------------------------------------------------------------------------------------
# Markdown


def _fmt(x: Any, digits: int = 4) -> str:
  if x is None:
    return "—"
  if isinstance(x, bool | np.bool_):
    return "yes" if x else "no"
  if isinstance(x, int | np.integer):
    return str(int(x))
  if isinstance(x, float | np.floating):
    x = float(x)
    if math.isnan(x):
      return "NaN"
    if math.isinf(x):
      return "+inf" if x > 0 else "-inf"
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 10 ** -digits):
      return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}f}"
  return str(x).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
  lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
  return lines + [""]


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


def _summary_section(a: dict[str, Any]) -> list[str]:
  lines = ["## Summary", ""]
  filt = a["filter"] if isinstance(a["filter"], dict) else None
  warning = _separation_text(filt)
  if warning:
    # First thing in the report: the numbers below are those of a filter that could not tell.
    lines += [f"> **{_fmt(warning)}**", ""]
  if filt is None:
    lines.append(f"Filter: not available ({a['notes']['filter']}).")
  else:
    lines.append(f"- Signal: `{a['signal']}`; threshold `{_fmt(a['threshold'])}` → "
                 f"ϕ = {_fmt(a['phi'])}")
    info = filt.get("info") or {}
    scalars = [f"{k}={_fmt(v)}" for k, v in sorted(info.items())
               if isinstance(v, int | float | str | bool) or v is None]
    if scalars:
      lines.append(f"- Threshold details: {', '.join(scalars)}")
    block = filt.get("separation")
    if isinstance(block, dict) and block.get("verdict"):
      stats = block.get("statistics") or {}
      numbers = [f"{k}={_fmt(stats[k])}" for k in ("delta_bic", "valley_depth", "ashman_d",
                                                   "drop_fraction") if k in stats]
      lines.append(f"- Separation (label-free, ff_jax.forgetting.thresholds.separation): "
                   f"**{_fmt(block['verdict'])}**" + (f"; {', '.join(numbers)}" if numbers
                                                     else ""))
  counts = a.get("counts") or dict((filt or {}).get("counts") or {})
  if counts:
    lines.append(f"- Examples kept: {_fmt(counts.get('kept'))}; dropped (flagged): "
                 f"{_fmt(counts.get('flagged'))}; truncated: {_fmt(counts.get('truncated'))}")
  if a.get("scores") is not None:
    lines.append(f"- Noisy examples scored: {a['n']}; labelled: {a['n_labelled']}")
  at_phi = a.get("at_phi")
  if at_phi:
    lines.append(f"- Filter F1 at ϕ: **{_fmt(at_phi['f1'])}** "
                 f"(precision {_fmt(at_phi['precision'])}, recall {_fmt(at_phi['recall'])})")
  elif a.get("scores") is not None:
    lines.append("- Filter F1: labels not available")
  manifest = a["manifest"] if isinstance(a["manifest"], dict) else {}
  seeds = _seeds(manifest.get("config"))
  if seeds:
    lines.append("- Seeds: " + ", ".join(f"`{k}`={_fmt(v)}" for k, v in seeds))
  return lines + [""]


def _filter_section(a: dict[str, Any]) -> list[str]:
  lines = ["## Filter metrics", ""]
  if not a.get("labels"):
    return lines + ["Labels not available: P/R/F1, AUROC and AUPRC need the `kind` column.", ""]
  if not a["signals"]:
    return lines + ["No forgetting signal has numbers in `scores.csv`.", ""]
  if a["n_labelled"] < a["n"]:
    lines += [f"Computed on the {a['n_labelled']} labelled of {a['n']} examples.", ""]
  rows = []
  for s in a["signals"]:
    e = a["per_signal"][s]
    at = e.get("at_phi") or {}
    oracle = e["oracle"]
    rows.append([s + (" (filter)" if s == a["signal"] else ""), at.get("precision"),
                 at.get("recall"), at.get("f1"), e["auroc"], e["auprc"], oracle["f1"],
                 oracle["phi"]])
  lines += _table(["signal", "precision@ϕ", "recall@ϕ", "F1@ϕ", "AUROC", "AUPRC",
                   "oracle best F1", "oracle ϕ"], rows)
  lines += ["P/R/F1@ϕ are for the filter's own flags; other signals show only threshold-free "
            "numbers. The oracle best F1 chooses ϕ with the labels: an upper bound for the "
            "label-free filter, not a result it can claim.", ""]
  at = a.get("at_phi")
  if at:
    lines += _table(["tp", "fp", "fn", "tn"], [[at["tp"], at["fp"], at["fn"], at["tn"]]])
  report = (a["filter"] or {}).get("signals") if isinstance(a["filter"], dict) else None
  if report:
    lines += ["### Every signal under the filter's threshold rule", "",
              f"Each signal thresholded by `{a['threshold']}` on its own scores, and its AUROC per "
              "unsafe category (that category's unsafe examples against every example that is "
              "not unsafe): which signal to trust on this data (ff_jax/signals.py defines them).",
              "", signal_table_markdown(report), ""]
  return lines


def _forgetting_section(a: dict[str, Any]) -> list[str]:
  lines = ["## Mean forgetting per kind", ""]
  if not a["signals"]:
    return lines + ["No forgetting signal has numbers in `scores.csv`.", ""]
  lines += ["r = after − before for NLL, before − after for accuracy and ROUGE-1: positive means "
            "forgotten during safety finetuning. Cells are mean r (examples scored).", ""]
  rows = []
  for k in a["kind_order"]:
    row: list[Any] = [k]
    for s in a["signals"]:
      g = a["per_signal"][s]["per_kind"][k]
      row.append(f"{_fmt(g['mean'])} ({g['count']})")
    rows.append(row)
  lines += _table(["kind"] + a["signals"], rows)
  if a.get("labels"):
    rows = []
    for s in a["signals"]:
      e = a["per_signal"][s]
      rows.append([s, e["ratios"]["unsafe/safe"], e["ratios"]["unsafe/task"],
                   e["diffs"]["unsafe-safe"], e["diffs"]["unsafe-task"]])
    lines += _table(["signal", "unsafe/safe", "unsafe/task", "unsafe − safe", "unsafe − task"],
                    rows)
    lines += ["A ratio is NaN when its denominator is ≤ 0 (that kind was not forgotten on "
              "average); the differences are shown for that case.", ""]
  if a["curves"]:
    lines += ["### Forgetting at safety snapshots", ""]
    for s, c in a["curves"].items():
      rows = [[k] + c["per_kind"][k] for k in a["kind_order"]]
      lines += [f"Mean r_{s} per kind at each safety step:", ""]
      lines += _table(["kind"] + [f"step {st}" for st in c["steps"]], rows)
  return lines


def _comparison_section(a: dict[str, Any]) -> list[str]:
  """One row per method: safety and task metrics side by side, and the examples trained on."""
  metrics = a["metrics"]
  models = metrics.get("models") if isinstance(metrics, dict) else None
  if not isinstance(models, dict) or not models:
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
           "RUN_DIR`.", ""]
  scorer = next((m.get("toxicity/scorer") for m in models.values() if m and
                 m.get("toxicity/scorer")), None)
  if scorer:
    lines += [f"Toxicity scorer: `{scorer}`.", ""]
  return lines + _table(["method", *(label for _, label in columns), "examples"], rows)


def _models_section(a: dict[str, Any]) -> list[str]:
  lines = ["## Model comparison", ""]
  metrics = a["metrics"]
  models = metrics.get("models") if isinstance(metrics, dict) else None
  if not isinstance(models, dict) or not models:
    why = a["notes"]["metrics"] or "`metrics.json` has no models"
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
  lines += _table(["metric"] + names, rows)
  return lines


def _timing_section(a: dict[str, Any]) -> list[str]:
  lines = ["## Phase timing", ""]
  manifest = a["manifest"]
  phases = manifest.get("phases") if isinstance(manifest, dict) else None
  if not isinstance(phases, dict) or not phases:
    why = a["notes"]["manifest"] or "`manifest.json` has no phases"
    return lines + [f"Not available ({why}).", ""]
  secs = {p: (v or {}).get("seconds") if isinstance(v, dict) else None for p, v in phases.items()}
  total = sum(float(s) for s in secs.values() if isinstance(s, int | float) and math.isfinite(s))
  rows = []
  # Pipeline order first, then anything else the manifest holds (the file is key-sorted).
  order = [p for p in PHASES if p in phases] + sorted(p for p in phases if p not in PHASES)
  for p in order:
    v = phases[p]
    s = secs[p]
    share = (f"{100 * float(s) / total:.1f}%" if isinstance(s, int | float) and total > 0
             and math.isfinite(s) else None)
    complete = v.get("complete") if isinstance(v, dict) else None
    rows.append([p, complete, f"{float(s):.1f}" if isinstance(s, int | float) else None, share])
  rows.append(["**total**", None, f"{total:.1f}", "100.0%" if total > 0 else None])
  return lines + _table(["phase", "complete", "seconds", "share"], rows)


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


def render_markdown(a: dict[str, Any], plots: dict[str, Path | None]) -> str:
  run_dir = a["run_dir"]
  lines = [f"# ForgetFilter report: {run_dir.name}", ""]
  if a.get("scores") is None:
    lines += [f"Per-example scores not available ({a['notes']['scores']}).", ""]
  lines += _summary_section(a)
  if a.get("scores") is not None:
    lines += _filter_section(a) + _forgetting_section(a)
  lines += _comparison_section(a) + _models_section(a) + _timing_section(a)
  lines += _plots_section(plots, run_dir)
  return "\n".join(lines).rstrip("\n") + "\n"


# ------------------------------------------------------------------------------------------------
# Entry point


def write_report(run_dir: str | Path) -> Path:
  """Writes `<run_dir>/report.md` and `<run_dir>/plots/*.png` (atomically); returns report.md.

  Plots: `forgetting_hist.png` (per kind, one panel per signal, ϕ on the filter's signal),
  `prf_vs_phi.png` (only with labels) and `forgetting_curves.png` (only with r_<signal>@<step>
  columns). Missing optional files leave a note in their section instead of failing.
  """
  run_dir = Path(run_dir)
  if not run_dir.is_dir():
    raise DataError(f"{run_dir}: run directory not found")
  a = _analyse(run_dir)
  plots = make_plots(a)
  for name, made in plots.items():
    # A plot this run no longer produces (e.g. labels dropped) must not linger beside the report.
    stale = run_dir / "plots" / f"{name}.png"
    if made is None and stale.is_file():
      stale.unlink()
  path = run_dir / "report.md"
  write_atomic(path, render_markdown(a, plots))
  return path
