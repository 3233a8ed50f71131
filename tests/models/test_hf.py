"""HF checkpoint import/export: logit parity, exact round trips, sharding and bad-input errors.

Golden tests use the tiny random checkpoints in tests/fixtures/parity/ (regenerate them with
scripts/make_parity_fixtures.py): transformers' logits of each, and the export of each that
transformers was seen to load, so they need no torch. The live tests that need torch are skipped
without it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from ff_jax.cpu_devices import cpu_device_flags
from ff_jax.errors import CheckpointError
from ff_jax.models import abstract_model, forward, hf, positions_from_mask
from ff_jax.models.config import ModelConfig, RopeScaling
from ff_jax.models.loading import flatten
from ff_jax.models.tokenizer import TextTokenizer
from ff_jax.parallel import MeshConfig, make_mesh
from tests.helpers.paths import FIXTURES, REPO

PARITY = FIXTURES / "parity"  # tiny random checkpoints and their golden logits
NAMES = ["llama", "llama3_rope", "gpt2", "qwen2", "qwen3", "gemma3", "llama_bias_headdim",
         "mistral", "gpt2_untied", "qwen3_sliding_bias", "gemma3_softcap"]
MODEL_TYPES = {"llama": "llama", "llama3_rope": "llama", "gpt2": "gpt2", "qwen2": "qwen2",
               "qwen3": "qwen3", "gemma3": "gemma3_text", "llama_bias_headdim": "llama",
               "mistral": "mistral", "gpt2_untied": "gpt2", "qwen3_sliding_bias": "qwen3",
               "gemma3_softcap": "gemma3_text"}
TOL = 1e-4

HAVE_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed (parity extra)")


def ff_logits(cfg: ModelConfig, params, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
  graphdef, _, _ = abstract_model(cfg)
  logits, _ = forward(graphdef, params, ids, positions_from_mask(mask), mask)
  return np.asarray(logits)


def max_diff(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
  """Largest |a - b| over real (non-padding) positions."""
  return float(np.abs(a - b)[mask.astype(bool)].max())


def fixture_logits_diff(cfg: ModelConfig, params, name: str) -> float:
  """Largest |logit difference| of `cfg`, `params` against fixture `name`'s golden logits."""
  expected = np.load(PARITY / name / "expected.npz")
  mask = expected["attention_mask"]
  return max_diff(ff_logits(cfg, params, expected["input_ids"], mask), expected["logits"], mask)


def read_safetensors(folder: Path) -> dict[str, np.ndarray]:
  out = {}
  for path in sorted(folder.glob("*.safetensors")):
    with safe_open(str(path), framework="numpy") as f:
      out.update({k: f.get_tensor(k) for k in f.keys()})
  return out


RAW_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}


def read_raw_safetensors(folder: Path) -> dict[str, np.ndarray]:
  """Every tensor of a folder's safetensors files, from the bytes (numpy's reader lacks bf16)."""
  out = {}
  for path in sorted(folder.glob("*.safetensors")):
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    for key, entry in header.items():
      if key != "__metadata__":
        begin, end = entry["data_offsets"]
        out[key] = np.frombuffer(data[8 + size + begin:8 + size + end],
                                 RAW_DTYPES[entry["dtype"]]).reshape(entry["shape"])
  return out


def copy_fixture(name: str, dest: Path) -> Path:
  folder = dest / name
  shutil.copytree(PARITY / name, folder)
  return folder


