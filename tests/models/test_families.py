"""Qwen3 and Gemma 3: what the golden fixtures prove, config spellings and defaults, multimodal
Gemma 3 checkpoints, refusals, export types, LoRA and sharding of the new parameters.

The shared parity / round-trip / export tests run these families from tests/models/test_hf.py;
this file holds what is specific to them.
"""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec
from safetensors.numpy import save_file

from ff_jax.errors import CheckpointError, ConfigError
from ff_jax.models import (
  abstract_model,
  forward,
  hf,
  init_cache,
  init_params,
  lora,
  positions_from_mask,
)
from ff_jax.models.config import LoraConfig, ModelConfig
from ff_jax.models.decoding import SamplingConfig, generate
from ff_jax.models.hf_config import GEMMA3_TEXT_DEFAULTS, hf_model_type
from ff_jax.models.loading import flatten, unflatten
from ff_jax.parallel import MeshConfig, make_mesh
from ff_jax.training.steps import ModelRuntime
from tests.models.test_hf import (
  MODEL_TYPES,
  NAMES,
  PARITY,
  TOL,
  ff_logits,
  fixture_logits_diff,
  max_diff,
  needs_torch,
  read_safetensors,
)
from tests.models.test_model import FAMILIES

SLIDING, FULL = "sliding_attention", "full_attention"


def gemma3_config_json() -> dict:
  return json.loads((PARITY / "gemma3" / "config.json").read_text())


# ------------------------------------------------------------------------------------------------
# The golden fixtures exercise every feature.


@pytest.mark.parametrize("ablation", [
    dict(layer_types=None, sliding_window=None, rope_local_theta=None),  # no window anywhere
    dict(rope_local_theta=None),  # local layers on the global (scaled) RoPE
    dict(query_pre_attn_scalar=None),  # head_dim ** -0.5
    dict(scale_embeddings=False),
    dict(norm_plus_one=False),
    dict(mlp="swiglu"),
])
def test_gemma3_fixture_depends_on_each_feature(ablation):
  """Parity holds within 1e-4 only with the feature: dropping it moves the logits far more."""
  cfg, params = hf.load_hf(PARITY / "gemma3")
  assert fixture_logits_diff(cfg, params, "gemma3") <= TOL
  assert fixture_logits_diff(cfg.replace(**ablation), params, "gemma3") > 1e-2


def test_qwen3_fixture_depends_on_the_qk_norms():
  cfg, params = hf.load_hf(PARITY / "qwen3")
  assert fixture_logits_diff(cfg, params, "qwen3") <= TOL
  attn = params["layers"]["attn"]  # unit q/k norm weights: the plain RMS normalisation
  for norm in ("q_norm", "k_norm"):
    attn[norm]["scale"] = np.ones_like(attn[norm]["scale"])
  assert fixture_logits_diff(cfg, params, "qwen3") > 1e-2


@pytest.mark.parametrize("name", ["qwen3", "gemma3"])
@pytest.mark.parametrize("kernel", ["einsum", "xla"])
def test_golden_logits_through_the_cache_and_the_fused_kernel(name, kernel):
  """Row 0 of each fixture (unpadded, as the fused kernels take rows) with attention=`kernel`,
  and the same logits decoded one token at a time through the KV cache."""
  cfg, params = hf.load_hf(PARITY / name)
  cfg = cfg.replace(attention=kernel)
  graphdef, _, _ = abstract_model(cfg)
  expected = np.load(PARITY / name / "expected.npz")
  ids, want = expected["input_ids"][:1], expected["logits"][:1]
  mask = np.ones_like(ids)
  logits, _ = forward(graphdef, params, ids, positions_from_mask(mask), mask)
  assert np.abs(np.asarray(logits) - want).max() <= TOL
  length = ids.shape[1]
  cache = init_cache(graphdef, params, 1, length)
  kv_mask = np.zeros((1, length), np.int32)
  for slot in range(length):
    kv_mask[:, slot] = 1
    step, cache = forward(graphdef, params, ids[:, slot:slot + 1], np.full((1, 1), slot),
                          kv_mask, cache, slot)
    assert np.abs(np.asarray(step[0, 0]) - want[0, slot]).max() <= TOL, slot


