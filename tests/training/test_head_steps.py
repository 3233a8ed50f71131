"""The train and score steps with the LM head at target positions only equal the steps that
build every position's logits (`FULL_LOGITS`, the reference): per-example statistics, losses and
gradients within 1e-5 in float32, on unpacked and packed rows, stacked replicas and parameter
snapshots, with tiles small enough that every batch spans several."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ff_jax import parallel
from ff_jax.data.batching import Batching, TrainIterator, eval_batches
from ff_jax.models.layout import FULL_LOGITS
from ff_jax.training.replicas import StackedBatches
from ff_jax.training.scoring import score_examples, score_snapshots
from ff_jax.training.steps import SCORE_KEYS, ModelRuntime, OptimConfig, Scorer, Trainer, token_nll
from tests.training.test_packed_steps import BUCKETS, FAMILIES, PAD, _examples, _params

ONE_DEVICE = parallel.MeshConfig(1, 1, 1)


def _runtime(cfg, mesh_cfg=ONE_DEVICE, devices=None):
  return ModelRuntime.create(cfg, parallel.make_mesh(mesh_cfg, devices or jax.devices()[:1]))


def _small_tiles(runtime):
  return dataclasses.replace(runtime.step_layout(), tile=8)


def _same(got, want, label=""):
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5, err_msg=f"{label}{key}")


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("name", sorted(FAMILIES))  # untied head (llama), tied embedding (gpt2)
def test_scores_equal_the_full_logits(name, packing):
  runtime = _runtime(FAMILIES[name])
  params = _params(runtime)
  examples = _examples(25, seed=7)
  want = score_examples(Scorer(runtime, FULL_LOGITS), params, examples,
                        Batching(8, BUCKETS, PAD, packing))
  got = score_examples(Scorer(runtime, _small_tiles(runtime)), params, examples,
                       Batching(8, BUCKETS, PAD, packing))
  assert set(got) == set(SCORE_KEYS)
  _same(got, want, f"{name} packing={packing} ")
  assert np.all(got["tokens"] > 0) and np.any(got["correct"] > 0)


def test_snapshot_scores_equal_the_full_logits():
  runtime = _runtime(FAMILIES["llama"])
  stacked = jax.tree.map(lambda *xs: np.stack(xs), _params(runtime, 0), _params(runtime, 1))
  examples = _examples(21, seed=1)
  for packing in (False, True):
    want = score_snapshots(Scorer(runtime, FULL_LOGITS), stacked, examples,
                           Batching(8, BUCKETS, PAD, packing))
    got = score_snapshots(Scorer(runtime, _small_tiles(runtime)), stacked, examples,
                          Batching(8, BUCKETS, PAD, packing))
    assert got["nll_sum"].shape == (2, 21)
    _same(got, want, f"packing={packing} ")


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_loss_gradients_equal_the_full_logits(name, packing):
  runtime = _runtime(FAMILIES[name])
  params = _params(runtime)
  batch = eval_batches(_examples(12, seed=3), 12, BUCKETS, pad_id=PAD, packing=packing)[0]
  batch = {k: jnp.asarray(v) for k, v in batch.items()}

  def loss(p, layout):
    nll, _, weights = token_nll(runtime.graphdef, p, batch, layout=layout)
    return nll.sum() / weights.sum()

  want, g_want = jax.value_and_grad(loss)(params, FULL_LOGITS)
  got, g_got = jax.value_and_grad(loss)(params, _small_tiles(runtime))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_want), jax.tree.leaves(g_got)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def _train(trainer, runtime, examples, seeds, steps=3):
  optim_streams = [TrainIterator(examples, 8, seed, BUCKETS, pad_id=PAD, packing=True,
                                 row_multiple=trainer.row_multiple) for seed in seeds]
  state = trainer.init_state(runtime.init_params(0))
  losses = []
  for _ in range(steps):
    if trainer.replicas is None:
      local = optim_streams[0].next_batch()[0]
    else:
      local = StackedBatches(optim_streams, PAD).next_batch()[0]
    state, metrics = trainer.step(state, trainer.put_batch(local))
    losses.append(np.asarray(metrics["loss"]))
  return np.stack(losses), jax.device_get(state["params"])


@pytest.mark.parametrize("replicas", [None, 2])
def test_training_equals_the_full_logits(replicas):
  """3 AdamW steps on packed rows, one model or two stacked replicas (other data orders): the
  same losses within 1e-5 and weights within 1e-4 (Adam divides each gradient entry by its own
  scale, so an entry that is float noise around 0, an embedding row no batch used, moves by up to
  the learning rate either way; measured: 1 of 16384 entries beyond 1e-5)."""
  runtime = _runtime(FAMILIES["llama"])
  examples = _examples(30, seed=4)
  optim = OptimConfig(learning_rate=1e-3, schedule="constant")
  seeds = (5,) if replicas is None else (5, 6)
  want = _train(Trainer(runtime, optim, 3, replicas, FULL_LOGITS), runtime, examples, seeds)
  got = _train(Trainer(runtime, optim, 3, replicas, _small_tiles(runtime)), runtime, examples,
               seeds)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)


@pytest.mark.multidevice
def test_sharded_mesh_equals_the_full_logits_on_one_device():
  """Rows over data x FSDP (4 row groups), the head's vocabulary over tensor: the tiled steps'
  losses and scores on 8 devices equal the reference on one."""
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices (set XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  cfg = FAMILIES["llama"]
  examples = _examples(30, seed=8)
  optim = OptimConfig(learning_rate=1e-3, schedule="constant")
  one = _runtime(cfg)
  sharded = _runtime(cfg, parallel.MeshConfig(2, 2, 2), jax.devices())
  assert sharded.step_layout().groups == 4
  want_loss, want_params = _train(Trainer(one, optim, 3, None, FULL_LOGITS), one, examples, (5,))
  got_loss, got_params = _train(Trainer(sharded, optim, 3, None, _small_tiles(sharded)), sharded,
                                examples, (5,))
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  params = jax.device_put(got_params, sharded.param_shardings)
  want = score_examples(Scorer(one, FULL_LOGITS), want_params, examples,
                        Batching(8, BUCKETS, PAD, True))
  got = score_examples(Scorer(sharded, _small_tiles(sharded)), params, examples,
                       Batching(8, BUCKETS, PAD, True))
  _same(got, want)