def rewrite_tensors(folder: Path, edit) -> None:
  tensors = read_safetensors(folder)
  edit(tensors)
  save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def fixture_script():
  spec = importlib.util.spec_from_file_location("make_parity_fixtures",
                                                REPO / "scripts" / "make_parity_fixtures.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# ------------------------------------------------------------------------------------------------
# Parity.


@pytest.mark.parametrize("name", NAMES)
def test_golden_logit_parity(name):
  cfg, params = hf.load_hf(PARITY / name)
  expected = np.load(PARITY / name / "expected.npz")
  mask = expected["attention_mask"]
  assert not mask.all(), "the fixture should contain a padded row"
  np.testing.assert_array_equal(positions_from_mask(mask), expected["position_ids"])
  logits = ff_logits(cfg, params, expected["input_ids"], mask)
  assert max_diff(logits, expected["logits"], mask) <= TOL


def test_fixture_configs_cover_the_features():
  # What load_hf reads config.json as, without loading and placing the weights of every fixture.
  cfgs = {name: hf.config_from_hf(json.loads((PARITY / name / "config.json").read_text()), name)
          for name in NAMES}
  assert cfgs["llama"].num_kv_heads < cfgs["llama"].num_heads and not cfgs["llama"].tie_embeddings
  assert cfgs["llama3_rope"].rope_scaling.kind == "llama3"
  assert cfgs["llama3_rope"].rope_scaling.original_max_position_embeddings == 16
  assert cfgs["gpt2"].positions == "learned" and cfgs["gpt2"].tie_embeddings
  assert cfgs["qwen2"].qkv_bias and not cfgs["qwen2"].out_bias
  assert cfgs["qwen2"].rope_theta == 1e6
  qwen3 = cfgs["qwen3"]
  assert qwen3.qk_norm and not qwen3.qkv_bias and qwen3.tie_embeddings
  assert qwen3.num_kv_heads < qwen3.num_heads
  assert qwen3.resolved_head_dim * qwen3.num_heads != qwen3.hidden_size  # explicit head_dim
  gemma3 = cfgs["gemma3"]
  assert len(set(gemma3.layer_types)) == 2
  assert gemma3.sliding_window < len(np.load(PARITY / "gemma3" / "expected.npz")["input_ids"][0])
  assert gemma3.rope_local_theta != gemma3.rope_theta and gemma3.rope_scaling.kind == "linear"
  assert gemma3.query_pre_attn_scalar not in (None, gemma3.resolved_head_dim)
  assert gemma3.mlp == "geglu" and gemma3.tie_embeddings and gemma3.num_kv_heads < gemma3.num_heads
  assert gemma3.qk_norm and gemma3.norm_plus_one and gemma3.post_norms and gemma3.scale_embeddings
  biased = cfgs["llama_bias_headdim"]
  assert biased.qkv_bias and biased.out_bias and biased.rope_scaling.kind == "linear"
  assert biased.resolved_head_dim * biased.num_heads != biased.hidden_size
  mistral = cfgs["mistral"]
  assert mistral.resolved_head_dim * mistral.num_heads != mistral.hidden_size
  assert mistral.num_kv_heads < mistral.num_heads and not mistral.tie_embeddings
  assert json.loads((PARITY / "mistral" / "config.json").read_text())["model_type"] == "mistral"
  assert not cfgs["gpt2_untied"].tie_embeddings and cfgs["gpt2_untied"].intermediate_size == 80
  sliding = cfgs["qwen3_sliding_bias"]
  assert sliding.layer_types == ("full_attention", "sliding_attention") and sliding.qkv_bias
  assert sliding.sliding_window < len(np.load(PARITY / "qwen3" / "expected.npz")["input_ids"][0])
  softcap = cfgs["gemma3_softcap"]
  assert softcap.final_logit_softcap is not None and softcap.qkv_bias
  assert not softcap.tie_embeddings


def _zero_attention_biases(params):
  for key in ("q_bias", "k_bias", "v_bias", "o_bias"):
    if key in params["layers"]["attn"]:
      params["layers"]["attn"][key] = np.zeros_like(params["layers"]["attn"][key])


def _tie_head(params):
  params["lm_head"] = np.asarray(params["embed"]).T


# What each fixture that only live tests used to check was made for: without it (a config field
# or some parameters undone), its golden logits are far off.
ABLATIONS = {
    "llama_bias_headdim/biases": ("llama_bias_headdim", None, _zero_attention_biases),
    "llama_bias_headdim/linear_rope": ("llama_bias_headdim", dict(rope_scaling=RopeScaling()),
                                       None),
    "gpt2_untied/head": ("gpt2_untied", None, _tie_head),
    "qwen3_sliding_bias/window": ("qwen3_sliding_bias",
                                  dict(layer_types=None, sliding_window=None), None),
    "qwen3_sliding_bias/biases": ("qwen3_sliding_bias", None, _zero_attention_biases),
    "gemma3_softcap/softcap": ("gemma3_softcap", dict(final_logit_softcap=None), None),
    "gemma3_softcap/biases": ("gemma3_softcap", None, _zero_attention_biases),
}


@pytest.mark.parametrize("ablation", sorted(ABLATIONS))
def test_fixture_depends_on_its_feature(ablation):
  name, changes, edit = ABLATIONS[ablation]
  cfg, params = hf.load_hf(PARITY / name)
  assert fixture_logits_diff(cfg, params, name) <= TOL
  if changes:
    cfg = cfg.replace(**changes)
  if edit:
    edit(params)
  assert fixture_logits_diff(cfg, params, name) > 1e-2


LIVE_CONFIGS = {
    # head_dim != hidden/heads, attention biases on q/k/v/o, linear RoPE scaling.
    "llama_bias_headdim": ("LlamaForCausalLM", dict(
        model_type="llama", vocab_size=96, hidden_size=48, intermediate_size=80,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
        attention_bias=True, max_position_embeddings=64, rms_norm_eps=1e-5,
        tie_word_embeddings=False, rope_theta=10000.0,
        rope_scaling=dict(rope_type="linear", factor=2.0))),
    "mistral": ("MistralForCausalLM", dict(
        model_type="mistral", vocab_size=96, hidden_size=32, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=1,
        max_position_embeddings=64, tie_word_embeddings=False, sliding_window=None)),
    # Untied GPT-2 with a non-default inner size.
    "gpt2_untied": ("GPT2LMHeadModel", dict(
        model_type="gpt2", vocab_size=96, n_embd=32, n_layer=2, n_head=2, n_positions=32,
        n_inner=80, activation_function="gelu_pytorch_tanh", tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0)),
    # Attention biases, a sliding window on the layers from max_window_layers on, untied.
    "qwen3_sliding_bias": ("Qwen3ForCausalLM", dict(
        model_type="qwen3", vocab_size=96, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        attention_bias=True, use_sliding_window=True, sliding_window=3, max_window_layers=1,
        max_position_embeddings=64, tie_word_embeddings=False)),
    # Softcapped final logits, attention biases, untied; layer kinds and local/global bases given
    # to transformers in v4 terms (sliding_window_pattern, rope_local_base_freq).
    "gemma3_softcap": ("Gemma3ForCausalLM", dict(
        model_type="gemma3_text", vocab_size=96, hidden_size=32, intermediate_size=64,
        num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        attention_bias=True, query_pre_attn_scalar=16, sliding_window=5, sliding_window_pattern=2,
        final_logit_softcapping=1.5, rope_theta=20000.0,
        rope_local_base_freq=300.0, max_position_embeddings=64, tie_word_embeddings=False)),
}


@needs_torch
@pytest.mark.parametrize("name", sorted(LIVE_CONFIGS))
def test_live_parity(tmp_path, name):
  script = fixture_script()
  arch, config = LIVE_CONFIGS[name]
  model = script.build_model(arch, config, seed=123)
  model.save_pretrained(tmp_path, safe_serialization=True)
  inputs = script.example_inputs(seed=7)
  inputs["input_ids"] %= config["vocab_size"]
  expected = script.hf_logits(model, inputs)
  cfg, params = hf.load_hf(tmp_path)
  mask = inputs["attention_mask"]
  logits = ff_logits(cfg, params, inputs["input_ids"], mask)
  assert max_diff(logits, expected, mask) <= TOL


# ------------------------------------------------------------------------------------------------
# Export.


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_is_exact(tmp_path, name):
  cfg, params = hf.load_hf(PARITY / name)
  out = hf.save_hf(tmp_path / "out", cfg, params, MODEL_TYPES[name])
  original, exported = read_safetensors(PARITY / name), read_safetensors(out)
  assert sorted(exported) == sorted(original)
  for key, value in original.items():
    assert exported[key].dtype == value.dtype, key
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  # And the config survives too.
  assert hf.load_hf(out)[0] == cfg


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trip(name):
  cfg, _ = hf.load_hf(PARITY / name)
  exported = hf.hf_config_from(cfg, MODEL_TYPES[name])
  assert hf.config_from_hf(json.loads(json.dumps(exported)), "x/config.json") == cfg


# Bytes per shard: one file (the default), or several (the fixtures hold 0.11-0.45 MB; the
# generator's sharded export uses the same size).
SHARD_SIZES = {"one_file": hf.MAX_SHARD_SIZE, "shards": 40_000}


@pytest.mark.parametrize("name", NAMES)
def test_export_is_the_one_transformers_was_seen_to_load(tmp_path, name):
  """The generator loaded ff_jax's export of each fixture in transformers and kept its logits
  (`export_logits`) and small files (`export/`) only if those logits were the fixture's. Today's
  export must be that folder: the same config.json and generation_config.json, and the fixture's
  own tensors (test_round_trip_is_exact), so transformers reads today's export the same way."""
  cfg, params = hf.load_hf(PARITY / name)
  out = hf.save_hf(tmp_path / "out", cfg, params, MODEL_TYPES[name])
  for file in ("config.json", "generation_config.json"):
    want = json.loads((PARITY / name / "export" / file).read_text())
    assert json.loads((out / file).read_text()) == want, file
  expected = np.load(PARITY / name / "expected.npz")
  mask = expected["attention_mask"]
  assert max_diff(expected["export_logits"], expected["logits"], mask) <= TOL


@needs_torch
@pytest.mark.parametrize("shards", sorted(SHARD_SIZES))
@pytest.mark.parametrize("name", NAMES)
def test_export_loads_in_transformers(tmp_path, name, shards):
  import torch
  import transformers

  cfg, params = hf.load_hf(PARITY / name)
  out = hf.save_hf(tmp_path / "out", cfg, params, MODEL_TYPES[name],
                   max_shard_size=SHARD_SIZES[shards])
  assert (out / "model.safetensors.index.json").exists() == (shards == "shards")
  model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
  expected = np.load(PARITY / name / "expected.npz")
  with torch.no_grad():
    logits = model(**{k: torch.from_numpy(expected[k])
                      for k in ("input_ids", "attention_mask", "position_ids")}).logits.numpy()
  mask = expected["attention_mask"]
  assert max_diff(logits, expected["logits"], mask) <= TOL


def tiny_tokenizer() -> TextTokenizer:
  import tokenizers

  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "hello": 4, "world": 5}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  return TextTokenizer(tokenizer=tok, eos_id=2, pad_id=3, bos_id=1)