# ------------------------------------------------------------------------------------------------
# Config spellings, defaults and multimodal checkpoints.


def test_gemma3_v4_config_spelling_reads_the_same_model():
  config = gemma3_config_json()
  for key in ("rope_parameters", "layer_types"):
    del config[key]
  config.update(rope_theta=100000.0, rope_scaling={"rope_type": "linear", "factor": 2.0},
                rope_local_base_freq=500.0, sliding_window_pattern=3)
  assert hf.config_from_hf(config, "c.json") == hf.load_hf(PARITY / "gemma3")[0]


def test_gemma3_defaults_match_transformers():
  transformers = pytest.importorskip("transformers")
  reference = transformers.Gemma3TextConfig()
  derived = {"sliding_window_pattern": reference._sliding_window_pattern,
             "rope_theta": reference.rope_parameters[FULL]["rope_theta"],
             "rope_local_base_freq": reference.rope_parameters[SLIDING]["rope_theta"]}
  for key, value in GEMMA3_TEXT_DEFAULTS.items():
    assert derived.get(key, getattr(reference, key, None)) == value, key


def test_gemma3_multimodal_text_config_with_defaults_reads_as_transformers_does():
  """A gemma-3-4b-it style config.json: text_config lists only what differs from the defaults."""
  transformers = pytest.importorskip("transformers")
  text = {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
          "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
          "sliding_window": 1024}
  config = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
            "eos_token_id": [1, 106], "text_config": text}
  cfg = hf.config_from_hf(config, "c.json")
  reference = transformers.Gemma3TextConfig(**{k: v for k, v in text.items()
                                               if k != "model_type"})
  assert cfg.layer_types == tuple(reference.layer_types)
  assert cfg.layer_types.count(FULL) == 34 // 6
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim) == (
      reference.num_attention_heads, reference.num_key_value_heads, reference.head_dim)
  assert cfg.sliding_window == reference.sliding_window == 1024
  assert cfg.rope_theta == reference.rope_parameters[FULL]["rope_theta"]
  assert (cfg.rope_scaling.kind, cfg.rope_scaling.factor) == ("linear", 8.0)
  assert cfg.rope_local_theta == reference.rope_parameters[SLIDING]["rope_theta"]
  assert cfg.query_pre_attn_scalar is None  # 256 == head_dim: the canonical form
  assert cfg.vocab_size == reference.vocab_size and cfg.eos_token_id == 1
  assert hf_model_type(cfg) == "gemma3_text"


def as_multimodal(folder, key_prefix: str) -> None:
  """Rewrite a gemma3_text fixture folder as a Gemma3ForConditionalGeneration checkpoint."""
  text = gemma3_config_json()
  (folder / "config.json").write_text(json.dumps({
      "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
      "text_config": text, "vision_config": {"model_type": "siglip_vision_model"}}))
  tensors = {key_prefix + k.removeprefix("model."): v
             for k, v in read_safetensors(folder).items()}
  tensors["vision_tower.vision_model.post_layernorm.weight"] = np.ones(8, np.float32)
  tensors["multi_modal_projector.mm_input_projection_weight"] = np.ones((8, 64), np.float32)
  save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("prefix", ["language_model.model.", "model.language_model."])
def test_gemma3_multimodal_checkpoint_loads_its_text_model(tmp_path, prefix):
  folder = tmp_path / "mm"
  shutil.copytree(PARITY / "gemma3", folder)
  as_multimodal(folder, prefix)
  cfg, params = hf.load_hf(folder)
  want_cfg, want = hf.load_hf(PARITY / "gemma3")
  assert cfg == want_cfg
  for path, value in flatten(want).items():
    np.testing.assert_array_equal(np.asarray(flatten(params)[path]), np.asarray(value))
  with pytest.raises(CheckpointError, match="export it as gemma3_text"):
    hf.save_hf(tmp_path / "out", cfg, params, "gemma3")
  out = hf.save_hf(tmp_path / "out", cfg, params, hf_model_type(cfg))
  assert sorted(read_safetensors(out)) == sorted(read_safetensors(PARITY / "gemma3"))


