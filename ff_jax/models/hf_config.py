"""HF `config.json` <-> `ModelConfig` for the supported model types (Llama, Mistral, Qwen2, GPT-2).

Import accepts transformers-5 `rope_parameters` and v4 `rope_theta` + `rope_scaling`; every
setting ff_jax cannot represent (another activation, yarn RoPE, sliding windows, ...) is refused
with a `CheckpointError` naming the file, never silently approximated. Export writes both rope
spellings so either transformers major reads the same model.
"""

from __future__ import annotations

from typing import Any

from ff_jax.errors import CheckpointError
from ff_jax.models.config import ModelConfig, RopeScaling

# model_type -> the *ForCausalLM class written on export.
EXPORT_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                        "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel"}
SUPPORTED_MODEL_TYPES = tuple(EXPORT_ARCHITECTURES)
# `architectures` entries that identify a model type when config.json has no `model_type`.
_ARCHITECTURES = {
    "LlamaForCausalLM": "llama", "LlamaModel": "llama", "MistralForCausalLM": "mistral",
    "MistralModel": "mistral", "Qwen2ForCausalLM": "qwen2", "Qwen2Model": "qwen2",
    "GPT2LMHeadModel": "gpt2", "GPT2Model": "gpt2",
}


def model_type_of(config: dict, origin: str) -> str:
  """The supported `model_type` a config.json describes; CheckpointError naming it otherwise."""
  model_type = config.get("model_type")
  archs = config.get("architectures") or []
  supported = ", ".join(SUPPORTED_MODEL_TYPES)
  if model_type is None:
    known = [_ARCHITECTURES[a] for a in archs if a in _ARCHITECTURES]
    if not known:
      name = archs[0] if archs else None
      raise CheckpointError(f"unknown architecture {name!r} in {origin}; supported: {supported}")
    model_type = known[0]
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise CheckpointError(f"unknown architecture {model_type!r} in {origin}; "
                          f"supported: {supported}")
  for arch in archs:
    # A sequence-classification or other head would leave its tensors unmapped; say why up front.
    if arch not in _ARCHITECTURES:
      raise CheckpointError(f"unknown architecture {arch!r} in {origin}; supported: "
                            f"{', '.join(sorted(_ARCHITECTURES))}")
  return model_type


def _first_id(value) -> int | None:
  # Llama 3 lists several EOS ids; ff_jax keeps one (the first, which is the chat turn's end).
  if isinstance(value, list):
    return int(value[0]) if value else None
  return None if value is None else int(value)


def _rope_scaling(config: dict, origin: str) -> tuple[float, RopeScaling]:
  """(theta, scaling) from transformers-5 `rope_parameters` or v4 `rope_theta` + `rope_scaling`."""
  if isinstance(config.get("rope_parameters"), dict):
    key = "rope_parameters"
    params = config["rope_parameters"]
  else:
    key = "rope_scaling"
    params = config.get("rope_scaling") or {}
  theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
  kind = params.get("rope_type", params.get("type", "default"))
  if kind == "default":
    return theta, RopeScaling()
  if kind == "linear":
    return theta, RopeScaling(kind="linear", factor=float(params["factor"]))
  if kind == "llama3":
    return theta, RopeScaling(
        kind="llama3", factor=float(params["factor"]),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings",
                                                        8192)))
  raise CheckpointError(f"{origin}: {key}.rope_type={kind!r} is not supported; "
                        f"supported: default, linear, llama3")


def config_from_hf(config: dict, origin: str) -> ModelConfig:
  """ModelConfig from an HF `config.json` dict; `origin` (the file's path) names it in errors."""
  model_type = model_type_of(config, origin)
  ids = dict(bos_token_id=_first_id(config.get("bos_token_id")),
             eos_token_id=_first_id(config.get("eos_token_id")),
             pad_token_id=_first_id(config.get("pad_token_id")),
             initializer_range=float(config.get("initializer_range", 0.02)))
  try:
    if model_type == "gpt2":
      return _gpt2_config(config, origin, ids)
    return _llama_config(config, origin, model_type, ids)
  except KeyError as e:
    raise CheckpointError(f"{origin}: missing key {e.args[0]!r}") from None


def _llama_config(config: dict, origin: str, model_type: str, ids: dict) -> ModelConfig:
  act = config.get("hidden_act", "silu")
  if act != "silu":
    raise CheckpointError(f"{origin}: hidden_act={act!r} is not supported; only 'silu' (SwiGLU)")
  if config.get("mlp_bias"):
    # ff_jax's SwiGLU has no gate bias.
    raise CheckpointError(f"{origin}: mlp_bias=true is not supported")
  if model_type == "qwen2" and config.get("use_sliding_window"):
    raise CheckpointError(f"{origin}: use_sliding_window=true is not supported")
  # Mistral's `sliding_window` is ignored: it only matters beyond that many tokens (4096).
  if model_type == "qwen2":
    qkv_bias, out_bias = True, False  # Qwen2 always has q/k/v biases and none on o_proj
  else:
    qkv_bias = out_bias = bool(config.get("attention_bias", False))
  theta, scaling = _rope_scaling(config, origin)
  heads = int(config["num_attention_heads"])
  hidden = int(config["hidden_size"])
  head_dim = config.get("head_dim")
  # Canonical form: None when it is the default, so configs compare equal however they were written.
  if head_dim is not None and int(head_dim) * heads == hidden:
    head_dim = None
  return ModelConfig(
      vocab_size=int(config["vocab_size"]), hidden_size=hidden,
      num_layers=int(config["num_hidden_layers"]), num_heads=heads,
      num_kv_heads=int(config.get("num_key_value_heads") or heads),
      intermediate_size=int(config["intermediate_size"]),
      max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
      head_dim=None if head_dim is None else int(head_dim), norm="rms",
      norm_eps=float(config.get("rms_norm_eps", 1e-6)), positions="rope", rope_theta=theta,
      rope_scaling=scaling, mlp="swiglu", qkv_bias=qkv_bias, out_bias=out_bias, mlp_bias=False,
      tie_embeddings=bool(config.get("tie_word_embeddings", False)), **ids)


