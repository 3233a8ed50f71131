"""LoRA: only adapters train, adapters start as the identity, merged weights compute what the
adapted model computes, adapter-only step checkpoints, a LoRA run of the tiny demo whose HF
export (adapters merged) matches the unmerged clean model, and the adapters as a PEFT folder."""

from __future__ import annotations

import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ff_jax import parallel
from ff_jax.errors import ConfigError
from ff_jax.models import forward, lora, positions_from_mask, tiny_llama
from ff_jax.models.config import LoraConfig
from ff_jax.models.loading import flatten, unstack_layers
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
  # The adapters alone, as PEFT reads them; the demo's base is the run's M0, no HF folder.
  from safetensors.numpy import load_file

  from ff_jax.models.hf import peft_adapter_tensors
  adapter = run_dir / "clean_adapter"
  config = json.loads((adapter / "adapter_config.json").read_text())
  assert config["base_model_name_or_path"] is None and config["lora_dropout"] == 0.1
  assert config["target_modules"] == ["down_proj", "q_proj", "up_proj", "v_proj"]
  written = load_file(adapter / "adapter_model.safetensors")
  want = peft_adapter_tensors(job.runtime.cfg, clean, "llama")
  assert sorted(written) == sorted(want)
  for key, value in want.items():
    np.testing.assert_array_equal(written[key], value, err_msg=key)
  assert "this run's `models/M0`" in (adapter / "README.md").read_text()
  assert "LoRA: rank 4" in (run_dir / "clean_hf" / "README.md").read_text()
  m0, m1 = flatten(job.params("M0")), flatten(job.params("M1"))
  for path, value in m0.items():  # the noisy finetune moved adapters only
    if not lora.is_adapter(path):
      np.testing.assert_array_equal(np.asarray(m1[path]), np.asarray(value))


# -- PEFT adapter folder --------------------------------------------------------------------------

PEFT_FAMILIES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text",
                 "mistral": "mistral", "llama_bias_headdim": "llama"}
ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def _trained_adapters(name: str, scan_layers: bool = True, targets=ALL_TARGETS):
  """(adapted config, params) of a parity fixture with random adapters (B ≠ 0: a real delta)."""
  from ff_jax.models import abstract_model
  from ff_jax.models.hf import load_hf
  from ff_jax.models.loading import unflatten
  from tests.helpers.paths import FIXTURES

  cfg, base = load_hf(FIXTURES / "parity" / name)
  cfg = cfg.replace(scan_layers=scan_layers, lora=LoraConfig(rank=3, alpha=6.0, targets=targets))
  _, abstract, _ = abstract_model(cfg)
  if not scan_layers:
    base = unstack_layers(base)  # {layer: subtree}, as an unscanned model holds its blocks
  params = flatten(lora.add_adapters(base, abstract, None, seed=1))
  rng = np.random.default_rng(0)
  for path, value in params.items():
    if str(path[-1]).endswith("_lora_b"):
      params[path] = jnp.asarray(rng.normal(0, 0.1, value.shape), value.dtype)
  return cfg, unflatten(params)


def _read_adapter(folder):
  import json

  from safetensors.numpy import load_file
  return json.loads((folder / "adapter_config.json").read_text()), load_file(
      folder / "adapter_model.safetensors")