@needs_torch
def test_gemma3_multimodal_live_parity(tmp_path):
  """transformers' own Gemma3ForConditionalGeneration (tiny SigLIP tower), saved and read back:
  its text-only logits within 1e-4."""
  import torch
  import transformers

  text = {k: v for k, v in gemma3_config_json().items()
          if k not in ("architectures", "transformers_version", "dtype", "_sliding_window_pattern")}
  vision = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32,
                num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
  config = transformers.Gemma3Config(text_config=text, vision_config=vision,
                                     mm_tokens_per_image=4, image_token_index=127,
                                     boi_token_index=125, eoi_token_index=126)
  config._attn_implementation = "eager"
  torch.manual_seed(0)
  model = transformers.Gemma3ForConditionalGeneration(config).eval()
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for _, param in sorted(model.named_parameters()):
      param.copy_(0.1 * torch.randn(param.shape, generator=gen))
  model.save_pretrained(tmp_path, safe_serialization=True)
  expected = np.load(PARITY / "gemma3" / "expected.npz")
  inputs = {k: torch.from_numpy(expected[k])
            for k in ("input_ids", "attention_mask", "position_ids")}
  with torch.no_grad():
    want = model(**inputs, use_cache=False).logits.float().numpy()
  cfg, params = hf.load_hf(tmp_path)
  mask = expected["attention_mask"]
  assert max_diff(ff_logits(cfg, params, expected["input_ids"], mask), want, mask) <= TOL


@needs_torch
def test_gemma3_greedy_decoding_matches_transformers_generate():
  """KV-cache decoding past the 4-slot window against transformers' generate (its sliding
  cache), 12 new tokens after an 8-token prompt."""
  import torch
  import transformers

  cfg, params = hf.load_hf(PARITY / "gemma3")
  model = transformers.AutoModelForCausalLM.from_pretrained(PARITY / "gemma3",
                                                            attn_implementation="eager")
  prompt = np.load(PARITY / "gemma3" / "expected.npz")["input_ids"][0, :8]
  with torch.no_grad():
    out = model.generate(torch.from_numpy(prompt)[None], max_new_tokens=12, do_sample=False,
                         eos_token_id=None, pad_token_id=0, min_new_tokens=12)
  want = out[0, len(prompt):].tolist()
  graphdef, _, _ = abstract_model(cfg)
  # An id outside the vocabulary as EOS: nothing stops either side early.
  got = generate(graphdef, params, [prompt.tolist()], eos_id=cfg.vocab_size, pad_id=0,
                 sampling=SamplingConfig(max_new_tokens=12))[0]
  assert got == want


# ------------------------------------------------------------------------------------------------
# Refusals.


@pytest.mark.parametrize("change, match", [
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention=true is not supported"),
    ({"hidden_activation": "gelu"}, "hidden_activation='gelu' is not supported"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0 is not supported"),
    ({"sliding_window": None}, "sliding_window=None, but layer_types has sliding_attention"),
    ({"layer_types": [SLIDING, FULL]}, "layer_types has 2 entries for num_hidden_layers=3"),
    ({"layer_types": [SLIDING, "chunked_attention", FULL]},
     r"layer_types \['chunked_attention'\] not supported"),
    ({"rope_parameters": {SLIDING: {"rope_type": "linear", "factor": 2.0, "rope_theta": 10.0}}},
     "rope_parameters.sliding_attention.rope_type='linear' is not supported"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 10.0}},
     "rope_parameters must map 'full_attention' and 'sliding_attention'"),
])
def test_unsupported_gemma3_config(change, match):
  config = gemma3_config_json()
  config.update(change)
  with pytest.raises(CheckpointError, match=f"path/config.json: {match}"):
    hf.config_from_hf(config, "path/config.json")


