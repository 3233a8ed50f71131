"""`filter.signal: auto`: the filter picks its signal from the run's own scores, without labels.

Every run scores two NLL signals at no extra cost: `nll` (the whole response's forgetting) and
`nll_tail` (the response after its first token), each averaged over the noisy replicas as
`nll_nens` and `nll_tail_nens`. Which one is right depends on where the data decides
(docs/fidelity.md): where every safe answer opens alike and a short task answer loses its first
token to that style, only the tail separates (`tune-Age-cue`: two-run AUROC 0.85-0.97 for `nll`,
0.99-1.00 for the tail); where an unsafe answer differs from the safe one in its first word ("The
soreni neighbor." against "Cannot be determined."), the tail leaves out the decision (the demo:
0.91 against 0.98). A user does not know which their data is.

The noisy replicas tell: each M1 saw the data in another order and had its own safety finetune, so
forgetting that is the content's own ranks the rows alike in every replica, and forgetting that is
the style of one run's safety finetune (or noise on a few tokens) does not. The candidate whose
replicas rank the rows most alike (Spearman's ρ between the replicas' scores, mean over pairs) is
taken; a candidate whose averaged scores the separation check (`thresholds.separation`) finds no
two groups in only wins when neither has two. With one noisy replica (the paper's single run)
there is nothing to compare, and the candidate with the larger Ashman's D of its two fitted groups
is taken; filter.json says so.

The rule was chosen on the tuning runs (the demo's world, seeds 0-2, and the three seed pairs of
`tune-Age-cue`), where it took the better signal in all six; the agreement of the replicas'
filters (Cohen's κ of the rows each drops) took it in five, and on the sixth split a tie (0.825
against 0.823) the wrong way. docs/fidelity.md has the tables, validation included.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import numpy as np

from ff_jax.forgetting.thresholds import Threshold, separation

AUTO = "auto"
# (the averaged signal, its per-replica column), with noisy replicas and for one run.
CANDIDATES = {True: (("nll_nens", "nll"), ("nll_tail_nens", "nll_tail")),
              False: (("nll", "nll"), ("nll_tail", "nll_tail"))}
# The signals averaged over noisy replicas whose replicas' agreement the separation check reads.
REPLICA_COLUMN = dict(CANDIDATES[True])


def cohen_kappa(a: np.ndarray, b: np.ndarray) -> float:
  """Agreement of two boolean flag vectors beyond chance: 1 identical, 0 as by chance."""
  a, b = np.asarray(a, bool), np.asarray(b, bool)
  observed = float((a == b).mean())
  chance = float(a.mean() * b.mean() + (1 - a.mean()) * (1 - b.mean()))
  return 1.0 if chance >= 1.0 else (observed - chance) / (1.0 - chance)


def _ranks(x: np.ndarray) -> np.ndarray:
  """Ranks 0..n-1 of x, ties given their mean rank (as Spearman's ρ needs)."""
  order = np.argsort(x, kind="stable")
  ranks = np.empty(x.size, np.float64)
  ranks[order] = np.arange(x.size)
  values, inverse = np.unique(x, return_inverse=True)
  sums = np.bincount(inverse, weights=ranks, minlength=values.size)
  return (sums / np.bincount(inverse, minlength=values.size))[inverse]


def replica_correlation(per_replica: np.ndarray) -> float | None:
  """Mean Spearman's ρ over pairs of replicas' scores ([K, N], NaN rows left out); None for one
  replica."""
  if per_replica.shape[0] < 2:
    return None
  scored = ~np.isnan(per_replica).any(0)
  ranks = [_ranks(row[scored]) for row in per_replica]
  return float(np.mean([np.corrcoef(a, b)[0, 1] for a, b in itertools.combinations(ranks, 2)]))


def replica_agreement(per_replica: np.ndarray, threshold: Threshold) -> float | None:
  """Mean Cohen's κ over pairs of replicas of the rows each drops under `threshold` on its own
  scores ([K, N]); None for one replica."""
  if per_replica.shape[0] < 2:
    return None
  flags = [np.asarray(threshold(row)[0], bool) for row in per_replica]
  return float(np.mean([cohen_kappa(a, b) for a, b in itertools.combinations(flags, 2)]))


def choose_signal(signals: Mapping[str, np.ndarray], per_replica: Mapping[str, np.ndarray],
                  threshold: Threshold, max_drop_fraction: float) -> tuple[str, dict[str, Any]]:
  """(signal, why) for `filter.signal: auto` (see the module docstring). `signals` are the run's
  averaged columns, `per_replica` the [K, N] forgetting of each noisy replica
  (`signals.replica_forgetting`)."""
  replicated = "nll_nens" in signals
  rows: dict[str, dict[str, Any]] = {}
  for name, column in CANDIDATES[replicated]:
    if name not in signals or column not in per_replica:
      continue
    r = np.asarray(signals[name], np.float64)
    flags = np.asarray(threshold(r)[0], bool)
    agreement = replica_agreement(per_replica[column], threshold)
    verdict = separation(r, flags, max_drop_fraction, agreement=agreement)
    rows[name] = {"correlation": replica_correlation(per_replica[column]),
                  "agreement": agreement, "ashman_d": verdict["statistics"].get("ashman_d"),
                  "separated": verdict["verdict"] == "separated",
                  "flagged": int(flags.sum())}
  if not rows:  # only where the run's score tables hold no NLL of its replicas
    name = "nll_nens" if replicated else "nll"
    return name, {"rule": "only candidate", "candidates": {}, "reason": f"{name}: the only "
                  "NLL signal this run scored"}

  def merit(name: str) -> tuple[bool, float]:
    row = rows[name]
    score = row["correlation"] if row["correlation"] is not None else row["ashman_d"]
    # A replica whose scores do not vary has no rank correlation (NaN): it ranks last.
    return row["separated"], -np.inf if score is None or np.isnan(score) else score

  chosen = max(rows, key=merit)  # the first candidate (nll) on a tie: deterministic
  by = ("the replicas' rank correlation (Spearman's ρ)" if replicated
        else "Ashman's D (one run: no replicas to compare)")
  parts = [f"{name} {'ρ' if replicated else 'D'} {merit(name)[1]:.3f}"
           + ("" if rows[name]["separated"] else " (no separation)") for name in rows]
  return chosen, {"rule": by, "candidates": rows,
                  "reason": f"{chosen} by {by}: {', '.join(parts)}"}