def test_save_replaces_folder_atomically_with_tokenizer(tmp_path):
  cfg, params = hf.load_hf(PARITY / "llama")
  dest = tmp_path / "export"
  dest.mkdir()
  (dest / "stale.txt").write_text("old run")
  hf.save_hf(dest, cfg, params, "llama", tokenizer=tiny_tokenizer())
  assert sorted(p.name for p in dest.iterdir()) == [
      "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
      "tokenizer_config.json"]
  assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temp or backup left behind
  tok = hf.load_tokenizer(dest)
  assert (tok.eos_id, tok.pad_id, tok.bos_id) == (2, 3, 1)
  assert tok.encode("hello world") == [4, 5]


def test_failed_save_leaves_destination_untouched(tmp_path):
  cfg, params = hf.load_hf(PARITY / "gpt2")
  dest = tmp_path / "export"
  hf.save_hf(dest, cfg, params, "gpt2")
  before = read_safetensors(dest)
  with pytest.raises(CheckpointError, match="cannot export this model as llama"):
    hf.save_hf(dest, cfg, params, "llama")
  assert sorted(read_safetensors(dest)) == sorted(before)
  assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_bfloat16_export_and_import(tmp_path):
  cfg, params = hf.load_hf(PARITY / "qwen2", dtype="bfloat16")
  assert cfg.param_dtype == "bfloat16"
  assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(params))
  out = hf.save_hf(tmp_path / "bf16", cfg, params, "qwen2")
  assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
  with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
    assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
  cfg2, params2 = hf.load_hf(out, dtype="bfloat16")
  assert cfg2 == cfg
  for path, value in flatten(params).items():
    np.testing.assert_array_equal(np.asarray(flatten(params2)[path]), np.asarray(value))