def test_unsupported_gemma3_multimodal_config_names_text_config():
  config = {"model_type": "gemma3", "text_config": {"use_bidirectional_attention": True}}
  with pytest.raises(CheckpointError, match="text_config.use_bidirectional_attention=true"):
    hf.config_from_hf(config, "c.json")
  with pytest.raises(CheckpointError, match="gemma3 config needs a text_config"):
    hf.config_from_hf({"model_type": "gemma3"}, "c.json")


def test_qwen3_sliding_window_config():
  config = json.loads((PARITY / "qwen3" / "config.json").read_text())
  del config["layer_types"]
  config.update(use_sliding_window=True, sliding_window=5, max_window_layers=1)
  cfg = hf.config_from_hf(config, "c.json")
  assert (cfg.layer_types, cfg.sliding_window) == ((FULL, SLIDING), 5)
  assert hf.config_from_hf(hf.hf_config_from(cfg, "qwen3"), "x") == cfg
  # A window without use_sliding_window is off, as in Qwen3Config.
  config.update(use_sliding_window=False)
  assert hf.config_from_hf(config, "c.json").sliding_window is None
  config.update(layer_types=[SLIDING, FULL])
  with pytest.raises(CheckpointError, match="c.json: sliding_window=None, but layer_types"):
    hf.config_from_hf(config, "c.json")
  with pytest.raises(CheckpointError, match="Qwen3's sliding layers must be the last ones"):
    hf.hf_config_from(cfg.replace(layer_types=(SLIDING, FULL)), "qwen3")


def test_export_refuses_what_the_type_cannot_hold(tmp_path):
  qwen3, qwen3_params = hf.load_hf(PARITY / "qwen3")
  gemma3, _ = hf.load_hf(PARITY / "gemma3")
  with pytest.raises(CheckpointError, match="as llama: model.qk_norm=True has no llama"):
    hf.save_hf(tmp_path / "a", qwen3, qwen3_params, "llama")
  with pytest.raises(CheckpointError, match="as qwen3: model.norm_plus_one=True has no qwen3"):
    hf.hf_config_from(gemma3, "qwen3")
  with pytest.raises(CheckpointError, match="as gemma3_text: Gemma 3 needs norm='rms', "
                                            "positions='rope', mlp='geglu'"):
    hf.hf_config_from(qwen3, "gemma3_text")
  with pytest.raises(CheckpointError, match="as qwen3: Qwen3 normalises q and k"):
    hf.hf_config_from(qwen3.replace(qk_norm=False), "qwen3")
  assert not (tmp_path / "a").exists()


def test_hf_model_type():
  for name in NAMES:
    # A Mistral checkpoint is a Llama to ModelConfig: it exports as llama unless told mistral.
    want = "llama" if MODEL_TYPES[name] == "mistral" else MODEL_TYPES[name]
    assert hf_model_type(hf.load_hf(PARITY / name)[0]) == want, name
  biased = FAMILIES["llama"].replace(qkv_bias=True, out_bias=True)
  assert hf_model_type(biased) == "llama"
  assert hf.config_from_hf(hf.hf_config_from(biased, "llama"), "x") == biased
  assert hf_model_type(FAMILIES["gemma3"]) == "gemma3_text"
  assert hf_model_type(FAMILIES["qwen3"]) == "qwen3"