@pytest.mark.parametrize("name", sorted(PEFT_FAMILIES))
def test_peft_adapter_plus_base_is_the_merged_export(tmp_path, name):
  """The adapter folder in PEFT's layout: for every adapted nn.Linear, base + (alpha/r) · lora_B
  lora_A is the merged model's exported weight (HF [out, in]), which pins the keys, the factors'
  orientation and the scale; nothing else in the merged export differs from the base's."""
  from ff_jax.models.hf import export_tensors, save_peft_adapter

  model_type = PEFT_FAMILIES[name]
  cfg, params = _trained_adapters(name)
  adapters, base = lora.split(params)
  folder = save_peft_adapter(tmp_path / "adapter", cfg, params, model_type,
                             base_model="org/base", card="# card\n")
  config, tensors = _read_adapter(folder)
  assert sorted(p.name for p in folder.iterdir()) == [
      "README.md", "adapter_config.json", "adapter_model.safetensors"]
  assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
  assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (
      3, 6, "org/base")
  assert config["target_modules"] == sorted(
      ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
  assert config["bias"] == "none" and config["fan_in_fan_out"] is False
  assert config["inference_mode"] is True
  plain = cfg.replace(lora=LoraConfig())
  merged = export_tensors(plain, lora.merge(params, cfg), model_type)
  original = export_tensors(plain, base, model_type)
  assert len(tensors) == 2 * 7 * cfg.num_layers
  adapted = set()
  for key, lora_a in tensors.items():
    if ".lora_A." not in key:
      continue
    module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
    lora_b = tensors[key.replace(".lora_A.", ".lora_B.")]
    weight = original[module + ".weight"]
    assert lora_a.shape == (3, weight.shape[1]) and lora_b.shape == (weight.shape[0], 3), key
    delta = (lora_b.astype(np.float64) @ lora_a.astype(np.float64)) * 6.0 / 3
    assert np.abs(delta).max() > 1e-3, key  # the adapters matter
    np.testing.assert_allclose(weight + delta, merged[module + ".weight"], atol=1e-5,
                               err_msg=key)
    adapted.add(module + ".weight")
  for key in set(original) - adapted:
    np.testing.assert_array_equal(original[key], merged[key], err_msg=key)
  assert len(flatten(adapters)) == 14


def test_peft_adapter_of_unscanned_layers_and_some_targets(tmp_path):
  from ff_jax.models.hf import peft_adapter_tensors

  cfg, params = _trained_adapters("llama", targets=("q", "v", "down"))
  flat_cfg, flat_params = _trained_adapters("llama", scan_layers=False, targets=("q", "v", "down"))
  stacked = peft_adapter_tensors(cfg, params, "llama")
  per_layer = peft_adapter_tensors(flat_cfg, flat_params, "llama")
  assert sorted(stacked) == sorted(per_layer)
  assert "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in stacked
  for key, value in stacked.items():
    np.testing.assert_array_equal(value, per_layer[key], err_msg=key)


def test_gpt2_has_no_peft_adapter_layout():
  from ff_jax.errors import CheckpointError
  from ff_jax.models.hf import load_hf, peft_target_modules
  from tests.helpers.paths import FIXTURES

  cfg, _ = load_hf(FIXTURES / "parity" / "gpt2")
  with pytest.raises(CheckpointError, match="not one nn.Linear"):
    peft_target_modules(cfg.replace(lora=LoraConfig(rank=2, targets=("q",))), "gpt2")


@pytest.mark.skipif(not (importlib.util.find_spec("peft") and importlib.util.find_spec("torch")
                         and importlib.util.find_spec("transformers")),
                    reason="peft and torch are not installed")
def test_peft_loads_the_adapter_onto_the_base_and_computes_the_merged_model(tmp_path):
  import torch
  import transformers
  from peft import PeftModel

  from ff_jax.models.hf import save_hf, save_peft_adapter

  cfg, params = _trained_adapters("llama")
  plain = cfg.replace(lora=LoraConfig())
  base_dir = save_hf(tmp_path / "base", plain, lora.split(params)[1], "llama")
  merged_dir = save_hf(tmp_path / "merged", plain, lora.merge(params, cfg), "llama")
  adapter = save_peft_adapter(tmp_path / "adapter", cfg, params, "llama", str(base_dir))
  base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
  model = PeftModel.from_pretrained(base, adapter)
  merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir,
                                                             attn_implementation="eager")
  ids = torch.tensor([[1, 5, 9, 3, 7]])
  with torch.no_grad():
    np.testing.assert_allclose(model(input_ids=ids).logits.numpy(),
                               merged(input_ids=ids).logits.numpy(), atol=1e-4)
