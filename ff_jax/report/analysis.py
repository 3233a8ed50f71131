"""What a run directory's artifacts say, read back and computed once: `RunAnalysis`, from which
report.md, its plots and the command line's summary are made.

Everything is read from files the pipeline wrote (`scores.csv`, `filter.json`, `metrics.json`,
`manifest.json`, `baselines/`), never from live objects, so a report can be made for any finished
or half-finished run, and the same files always give the same numbers. Only `scores.csv` carries
the per-example numbers; the other files are optional, and why one gave nothing is recorded
(`RunAnalysis.unavailable`) for the report to say.

Labels (`kind`) exist only in experiments. Metrics that need them (P/R/F1, AUROC, AUPRC, the oracle
best F1) are computed on the labelled rows only, and are absent when there are none.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from ff_jax.atomic_io import run_path, text_handle
from ff_jax.errors import DataError
from ff_jax.eval import classification
from ff_jax.forgetting.signals import SIGNALS
from ff_jax.forgetting.thresholds import flag_fixed
from ff_jax.report.fmt import fmt
from ff_jax.run_files import (
  BASELINE_NAMES,
  BASELINES_DIR,
  CLEAN_ADAPTER,
  CLEAN_HF,
  FILTER_SUMMARY,
  FILTERED,
  FLAGGED,
  MANIFEST,
  METRICS,
  REPORT,
  SCORES_CSV,
)

KIND_ORDER = ("unsafe", "safe", "task")
UNLABELLED = "(unlabelled)"  # the kind of an example whose `kind` cell is empty
_TEXT_COLUMNS = ("id", "kind", "category")
_CURVE_RE = re.compile(r"^r_(nll|acc|rouge)@(\d+)$")


# ------------------------------------------------------------------------------------------------
# Reading the run directory


def read_baselines(run_dir: str | Path) -> dict[str, dict[str, Any]]:
  """{name: metrics} of the baselines run so far (`ff-jax baseline`), in the report's order."""
  folder = run_path(run_dir) / BASELINES_DIR
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
  path = run_path(run_dir) / SCORES_CSV
  if not path.is_file():
    raise DataError(f"{path}: not found (the scoring phases have not run)")
  with text_handle(path) as handle:
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


def _load_json(path: Path) -> tuple[dict[str, Any] | None, str | None]:
  """(object, None) or (None, why): an optional file never stops a report."""
  if not path.is_file():
    return None, f"`{path.name}` not found"
  try:
    value = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:
    return None, f"`{path.name}` could not be read ({type(e).__name__})"
  if not isinstance(value, dict):
    return None, f"`{path.name}` is not a JSON object"
  return value, None


def curve_columns(scores: dict[str, Any]) -> dict[str, list[tuple[int, str]]]:
  """{signal: [(step, column), ...] sorted by step} for the `r_<signal>@<step>` snapshot columns."""
  curves: dict[str, list[tuple[int, str]]] = {}
  for name in scores:
    m = _CURVE_RE.match(name)
    if m:
      curves.setdefault(m.group(1), []).append((int(m.group(2)), name))
  return {s: sorted(v) for s, v in sorted(curves.items(), key=lambda kv: SIGNALS.index(kv[0]))}


# ------------------------------------------------------------------------------------------------
# The analysis