# ------------------------------------------------------------------------------------------------
# Layouts: sharded files, prefixes, sharded placement.


def test_multi_file_checkpoint_loads_identically(tmp_path):
  folder = copy_fixture("llama", tmp_path)
  tensors = read_safetensors(folder)
  (folder / "model.safetensors").unlink()
  keys = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": keys[::2],
            "model-00002-of-00002.safetensors": keys[1::2]}
  weight_map = {}
  for name, shard_keys in shards.items():
    # The second shard is bf16: checkpoints are usually stored that way and numpy cannot read it.
    cast = (lambda x: x.astype(ml_dtypes.bfloat16)) if name.startswith("model-00002") else None
    save_file({k: cast(tensors[k]) if cast else tensors[k] for k in shard_keys},
              str(folder / name), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(shard_keys, name))
  (folder / "model.safetensors.index.json").write_text(
      json.dumps({"metadata": {}, "weight_map": weight_map}))

  cfg, params = hf.load_hf(PARITY / "llama")
  cfg2, params2 = hf.load_hf(folder)
  assert cfg2 == cfg
  flat, flat2 = flatten(params), flatten(params2)
  assert sorted(flat, key=str) == sorted(flat2, key=str)
  bf16_keys = set(shards["model-00002-of-00002.safetensors"])
  exported = hf.export_tensors(cfg2, params2, "llama")
  for key, value in tensors.items():
    want = value.astype(ml_dtypes.bfloat16).astype(np.float32) if key in bf16_keys else value
    np.testing.assert_array_equal(exported[key], want, err_msg=key)


