"""The `filter` phase: forgetting signals per example, the threshold, and the filtered dataset.

Reads the score tables, computes every signal that was scored (ff_jax.signals), flags r > ϕ on the
configured `filter.signal` and writes `scores.csv` (one row per example id, a column per signal),
`filtered.jsonl` (kept, in input order), `flagged.jsonl` (dropped, with their scores) and
`filter.json` (the threshold, the filter's quality and, with labels, the report of every signal).
The filter never reads `kind`; labels only feed the quality metrics when they exist.
"""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

import numpy as np

from ff_jax.checkpoints import write_atomic, write_json_atomic
from ff_jax.config import RunConfig
from ff_jax.data.records import Record, write_jsonl_atomic
from ff_jax.errors import ConfigError
from ff_jax.filtering import Threshold, auprc, auroc, filter_metrics
from ff_jax.rundir import RunDir
from ff_jax.signals import SIGNALS, compute_signals, signal_report

_STAT_KEYS = ("nll", "acc", "rouge")


def _fmt(value: float) -> str:
  return "" if value is None or (isinstance(value, float) and math.isnan(value)) else repr(
      float(value))


def _read(run: RunDir, name: str) -> dict[str, Any] | None:
  path = run.file(name)
  return json.loads(path.read_text()) if path.exists() else None


def _columns(before: dict[str, Any], after: dict[str, Any], signals: dict[str, np.ndarray],
             extra: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The numeric columns of scores.csv after `id, kind, category, tokens`, in order."""
  cols: dict[str, np.ndarray] = {}
  if "m0" in before:
    cols["nll_m0"] = np.asarray(before["m0"]["nll"], dtype=np.float64)
  for key in _STAT_KEYS:
    for table, when in ((before, "before"), (after, "after")):
      cols[f"{key}_{when}"] = (np.asarray(table[key], dtype=np.float64) if key in table
                               else np.full(len(before["nll"]), np.nan))
  for name in SIGNALS:
    if name in signals:
      cols[f"r_{name}"] = signals[name]
    elif name in _STAT_KEYS:  # the paper's three always have a column, empty when not scored
      cols[f"r_{name}"] = np.full(len(before["nll"]), np.nan)
  cols.update(extra)
  return cols


def run_filter(cfg: RunConfig, run: RunDir, records: list[Record], truncated: int) -> dict:
  before, after = _read(run, "scores_before.json"), _read(run, "scores_after.json")
  signals, extra = compute_signals(before, after, _read(run, "scores_replicas.json"),
                                   cfg.filter.lnf_floor, cfg.safety.steps,
                                   _read(run, "scores_noisy_replicas.json"),
                                   cfg.filter.lnf_floor_quantile)
  signal = cfg.filter.signal
  if signal not in signals:
    # The config's settings score it (signals.check_scored, at load), but this run's score files
    # were written with others.
    raise ConfigError(f"filter.signal={signal!r} was not scored in this run; available: "
                      f"{sorted(signals)} (ff_jax/signals.py names the scoring option each needs)")
  threshold = Threshold.parse(cfg.filter.threshold)
  r = signals[signal]
  flags, phi, info = threshold(r)
  flags = np.asarray(flags, dtype=bool)

  columns = _columns(before, after, signals, extra)
  if "curve" in after:
    nll_before = np.asarray(before["nll"], dtype=np.float64)
    for step, row in zip(after["curve"]["steps"], after["curve"]["nll"]):
      columns[f"r_nll@{step}"] = np.asarray(row, dtype=np.float64) - nll_before
  header = ["id", "kind", "category", "tokens", *columns, "flagged"]
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(header)
  tokens = before["tokens"]
  for i, rec in enumerate(records):
    writer.writerow([rec.id, rec.kind or "", rec.category or "", int(tokens[i]),
                     *(_fmt(col[i]) for col in columns.values()), int(flags[i])])
  write_atomic(run.file("scores.csv"), buffer.getvalue())

  kept = [rec for rec, f in zip(records, flags) if not f]
  dropped = []
  for i, rec in enumerate(records):
    if flags[i]:
      item = rec.to_dict()
      item["scores"] = {f"r_{k}": float(v[i]) for k, v in signals.items()}
      dropped.append(item)
  write_jsonl_atomic(run.file("filtered.jsonl"), kept)
  write_jsonl_atomic(run.file("flagged.jsonl"), dropped)

  labelled = all(rec.kind is not None for rec in records)
  metrics = None
  if labelled:
    is_unsafe = np.asarray([rec.kind == "unsafe" for rec in records])
    metrics = dict(filter_metrics(flags, is_unsafe))
    metrics["auroc"] = auroc(r, is_unsafe)
    metrics["auprc"] = auprc(r, is_unsafe)
  summary = {"signal": signal, "threshold": str(threshold), "phi": float(phi),
             "info": info, "metrics": metrics,
             "signals": signal_report(signals, records, threshold),
             "counts": {"kept": len(kept), "flagged": len(dropped), "truncated": int(truncated)}}
  write_json_atomic(run.file("filter.json"), summary)
  return {"kept": len(kept), "flagged": len(dropped), "phi": float(phi),
          "f1": metrics["f1"] if metrics else None}
