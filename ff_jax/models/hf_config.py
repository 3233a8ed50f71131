"""HF `config.json` <-> `ModelConfig` for the supported model types (Llama, Mistral, Qwen2,
Qwen3, Gemma 3 text, GPT-2).

Import accepts transformers-5 `rope_parameters` and v4 `rope_theta` + `rope_scaling` (Gemma 3:
per-layer-type `rope_parameters`, or v4 `rope_theta` + `rope_local_base_freq` + `rope_scaling`);
every setting ff_jax cannot represent (another activation, yarn RoPE, bidirectional attention,
...) is refused with a `CheckpointError` naming the file and key, never silently approximated.
Export writes both spellings so either transformers major reads the same model.

A multimodal Gemma 3 checkpoint (`gemma3`, Gemma3ForConditionalGeneration) imports as its text
model (`text_config`; the vision tower's tensors are skipped) and exports as `gemma3_text`.
"""

from __future__ import annotations

from typing import Any

from ff_jax.errors import CheckpointError
from ff_jax.models.config import FULL_ATTENTION, SLIDING_ATTENTION, ModelConfig, RopeScaling

# model_type -> the *ForCausalLM class written on export.
EXPORT_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                        "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel",
                        "qwen3": "Qwen3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
# Import only: the text part of a multimodal Gemma 3.
GEMMA3_MULTIMODAL = "gemma3"
SUPPORTED_MODEL_TYPES = (*EXPORT_ARCHITECTURES, GEMMA3_MULTIMODAL)
# `architectures` entries that identify a model type when config.json has no `model_type`.
_ARCHITECTURES = {
    "LlamaForCausalLM": "llama", "LlamaModel": "llama", "MistralForCausalLM": "mistral",
    "MistralModel": "mistral", "Qwen2ForCausalLM": "qwen2", "Qwen2Model": "qwen2",
    "GPT2LMHeadModel": "gpt2", "GPT2Model": "gpt2", "Qwen3ForCausalLM": "qwen3",
    "Qwen3Model": "qwen3", "Gemma3ForCausalLM": "gemma3_text", "Gemma3TextModel": "gemma3_text",
    "Gemma3ForConditionalGeneration": GEMMA3_MULTIMODAL,
}
# transformers' Gemma3TextConfig defaults for the keys read here: a multimodal checkpoint's
# text_config leaves most of them out (tests check them against transformers).
GEMMA3_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216,
    "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131_072,
    "initializer_range": 0.02, "rms_norm_eps": 1e-6, "pad_token_id": 0, "eos_token_id": 1,
    "bos_token_id": 2, "tie_word_embeddings": True, "attention_bias": False,
    "query_pre_attn_scalar": 256, "sliding_window": 4096, "sliding_window_pattern": 6,
    "final_logit_softcapping": None, "attn_logit_softcapping": None,
    "use_bidirectional_attention": False, "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
}
_TOP_LEVEL_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings")
# ModelConfig settings beyond the Llama/GPT-2 core, at their neutral values; a model type that
# cannot represent one refuses a config that sets it.
_EXTRAS = {"qk_norm": False, "norm_plus_one": False, "post_norms": False,
           "scale_embeddings": False, "query_pre_attn_scalar": None, "layer_types": None,
           "sliding_window": None, "rope_local_theta": None, "final_logit_softcap": None}
_REPRESENTABLE = {"qwen3": {"qk_norm", "layer_types", "sliding_window"},
                  "gemma3_text": set(_EXTRAS)}


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
  return _rope_from(params, float(config.get("rope_theta", 10000.0)), key, origin)


def _rope_from(params: dict, default_theta: float, key: str,
               origin: str) -> tuple[float, RopeScaling]:
  """(theta, scaling) of one rope parameter dict, `key` naming it in errors."""
  theta = float(params.get("rope_theta", default_theta))
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
    if model_type in ("gemma3_text", GEMMA3_MULTIMODAL):
      return _gemma3_config(config, origin, model_type)
    return _llama_config(config, origin, model_type, ids)
  except KeyError as e:
    raise CheckpointError(f"{origin}: missing key {e.args[0]!r}") from None