def test_base_model_keys_without_prefix_and_ignorable_buffers(tmp_path):
  folder = copy_fixture("gpt2", tmp_path)

  def strip(tensors):
    for key in list(tensors):
      tensors[key.removeprefix("transformer.")] = tensors.pop(key)
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))  # old causal buffer
    tensors["lm_head.weight"] = tensors["wte.weight"]  # tied: ignored

  rewrite_tensors(folder, strip)
  _, params = hf.load_hf(folder)
  _, want = hf.load_hf(PARITY / "gpt2")
  for path, value in flatten(want).items():
    np.testing.assert_array_equal(np.asarray(flatten(params)[path]), np.asarray(value))


def test_sharded_load_matches_runtime_shardings():
  from ff_jax.training.steps import ModelRuntime

  mesh = make_mesh(MeshConfig())
  for name in ("llama", "gpt2", "qwen3", "gemma3"):
    cfg, params = hf.load_hf(PARITY / name, mesh=mesh)
    runtime = ModelRuntime.create(cfg, mesh)
    got = jax.tree.map(lambda x: x.sharding, params)
    assert got == runtime.param_shardings
    _, plain = hf.load_hf(PARITY / name)
    for path, value in flatten(plain).items():
      np.testing.assert_array_equal(np.asarray(flatten(params)[path]), np.asarray(value))


