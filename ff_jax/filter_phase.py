"""The `filter` phase: forgetting per example, the threshold, and the filtered dataset.

Reads the two score tables, computes r for every signal, flags r > ϕ on the configured signal and
writes `scores.csv` (one row per example id), `filtered.jsonl` (kept, in input order),
`flagged.jsonl` (dropped, with their scores) and `filter.json`. The filter never reads `kind`;
labels only feed the quality metrics when they exist.
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
from ff_jax.scoring import forgetting

_SCORE_KEYS = ("nll", "acc", "rouge")


def _arrays(scores: dict[str, Any]) -> dict[str, np.ndarray]:
  return {k: np.asarray(scores[k], dtype=np.float64) for k in (*_SCORE_KEYS, "tokens")
          if k in scores}


def _fmt(value: float) -> str:
  return "" if value is None or (isinstance(value, float) and math.isnan(value)) else repr(
      float(value))


def run_filter(cfg: RunConfig, run: RunDir, records: list[Record], truncated: int) -> dict:
  before_raw = json.loads(run.file("scores_before.json").read_text())
  after_raw = json.loads(run.file("scores_after.json").read_text())
  before, after = _arrays(before_raw), _arrays(after_raw)
  r = forgetting(before, after)
  signal = cfg.filter.signal
  if signal not in r:
    raise ConfigError(f"filter.signal={signal!r} was not scored; available: {sorted(r)} "
                      "(rouge needs scoring.rouge=true)")
  threshold = Threshold.parse(cfg.filter.threshold)
  flags, phi, info = threshold(r[signal])
  flags = np.asarray(flags, dtype=bool)

  curve_cols: dict[str, np.ndarray] = {}
  if "curve" in after_raw:
    curve_nll = np.asarray(after_raw["curve"]["nll"], dtype=np.float64)
    for step, row in zip(after_raw["curve"]["steps"], curve_nll):
      curve_cols[f"r_nll@{step}"] = row - before["nll"]

  header = ["id", "kind", "category", "tokens"]
  for key in _SCORE_KEYS:
    header += [f"{key}_before", f"{key}_after"]
  header += [f"r_{key}" for key in _SCORE_KEYS] + ["flagged", *curve_cols]
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(header)
  for i, rec in enumerate(records):
    row = [rec.id, rec.kind or "", rec.category or "", int(before["tokens"][i])]
    for key in _SCORE_KEYS:
      row += [_fmt(before[key][i]) if key in before else "",
              _fmt(after[key][i]) if key in after else ""]
    row += [_fmt(r[key][i]) if key in r else "" for key in _SCORE_KEYS]
    row += [int(flags[i]), *(_fmt(col[i]) for col in curve_cols.values())]
    writer.writerow(row)
  write_atomic(run.file("scores.csv"), buffer.getvalue())

  kept = [rec for rec, f in zip(records, flags) if not f]
  dropped = []
  for i, rec in enumerate(records):
    if flags[i]:
      item = rec.to_dict()
      item["scores"] = {f"r_{k}": float(v[i]) for k, v in r.items()}
      dropped.append(item)
  write_jsonl_atomic(run.file("filtered.jsonl"), kept)
  write_jsonl_atomic(run.file("flagged.jsonl"), dropped)

  labelled = all(rec.kind is not None for rec in records)
  metrics = None
  if labelled:
    is_unsafe = np.asarray([rec.kind == "unsafe" for rec in records])
    metrics = dict(filter_metrics(flags, is_unsafe))
    metrics["auroc"] = auroc(r[signal], is_unsafe)
    metrics["auprc"] = auprc(r[signal], is_unsafe)
  summary = {"signal": signal, "threshold": str(threshold), "phi": float(phi),
             "info": info, "metrics": metrics,
             "counts": {"kept": len(kept), "flagged": len(dropped), "truncated": int(truncated)}}
  write_json_atomic(run.file("filter.json"), summary)
  return {"kept": len(kept), "flagged": len(dropped), "phi": float(phi),
          "f1": metrics["f1"] if metrics else None}