def _layer_kinds(layer_types: list | None, window: Any, num_layers: int, origin: str,
                 key: str) -> tuple[tuple[str, ...] | None, int | None]:
  """(layer_types, sliding_window) in ModelConfig's canonical form: both None unless some layer
  slides. `key` is the config's prefix for error messages."""
  if layer_types is None:
    return None, None
  layer_types = tuple(layer_types)
  if len(layer_types) != num_layers:
    raise CheckpointError(f"{origin}: {key}layer_types has {len(layer_types)} entries for "
                          f"num_hidden_layers={num_layers}")
  unknown = sorted(set(layer_types) - {FULL_ATTENTION, SLIDING_ATTENTION})
  if unknown:
    raise CheckpointError(f"{origin}: {key}layer_types {unknown} not supported; supported: "
                          f"{FULL_ATTENTION}, {SLIDING_ATTENTION}")
  if SLIDING_ATTENTION not in layer_types:
    return None, None
  if window is None or int(window) <= 0:
    raise CheckpointError(f"{origin}: {key}sliding_window={window!r}, but layer_types has "
                          f"{SLIDING_ATTENTION} layers that need a positive window")
  return layer_types, int(window)


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
  layers = int(config["num_hidden_layers"])
  qwen3: dict[str, Any] = {}
  if model_type == "qwen3":
    # As Qwen3Config: the window counts only with use_sliding_window; layer_types default to
    # sliding from max_window_layers on.
    window = config.get("sliding_window") if config.get("use_sliding_window") else None
    kinds = config.get("layer_types")
    if kinds is None and window is not None:
      first = int(config.get("max_window_layers", 28))
      kinds = [SLIDING_ATTENTION if i >= first else FULL_ATTENTION for i in range(layers)]
    layer_types, window = _layer_kinds(kinds, window, layers, origin, "")
    qwen3 = dict(qk_norm=True, layer_types=layer_types, sliding_window=window)
  heads = int(config["num_attention_heads"])
  hidden = int(config["hidden_size"])
  head_dim = config.get("head_dim")
  # Canonical form: None when it is the default, so configs compare equal however they were written.
  if head_dim is not None and int(head_dim) * heads == hidden:
    head_dim = None
  return ModelConfig(
      vocab_size=int(config["vocab_size"]), hidden_size=hidden,
      num_layers=layers, num_heads=heads,
      num_kv_heads=int(config.get("num_key_value_heads") or heads),
      intermediate_size=int(config["intermediate_size"]),
      max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
      head_dim=None if head_dim is None else int(head_dim), norm="rms",
      norm_eps=float(config.get("rms_norm_eps", 1e-6)), positions="rope", rope_theta=theta,
      rope_scaling=scaling, mlp="swiglu", qkv_bias=qkv_bias, out_bias=out_bias, mlp_bias=False,
      tie_embeddings=bool(config.get("tie_word_embeddings", False)), **qwen3, **ids)