def _gpt2_config(config: dict, origin: str, ids: dict) -> ModelConfig:
  act = config.get("activation_function", "gelu_new")
  if act not in ("gelu_new", "gelu_pytorch_tanh"):
    raise CheckpointError(f"{origin}: activation_function={act!r} is not supported; "
                          f"supported: gelu_new, gelu_pytorch_tanh (tanh-approximate GELU)")
  if not config.get("scale_attn_weights", True) or config.get("scale_attn_by_inverse_layer_idx"):
    raise CheckpointError(f"{origin}: only 1/sqrt(head_dim) attention scaling is supported "
                          f"(scale_attn_weights=true, scale_attn_by_inverse_layer_idx=false)")
  d = int(config["n_embd"])
  return ModelConfig(
      vocab_size=int(config["vocab_size"]), hidden_size=d, num_layers=int(config["n_layer"]),
      num_heads=int(config["n_head"]), num_kv_heads=int(config["n_head"]),
      intermediate_size=int(config.get("n_inner") or 4 * d),
      max_position_embeddings=int(config.get("n_positions", 1024)), norm="layer",
      norm_eps=float(config.get("layer_norm_epsilon", 1e-5)), positions="learned", mlp="gelu",
      qkv_bias=True, out_bias=True, mlp_bias=True,
      tie_embeddings=bool(config.get("tie_word_embeddings", True)), **ids)


def hf_config_from(cfg: ModelConfig, model_type: str) -> dict:
  """An HF `config.json` dict for `cfg` as `model_type`; CheckpointError if it cannot be one."""
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise CheckpointError(f"cannot export as model_type {model_type!r}; supported: "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)}")

  def need(cond: bool, why: str):
    if not cond:
      raise CheckpointError(f"cannot export this model as {model_type}: {why}")

  out: dict[str, Any] = {
      "architectures": [EXPORT_ARCHITECTURES[model_type]],
      "model_type": model_type, "vocab_size": cfg.vocab_size,
      "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.initializer_range,
      "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
      "pad_token_id": cfg.pad_token_id, "dtype": cfg.param_dtype, "use_cache": True,
  }
  if model_type == "gpt2":
    need(cfg.norm == "layer" and cfg.positions == "learned" and cfg.mlp == "gelu",
         "GPT-2 needs norm='layer', positions='learned', mlp='gelu'")
    need(cfg.qkv_bias and cfg.out_bias and cfg.mlp_bias, "GPT-2 has biases on every projection")
    need(cfg.num_kv_heads == cfg.num_heads, "GPT-2 has no grouped-query attention")
    need(cfg.resolved_head_dim * cfg.num_heads == cfg.hidden_size,
         "GPT-2 needs head_dim * num_heads == hidden_size")
    out.update(n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
               n_inner=cfg.intermediate_size, n_positions=cfg.max_position_embeddings,
               layer_norm_epsilon=cfg.norm_eps, activation_function="gelu_new",
               scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
               reorder_and_upcast_attn=False)
    return out
  need(cfg.norm == "rms" and cfg.positions == "rope" and cfg.mlp == "swiglu",
       "needs norm='rms', positions='rope', mlp='swiglu'")
  need(not cfg.mlp_bias, "MLP biases are not supported")
  if model_type == "qwen2":
    need(cfg.qkv_bias and not cfg.out_bias, "Qwen2 has q/k/v biases and no o_proj bias")
  elif model_type == "mistral":
    need(not cfg.qkv_bias and not cfg.out_bias, "Mistral has no attention biases")
  else:
    need(cfg.qkv_bias == cfg.out_bias, "Llama's attention_bias covers q/k/v and o together")
  scaling = cfg.rope_scaling
  rope: dict[str, Any] = {"rope_type": scaling.kind, "rope_theta": cfg.rope_theta}
  if scaling.kind != "default":
    rope["factor"] = scaling.factor
  if scaling.kind == "llama3":
    rope.update(low_freq_factor=scaling.low_freq_factor, high_freq_factor=scaling.high_freq_factor,
                original_max_position_embeddings=scaling.original_max_position_embeddings)
  out.update(
      hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.resolved_head_dim,
      max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_eps,
      hidden_act="silu", rope_parameters=rope,
      # transformers 4 readers ignore `rope_parameters`; give them the legacy keys too.
      rope_theta=cfg.rope_theta,
      rope_scaling={k: v for k, v in rope.items() if k != "rope_theta"}
      if scaling.kind != "default" else None)
  if model_type == "llama":
    out.update(attention_bias=cfg.qkv_bias, mlp_bias=False)
  elif model_type == "mistral":
    out.update(sliding_window=None)
  else:
    out.update(use_sliding_window=False, sliding_window=None)
  return out