@pytest.mark.slow
def test_sharded_load_on_eight_fake_devices():
  """The same check on a real 2x2x2 mesh, in a subprocess so the device count can be forced."""
  code = textwrap.dedent(f"""
      import jax, numpy as np
      from ff_jax.models import hf
      from ff_jax.models.loading import flatten
      from ff_jax.parallel import MeshConfig, make_mesh
      from ff_jax.training.steps import ModelRuntime
      assert len(jax.devices()) == 8
      mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
      for name in ("llama", "qwen2", "gpt2", "qwen3", "gemma3"):
        folder = {str(PARITY)!r} + "/" + name
        cfg, params = hf.load_hf(folder, mesh=mesh)
        runtime = ModelRuntime.create(cfg, mesh)
        assert jax.tree.map(lambda x: x.sharding, params) == runtime.param_shardings
        q = params["layers"]["attn"]["q"].sharding.spec
        assert q == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None), q
        _, plain = hf.load_hf(folder)
        for path, value in flatten(plain).items():
          np.testing.assert_array_equal(np.asarray(flatten(params)[path]), np.asarray(value))
      print("ok")
  """)
  env = dict(os.environ, XLA_FLAGS=cpu_device_flags(8),
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith("ok")


# ------------------------------------------------------------------------------------------------
# Bad input.


def test_unknown_architecture(tmp_path):
  folder = copy_fixture("llama", tmp_path)
  config = json.loads((folder / "config.json").read_text())
  config.update(model_type="bert", architectures=["BertForMaskedLM"])
  (folder / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match=r"unknown architecture 'bert' in .*config\.json; "
                                            r"supported: llama, mistral, qwen2, gpt2"):
    hf.load_hf(folder)


def test_unknown_architecture_without_model_type():
  with pytest.raises(CheckpointError, match="unknown architecture 'FalconForCausalLM' in cfg"):
    hf.config_from_hf({"architectures": ["FalconForCausalLM"]}, "cfg")


def test_missing_tensor(tmp_path):
  folder = copy_fixture("llama", tmp_path)
  rewrite_tensors(folder, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
  with pytest.raises(CheckpointError,
                     match=r"llama: checkpoint is missing tensor\(s\) "
                           r"'model.layers.1.self_attn.k_proj.weight'"):
    hf.load_hf(folder)


def test_wrong_shape(tmp_path):
  folder = copy_fixture("qwen2", tmp_path)

  def widen(tensors):
    key = "model.layers.0.mlp.up_proj.weight"
    tensors[key] = np.concatenate([tensors[key], tensors[key][:1]])

  rewrite_tensors(folder, widen)
  with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor "
                                            r"'model.layers.0.mlp.up_proj.weight' has shape"):
    hf.load_hf(folder)


def test_wrong_fused_qkv_shape(tmp_path):
  folder = copy_fixture("gpt2", tmp_path)

  def cut(tensors):
    key = "transformer.h.1.attn.c_attn.bias"
    tensors[key] = tensors[key][:-4]

  rewrite_tensors(folder, cut)
  match = r"model\.safetensors: tensor 'transformer.h.1.attn.c_attn.bias' has shape \(188,\)"
  with pytest.raises(CheckpointError, match=match):
    hf.load_hf(folder)


def test_unmapped_tensor(tmp_path):
  folder = copy_fixture("llama", tmp_path)

  def add(tensors):
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)

  rewrite_tensors(folder, add)
  with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor "
                                            r"'model.layers.0.self_attn.q_proj.bias' has no place"):
    hf.load_hf(folder)


@pytest.mark.parametrize("change, match", [
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
     "rope_parameters.rope_type='yarn' is not supported"),
    ({"mlp_bias": True}, "mlp_bias=true is not supported"),
    ({"num_attention_heads": None}, "missing key 'num_attention_heads'"),
])
def test_unsupported_llama_config(change, match):
  config = json.loads((PARITY / "llama" / "config.json").read_text())
  config.update(change)
  config = {k: v for k, v in config.items() if v is not None}
  with pytest.raises(CheckpointError, match=f"path/config.json: .*{match}"):
    hf.config_from_hf(config, "path/config.json")


def test_unsupported_gpt2_activation():
  config = json.loads((PARITY / "gpt2" / "config.json").read_text())
  config["activation_function"] = "relu"
  with pytest.raises(CheckpointError, match="activation_function='relu' is not supported"):
    hf.config_from_hf(config, "c.json")


def test_v4_style_rope_keys():
  config = json.loads((PARITY / "llama" / "config.json").read_text())
  del config["rope_parameters"]
  config.update(rope_theta=5e5, rope_scaling={"type": "linear", "factor": 4.0})
  cfg = hf.config_from_hf(config, "c.json")
  assert cfg.rope_theta == 5e5
  assert (cfg.rope_scaling.kind, cfg.rope_scaling.factor) == ("linear", 4.0)
  config["eos_token_id"] = [7, 8]  # Llama 3 lists several
  assert hf.config_from_hf(config, "c.json").eos_token_id == 7


def test_missing_files(tmp_path):
  with pytest.raises(CheckpointError, match="config.json: not found"):
    hf.load_hf(tmp_path)
  shutil.copy(PARITY / "llama" / "config.json", tmp_path)
  with pytest.raises(CheckpointError, match="no model.safetensors"):
    hf.load_hf(tmp_path)


# ------------------------------------------------------------------------------------------------
# Streamed, sharded export.

SHARD_BYTES = SHARD_SIZES["shards"]