def _gemma3_config(config: dict, origin: str, model_type: str) -> ModelConfig:
  """Gemma 3's text model: from config.json itself (gemma3_text) or its `text_config` (gemma3),
  with Gemma3TextConfig's defaults for absent keys."""
  key = ""
  text = config
  if model_type == GEMMA3_MULTIMODAL:
    text, key = config.get("text_config"), "text_config."
    if not isinstance(text, dict):
      raise CheckpointError(f"{origin}: a gemma3 config needs a text_config object")

  def get(name: str) -> Any:
    # A multimodal config may keep token ids and tying at its top level.
    outer = config if name in _TOP_LEVEL_KEYS else {}
    return text.get(name, outer.get(name, GEMMA3_TEXT_DEFAULTS[name]))

  act = get("hidden_activation")
  if act not in ("gelu_pytorch_tanh", "gelu_new"):
    raise CheckpointError(f"{origin}: {key}hidden_activation={act!r} is not supported; "
                          "supported: gelu_pytorch_tanh (tanh-approximate GELU)")
  if get("use_bidirectional_attention"):
    raise CheckpointError(f"{origin}: {key}use_bidirectional_attention=true is not supported "
                          "(ff_jax's decoder is causal)")
  layers = int(get("num_hidden_layers"))
  kinds = text.get("layer_types")
  if kinds is None:  # as Gemma3TextConfig: every `pattern`-th layer is global
    pattern = int(get("sliding_window_pattern"))
    kinds = [SLIDING_ATTENTION if (i + 1) % pattern else FULL_ATTENTION for i in range(layers)]
  layer_types, window = _layer_kinds(kinds, get("sliding_window"), layers, origin, key)
  theta, scaling, local_theta = _gemma3_rope(text, origin, key)
  heads = int(get("num_attention_heads"))
  hidden = int(get("hidden_size"))
  head_dim = int(get("head_dim"))
  scalar = float(get("query_pre_attn_scalar"))
  attention_bias = bool(get("attention_bias"))
  if get("attn_logit_softcapping") is not None:
    # transformers' Gemma 3 keeps the key but never applies it; honouring it would break parity
    # and ignoring it would hide what the file asks for.
    raise CheckpointError(f"{origin}: {key}attn_logit_softcapping="
                          f"{get('attn_logit_softcapping')!r} is not supported (Gemma 3 sets null; "
                          "transformers' Gemma 3 ignores it)")
  cap = get("final_logit_softcapping")
  return ModelConfig(
      vocab_size=int(get("vocab_size")), hidden_size=hidden, num_layers=layers, num_heads=heads,
      num_kv_heads=int(get("num_key_value_heads") or heads),
      intermediate_size=int(get("intermediate_size")),
      max_position_embeddings=int(get("max_position_embeddings")),
      # Canonical forms: None where the value is the default, as for Llama's head_dim.
      head_dim=None if head_dim * heads == hidden else head_dim, norm="rms",
      norm_eps=float(get("rms_norm_eps")), positions="rope", rope_theta=theta,
      rope_scaling=scaling, mlp="geglu", qkv_bias=attention_bias, out_bias=attention_bias,
      tie_embeddings=bool(get("tie_word_embeddings")), qk_norm=True, norm_plus_one=True,
      post_norms=True, scale_embeddings=True,
      query_pre_attn_scalar=None if scalar == head_dim else scalar, layer_types=layer_types,
      sliding_window=window, rope_local_theta=local_theta if layer_types else None,
      final_logit_softcap=None if cap is None else float(cap),
      bos_token_id=_first_id(get("bos_token_id")), eos_token_id=_first_id(get("eos_token_id")),
      pad_token_id=_first_id(get("pad_token_id")),
      initializer_range=float(get("initializer_range")))


def _gemma3_rope(text: dict, origin: str, key: str) -> tuple[float, RopeScaling, float]:
  """(global theta, global scaling, local theta): transformers 5 keeps one rope dict per layer
  type; v4 has rope_theta + rope_scaling for global layers and rope_local_base_freq."""
  params = text.get("rope_parameters")
  theta = float(text.get("rope_theta", GEMMA3_TEXT_DEFAULTS["rope_theta"]))
  local = float(text.get("rope_local_base_freq", GEMMA3_TEXT_DEFAULTS["rope_local_base_freq"]))
  if params is None:
    theta, scaling = _rope_from(text.get("rope_scaling") or {}, theta, key + "rope_scaling",
                                origin)
    return theta, scaling, local
  if not isinstance(params, dict) or not set(params) <= {FULL_ATTENTION, SLIDING_ATTENTION}:
    raise CheckpointError(f"{origin}: {key}rope_parameters must map {FULL_ATTENTION!r} and "
                          f"{SLIDING_ATTENTION!r} to rope settings")
  theta, scaling = _rope_from(params.get(FULL_ATTENTION) or {}, theta,
                              f"{key}rope_parameters.{FULL_ATTENTION}", origin)
  local_key = f"{key}rope_parameters.{SLIDING_ATTENTION}"
  local, local_scaling = _rope_from(params.get(SLIDING_ATTENTION) or {}, local, local_key, origin)
  if local_scaling != RopeScaling():
    raise CheckpointError(f"{origin}: {local_key}.rope_type={local_scaling.kind!r} is not "
                          "supported; sliding layers take default RoPE")
  return theta, scaling, local


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