def test_gemma3_export_writes_both_spellings():
  cfg, _ = hf.load_hf(PARITY / "gemma3")
  out = hf.hf_config_from(cfg, "gemma3_text")
  assert out["sliding_window_pattern"] == 3 and out["rope_local_base_freq"] == 500.0
  assert out["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
  assert out["rope_parameters"][SLIDING] == {"rope_type": "default", "rope_theta": 500.0}
  assert out["query_pre_attn_scalar"] == 24 and isinstance(out["query_pre_attn_scalar"], int)
  legacy = {k: v for k, v in out.items() if k not in ("rope_parameters", "layer_types")}
  assert hf.config_from_hf(legacy, "x") == cfg


# ------------------------------------------------------------------------------------------------
# ModelConfig validation.


@pytest.mark.parametrize("change, match", [
    (dict(layer_types=(SLIDING,)), "model.layer_types: has 1 entries for num_layers=2"),
    (dict(layer_types=(SLIDING, "local")), r"model.layer_types: unknown kind\(s\) \['local'\]"),
    (dict(layer_types=(SLIDING, FULL)), "model.sliding_window: sliding_attention layers need"),
    (dict(sliding_window=4), "model.sliding_window: is set but no layer_types entry"),
    (dict(sliding_window=0, layer_types=(SLIDING, FULL)), "model.sliding_window: must be a "
                                                          "positive integer"),
    (dict(rope_local_theta=10.0), "model.rope_local_theta: only sliding_attention layers"),
    (dict(query_pre_attn_scalar=-1.0), "model.query_pre_attn_scalar: must be positive"),
    (dict(mlp="relu"), "model.mlp: must be 'swiglu', 'geglu' or 'gelu'"),
])
def test_bad_family_settings_name_the_key(change, match):
  with pytest.raises(ConfigError, match=match):
    FAMILIES["llama"].replace(**change)


def test_config_dict_round_trip_keeps_layer_types():
  cfg = FAMILIES["gemma3"]
  values = json.loads(json.dumps(cfg.to_dict()))  # as a run directory stores it: lists
  assert ModelConfig.from_dict(values) == cfg


# ------------------------------------------------------------------------------------------------
# LoRA and sharding of the new parameters.


@pytest.mark.parametrize("name", ["qwen3", "gemma3"])
def test_lora_on_every_target_merges_exactly(name):
  """All seven targets (GeGLU's gate included): fresh adapters compute the base model, and
  trained-looking adapters merged into the weights compute the adapted model."""
  base_cfg = FAMILIES[name]
  cfg = base_cfg.replace(lora=LoraConfig(rank=2, alpha=4.0, targets=(
      "q", "k", "v", "o", "gate", "up", "down")))
  base_graph, _, _ = abstract_model(base_cfg)
  graph, _, _ = abstract_model(cfg)
  params = init_params(cfg, 0)
  adapters, base = lora.split(params)
  stacked = flatten(adapters)  # 2 factors x 7 targets, each stacked over the layers
  assert len(stacked) == 2 * 7
  assert {a.shape[0] for a in stacked.values()} == {base_cfg.num_layers}
  tokens = np.asarray([[3, 4, 5, 6, 7, 8, 9, 10]])
  mask = np.ones_like(tokens)
  positions = positions_from_mask(mask)

  def logits(g, p):
    return np.asarray(forward(g, p, tokens, positions, mask)[0])

  np.testing.assert_array_equal(logits(graph, params), logits(base_graph, base))
  flat = flatten(params)
  key = jax.random.key(2)
  for i, path in enumerate(sorted((p for p in flat if str(p[-1]).endswith("_lora_b")), key=str)):
    flat[path] = 0.05 * jax.random.normal(jax.random.fold_in(key, i), flat[path].shape)
  adapted = unflatten(flat)
  merged = lora.merge(adapted, cfg)
  assert np.abs(logits(graph, adapted) - logits(base_graph, base)).max() > 1e-3
  np.testing.assert_allclose(logits(base_graph, merged), logits(graph, adapted), atol=1e-5)


def test_new_norms_are_replicated_and_projections_sharded():
  mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
  runtime = ModelRuntime.create(FAMILIES["gemma3"], mesh)
  layer = runtime.param_shardings["layers"]  # stacked: a leading, unsharded layers axis
  for norm in (layer["attn"]["q_norm"], layer["attn"]["k_norm"], layer["attn_post_norm"],
               layer["mlp_post_norm"], layer["mlp_norm"]):
    assert norm["scale"].spec == PartitionSpec(None, None)
  assert layer["attn"]["q"].spec == PartitionSpec(None, "fsdp", "tensor", None)
  assert layer["mlp"]["gate"].spec == PartitionSpec(None, "fsdp", "tensor")