def test_shard_files_fill_in_order_and_are_named_like_transformers():
  sizes = [("a", 40), ("b", 50), ("c", 30), ("d", 150), ("e", 10)]
  assert hf.shard_files(sizes, 100) == {
      "model-00001-of-00004.safetensors": ["a", "b"],
      "model-00002-of-00004.safetensors": ["c"],
      "model-00003-of-00004.safetensors": ["d"],  # larger than a shard: a file of its own
      "model-00004-of-00004.safetensors": ["e"]}
  assert hf.shard_files(sizes, 280) == {"model.safetensors": ["a", "b", "c", "d", "e"]}


@pytest.mark.parametrize("name", NAMES)
def test_sharded_export_equals_single_file_and_round_trips(tmp_path, name):
  cfg, params = hf.load_hf(PARITY / name)
  single = hf.save_hf(tmp_path / "single", cfg, params, MODEL_TYPES[name])
  sharded = hf.save_hf(tmp_path / "sharded", cfg, params, MODEL_TYPES[name],
                       max_shard_size=SHARD_BYTES)
  shards = sorted(sharded.glob("*.safetensors"))
  count = len(shards)
  assert count >= 3
  assert [p.name for p in shards] == [f"model-{i:05d}-of-{count:05d}.safetensors"
                                      for i in range(1, count + 1)]
  for small in ("config.json", "generation_config.json"):
    assert (sharded / small).read_bytes() == (single / small).read_bytes()

  whole, parts = read_safetensors(single), read_safetensors(sharded)
  assert sorted(parts) == sorted(whole)
  for key, value in whole.items():
    assert parts[key].dtype == value.dtype, key
    np.testing.assert_array_equal(parts[key], value, err_msg=key)

  index = json.loads((sharded / "model.safetensors.index.json").read_text())
  assert index["metadata"] == {"total_size": sum(v.nbytes for v in whole.values()),
                               "total_parameters": sum(v.size for v in whole.values())}
  placed = {}
  for shard in shards:
    with safe_open(str(shard), framework="numpy") as f:
      keys = list(f.keys())
    assert sum(whole[k].nbytes for k in keys) <= SHARD_BYTES or len(keys) == 1, shard.name
    placed.update(dict.fromkeys(keys, shard.name))
  assert index["weight_map"] == placed

  cfg2, params2 = hf.load_hf(sharded)
  assert cfg2 == cfg
  flat, flat2 = flatten(params), flatten(params2)
  assert sorted(flat2, key=str) == sorted(flat, key=str)
  for path, value in flat.items():
    np.testing.assert_array_equal(np.asarray(flat2[path]), np.asarray(value))


@needs_torch
@pytest.mark.parametrize("name", NAMES)
def test_generation_config_is_what_transformers_derives(tmp_path, name):
  import transformers

  cfg, params = hf.load_hf(PARITY / name)
  out = hf.save_hf(tmp_path / "out", cfg, params, MODEL_TYPES[name])
  written = transformers.GenerationConfig.from_pretrained(out)
  assert (written.bos_token_id, written.eos_token_id, written.pad_token_id) == (
      cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id)
  # What transformers' own save_pretrained writes for the model loaded without it, but the
  # version stamp.
  bare = shutil.copytree(out, tmp_path / "bare")
  (bare / "generation_config.json").unlink()
  model = transformers.AutoModelForCausalLM.from_pretrained(bare)
  model.generation_config.save_pretrained(tmp_path / "derived")
  want = json.loads((tmp_path / "derived" / "generation_config.json").read_text())
  want.pop("transformers_version")
  assert json.loads((out / "generation_config.json").read_text()) == want


def test_failed_shard_write_stops_writing_and_leaves_destination_untouched(tmp_path,
                                                                           monkeypatch):
  cfg, params = hf.load_hf(PARITY / "llama")
  dest = hf.save_hf(tmp_path / "export", cfg, params, "llama")
  before = {p.name: p.read_bytes() for p in dest.iterdir()}
  real_save, written = hf.save_file, []

  def disk_fills_on_second_shard(tensors, path, metadata=None):
    written.append(Path(path).name)
    if len(written) == 2:
      raise OSError(28, "No space left on device")
    real_save(tensors, path, metadata=metadata)

  monkeypatch.setattr(hf, "save_file", disk_fills_on_second_shard)
  with pytest.raises(OSError, match="No space left on device"):
    hf.save_hf(dest, cfg, params, "llama", max_shard_size=SHARD_BYTES)
  assert len(written) == 2  # nothing more was written after the failure
  assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
  assert [p.name for p in tmp_path.iterdir()] == ["export"]  # the temp folder is gone