def hf_model_type(cfg: ModelConfig) -> str:
  """The model_type `cfg` exports as: the family whose distinctive settings it has (Gemma's norms
  and GeGLU, Qwen3's q/k norms, Qwen2's q/k/v-only biases, GPT-2's learned positions), else
  Llama. `hf_config_from` still refuses what that type cannot represent."""
  if cfg.positions == "learned" or cfg.norm == "layer":
    return "gpt2"
  if cfg.mlp == "geglu" or cfg.norm_plus_one or cfg.post_norms or cfg.scale_embeddings:
    return "gemma3_text"
  if cfg.qk_norm:
    return "qwen3"
  if cfg.qkv_bias and not cfg.out_bias:
    return "qwen2"
  return "llama"


def _number(value: float) -> int | float:
  """Integral floats as ints: transformers' strict configs type these keys as int."""
  return int(value) if float(value).is_integer() else value


def _rope_dict(theta: float, scaling: RopeScaling) -> dict[str, Any]:
  """transformers-5 `rope_parameters` entry for one RoPE setting."""
  rope: dict[str, Any] = {"rope_type": scaling.kind, "rope_theta": theta}
  if scaling.kind != "default":
    rope["factor"] = scaling.factor
  if scaling.kind == "llama3":
    rope.update(low_freq_factor=scaling.low_freq_factor, high_freq_factor=scaling.high_freq_factor,
                original_max_position_embeddings=scaling.original_max_position_embeddings)
  return rope


def _legacy_rope_scaling(rope: dict[str, Any]) -> dict[str, Any] | None:
  """transformers 4's `rope_scaling` for a `rope_parameters` entry (None: unscaled)."""
  if rope["rope_type"] == "default":
    return None
  return {k: v for k, v in rope.items() if k != "rope_theta"}


def require_export_type(model_type: str) -> None:
  """CheckpointError unless ff_jax can write checkpoints of `model_type`."""
  if model_type == GEMMA3_MULTIMODAL:
    raise CheckpointError("cannot export as model_type 'gemma3' (multimodal): ff_jax holds only "
                          "the text model; export it as gemma3_text")
  if model_type not in EXPORT_ARCHITECTURES:
    raise CheckpointError(f"cannot export as model_type {model_type!r}; supported: "
                          f"{', '.join(EXPORT_ARCHITECTURES)}")


def hf_config_from(cfg: ModelConfig, model_type: str) -> dict:
  """An HF `config.json` dict for `cfg` as `model_type`; CheckpointError if it cannot be one."""
  require_export_type(model_type)

  def need(cond: bool, why: str):
    if not cond:
      raise CheckpointError(f"cannot export this model as {model_type}: {why}")

  representable = _REPRESENTABLE.get(model_type, set())
  for key, neutral in _EXTRAS.items():
    value = getattr(cfg, key)
    need(key in representable or value == neutral,
         f"model.{key}={value!r} has no {model_type} equivalent")
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
  need(not cfg.mlp_bias, "MLP biases are not supported")
  out.update(
      hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.resolved_head_dim,
      max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_eps)
  if model_type == "gemma3_text":
    return out | _gemma3_hf_config(cfg, need)
  need(cfg.norm == "rms" and cfg.positions == "rope" and cfg.mlp == "swiglu",
       "needs norm='rms', positions='rope', mlp='swiglu'")
  if model_type == "qwen2":
    need(cfg.qkv_bias and not cfg.out_bias, "Qwen2 has q/k/v biases and no o_proj bias")
  elif model_type == "mistral":
    need(not cfg.qkv_bias and not cfg.out_bias, "Mistral has no attention biases")
  else:
    need(cfg.qkv_bias == cfg.out_bias,
         "attention_bias covers q/k/v and o together (only Qwen2 has q/k/v biases alone)")
  rope = _rope_dict(cfg.rope_theta, cfg.rope_scaling)
  out.update(
      hidden_act="silu", rope_parameters=rope,
      # transformers 4 readers ignore `rope_parameters`; give them the legacy keys too.
      rope_theta=cfg.rope_theta, rope_scaling=_legacy_rope_scaling(rope))
  if model_type == "llama":
    out.update(attention_bias=cfg.qkv_bias, mlp_bias=False)
  elif model_type == "mistral":
    out.update(sliding_window=None)
  elif model_type == "qwen2":
    out.update(use_sliding_window=False, sliding_window=None)
  else:
    out.update(_qwen3_hf_config(cfg, need))
  return out


