"""The `filter` phase: forgetting signals per example, the threshold, and the filtered dataset.

Reads the score tables, computes every signal that was scored (ff_jax.forgetting.signals), flags
r > ϕ on the configured `filter.signal` (with `auto`: the one `ff_jax.forgetting.choice` picks
from the run's scores, recorded with why in filter.json's `signal_choice`) and writes `scores.csv`
(one row per example id, a column per signal, and `flagged`), the kept rows of data.noisy in its
own format and fields (`filtered.<ext>` or `filtered/`, see `ff_jax.data.formats`; the demo's:
`filtered.jsonl` in ff_jax's schema), `flagged.jsonl` (dropped, ff_jax's schema with their
scores) and `filter.json` (the threshold, the filter's quality and, with labels, the report of
every signal). The filter never reads `kind`; labels only feed the quality metrics when they
exist. What the later phases train and measure on comes from `kept_and_flagged` (data.noisy's
records split by scores.csv's `flagged` column), never from re-reading the written rows.

Before anything is dropped, `ff_jax.forgetting.thresholds.separation` judges (without labels)
whether the signal's scores show two groups at all. On "no separation", `filter.on_no_separation:
warn` writes every output as usual with the verdict in filter.json's `separation` block (the
pipeline, the command line and report.md repeat it as a warning); `refuse` (the default) writes
`scores.csv` only (its `flagged` column: what the threshold would have dropped), so the scores can
be looked at, removes a filtered output, flagged.jsonl or filter.json an earlier filter run left,
and raises `NoSeparationError`: no filtered set exists to train on.
"""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

import numpy as np

from ff_jax.atomic_io import barrier, remove, text_handle, write_atomic, write_json_atomic
from ff_jax.config import RunConfig
from ff_jax.data.kept import Source
from ff_jax.data.records import Record, write_jsonl_atomic
from ff_jax.errors import ConfigError, DataError, NoSeparationError
from ff_jax.eval.classification import auprc, auroc, filter_metrics
from ff_jax.forgetting.choice import AUTO, REPLICA_COLUMN, choose_signal, replica_agreement
from ff_jax.forgetting.signals import SIGNALS, compute_signals, replica_forgetting, signal_report
from ff_jax.forgetting.thresholds import Threshold, separation
from ff_jax.pipeline.context import RunContext
from ff_jax.pipeline.rundir import RunDir
from ff_jax.progress import log
from ff_jax.report.analysis import separation_text
from ff_jax.run_files import (
  FILTER_SUMMARY,
  FILTERED,
  FILTERED_DEMO,
  FLAGGED,
  SCORES_AFTER,
  SCORES_BEFORE,
  SCORES_CSV,
  SCORES_NOISY_REPLICAS,
  SCORES_REPLICAS,
)

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


def run(ctx: RunContext) -> dict[str, Any]:
  """The filter phase; a separation warning (see the module docstring) is logged at its end."""
  info = filter_records(ctx.cfg, ctx.run, ctx.inputs.noisy,
                        truncated=sum(e.truncated for e in ctx.noisy),
                        source=ctx.inputs.noisy_source)
  warning = info.pop("warning")
  if warning:
    log(warning)
  return info


