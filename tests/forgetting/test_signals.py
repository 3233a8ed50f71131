"""Forgetting signals and gradient alignment (ff_jax.forgetting) by their definitions."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from ff_jax import parallel
from ff_jax.data.batching import Batching
from ff_jax.data.records import Record
from ff_jax.errors import ConfigError
from ff_jax.forgetting.gradients import GradientAlignment, merge_blocks, split_blocks, subset_bytes
from ff_jax.forgetting.signals import (
  compute_signals,
  curve_area,
  learning_normalized,
  rise_step,
  signal_report,
)
from ff_jax.forgetting.thresholds import Threshold
from ff_jax.models import tiny_llama
from ff_jax.report.signals import signal_table_markdown
from ff_jax.training.scoring import score_examples
from ff_jax.training.steps import ModelRuntime, Scorer
from tests.helpers.encoded import random_examples

# -- learning-normalized forgetting ---------------------------------------------------------------


def test_learning_normalized_is_one_back_at_m0_and_zero_when_unchanged():
  m0 = np.array([3.0, 3.0, 3.0, 2.0])
  m1 = np.array([1.0, 1.0, 1.0, 1.0])
  m2 = np.array([3.0, 1.0, 2.0, 4.0])  # back at M0, unchanged, half-way, beyond M0
  np.testing.assert_allclose(learning_normalized(m0, m1, m2, floor=0.05), [1.0, 0.0, 0.5, 3.0])


def test_learning_normalized_measures_unlearned_examples_against_the_floor():
  # The noisy phase did not lower this example's NLL (it rose): forgetting / floor, not / ~0.
  lnf = learning_normalized(np.array([1.0]), np.array([1.2]), np.array([1.3]), floor=0.1)
  np.testing.assert_allclose(lnf, [1.0])
  with pytest.raises(ConfigError, match="lnf_floor"):
    learning_normalized(np.ones(1), np.ones(1), np.ones(1), floor=0.0)


def test_learning_normalized_floor_quantile_uses_what_the_noisy_phase_typically_taught():
  # Learning M0 − M1 = [4, 0.01, 1, 3]: its median is 2, so the two examples learned less are
  # measured against 2 and the two learned more against their own learning (1 back at M0).
  m0, m1 = np.array([5.0, 1.01, 2.0, 4.0]), np.ones(4)
  m2 = np.array([5.0, 2.0, 2.0, 2.5])
  np.testing.assert_allclose(learning_normalized(m0, m1, m2, 0.05, floor_quantile=0.5),
                             [1.0, 0.5, 0.5, 0.5])
  # One quantile per M1: rows of m1 (noisy replicas) get their own floors.
  m1_k = np.stack([m1, m1 + 0.5])
  got = learning_normalized(m0, m1_k, m1_k + 1.0, 0.05, floor_quantile=0.5)
  np.testing.assert_allclose(got, 1 / np.array([[4, 2, 2, 3], [3.5, 1.5, 1.5, 2.5]]))
  # q = 0 is the fixed floor alone; a floor above the quantile still wins.
  np.testing.assert_allclose(learning_normalized(m0, m1, m2, 3.0, floor_quantile=0.5),
                             [1.0, 1 / 3, 1 / 3, 1.5 / 3])
  with pytest.raises(ConfigError, match="lnf_floor_quantile"):
    learning_normalized(m0, m1, m2, 0.05, floor_quantile=1.0)


# -- forgetting-curve features --------------------------------------------------------------------


def test_curve_area_is_the_trapezoid_mean_of_r_over_the_safety_steps():
  before = np.array([1.0, 1.0])
  steps = [2, 4]  # step 4 is also the final step: M2 is used for it, not counted twice
  curve = np.array([[2.0, 1.0], [9.0, 9.0]])
  final = np.array([3.0, 1.0])
  # r(0)=0, r(2)=a, r(4)=b: ((0+a)/2*2 + (a+b)/2*2) / 4 = (2a + b) / 4.
  a, b = np.array([1.0, 0.0]), np.array([2.0, 0.0])
  np.testing.assert_allclose(curve_area(steps, curve, before, 4, final), (2 * a + b) / 4)
  # An example forgotten early has a larger area than one forgotten as much, but late.
  early = curve_area([1, 2, 3], np.array([[1.0], [1.0], [1.0]]), np.zeros(1), 4, np.ones(1))
  late = curve_area([1, 2, 3], np.array([[0.0], [0.0], [0.0]]), np.zeros(1), 4, np.ones(1))
  assert early[0] > late[0]


def test_rise_step_is_where_r_rose_most():
  before = np.zeros(2)
  curve = np.array([[0.1, 1.0], [0.2, 1.1], [2.0, 1.2]])  # steps 5, 10, 15
  np.testing.assert_array_equal(rise_step([5, 10, 15], curve, before), [15.0, 5.0])


# -- the signals from the score tables ------------------------------------------------------------


def _tables():
  before = {"nll": [1.0, 1.0, 2.0], "acc": [0.9, 0.8, 0.5], "tokens": [4, 4, 4],
            "m0": {"nll": [3.0, 1.5, 2.0]},
            "grad": {"grad": [0.3, -0.1, 0.0], "grad_cos": [0.5, -0.2, 0.0]}}
  after = {"nll": [3.0, 1.1, 2.0], "acc": [0.1, 0.8, 0.5],
           "curve": {"steps": [2], "nll": [[2.0, 1.0, 2.0]]}}
  replicas = {"nll": [[2.0, 1.3, 2.0], [1.0, 1.2, 2.0]]}
  return before, after, replicas


def test_compute_signals_from_score_tables():
  before, after, replicas = _tables()
  signals, extra = compute_signals(before, after, replicas, lnf_floor=0.05, safety_steps=4)
  np.testing.assert_allclose(signals["nll"], [2.0, 0.1, 0.0])
  np.testing.assert_allclose(signals["acc"], [0.8, 0.0, 0.0])
  assert "rouge" not in signals
  np.testing.assert_allclose(signals["nll_lnf"], [1.0, 0.2, 0.0])  # floor 0.05 for the third
  # Replicas: M2 plus the two extra ones, r = [2, 1, 0], [0.1, 0.3, 0.2], [0, 0, 0].
  np.testing.assert_allclose(signals["nll_ens"], [1.0, 0.2, 0.0])
  np.testing.assert_allclose(extra["nll_ens_std"], [np.std([2, 1, 0]), np.std([.1, .3, .2]), 0])
  np.testing.assert_allclose(signals["nll_lnf_ens"], [0.5, 0.4, 0.0])
  np.testing.assert_allclose(signals["nll_auc"], [(1.0 + 1.0 + 2.0) / 4, (0 + 0 + .1) / 4, 0.0])
  np.testing.assert_allclose(signals["grad"], [0.3, -0.1, 0.0])
  # A noisy replica: its own M1 (2.0, 1.0, 1.5) and M2 (2.5, 1.5, 1.5), r = [0.5, 0.5, 0]; the
  # run's own r = [2, 0.1, 0]. LNF against M0 (3, 1.5, 2): [0.5, 1.0, 0] and [1.0, 0.2, 0].
  noisy = {"seeds": [[1, 2]], "nll_before": [[2.0, 1.0, 1.5]], "nll_after": [[2.5, 1.5, 1.5]]}
  signals, extra = compute_signals(before, after, None, 0.05, 4, noisy)
  np.testing.assert_allclose(signals["nll_nens"], [1.25, 0.3, 0.0])
  np.testing.assert_allclose(extra["nll_nens_std"], [0.75, 0.2, 0.0])
  np.testing.assert_allclose(signals["nll_lnf_nens"], [0.75, 0.6, 0.0])
  assert "nll_ens" not in signals
  # The tail (each response without its first target): r_tail = [0.5, 0, −0.25] for the run, and
  # [0.5, 1.0, 0.0] for its noisy replica.
  tail_before, tail_after = {**before, "nll_tail": [1.0, 1.0, 2.0]}, {**after, "nll_tail": [
      1.5, 1.0, 1.75]}
  tail_noisy = {**noisy, "nll_tail_before": [[1.0, 1.0, 1.0]], "nll_tail_after": [[1.5, 2.0, 1.0]]}
  signals, _ = compute_signals(tail_before, tail_after, None, 0.05, 4, tail_noisy)
  np.testing.assert_allclose(signals["nll_tail"], [0.5, 0.0, -0.25])
  np.testing.assert_allclose(signals["nll_tail_nens"], [0.5, 0.5, -0.125])
  # Replicas of a run resumed from before nll_tail was scored have none: no nll_tail_nens.
  old = {**noisy, "nll_tail_before": [None], "nll_tail_after": [None]}
  signals, _ = compute_signals(tail_before, tail_after, None, 0.05, 4, old)
  assert "nll_tail" in signals and "nll_tail_nens" not in signals
  # Each response after an empty prompt: its rise under the safety finetune is style, not content.
  alone_before = {**before, "nll_alone": [3.0, 2.0, 1.0]}
  alone_after = {**after, "nll_alone": [3.5, 2.1, 1.2]}
  signals, _ = compute_signals(alone_before, alone_after, None, 0.05, 4)
  np.testing.assert_allclose(signals["nll_pmi"], [2.0 - 0.5, 0.1 - 0.1, 0.0 - 0.2])
  # Without M0, snapshots, replicas or gradients only the paper's signals remain.
  plain, extra = compute_signals({k: before[k] for k in ("nll", "acc", "tokens")},
                                 {k: after[k] for k in ("nll", "acc")}, None, 0.05, 4)
  assert set(plain) == {"nll", "acc"} and not extra


def _records(kinds, categories):
  return [Record(id=f"r{i}", prompt="p", response="r", kind=k, category=c)
          for i, (k, c) in enumerate(zip(kinds, categories))]


def test_signal_report_per_signal_and_per_category():
  kinds = ["unsafe"] * 4 + ["safe"] * 2 + ["task"] * 2
  cats = ["bias", "bias", "toxicity", "toxicity", "bias", "toxicity", None, None]
  good = np.array([5.0, 6.0, 5.5, 6.5, 0.1, 0.2, 0.0, 0.3])
  # Separates bias perfectly, but scores toxic examples like the rest.
  half = np.array([5.0, 6.0, 0.05, 0.25, 0.1, 0.2, 0.0, 0.3])
  report = signal_report({"nll": good, "grad": half}, _records(kinds, cats),
                         Threshold.parse("auto:otsu"))
  assert report["nll"]["auroc"] == 1.0 and report["nll"]["f1"] == 1.0
  assert report["grad"]["by_group"]["category=bias"]["auroc"] == 1.0
  assert report["grad"]["by_group"]["category=toxicity"]["auroc"] == 0.5
  assert report["grad"]["by_group"]["category=toxicity"]["n_unsafe"] == 2
  table = signal_table_markdown(report)
  assert "| `nll` | 1.000 |" in table and "AUROC toxicity" in table
  # No labels, or one class only: no report.
  assert signal_report({"nll": good}, _records([None] * 8, cats), Threshold.parse("auto")) is None
  assert signal_report({"nll": good}, _records(["safe"] * 8, cats), Threshold.parse("auto")) is None


# -- gradient alignment ---------------------------------------------------------------------------

BUCKETS = (16, 32)


def _runtime(mesh_cfg=None, devices=1):
  mesh_cfg = mesh_cfg or parallel.MeshConfig(1, 1, 1)
  cfg = tiny_llama(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=2,
                   num_kv_heads=1)
  return ModelRuntime.create(cfg, parallel.make_mesh(mesh_cfg, jax.devices()[:devices]))


def _per_token_nll(runtime, params, examples):
  stats = score_examples(Scorer(runtime), params, examples, Batching(8, BUCKETS, 0))
  return stats["nll_sum"] / stats["tokens"]


def test_gradient_alignment_predicts_the_first_order_change_of_each_loss():
  runtime = _runtime()
  params = runtime.init_params(seed=0)
  safe, noisy = random_examples(6, 1, lo=8), random_examples(10, 2, lo=8)
  aligner = GradientAlignment(runtime, n_blocks=2, batch_size=4, max_gib=1.0)
  g_safe = aligner.safe_gradient(params, safe, Batching(4, BUCKETS, 0))
  out = aligner.align(params, g_safe, noisy, BUCKETS, 0)
  # Step the last two blocks by ±eps along the safe descent direction -g_S/|g_S|: each example's
  # loss changes by eps * grad (first order); a central difference cancels the second order.
  eps = 1e-2
  norm = out["safe_grad_norm"]

  def moved(sign):
    subset, rest = split_blocks(params, 2)
    subset = jax.tree.map(lambda p, g: p - sign * eps * g / norm, subset, g_safe)
    return merge_blocks(subset, rest)

  slope = (_per_token_nll(runtime, moved(1), noisy)
           - _per_token_nll(runtime, moved(-1), noisy)) / (2 * eps)
  np.testing.assert_allclose(out["grad"], slope, rtol=2e-2, atol=2e-3)
  assert np.all(np.abs(out["grad_cos"]) <= 1 + 1e-6)


def test_an_example_aligned_with_itself_has_cosine_minus_one():
  runtime = _runtime()
  params = runtime.init_params(seed=1)
  one = random_examples(1, 3, lo=8)
  aligner = GradientAlignment(runtime, n_blocks=1, batch_size=2, max_gib=1.0)
  g = aligner.safe_gradient(params, one, Batching(2, BUCKETS, 0))
  out = aligner.align(params, g, one, BUCKETS, 0)
  np.testing.assert_allclose(out["grad_cos"], [-1.0], rtol=1e-5)
  np.testing.assert_allclose(out["grad"], [-out["safe_grad_norm"]], rtol=1e-5)


@pytest.mark.slow  # several compiled meshes or precisions: CI runs it, the fast loop skips it
def test_gradient_alignment_is_the_same_on_a_sharded_mesh():
  noisy, safe = random_examples(8, 4, lo=8), random_examples(4, 5, lo=8)
  outs = []
  for mesh_cfg, devices in ((parallel.MeshConfig(1, 1, 1), 1), (parallel.MeshConfig(2, 2, 2), 8)):
    runtime = _runtime(mesh_cfg, devices)
    params = runtime.init_params(seed=2)
    aligner = GradientAlignment(runtime, n_blocks=2, batch_size=4, max_gib=1.0)
    g = aligner.safe_gradient(params, safe, Batching(4, BUCKETS, 0))
    outs.append(aligner.align(params, g, noisy, BUCKETS, 0))
  np.testing.assert_allclose(outs[0]["grad"], outs[1]["grad"], rtol=1e-4, atol=1e-6)


def test_gradient_alignment_refuses_more_memory_than_its_bound():
  runtime = _runtime()
  per_example = subset_bytes(runtime.abstract_params, 2)
  block = per_example // 2
  assert per_example == 2 * block > 0
  limit = 3.5 * per_example / 2**30  # fits 3 examples per pass, not 4
  GradientAlignment(runtime, n_blocks=2, batch_size=3, max_gib=limit)
  with pytest.raises(ConfigError, match="gradient_batch_size=4.*gradient_max_gib"):
    GradientAlignment(runtime, n_blocks=2, batch_size=4, max_gib=limit)
  with pytest.raises(ConfigError, match=r"gradient_blocks=4: must be in \[1, 3\]"):
    GradientAlignment(runtime, n_blocks=4, batch_size=1, max_gib=1.0)
  assert math.isfinite(limit)


def test_a_signal_the_config_would_not_score_is_refused_when_the_config_loads():
  from ff_jax.config import load_config

  with pytest.raises(ConfigError, match=r"'nll_nens' needs scoring.noisy_replicas > 1"):
    load_config(None, ["filter.signal=nll_nens", "scoring.noisy_replicas=1"])
  with pytest.raises(ConfigError, match=r"'nll_lnf_ens' needs scoring.replicas > 1 and scoring.m0"):
    load_config(None, ["filter.signal=nll_lnf_ens", "scoring.m0=false"])
  with pytest.raises(ConfigError, match=r"'grad' needs scoring.gradient_blocks > 0"):
    load_config(None, ["filter.signal=grad", "scoring.gradient_blocks=0"])
  with pytest.raises(ConfigError, match=r"'nll_pmi' needs scoring.pmi=true"):
    load_config(None, ["filter.signal=nll_pmi", "scoring.pmi=false"])
  with pytest.raises(ConfigError, match=r"'nll_mean' is not a signal"):
    load_config(None, ["filter.signal=nll_mean"])
  assert load_config(None, ["filter.signal=nll", "scoring.replicas=1"]).filter.signal == "nll"
