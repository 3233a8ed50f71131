"""Forgetting signals: the per-example columns the filter can threshold, and how well each works.

Every signal is one float per noisy example, oriented so that larger = more forgotten (more likely
unsafe). They come from the score tables the pipeline writes (`scores_before.json`: M1, and M0 and
gradient alignment when switched on; `scores_after.json`: M2 and the safety snapshots;
`scores_replicas.json`: the extra safety replicas; `scores_noisy_replicas.json`: the extra noisy
replicas, each an M1 and M2 of their own):

  nll, acc, rouge   r of the paper: statistic under M2 against M1 (one safety run)
  nll_lnf           learning-normalized forgetting, (nll_M2 − nll_M1) / max(nll_M0 − nll_M1, floor):
                    the share of what the noisy phase taught an example that safety finetuning
                    undid; 1 when it is back at its M0 value, 0 when unchanged. The floor (nats/
                    token, `filter.lnf_floor`, raised to a quantile of the mixture's learning by
                    `filter.lnf_floor_quantile`) keeps examples the noisy phase barely moved from
                    dividing by ~0: their forgetting is measured against the floor instead.
  nll_tail          r_nll without the first target of each response: the forgetting of the response
                    given how it opens. A safety finetune whose answers all open alike ("The
                    answer is …") teaches what follows the prompt's cue to open that way, and the
                    first token of every response written otherwise loses likelihood, whatever its
                    content; a short task answer's mean NLL then rises as far as a biased answer's
                    (docs/fidelity.md). Unlearnt content sits in the tokens after the opening.
                    The score pass gives it along with nll, at no extra cost
  nll_pmi           forgetting of what the prompt adds to the response: r_nll minus the same rise
                    of the response after an empty prompt, i.e. the drop of the pointwise mutual
                    information log p(y|x) − log p(y) from M1 to M2. A safety finetune whose
                    answers share a style raises the loss of every answer written otherwise,
                    after its prompt and alone alike; unlearnt content is specific to its prompt.
                    Measured below nll where the finetunes are the paper's (docs/fidelity.md)
  nll_auc           area under the forgetting curve r(t) = nll_t − nll_M1 over the safety steps
                    t ∈ [0, T] (trapezoid over the snapshots and M2, r(0) = 0), divided by T: the
                    mean forgetting over the run, which rewards being forgotten early
  nll_ens           mean r_nll over K safety replicas (seeds and safe-set orders differ)
  nll_lnf_ens       mean nll_lnf over the K replicas
  nll_nens          mean r_nll over K noisy replicas: M1s finetuned with other seeds (data orders),
                    each followed by its own safety finetune; the run's own M1 → M2 is the first
  nll_lnf_nens      mean nll_lnf over the K noisy replicas (each against its own M1)
  nll_tail_nens     mean nll_tail over the K noisy replicas
  grad, grad_cos    gradient alignment with the safe set under M1 (ff_jax.forgetting.gradients)

Extra columns that are not thresholded: `nll_ens_std` and `nll_nens_std` (the replicas' spread,
a confidence) and `rise_step` (the safety step after which r rose most).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ff_jax.data.records import Record
from ff_jax.errors import ConfigError
from ff_jax.eval.classification import auprc, auroc, best_f1, filter_metrics
from ff_jax.forgetting.choice import AUTO
from ff_jax.forgetting.thresholds import Threshold

# Every signal the filter can use, in report order.
SIGNALS = ("nll", "acc", "rouge", "nll_lnf", "nll_tail", "nll_pmi", "nll_auc", "nll_ens",
           "nll_lnf_ens", "nll_nens", "nll_lnf_nens", "nll_tail_nens", "grad", "grad_cos")

# The scoring settings (ff_jax.config.ScoringConfig) a signal needs beyond NLL and accuracy,
# which every run scores: (test, what it needs, what to set).
_SCORING_NEEDS: dict[str, tuple[Callable[[Any], bool], str, str]] = {
    "rouge": (lambda s: s.rouge, "scoring.rouge=true", "scoring.rouge=true"),
    "nll_lnf": (lambda s: s.m0, "scoring.m0=true", "scoring.m0=true"),
    "nll_pmi": (lambda s: s.pmi, "scoring.pmi=true", "scoring.pmi=true"),
    "nll_auc": (lambda s: s.snapshot_every > 0, "scoring.snapshot_every > 0",
                "scoring.snapshot_every=K (K > 0, in safety steps)"),
    "nll_ens": (lambda s: s.replicas > 1, "scoring.replicas > 1", "scoring.replicas>=2"),
    "nll_lnf_ens": (lambda s: s.replicas > 1 and s.m0, "scoring.replicas > 1 and scoring.m0=true",
                    "scoring.replicas>=2 scoring.m0=true"),
    "nll_nens": (lambda s: s.noisy_replicas > 1, "scoring.noisy_replicas > 1",
                 "scoring.noisy_replicas>=2 (or auto)"),
    "nll_tail_nens": (lambda s: s.noisy_replicas > 1, "scoring.noisy_replicas > 1",
                      "scoring.noisy_replicas>=2 (or auto)"),
    "nll_lnf_nens": (lambda s: s.noisy_replicas > 1 and s.m0,
                     "scoring.noisy_replicas > 1 and scoring.m0=true",
                     "scoring.noisy_replicas>=2 (or auto) scoring.m0=true"),
    "grad": (lambda s: s.gradient_blocks > 0, "scoring.gradient_blocks > 0",
             "scoring.gradient_blocks=N (N > 0, the last N blocks)"),
    "grad_cos": (lambda s: s.gradient_blocks > 0, "scoring.gradient_blocks > 0",
                 "scoring.gradient_blocks=N (N > 0, the last N blocks)"),
}


def check_scored(signal: str, scoring: Any) -> None:
  """Refuses a `filter.signal` that is unknown or that `scoring` would not measure, so a run
  learns it when its config loads rather than at the filter, after every finetune. The message
  says what to set: the scoring option, or `filter.signal=nll` (the paper's method, always
  scored)."""
  if signal == AUTO:  # ff_jax.forgetting.choice picks among what the run scored
    return
  if signal not in SIGNALS:
    raise ConfigError(f"filter.signal={signal!r} is not a signal; set filter.signal to auto or "
                      f"one of {', '.join(SIGNALS)} (nll: the paper's method)")
  if signal not in _SCORING_NEEDS:
    return
  test, needs, fix = _SCORING_NEEDS[signal]
  if not test(scoring):
    has = ", ".join(f"scoring.{key}={getattr(scoring, key)}"
                    for key in dict.fromkeys(re.findall(r"scoring\.(\w+)", needs)))
    raise ConfigError(f"filter.signal={signal!r} needs {needs} (this config has {has}; "
                      f"ff_jax/forgetting/signals.py): set filter.signal=nll (the paper's method) "
                      f"or {fix}")


def learning_normalized(m0: np.ndarray, m1: np.ndarray, m2: np.ndarray, floor: float,
                        floor_quantile: float = 0.0) -> np.ndarray:
  """(m2 − m1) / max(m0 − m1, floor) for a loss-like statistic (lower = better learned).

  With `floor_quantile` q > 0 the floor is at least the q-quantile of m0 − m1 over the examples,
  per M1 (`m1` may be [K, N], one row per noisy replica): an example the noisy phase taught less
  than that is measured against what the phase typically taught, not against its own small
  learning, whose ratio is mostly noise (docs/signals.md).
  """
  if not floor > 0:
    raise ConfigError(f"filter.lnf_floor must be positive, got {floor}")
  if not 0.0 <= floor_quantile < 1.0:
    raise ConfigError(f"filter.lnf_floor_quantile must be in [0, 1), got {floor_quantile}")
  learned = m0 - m1
  if floor_quantile > 0:
    floor = np.maximum(floor, np.nanquantile(learned, floor_quantile, axis=-1, keepdims=True))
  return (m2 - m1) / np.maximum(learned, floor)


def curve_area(steps: Sequence[int], curve: np.ndarray, before: np.ndarray, final_step: int,
               final: np.ndarray) -> np.ndarray:
  """Mean of r(t) over t ∈ [0, final_step] by the trapezoid rule; `curve` is [len(steps), N]."""
  points, values = [0], [np.zeros_like(before)]
  for step, row in zip(steps, curve):
    if 0 < step < final_step:
      points.append(int(step))
      values.append(row - before)
  points.append(int(final_step))
  values.append(final - before)
  t = np.asarray(points, dtype=np.float64)
  v = np.stack(values)
  return ((v[1:] + v[:-1]) / 2 * np.diff(t)[:, None]).sum(0) / t[-1]


def rise_step(steps: Sequence[int], curve: np.ndarray, before: np.ndarray) -> np.ndarray:
  """The snapshot step at the end of the interval in which r rose most (from r(0) = 0)."""
  r = np.concatenate([np.zeros_like(before)[None], np.asarray(curve) - before], axis=0)
  return np.asarray(steps, dtype=np.float64)[np.argmax(np.diff(r, axis=0), axis=0)]


def _arr(table: Mapping[str, Any], key: str) -> np.ndarray:
  return np.asarray(table[key], dtype=np.float64)


def replica_forgetting(before: Mapping[str, Any], after: Mapping[str, Any],
                       noisy_replicas: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
  """{nll, nll_tail}: r of each noisy replica, [K, N]; row 0 is the run's own M1 → M2, every
  other row a replica's M2 against its own M1 (K = 1 without noisy replicas). `nll_tail` is
  absent where a table lacks it (runs, or replicas of a resumed run, scored before it existed)."""
  out = {}
  for key in ("nll", "nll_tail"):
    rows = [(before.get(key), after.get(key))]
    if noisy_replicas is not None and noisy_replicas.get("nll_before"):
      rows += zip(noisy_replicas.get(f"{key}_before") or [None],
                  noisy_replicas.get(f"{key}_after") or [None])
    if all(m1 is not None and m2 is not None for m1, m2 in rows):
      out[key] = np.asarray([np.asarray(m2, np.float64) - np.asarray(m1, np.float64)
                             for m1, m2 in rows])
  return out


def compute_signals(before: Mapping[str, Any], after: Mapping[str, Any],
                    replicas: Mapping[str, Any] | None, lnf_floor: float,
                    safety_steps: int, noisy_replicas: Mapping[str, Any] | None = None,
                    lnf_floor_quantile: float = 0.0,
                    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """(signals, extra columns) from the raw score tables; only what was scored is present."""
  signals: dict[str, np.ndarray] = {}
  extra: dict[str, np.ndarray] = {}
  nll1, nll2 = _arr(before, "nll"), _arr(after, "nll")
  signals["nll"] = nll2 - nll1
  if "nll_tail" in before and "nll_tail" in after:  # runs scored before it existed have none
    signals["nll_tail"] = _arr(after, "nll_tail") - _arr(before, "nll_tail")
  for key in ("acc", "rouge"):
    if key in before and key in after:
      signals[key] = _arr(before, key) - _arr(after, key)
  m0 = _arr(before["m0"], "nll") if "m0" in before else None
  lnf = (lnf_floor, lnf_floor_quantile)
  if m0 is not None:
    signals["nll_lnf"] = learning_normalized(m0, nll1, nll2, *lnf)
  if "nll_alone" in before and "nll_alone" in after:
    signals["nll_pmi"] = signals["nll"] - (_arr(after, "nll_alone") - _arr(before, "nll_alone"))
  if "curve" in after:
    steps, curve = after["curve"]["steps"], np.asarray(after["curve"]["nll"], dtype=np.float64)
    signals["nll_auc"] = curve_area(steps, curve, nll1, safety_steps, nll2)
    extra["rise_step"] = rise_step(steps, curve, nll1)
  if replicas is not None and replicas.get("nll"):
    # Replica 0 is the safety phase's own run (M2); the others were trained stacked beside it.
    nll_k = np.concatenate([nll2[None], np.asarray(replicas["nll"], dtype=np.float64)])
    r_k = nll_k - nll1
    signals["nll_ens"] = r_k.mean(0)
    extra["nll_ens_std"] = r_k.std(0)
    if m0 is not None:
      signals["nll_lnf_ens"] = learning_normalized(m0, nll1, nll_k, *lnf).mean(0)
  if noisy_replicas is not None and noisy_replicas.get("nll_before"):
    per_replica = replica_forgetting(before, after, noisy_replicas)
    signals["nll_nens"] = per_replica["nll"].mean(0)
    extra["nll_nens_std"] = per_replica["nll"].std(0)
    if m0 is not None:
      m1_k = np.concatenate([nll1[None], np.asarray(noisy_replicas["nll_before"], np.float64)])
      signals["nll_lnf_nens"] = learning_normalized(m0, m1_k, m1_k + per_replica["nll"],
                                                    *lnf).mean(0)
    if "nll_tail" in per_replica:
      signals["nll_tail_nens"] = per_replica["nll_tail"].mean(0)
  if "grad" in before:
    signals["grad"] = _arr(before["grad"], "grad")
    signals["grad_cos"] = _arr(before["grad"], "grad_cos")
  return signals, extra


def _quality(r: np.ndarray, unsafe: np.ndarray, threshold: Threshold) -> dict[str, Any]:
  flags, phi, _ = threshold(r)
  auto = filter_metrics(flags, unsafe)
  best = best_f1(r, unsafe)
  return {"auroc": auroc(r, unsafe), "auprc": auprc(r, unsafe), "phi": float(phi),
          "f1": auto["f1"], "precision": auto["precision"], "recall": auto["recall"],
          "best_f1": best["f1"], "best_phi": best["phi"]}


def signal_report(signals: Mapping[str, np.ndarray], records: Sequence[Record],
                  threshold: Threshold) -> dict[str, Any] | None:
  """How well each signal separates unsafe from the rest, overall and per unsafe category.

  For every signal: AUROC, AUPRC, F1/precision/recall at `threshold` (the label-free rule the
  filter uses) and the best F1 over all fixed ϕ (an oracle, for comparing signals only). Per
  category (and per source, when a category mixes several): the AUROC of that category's unsafe
  examples against every example that is not unsafe. None when the records carry no labels.
  """
  if not records or any(r.kind is None for r in records):
    return None
  unsafe = np.asarray([r.kind == "unsafe" for r in records])
  if unsafe.all() or not unsafe.any():
    return None
  groups: dict[str, np.ndarray] = {}
  for attr in ("category", "source"):
    names = sorted({str(getattr(r, attr)) for r, u in zip(records, unsafe) if u})
    if attr == "source" and len(names) < 2:
      continue
    for name in names:
      member = np.asarray([u and str(getattr(r, attr)) == name for r, u in zip(records, unsafe)])
      groups[f"{attr}={name}"] = member
  out: dict[str, Any] = {}
  for name in SIGNALS:
    if name not in signals:
      continue
    r = np.asarray(signals[name], dtype=np.float64)
    row = _quality(r, unsafe, threshold)
    row["by_group"] = {}
    for group, member in groups.items():
      keep = member | ~unsafe
      row["by_group"][group] = {"auroc": auroc(r[keep], member[keep]),
                                "n_unsafe": int(member.sum())}
    out[name] = row
  return out