def filter_records(cfg: RunConfig, run: RunDir, records: list[Record], truncated: int,
                   source: Source | None = None) -> dict[str, Any]:
  """Signals, threshold and outputs of the filter on `records` (D, in order) from `run`'s scores;
  the kept rows are written back through `source` (None: as ff_jax JSONL, the demo's)."""
  before, after = _read(run, SCORES_BEFORE), _read(run, SCORES_AFTER)
  noisy_replicas = _read(run, SCORES_NOISY_REPLICAS)
  signals, extra = compute_signals(before, after, _read(run, SCORES_REPLICAS),
                                   cfg.filter.lnf_floor, cfg.safety.steps, noisy_replicas,
                                   cfg.filter.lnf_floor_quantile)
  threshold = Threshold.parse(cfg.filter.threshold)
  signal, choice = cfg.filter.signal, None
  per_replica = replica_forgetting(before, after, noisy_replicas)
  if signal == AUTO:
    signal, choice = choose_signal(signals, per_replica, threshold, cfg.filter.max_drop_fraction)
    log(f"filter.signal=auto: {choice['reason']}")
  if signal not in signals:
    # The config's settings score it (signals.check_scored, at load), but this run's score files
    # were written with others.
    raise ConfigError(f"filter.signal={signal!r} was not scored in this run; available: "
                      f"{sorted(signals)} (ff_jax/forgetting/signals.py names the scoring option "
                      "each needs)")
  r = signals[signal]
  flags, phi, info = threshold(r)
  flags = np.asarray(flags, dtype=bool)
  column = REPLICA_COLUMN.get(signal)
  if choice is not None and signal in choice["candidates"]:  # measured while choosing
    agreement = choice["candidates"][signal]["agreement"]
  else:
    agreement = (replica_agreement(per_replica[column], threshold) if column in per_replica
                 else None)
  verdict = separation(r, flags, cfg.filter.max_drop_fraction, agreement=agreement)

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
  write_atomic(run.file(SCORES_CSV), buffer.getvalue())
  if verdict["verdict"] != "separated" and cfg.filter.on_no_separation == "refuse":
    _refuse(run, signal, str(threshold), verdict)

  kept = [rec for rec, f in zip(records, flags) if not f]
  dropped = []
  for i, rec in enumerate(records):
    if flags[i]:
      item = rec.to_dict()
      item["scores"] = {f"r_{k}": float(v[i]) for k, v in signals.items()}
      dropped.append(item)
  if source is None:
    written = run.file(FILTERED_DEMO)
    write_jsonl_atomic(written, kept)
  else:  # the kept rows in the source's own format (its writers are atomic_io's: process 0)
    written = source.write_kept(run.root, {rec.id for rec in kept})
  _remove_filtered(run, but=written.name)  # another format's: stale
  write_jsonl_atomic(run.file(FLAGGED), dropped)

  labelled = all(rec.kind is not None for rec in records)
  metrics = None
  if labelled:
    is_unsafe = np.asarray([rec.kind == "unsafe" for rec in records])
    metrics = dict(filter_metrics(flags, is_unsafe))
    metrics["auroc"] = auroc(r, is_unsafe)
    metrics["auprc"] = auprc(r, is_unsafe)
  summary = {"signal": signal, "signal_choice": choice, "threshold": str(threshold),
             "phi": float(phi), "info": info, "separation": verdict, "metrics": metrics,
             "signals": signal_report(signals, records, threshold),
             "counts": {"kept": len(kept), "flagged": len(dropped), "truncated": int(truncated)}}
  write_json_atomic(run.file(FILTER_SUMMARY), summary)
  barrier("filter outputs written")
  return {"kept": len(kept), "flagged": len(dropped), "phi": float(phi),
          "f1": metrics["f1"] if metrics else None, "separation": verdict["verdict"],
          "warning": separation_text(summary)}


def _refuse(run: RunDir, signal: str, threshold: str, verdict: dict[str, Any]) -> None:
  """Raises `NoSeparationError` for `filter.on_no_separation: refuse`, after removing what an
  earlier filter run wrote: no filtered set is left for the clean phase or the user to take."""
  _remove_filtered(run)
  for name in (FLAGGED, FILTER_SUMMARY):
    remove(run.file(name))
  barrier("filter outputs removed")
  raise NoSeparationError(
      f"the filter cannot tell groups apart in filter.signal={signal!r} (filter.threshold="
      f"{threshold}): {'; '.join(verdict['reasons'])}. Nothing was filtered; every signal's "
      f"scores are in {run.file(SCORES_CSV)}. Rerun with filter.on_no_separation=warn to "
      "filter anyway, or with another filter.signal or filter.threshold "
      "(filter.max_drop_fraction=1.0 lifts the limit on the share dropped)")


def _remove_filtered(run: RunDir, but: str | None = None) -> None:
  """Remove every filtered output (filtered.<ext>, filtered/) an earlier filter run wrote, except
  the one named `but`."""
  for path in [*run.root.glob(f"{FILTERED}.*"), run.file(FILTERED)]:
    if path.name != but:
      remove(path)


def kept_and_flagged(run: RunDir, records: list[Record]) -> tuple[list[Record], list[Record]]:
  """data.noisy's records (in order) split by the filter's verdict: scores.csv's `flagged` column,
  keyed by id. The one way later phases (clean, evaluate, rounds, baselines) get the kept set."""
  path = run.file(SCORES_CSV)
  if not path.exists():
    raise DataError(f"{path}: not found; the filter phase has not run in {run.root}")
  with text_handle(path) as handle:
    flagged = {row["id"]: row["flagged"] == "1" for row in csv.DictReader(handle)}
  for rec in records:
    if rec.id not in flagged:
      raise DataError(f"{path}: no verdict for record {rec.id!r} of data.noisy (the scores are of "
                      "other data); rerun with --from filter")
  return ([rec for rec in records if not flagged[rec.id]],
          [rec for rec in records if flagged[rec.id]])
