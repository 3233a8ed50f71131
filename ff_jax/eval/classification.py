"""How well a per-example score separates labelled groups: the filter's quality metrics.

Positives are unsafe examples; labels exist only in experiments, so these metrics measure a filter
and never choose its threshold (`best_f1` is an oracle for reports). NaN scores (examples that
could not be scored) rank lowest and are never flagged.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from ff_jax.errors import ConfigError, DataError


def as_scores(r: Any, name: str = "r") -> np.ndarray:
  try:
    arr = np.asarray(r, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise DataError(f"{name} must be an array of numbers: {e}") from e
  if arr.ndim != 1:
    raise DataError(f"{name} must be one-dimensional (one value per example), got {arr.shape}")
  return arr


def as_labels(labels: Any, n: int, name: str = "is_unsafe") -> np.ndarray:
  arr = np.asarray(labels)
  if arr.ndim != 1 or arr.shape[0] != n:
    raise DataError(f"{name} has shape {arr.shape}, expected ({n},) to match the scores")
  if arr.dtype != np.bool_:
    if not np.isin(arr, (0, 1)).all():
      raise DataError(f"{name} must be boolean or 0/1")
    arr = arr.astype(bool)
  return arr


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return precision, recall, f1


def filter_metrics(flags: Any, is_unsafe: Any) -> dict[str, float | int]:
  """Precision, recall, F1 of the flags against the unsafe labels, and the confusion counts.

  Positives are unsafe examples. Flagged safe *and* task examples are both false positives (as in
  the official `postprocess.dt_forget_filter`): each costs the customer a clean example. A zero
  denominator gives 0.0 (e.g. precision when nothing is flagged), never an exception.
  Fractions are in [0, 1] (the paper reports F1 × 100).
  """
  flags = np.asarray(flags)
  if flags.ndim != 1:
    raise DataError(f"flags must be one-dimensional, got shape {flags.shape}")
  flags = as_labels(flags, flags.shape[0], "flags")
  unsafe = as_labels(is_unsafe, flags.shape[0])
  tp = int((flags & unsafe).sum())
  fp = int((flags & ~unsafe).sum())
  fn = int((~flags & unsafe).sum())
  tn = int((~flags & ~unsafe).sum())
  precision, recall, f1 = _prf(tp, fp, fn)
  return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn,
          "tn": tn, "flagged": tp + fp, "kept": fn + tn, "n": int(flags.size),
          "n_unsafe": tp + fn}


def _rank_scores(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
  s = as_scores(scores, "scores")
  y = as_labels(labels, s.shape[0], "labels")
  # NaN (unscored) ranks below every score, like "never flagged" in the threshold functions.
  return np.where(np.isnan(s), -np.inf, s), y


def auroc(scores: Any, labels: Any) -> float:
  """Area under the ROC curve (Mann–Whitney U with average ranks for ties).

  Equals sklearn's roc_auc_score. NaN scores rank lowest. NaN when labels have one class only.
  """
  s, y = _rank_scores(scores, labels)
  n_pos = int(y.sum())
  n_neg = y.size - n_pos
  if n_pos == 0 or n_neg == 0:
    return math.nan
  order = np.argsort(s, kind="stable")
  sorted_s = s[order]
  # Average rank of each tie group (1-based).
  _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
  avg_rank = first + (counts + 1) / 2.0
  ranks = np.empty(s.size)
  ranks[order] = np.repeat(avg_rank, counts)
  u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def auprc(scores: Any, labels: Any) -> float:
  """Average precision Σ (R_k − R_{k−1}) P_k over distinct score thresholds.

  Equals sklearn's average_precision_score (tied scores enter together, no interpolation).
  NaN scores rank lowest. NaN when there are no positives.
  """
  s, y = _rank_scores(scores, labels)
  n_pos = int(y.sum())
  if n_pos == 0:
    return math.nan
  order = np.argsort(-s, kind="stable")
  s_desc, y_desc = s[order], y[order]
  # The last index of each tie group: the thresholds of the precision–recall curve.
  ends = np.r_[np.nonzero(np.diff(s_desc))[0], s_desc.size - 1]
  tps = np.cumsum(y_desc)[ends]
  precision = tps / (ends + 1)
  recall = tps / n_pos
  return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def sweep_thresholds(r: Any, is_unsafe: Any, phis: Any) -> dict[str, np.ndarray]:
  """Precision, recall, F1 and flagged count of r > ϕ for every ϕ in `phis` (for P/R/F1-vs-ϕ)."""
  r = as_scores(r)
  unsafe = as_labels(is_unsafe, r.shape[0])
  phis = as_scores(phis, "phis")
  if np.isnan(phis).any():
    raise ConfigError("sweep_thresholds: phis contain NaN")
  scored = ~np.isnan(r)
  order = np.argsort(r[scored], kind="stable")
  r_sorted = r[scored][order]
  unsafe_sorted = unsafe[scored][order]
  # cum_unsafe[i] = unsafe among the i smallest scores; r > ϕ flags the suffix after searchsorted.
  cum_unsafe = np.r_[0, np.cumsum(unsafe_sorted)]
  kept_idx = np.searchsorted(r_sorted, phis, side="right")
  flagged = r_sorted.size - kept_idx
  tp = cum_unsafe[-1] - cum_unsafe[kept_idx]
  fn = int(unsafe.sum()) - tp  # unscored unsafe examples are never flagged: false negatives
  with np.errstate(divide="ignore", invalid="ignore"):
    precision = np.where(flagged > 0, tp / np.maximum(flagged, 1), 0.0)
    recall = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), 0.0)
    denom = precision + recall
    f1 = np.where(denom > 0, 2 * precision * recall / np.where(denom > 0, denom, 1), 0.0)
  return {"phi": phis, "precision": precision, "recall": recall, "f1": f1,
          "flagged": flagged.astype(np.int64), "tp": tp.astype(np.int64)}


def best_f1(r: Any, is_unsafe: Any) -> dict[str, float]:
  """The oracle ϕ with the highest F1 (uses labels: for reports only, never for filtering).

  Candidates are the midpoints between consecutive distinct scores plus -inf (flag all), which
  covers every distinct flag set of r > ϕ. Ties in F1 go to the highest ϕ (fewest flagged).
  """
  r = as_scores(r)
  values = np.unique(r[~np.isnan(r)])
  if values.size == 0:
    return {"phi": math.inf, "f1": 0.0, "precision": 0.0, "recall": 0.0}
  phis = np.r_[-np.inf, (values[:-1] + values[1:]) / 2, np.inf]
  sweep = sweep_thresholds(r, is_unsafe, phis)
  i = int(np.flatnonzero(sweep["f1"] == sweep["f1"].max())[-1])
  return {"phi": float(phis[i]), "f1": float(sweep["f1"][i]),
          "precision": float(sweep["precision"][i]), "recall": float(sweep["recall"][i])}


def per_group_mean(r: Any, groups: Sequence[Hashable]) -> dict[Hashable, dict[str, float | int]]:
  """Mean r per group (e.g. per kind unsafe/safe/task), ignoring NaN; counts both.

  Returns {group: {"mean", "count" (scored), "n_nan"}}; groups in order of first appearance.
  The mean of a group with no scored examples is NaN.
  """
  r = as_scores(r)
  groups = list(groups)
  if len(groups) != r.size:
    raise DataError(f"per_group_mean: {r.size} scores but {len(groups)} group labels")
  out: dict[Hashable, dict[str, float | int]] = {}
  index: dict[Hashable, list[int]] = {}
  for i, g in enumerate(groups):
    index.setdefault(g, []).append(i)
  for g, idx in index.items():
    vals = r[idx]
    ok = vals[~np.isnan(vals)]
    out[g] = {"mean": float(ok.mean()) if ok.size else math.nan, "count": int(ok.size),
              "n_nan": int(vals.size - ok.size)}
  return out
