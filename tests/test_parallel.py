"""Meshes and sharding on 8 fake CPU devices: same results on any mesh, one trace, no full copy."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ff_jax import parallel
from ff_jax.errors import MeshError
from ff_jax.models import init_params, tiny_llama
from ff_jax.training.steps import ModelRuntime, OptimConfig, Scorer, Trainer

pytestmark = pytest.mark.multidevice


def _need_devices(n):
  if len(jax.devices()) < n:
    pytest.skip(f"needs {n} devices (set XLA_FLAGS=--xla_force_host_platform_device_count=8)")


def _batch(rows=8, length=16, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 256, (rows, length)).astype(np.int32)
  mask = np.ones((rows, length), np.int32)
  mask[1, 9:] = 0
  mask[5, 4:] = 0
  loss_mask = np.zeros((rows, length), np.int32)
  loss_mask[:, 3:] = 1
  loss_mask *= mask
  return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask,
          "example_id": np.arange(rows, dtype=np.int32)}


def _run(mesh_cfg, devices, steps=3, accum=1, attention="auto"):
  # Enough heads and width that tensor=2 really shards every weight kind.
  cfg = tiny_llama(num_heads=4, num_kv_heads=2, hidden_size=64, intermediate_size=128,
                   attention=attention)
  mesh = parallel.make_mesh(mesh_cfg, devices)
  runtime = ModelRuntime.create(cfg, mesh)
  trainer = Trainer(runtime, OptimConfig(learning_rate=1e-3, grad_accum_steps=accum), steps)
  state = trainer.init_state(runtime.init_params(seed=0))
  losses = []
  for step in range(steps):
    state, metrics = trainer.step(state, trainer.put_batch(_batch(seed=step)))
    losses.append(float(metrics["loss"]))
  scores = Scorer(runtime).step(state["params"], parallel.global_batch(_batch(seed=9), mesh))
  return runtime, trainer, state, np.array(losses), scores


def _assert_same_scores(scores, ref_scores, label=""):
  for key in ref_scores:
    np.testing.assert_allclose(scores[key], ref_scores[key], rtol=2e-5, err_msg=f"{label} {key}")


@pytest.mark.slow  # several compiled meshes or precisions: CI runs it, the fast loop skips it
def test_same_losses_on_one_device_and_on_sharded_meshes():
  _need_devices(8)
  devices = jax.devices()
  _, _, _, ref_loss, ref_scores = _run(parallel.MeshConfig(1, 1, 1), devices[:1])
  for shape in [(8, 1, 1), (2, 2, 2), (1, 4, 2)]:
    _, _, _, loss, scores = _run(parallel.MeshConfig(*shape), devices)
    np.testing.assert_allclose(loss, ref_loss, atol=1e-5, err_msg=str(shape))
    _assert_same_scores(scores, ref_scores, str(shape))


@pytest.mark.parametrize("kernel", ["xla", "splash"])
def test_fused_attention_on_a_sharded_mesh(kernel):
  # jax.nn.dot_product_attention (the call cuDNN gets on a GPU), and splash attention (a
  # per-device Pallas kernel under shard_map: rows over data and FSDP, heads over tensor; Pallas
  # interpret mode here), under data, FSDP and tensor sharding, against the einsum path on one
  # device.
  _need_devices(8)
  devices = jax.devices()
  _, _, _, ref_loss, ref_scores = _run(parallel.MeshConfig(1, 1, 1), devices[:1])
  _, _, _, loss, scores = _run(parallel.MeshConfig(2, 2, 2), devices, attention=kernel)
  np.testing.assert_allclose(loss, ref_loss, atol=1e-5)
  _assert_same_scores(scores, ref_scores)


@pytest.mark.slow  # several compiled meshes or precisions: CI runs it, the fast loop skips it
def test_gradient_accumulation_matches_the_full_batch():
  _need_devices(8)
  _, _, _, ref_loss, ref_scores = _run(parallel.MeshConfig(2, 2, 2), jax.devices())
  _, _, _, loss, scores = _run(parallel.MeshConfig(2, 2, 2), jax.devices(), accum=2)
  np.testing.assert_allclose(loss, ref_loss, atol=1e-5)
  _assert_same_scores(scores, ref_scores)


def test_parameter_shardings_follow_the_rules_and_the_step_traces_once():
  _need_devices(8)
  runtime, trainer, state, *_ = _run(parallel.MeshConfig(2, 2, 2), jax.devices(), steps=4)
  params = state["params"]
  # Block parameters are stacked over layers; that leading axis stays unsharded.
  attn = params["layers"]["attn"]
  assert attn["q"].sharding.spec == P(None, "fsdp", "tensor", None)
  assert attn["k"].sharding.spec == P(None, "fsdp", "tensor", None)
  assert attn["o"].sharding.spec == P(None, "tensor", None, "fsdp")
  assert params["layers"]["mlp"]["down"].sharding.spec == P(None, "tensor", "fsdp")
  assert params["embed"].sharding.spec == P("tensor", "fsdp")
  assert params["final_norm"]["scale"].sharding.spec == P(None)
  # Optimizer moments are sharded like their parameters, not replicated.
  adam = trainer.state_shardings["opt_state"][1][0]
  assert adam.mu["layers"]["attn"]["q"].spec == P(None, "fsdp", "tensor", None)
  assert trainer.trace_count == 1


def test_sharded_init_never_materialises_the_whole_model():
  _need_devices(8)
  cfg = tiny_llama(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_layers=2,
                   num_heads=8, num_kv_heads=8)
  mesh = parallel.make_mesh(parallel.MeshConfig(1, 8, 1))
  runtime = ModelRuntime.create(cfg, mesh)
  total_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(runtime.abstract_params))
  shardings = runtime.param_shardings
  compiled = jax.jit(lambda: init_params(cfg, 0, shardings),
                     out_shardings=shardings).lower().compile()
  memory = compiled.memory_analysis()
  per_device = memory.output_size_in_bytes + memory.temp_size_in_bytes
  assert per_device < total_bytes / 2, (per_device, total_bytes)
  params = runtime.init_params(0)
  shard = params["layers"]["mlp"]["up"].addressable_shards[0]
  assert shard.data.shape == (2, 256 // 8, 1024)
  for array, sharding in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
    assert array.sharding == sharding


def test_meshes_that_do_not_fit_the_devices_are_refused():
  with pytest.raises(MeshError, match="needs 12 devices"):
    parallel.resolve_mesh_shape(parallel.MeshConfig(3, 2, 2), 8)
  with pytest.raises(MeshError, match="do not divide"):
    parallel.resolve_mesh_shape(parallel.MeshConfig(3, -1, 1), 8)
  with pytest.raises(MeshError, match="at most one axis"):
    parallel.resolve_mesh_shape(parallel.MeshConfig(-1, -1, 1), 8)
  assert parallel.resolve_mesh_shape(parallel.MeshConfig(2, -1, 2), 8) == (2, 2, 2)


def test_indivisible_dimensions_are_replicated_not_an_error():
  _need_devices(8)
  mesh = parallel.make_mesh(parallel.MeshConfig(1, 1, 8))
  spec = parallel.spec_for(P("embed", "kv_heads", "head_dim"), (64, 3, 16), mesh)
  assert spec == P(None, None, None)