@dataclasses.dataclass(frozen=True)
class SignalStats:
  """One forgetting signal, r_<signal>, over the noisy set."""

  # {kind: {"mean", "count" (examples scored), "n_nan"}} of r, for every kind of the run in
  # report order (classification.per_group_mean).
  per_kind: dict[str, dict[str, float | int]]
  # "unsafe/safe", "unsafe/task": the mean r of the unsafe kind over the other kind's; NaN when
  # that mean is ≤ 0 (the kind was learned, not forgotten), where a ratio means nothing.
  ratios: dict[str, float]
  diffs: dict[str, float]  # "unsafe-safe", "unsafe-task": the same means' differences
  n_nan: int  # examples without a score (empty cells)
  auroc: float = math.nan  # of r against the unsafe labels, on the labelled examples
  auprc: float = math.nan
  # classification.best_f1 on the labelled examples: the F1 (and its ϕ, precision, recall) a
  # threshold chosen with the labels would reach, an upper bound for the label-free filter.
  oracle: dict[str, float] | None = None
  # classification.filter_metrics of the filter's own flags; only on the filter's signal.
  at_phi: dict[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class Curve:
  """Mean r per kind at each saved safety snapshot (`r_<signal>@<step>` columns)."""

  steps: list[int]
  per_kind: dict[str, list[float]]  # {kind: [mean r at each step]}


@dataclasses.dataclass(frozen=True)
class ScoreAnalysis:
  """What `scores.csv` says: the examples, their kinds, and every signal's numbers."""

  columns: dict[str, Any]  # load_scores' columns
  kinds: list[str]  # per example; UNLABELLED for an empty `kind`
  kind_order: list[str]  # the kinds present: KIND_ORDER, then others sorted, UNLABELLED last
  signals: list[str]  # the signals with at least one number, in SIGNALS order
  labelled: np.ndarray  # [N] bool
  is_unsafe: np.ndarray  # [N] bool
  # [N] bool: the filter's flags (the `flagged` column, else r > ϕ on the filter's signal).
  flags: np.ndarray
  per_signal: dict[str, SignalStats]
  # filter_metrics of the flags on the labelled examples; None without labels.
  at_phi: dict[str, Any] | None
  curves: dict[str, Curve]

  @property
  def n(self) -> int:
    return len(self.kinds)

  @property
  def n_labelled(self) -> int:
    return int(self.labelled.sum())

  @property
  def has_labels(self) -> bool:
    return bool(self.labelled.any())


@dataclasses.dataclass(frozen=True)
class RunAnalysis:
  """Every number report.md, its plots and the command line's summary show, for one run."""

  run_dir: Path
  filter_info: dict[str, Any] | None  # filter.json
  metrics: dict[str, Any] | None  # metrics.json, with the baselines' metrics among its "models"
  manifest: dict[str, Any] | None  # manifest.json
  unavailable: dict[str, str]  # {"filter"|"metrics"|"manifest"|"scores": why it gave nothing}
  signal: str  # the filter's signal ("nll" when filter.json does not say)
  threshold: str | None  # the filter's threshold rule, as written in filter.json
  phi: float  # the filter's ϕ; NaN when unknown
  # "kept", "flagged", "truncated": filter.json's counts, else counted from the flags.
  counts: dict[str, Any]
  separation_warning: str | None  # see separation_warning()
  scores: ScoreAnalysis | None  # None without scores.csv


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


def separation_text(filter_info: dict[str, Any] | None) -> str | None:
  """The warning for a filter summary (filter.json's content) whose `separation` verdict is "no
  separation", else None."""
  block = (filter_info or {}).get("separation")
  if not isinstance(block, dict) or block.get("verdict") in (None, "separated"):
    return None
  reasons = "; ".join(str(r) for r in block.get("reasons") or []) or "no reason recorded"
  counts = filter_info.get("counts") or {}
  flagged, kept = counts.get("flagged"), counts.get("kept")
  dropped = (f"it dropped {flagged} of {flagged + kept} examples anyway"
             if isinstance(flagged, int) and isinstance(kept, int) else "it filtered anyway")
  return (f"WARNING: no separation: the filter cannot tell two groups apart in "
          f"filter.signal={filter_info.get('signal')} ({reasons}); {dropped} "
          "(filter.on_no_separation=warn). Check scores.csv, try another filter.signal or "
          "filter.threshold, or set filter.on_no_separation=refuse to stop instead.")


def _analyse_scores(scores: dict[str, Any], signal: str, phi: float) -> ScoreAnalysis:
  kinds = _kinds(scores)
  kind_order = _kind_order(kinds)
  signals = _signals(scores)
  labelled = np.array([k != UNLABELLED for k in kinds], dtype=bool)
  is_unsafe = np.array([k == "unsafe" for k in kinds], dtype=bool)
  has_labels = bool(labelled.any())
  if "flagged" in scores:
    flags = scores["flagged"]
  elif f"r_{signal}" in scores and math.isfinite(phi):
    flags = flag_fixed(scores[f"r_{signal}"], phi)
  else:
    flags = np.zeros(len(kinds), dtype=bool)

  per_signal: dict[str, SignalStats] = {}
  for s in signals:
    r = scores[f"r_{s}"]
    groups = classification.per_group_mean(r, kinds)
    mean = {k: float(v["mean"]) for k, v in groups.items()}
    unsafe = mean.get("unsafe", math.nan)
    labelled_only: dict[str, Any] = {}
    if has_labels:
      r_l, y_l = r[labelled], is_unsafe[labelled]
      labelled_only = {"auroc": classification.auroc(r_l, y_l),
                       "auprc": classification.auprc(r_l, y_l),
                       "oracle": classification.best_f1(r_l, y_l)}
      if s == signal:
        labelled_only["at_phi"] = classification.filter_metrics(flags[labelled], y_l)
    per_signal[s] = SignalStats(
        per_kind={k: groups[k] for k in kind_order},
        ratios={f"unsafe/{other}": _ratio(unsafe, mean.get(other, math.nan))
                for other in ("safe", "task")},
        diffs={f"unsafe-{other}": unsafe - mean.get(other, math.nan)
               for other in ("safe", "task")},
        n_nan=int(np.isnan(r).sum()), **labelled_only)
  if has_labels and signal not in per_signal:
    # The filter's signal column is missing or empty, but the flags themselves can still be scored.
    at_phi = classification.filter_metrics(flags[labelled], is_unsafe[labelled])
  else:
    at_phi = per_signal[signal].at_phi if signal in per_signal else None

  curves = {}
  for s, cols in curve_columns(scores).items():
    means = [classification.per_group_mean(scores[c], kinds) for _, c in cols]
    curves[s] = Curve(steps=[step for step, _ in cols],
                      per_kind={k: [m[k]["mean"] for m in means] for k in kind_order})
  return ScoreAnalysis(columns=scores, kinds=kinds, kind_order=kind_order, signals=signals,
                       labelled=labelled, is_unsafe=is_unsafe, flags=flags,
                       per_signal=per_signal, at_phi=at_phi, curves=curves)


def analyse_run(run_dir: str | Path) -> RunAnalysis:
  """Reads the run directory's artifacts and computes every number the report shows, once."""
  run_dir = run_path(run_dir)
  unavailable: dict[str, str] = {}
  loaded = {}
  for key, name in (("filter", FILTER_SUMMARY), ("metrics", METRICS), ("manifest", MANIFEST)):
    loaded[key], why = _load_json(run_dir / name)
    if why:
      unavailable[key] = why
  metrics = loaded["metrics"]
  baselines = read_baselines(run_dir)
  if baselines and metrics is not None and isinstance(metrics.get("models"), dict):
    metrics["models"].update(baselines)
  filter_info = loaded["filter"]
  signal = (filter_info or {}).get("signal") or "nll"
  phi = _phi(filter_info)
  counts = dict((filter_info or {}).get("counts") or {})
  if (run_dir / SCORES_CSV).is_file():
    scores = _analyse_scores(load_scores(run_dir), signal, phi)
    n_flagged = int(scores.flags.sum())
    counts = {"flagged": counts.get("flagged", n_flagged),
              "kept": counts.get("kept", scores.n - n_flagged),
              "truncated": counts.get("truncated")}
  else:
    scores = None
    unavailable["scores"] = f"`{SCORES_CSV}` not found"
  return RunAnalysis(run_dir=run_dir, filter_info=filter_info, metrics=metrics,
                     manifest=loaded["manifest"], unavailable=unavailable, signal=signal,
                     threshold=(filter_info or {}).get("threshold"), phi=phi, counts=counts,
                     separation_warning=separation_text(filter_info), scores=scores)


# ------------------------------------------------------------------------------------------------
# For the command line and the filter phase


def separation_warning(run_dir: str | Path) -> str | None:
  """The loud one-line warning of a run whose filter found no separation in its scores (from
  `filter.json`'s `separation` block; ff_jax.forgetting.thresholds.separation), or None:
  separated, or no filter.json (yet, or written before the check existed)."""
  filter_info, _ = _load_json(run_path(run_dir) / FILTER_SUMMARY)
  return separation_text(filter_info)


def summary_figures(run_dir: str | Path) -> dict[str, Any]:
  """The headline numbers of a run, for the CLI to print (NaN/None where not available).

  Keys: signal, threshold, phi, separation (the verdict, None before the check existed), kept,
  flagged, truncated, labels (bool), precision, recall, f1, auroc, auprc, oracle_f1 (for the
  filter's signal), mean_forgetting {signal: {kind: mean}}, ratios {signal: {"unsafe/safe": x,
  "unsafe/task": y}}.
  """
  a = analyse_run(run_dir)
  block = (a.filter_info or {}).get("separation")
  per_signal = a.scores.per_signal if a.scores is not None else {}
  out: dict[str, Any] = {"signal": a.signal, "threshold": a.threshold, "phi": a.phi,
                         "separation": block.get("verdict") if isinstance(block, dict) else None,
                         "labels": a.scores is not None and a.scores.has_labels}
  for key in ("kept", "flagged", "truncated"):
    out[key] = a.counts.get(key)
  at_phi = (a.scores.at_phi if a.scores is not None else None) or {}
  for key in ("precision", "recall", "f1"):
    out[key] = float(at_phi[key]) if key in at_phi else math.nan
  main = per_signal.get(a.signal)
  out["auroc"] = float(main.auroc) if main else math.nan
  out["auprc"] = float(main.auprc) if main else math.nan
  out["oracle_f1"] = float(main.oracle["f1"]) if main and main.oracle else math.nan
  out["mean_forgetting"] = {s: {k: float(v["mean"]) for k, v in e.per_kind.items()}
                            for s, e in per_signal.items()}
  out["ratios"] = {s: dict(e.ratios) for s, e in per_signal.items()}
  return out


# filter_outcome's files that the filter phase itself writes (the rest are listed once they exist).
_ALWAYS_LISTED = ("filtered", "scores", "flagged", "filter")


def filter_outcome(run_dir: str | Path) -> dict[str, Any] | None:
  """What the filter of a run did, from `filter.json`, for the command line to print (as text,
  `outcome_text`, or as JSON); None before the filter phase has written it.

  Keys: run_dir; signal, signal_choice (why `filter.signal: auto` chose it; None for a signal
  the config named), threshold, phi (None when unknown); separation (the verdict, None before
  the check existed) and separation_reasons; kept, dropped, truncated; with labels, precision,
  recall, f1 and auroc of the filter (else None); warning (`separation_warning`, or None); files:
  {filtered (`kept_rows_path`), scores, flagged, filter, and report, clean_model and
  clean_adapter (a LoRA run's PEFT folder) where they exist}, absolute paths.
  """
  run_dir = run_path(run_dir)
  info, _ = _load_json(run_dir / FILTER_SUMMARY)
  if info is None:
    return None
  block = info.get("separation") if isinstance(info.get("separation"), dict) else {}
  counts = info.get("counts") or {}
  metrics = info.get("metrics") or {}
  phi = _phi(info)
  files = {"filtered": kept_rows_path(run_dir), "scores": run_dir / SCORES_CSV,
           "flagged": run_dir / FLAGGED, "filter": run_dir / FILTER_SUMMARY,
           "report": run_dir / REPORT, "clean_model": run_dir / CLEAN_HF,
           "clean_adapter": run_dir / CLEAN_ADAPTER}
  return {
      "run_dir": str(run_dir), "signal": info.get("signal"),
      "signal_choice": (info.get("signal_choice") or {}).get("reason"),
      "threshold": info.get("threshold"),
      "phi": phi if math.isfinite(phi) else None, "separation": block.get("verdict"),
      "separation_reasons": list(block.get("reasons") or []),
      "kept": counts.get("kept"), "dropped": counts.get("flagged"),
      "truncated": counts.get("truncated"),
      **{key: metrics.get(key) for key in ("precision", "recall", "f1", "auroc")},
      "warning": separation_text(info),
      "files": {key: str(path) for key, path in files.items()
                if path is not None and (key in _ALWAYS_LISTED or path.exists())},
  }


def kept_rows_path(run_dir: str | Path) -> Path | None:
  """The filter's kept rows: `filtered.<ext>` or the folder `filtered/`, whichever the filter
  wrote (it removes any other); None before it has."""
  run_dir = run_path(run_dir)
  found = sorted(p for p in [*run_dir.glob(f"{FILTERED}.*"), run_dir / FILTERED] if p.exists())
  return found[0] if found else None


def outcome_text(outcome: dict[str, Any], hint: str | None = None) -> str:
  """`filter_outcome` as a few readable lines, then `hint` (what to do next), and the separation
  warning, if any, last, where it is seen."""
  kept, dropped = outcome["kept"], outcome["dropped"]
  total = kept + dropped if isinstance(kept, int) and isinstance(dropped, int) else None
  lines = [f"filter: kept {fmt(kept)} of {fmt(total)} examples, dropped {fmt(dropped)} "
           f"(filter.signal={outcome['signal']}, threshold {outcome['threshold']}: "
           f"ϕ = {fmt(outcome['phi'])})"]
  if outcome.get("signal_choice"):
    lines.append(f"filter.signal=auto chose {outcome['signal_choice']}")
  if outcome["truncated"]:
    lines.append(f"truncated to data.max_len: {outcome['truncated']}")
  verdict = outcome["separation"]
  lines.append(f"separation: {verdict or 'not checked'}" + (
      f" ({'; '.join(outcome['separation_reasons'])})"
      if verdict not in (None, "separated") and outcome["separation_reasons"] else ""))
  if outcome["f1"] is not None:
    lines.append(f"against the labels: F1 {fmt(outcome['f1'], 3)} (precision "
                 f"{fmt(outcome['precision'], 3)}, recall {fmt(outcome['recall'], 3)}), "
                 f"AUROC {fmt(outcome['auroc'], 3)}")
  names = {"filtered": "kept rows", "scores": "scores", "flagged": "dropped rows",
           "filter": "filter summary", "report": "report", "clean_model": "clean model",
           "clean_adapter": "clean adapter (PEFT)"}
  width = max(len(names[key]) for key in outcome["files"])
  lines += [f"{names[key] + ':':<{width + 1}} {path}" for key, path in outcome["files"].items()]
  if hint:
    lines.append(hint)
  if outcome["warning"]:
    lines.append(outcome["warning"])
  return "\n".join(lines)
