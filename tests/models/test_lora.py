"""LoRA: only adapters train, adapters start as the identity, merged weights compute what the
adapted model computes, adapter-only step checkpoints, and a LoRA run of the tiny demo whose HF
export (adapters merged) matches the unmerged clean model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ff_jax import parallel
from ff_jax.errors import ConfigError
from ff_jax.models import forward, lora, positions_from_mask, tiny_llama
from ff_jax.models.config import LoraConfig
from ff_jax.models.loading import flatten
from ff_jax.training.steps import ModelRuntime, OptimConfig, Trainer
from tests.helpers.pipeline_helpers import TINY_DEMO, run_and_kill, run_ok

LORA = LoraConfig(rank=4, alpha=8.0, targets=("q", "k", "v", "o", "gate", "up", "down"))


def _batch(rng: np.random.Generator, rows: int = 8, length: int = 12) -> dict[str, np.ndarray]:
  tokens = rng.integers(1, 200, (rows, length)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[::2, -3:] = 0  # some right padding
  return {"tokens": tokens, "mask": mask, "loss_mask": mask.copy(),
          "example_id": np.arange(rows, dtype=np.int32)}


def _logits(runtime, params, batch):
  mask = jnp.asarray(batch["mask"])
  return forward(runtime.graphdef, params, jnp.asarray(batch["tokens"]),
                 positions_from_mask(mask), mask)[0]


@pytest.fixture(scope="module")
def adapted():
  """(base runtime, adapted runtime, base params, adapted params after 5 train steps, trainer)."""
  mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=4, tensor=1))
  base_rt = ModelRuntime.create(tiny_llama(), mesh)
  rt = ModelRuntime.create(tiny_llama(lora=LORA), mesh)
  base = base_rt.init_params(0)
  params = lora.add_adapters(base, rt.abstract_params, rt.param_shardings, seed=1)
  trainer = Trainer(rt, OptimConfig(learning_rate=1e-2), total_steps=5)
  state = trainer.init_state(jax.tree.map(jnp.copy, params))  # the step donates its input
  rng = np.random.default_rng(0)
  for _ in range(5):
    batch = parallel.global_batch(_batch(rng), mesh, rt.rules)
    state, _ = trainer.step(state, batch)
  return base_rt, rt, base, params, state


def test_fresh_adapters_compute_the_base_model(adapted):
  base_rt, rt, base, params, _ = adapted
  batch = _batch(np.random.default_rng(1))
  np.testing.assert_array_equal(_logits(rt, params, batch), _logits(base_rt, base, batch))
  # 7 targets x 2 factors, stacked over the 2 blocks, each sharded like the weight it adapts.
  adapters = flatten(lora.split(params)[0])
  assert len(adapters) == 14
  q_a = params["layers"]["attn"]["q_lora_a"]  # stacked over the 2 layers
  assert q_a.shape == (2, 64, 4) and q_a.sharding.spec[1] == "fsdp"


def test_only_adapters_train_and_have_optimizer_state(adapted):
  _, _, base, params, state = adapted
  trained = flatten(state["params"])
  for path, value in flatten(base).items():  # every base weight bit-identical after training
    np.testing.assert_array_equal(np.asarray(trained[path]), np.asarray(value), err_msg=str(path))
  # Each layer's factors (slice i of each stacked factor): B moves off zero, A with it.
  changed = [(p, i) for p, v in flatten(lora.split(params)[0]).items() for i in range(2)
             if not np.array_equal(np.asarray(trained[p][i]), np.asarray(v[i]))]
  assert len(changed) == 28
  moments = {leaf.shape for leaf in jax.tree.leaves(state["opt_state"]) if leaf.ndim}
  adapter_shapes = {v.shape for v in flatten(lora.split(params)[0]).values()}
  assert moments <= adapter_shapes


def test_merged_weights_match_the_adapted_forward(adapted):
  base_rt, rt, _, _, state = adapted
  merged = lora.merge(state["params"], rt.cfg)
  assert not lora.split(merged)[0]
  batch = _batch(np.random.default_rng(2))
  got, want = _logits(base_rt, merged, batch), _logits(rt, state["params"], batch)
  assert float(jnp.max(jnp.abs(want - _logits(base_rt, lora.split(state["params"])[1], batch)))
               ) > 1e-3  # the adapters matter
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_lora_config_is_checked():
  with pytest.raises(ConfigError, match="lora.targets"):
    LoraConfig(rank=4, targets=("q", "lm_head"))
  with pytest.raises(ConfigError, match="lora.dropout"):
    LoraConfig(rank=4, dropout=1.0)


@pytest.mark.slow
def test_lora_run_checkpoints_adapters_and_exports_a_merged_model(tmp_path):
  run_dir = tmp_path / "run"
  args = ["run", f"run_dir={run_dir}", *TINY_DEMO, "lora.rank=4", "lora.alpha=8",
          "lora.dropout=0.1", "lora.targets=[q,v,up,down]"]
  run_and_kill(*args, phase="noisy", at=5)
  steps = sorted(int(p.name) for p in (run_dir / "ckpt" / "noisy").iterdir() if p.name.isdigit())
  saved = ocp.StandardCheckpointer().metadata(
      run_dir / "ckpt" / "noisy" / str(steps[-1]) / "state").item_metadata

  def names(node):  # leaf names of an Orbax tree metadata
    if hasattr(node, "keys"):
      return {n for key in node.keys() for n in (names(node[key]) or {key})}
    return set()

  assert names(saved["params"]) == {f"{t}_lora_{f}" for t in ("q", "v", "up", "down")
                                    for f in "ab"}
  run_ok(*args)  # resumes from the adapter-only checkpoint and finishes

  from ff_jax.config import load_config
  from ff_jax.models.hf import load_hf
  from ff_jax.pipeline.context import open_run

  job = open_run(load_config(None, args[1:]))
  clean = job.params("clean")
  cfg, exported = load_hf(run_dir / "clean_hf")
  base_rt = ModelRuntime.create(cfg, job.mesh)
  batch = _batch(np.random.default_rng(3))
  np.testing.assert_allclose(np.asarray(_logits(base_rt, exported, batch)),
                             np.asarray(_logits(job.runtime, clean, batch)), atol=1e-5, rtol=1e-5)
  m0, m1 = flatten(job.params("M0")), flatten(job.params("M1"))
  for path, value in m0.items():  # the noisy finetune moved adapters only
    if not lora.is_adapter(path):
      np.testing.assert_array_equal(np.asarray(m1[path]), np.asarray(value))