def _qwen3_hf_config(cfg: ModelConfig, need) -> dict[str, Any]:
  """Qwen3's own keys: q/k norms are implied; sliding layers must be the last ones, which is
  what transformers 4 derives from max_window_layers (5 reads layer_types)."""
  need(cfg.qk_norm, "Qwen3 normalises q and k (model.qk_norm=true)")
  kinds = cfg.layer_types or (FULL_ATTENTION,) * cfg.num_layers
  first = kinds.index(SLIDING_ATTENTION) if SLIDING_ATTENTION in kinds else cfg.num_layers
  need(all(kind == SLIDING_ATTENTION for kind in kinds[first:]),
       f"model.layer_types={list(kinds)}: Qwen3's sliding layers must be the last ones")
  return dict(attention_bias=cfg.qkv_bias, use_sliding_window=cfg.sliding_window is not None,
              sliding_window=cfg.sliding_window, max_window_layers=first,
              layer_types=list(kinds))


def _gemma3_hf_config(cfg: ModelConfig, need) -> dict[str, Any]:
  """Gemma 3 text's own keys, in transformers 5 and 4 spellings."""
  need(cfg.norm == "rms" and cfg.positions == "rope" and cfg.mlp == "geglu",
       "Gemma 3 needs norm='rms', positions='rope', mlp='geglu'")
  need(cfg.qk_norm and cfg.norm_plus_one and cfg.post_norms and cfg.scale_embeddings,
       "Gemma 3 needs qk_norm, norm_plus_one, post_norms and scale_embeddings all true")
  need(cfg.qkv_bias == cfg.out_bias, "attention_bias covers q/k/v and o together")
  kinds = cfg.layer_types or (FULL_ATTENTION,) * cfg.num_layers
  local_theta = cfg.rope_local_theta
  if local_theta is None:  # sliding layers share the global RoPE: Gemma can say so if unscaled
    need(cfg.sliding_window is None or cfg.rope_scaling.kind == "default",
         "sliding layers with scaled RoPE need model.rope_local_theta")
    local_theta = cfg.rope_theta
  rope = _rope_dict(cfg.rope_theta, cfg.rope_scaling)
  out: dict[str, Any] = dict(
      hidden_activation="gelu_pytorch_tanh", attention_bias=cfg.qkv_bias,
      query_pre_attn_scalar=_number(cfg.query_pre_attn_scalar or cfg.resolved_head_dim),
      sliding_window=cfg.sliding_window, layer_types=list(kinds),
      attn_logit_softcapping=None, final_logit_softcapping=cfg.final_logit_softcap,
      use_bidirectional_attention=False,
      rope_parameters={FULL_ATTENTION: rope,
                       SLIDING_ATTENTION: {"rope_type": "default", "rope_theta": local_theta}},
      rope_theta=cfg.rope_theta, rope_local_base_freq=local_theta,
      rope_scaling=_legacy_rope_scaling(rope))
  # transformers 4 readers before layer_types derive the kinds from a period.
  for period in range(1, cfg.num_layers + 2):
    if all((kind == SLIDING_ATTENTION) == bool((i + 1) % period) for i, kind in enumerate(kinds)):
      out["sliding_window_pattern"] = period
      break
  return out