@pytest.mark.slow
def test_streamed_export_holds_one_shard_not_the_model(tmp_path):
  """Peak host memory of exporting a 328 MB model in 32 MB shards, against gathering it whole
  (tests/helpers/export_memory.py; each in a fresh process)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  figures = {}
  for mode in ("streamed", "whole"):
    result = subprocess.run(
        [sys.executable, "-m", "tests.helpers.export_memory", str(tmp_path / mode), mode],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    figures[mode] = json.loads(result.stdout.strip().splitlines()[-1])
  streamed, whole = figures["streamed"], figures["whole"]
  assert streamed["files"] >= 8
  # One shard plus the largest tensor (16 MB) and its converted copy, and some slack.
  assert streamed["peak_rise_mb"] < streamed["shard_mb"] + 2 * 16 + 16, figures
  assert whole["peak_rise_mb"] > 0.75 * whole["model_mb"], figures  # the measure sees a gather


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_export_in_another_dtype_casts_every_tensor_and_says_so(tmp_path, dtype):
  """float32 parameters exported in a narrower dtype: every tensor in it (rounded to nearest, as
  torch's `.to` rounds), config.json's `dtype` naming it, the shards planned by its size, and
  `checkpoint_dtype` reading it back, from config.json or, without the key, from the headers."""
  cfg, params = hf.load_hf(PARITY / "llama")
  assert cfg.param_dtype == "float32"
  wide = hf.save_hf(tmp_path / "wide", cfg, params, "llama", max_shard_size=40_000)
  out = hf.save_hf(tmp_path / "out", cfg, params, "llama", max_shard_size=40_000, dtype=dtype)
  assert json.loads((out / "config.json").read_text())["dtype"] == dtype
  header = {"bfloat16": "BF16", "float16": "F16"}[dtype]
  want = {k: v.astype(hf.EXPORT_DTYPES[dtype]) for k, v in read_safetensors(wide).items()}
  got = read_raw_safetensors(out)
  assert sorted(got) == sorted(want)
  for key, value in got.items():
    assert value.dtype == want[key].dtype, key
    np.testing.assert_array_equal(value.view(np.uint16), want[key].view(np.uint16), err_msg=key)
  for shard in out.glob("model-*.safetensors"):
    with safe_open(str(shard), framework="numpy") as f:
      assert {f.get_slice(k).get_dtype() for k in f.keys()} == {header}
  index = json.loads((out / "model.safetensors.index.json").read_text())
  wide_index = json.loads((wide / "model.safetensors.index.json").read_text())
  assert index["metadata"]["total_size"] * 2 == wide_index["metadata"]["total_size"]
  size = lambda folder: sum(p.stat().st_size for p in folder.glob("*.safetensors"))  # noqa: E731
  assert size(out) < 0.55 * size(wide)
  assert hf.checkpoint_dtype(out) == dtype and hf.checkpoint_dtype(wide) == "float32"
  config = json.loads((out / "config.json").read_text())
  del config["dtype"]
  config["torch_dtype"] = "float32"  # transformers 4's key is read too
  (out / "config.json").write_text(json.dumps(config))
  assert hf.checkpoint_dtype(out) == "float32"
  del config["torch_dtype"]
  (out / "config.json").write_text(json.dumps(config))
  assert hf.checkpoint_dtype(out) == dtype  # the tensors' own
  with pytest.raises(CheckpointError, match="cannot export in dtype 'int8'"):
    hf.save_hf(tmp_path / "bad", cfg, params, "llama", dtype="int8")


def test_save_writes_the_model_card(tmp_path):
  cfg, params = hf.load_hf(PARITY / "llama")
  out = hf.save_hf(tmp_path / "out", cfg, params, "llama", card="---\ntags:\n- x\n---\n# card\n")
  assert (out / hf.MODEL_CARD).read_text() == "---\ntags:\n- x\n---\n# card\n"
