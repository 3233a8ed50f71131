"""`filter.signal: auto` (ff_jax.forgetting.choice): the signal whose replicas rank rows alike."""

import numpy as np
import pytest

from ff_jax.forgetting.choice import (
  choose_signal,
  cohen_kappa,
  replica_agreement,
  replica_correlation,
)
from ff_jax.forgetting.signals import replica_forgetting
from ff_jax.forgetting.thresholds import Threshold

AUTO = Threshold.parse("auto")
N, UNSAFE = 200, 80


def _replica(rng, forgotten: np.ndarray) -> np.ndarray:
  """A spike of unchanged rows near 0 and the `forgotten` rows around 1.5 nats/token."""
  r = rng.normal(0.0, 0.05, N)
  r[forgotten] = rng.normal(1.5, 0.3, forgotten.sum())
  return r


def _columns(rng, stable: str, unstable: str) -> tuple[dict, dict]:
  """Two replicas per column: `stable` forgets the same rows in both, `unstable` other rows in
  each (as a safety finetune's style forgets some task rows in one run and not the next)."""
  first = np.arange(N) < UNSAFE
  other = (np.arange(N) >= N - UNSAFE)
  per_replica = {stable: np.stack([_replica(rng, first), _replica(rng, first)]),
                 unstable: np.stack([_replica(rng, first), _replica(rng, other)])}
  names = {"nll": "nll_nens", "nll_tail": "nll_tail_nens"}
  return {names[k]: v.mean(0) for k, v in per_replica.items()}, per_replica


def test_kappa():
  a = np.array([1, 1, 0, 0, 1, 0], bool)
  assert cohen_kappa(a, a) == 1.0
  assert cohen_kappa(a, ~a) == pytest.approx(-1.0)
  assert cohen_kappa(np.zeros(4, bool), np.zeros(4, bool)) == 1.0  # nothing dropped by either
  assert replica_agreement(np.zeros((1, 5)), AUTO) is None


def test_spearman():
  x = np.array([0.1, 0.5, 0.2, 0.9])
  assert replica_correlation(np.stack([x, x ** 3])) == pytest.approx(1.0)  # monotone: ρ = 1
  assert replica_correlation(np.stack([x, -x])) == pytest.approx(-1.0)
  ties = np.array([[1.0, 1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]])  # mean ranks for the tie
  assert replica_correlation(ties) == pytest.approx(0.9486832980505138)
  with_nan = np.array([[0.1, np.nan, 0.3], [0.2, 0.5, 0.1]])  # an unscored row is left out
  assert replica_correlation(with_nan) == pytest.approx(-1.0)
  assert replica_correlation(x[None]) is None


@pytest.mark.parametrize("stable, unstable", [("nll", "nll_tail"), ("nll_tail", "nll")])
def test_picks_the_signal_whose_replicas_agree(stable, unstable):
  signals, per_replica = _columns(np.random.default_rng(0), stable, unstable)
  chosen, why = choose_signal(signals, per_replica, AUTO, 0.6)
  assert chosen == {"nll": "nll_nens", "nll_tail": "nll_tail_nens"}[stable]
  rows = why["candidates"]
  other = rows[{"nll_nens", "nll_tail_nens"}.difference([chosen]).pop()]
  assert rows[chosen]["correlation"] > other["correlation"]
  assert rows[chosen]["agreement"] > 0.9 > other["agreement"]
  assert chosen in why["reason"] and "ρ" in why["reason"]


def test_a_signal_without_two_groups_loses_to_one_with_them():
  rng = np.random.default_rng(1)
  signals, per_replica = _columns(rng, "nll_tail", "nll")
  blob = np.stack([rng.normal(0.0, 1.0, N)] * 2)  # replicas agree perfectly on one blob
  per_replica["nll"], signals["nll_nens"] = blob, blob[0]
  chosen, why = choose_signal(signals, per_replica, AUTO, 0.6)
  assert chosen == "nll_tail_nens" and not why["candidates"]["nll_nens"]["separated"]


def test_one_run_compares_the_groups_distance():
  rng = np.random.default_rng(2)
  first = np.arange(N) < UNSAFE
  clear, blurred = _replica(rng, first), _replica(rng, first)
  blurred[first] = rng.normal(0.4, 0.3, UNSAFE)
  signals = {"nll": blurred, "nll_tail": clear}
  chosen, why = choose_signal(signals, {"nll": blurred[None], "nll_tail": clear[None]}, AUTO, 0.6)
  assert chosen == "nll_tail" and "one run" in why["rule"]


def test_old_runs_without_the_tail_keep_nll():
  rng = np.random.default_rng(3)
  r = _replica(rng, np.arange(N) < UNSAFE)
  assert choose_signal({"nll": r}, {"nll": r[None]}, AUTO, 0.6)[0] == "nll"


def test_replica_forgetting_reads_every_replica_against_its_own_m1():
  before = {"nll": [1.0, 2.0], "nll_tail": [1.5, 2.5]}
  after = {"nll": [1.5, 2.0], "nll_tail": [2.0, 2.5]}
  replicas = {"nll_before": [[1.0, 1.0]], "nll_after": [[3.0, 1.0]],
              "nll_tail_before": [None], "nll_tail_after": [None]}
  out = replica_forgetting(before, after, replicas)
  np.testing.assert_allclose(out["nll"], [[0.5, 0.0], [2.0, 0.0]])
  assert "nll_tail" not in out  # a replica scored before nll_tail existed
  assert replica_forgetting(before, after, None)["nll_tail"].shape == (1, 2)
