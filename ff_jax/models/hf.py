"""Hugging Face checkpoints: `config.json` + safetensors folders in and out of ff_jax.

Each family (Llama/Mistral/Qwen2 share one, GPT-2 has its own) has ONE declarative name table: a
list of `Rule(hf_key_template, param_path_templates, transform)`. Import and export are both derived
from it, so a name can never be mapped one way and forgotten the other:

  * import plans the exact set of HF keys the config needs by expanding the table over the abstract
    parameter tree, streams each tensor from the safetensors file(s) one at a time, applies the
    transform's `to_params` and hands `(path, array, key)` to `loading.assemble_params`, which puts
    it straight onto its sharding and checks full coverage;
  * export expands the same table over the concrete parameters and applies `to_hf`.

Transforms are small named pairs of exact inverses (transposes and reshapes only), so
HF -> ff_jax -> HF reproduces every tensor bit for bit.

HF layouts: `nn.Linear` stores `[out, in]`; GPT-2's `Conv1D` stores `[in, out]` and fuses q/k/v into
one `c_attn` tensor. ff_jax keeps heads as their own axis (`q [D, H, hd]`, `o [H, hd, D]`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from ff_jax import parallel
from ff_jax.errors import CheckpointError
from ff_jax.models import abstract_model
from ff_jax.models.config import ModelConfig, RopeScaling
from ff_jax.models.loading import assemble_params, flatten, path_str
from ff_jax.models.tokenizer import TextTokenizer

__all__ = [
    "FAMILIES", "Family", "Rule", "Transform", "SUPPORTED_MODEL_TYPES", "config_from_hf",
    "export_tensors", "hf_config_from", "load_hf", "load_tokenizer", "save_hf",
]

Params = dict[str, Any]
ParamPath = tuple[Any, ...]


# ------------------------------------------------------------------------------------------------
# Transforms: `to_params(hf_array, cfg) -> tuple of param arrays`, `to_hf(param arrays, cfg) -> hf`.


@dataclasses.dataclass(frozen=True)
class Transform:
  """A named pair of exact inverses between one HF tensor and one or more ff_jax parameters."""

  name: str
  to_params: Callable[[np.ndarray, ModelConfig], tuple[np.ndarray, ...]]
  to_hf: Callable[[tuple[np.ndarray, ...], ModelConfig], np.ndarray]


def _same(x, cfg):
  return (x,)


def _same_inv(p, cfg):
  return p[0]


def _transpose(x, cfg):
  """nn.Linear `[out, in]` -> `[in, out]` (and back: a transpose is its own inverse)."""
  return (x.T,)


def _transpose_inv(p, cfg):
  return p[0].T


def _linear_to_heads(x, cfg):
  """q/k/v_proj.weight `[H*hd, D]` -> `[D, H, hd]` (H from the shape: works for q and k/v)."""
  return (x.T.reshape(x.shape[1], -1, cfg.resolved_head_dim),)


def _linear_to_heads_inv(p, cfg):
  (w,) = p
  return w.reshape(w.shape[0], -1).T


def _linear_from_heads(x, cfg):
  """o_proj.weight `[D, H*hd]` -> `[H, hd, D]`."""
  return (x.T.reshape(-1, cfg.resolved_head_dim, x.shape[0]),)


def _linear_from_heads_inv(p, cfg):
  (w,) = p
  return w.reshape(-1, w.shape[-1]).T


def _bias_to_heads(x, cfg):
  """q/k/v bias `[H*hd]` -> `[H, hd]`."""
  return (x.reshape(-1, cfg.resolved_head_dim),)


def _bias_to_heads_inv(p, cfg):
  return p[0].reshape(-1)


def _split_qkv(x, cfg):
  """GPT-2 fused c_attn (`[D, (H+2Hkv)*hd]` weight or `[(H+2Hkv)*hd]` bias) -> q, k, v by head."""
  hd = cfg.resolved_head_dim
  q_size, kv_size = cfg.num_heads * hd, cfg.num_kv_heads * hd
  if x.shape[-1] != q_size + 2 * kv_size:
    raise ValueError(f"last dimension {x.shape[-1]} != {q_size + 2 * kv_size} (q + k + v)")
  parts = np.split(x, [q_size, q_size + kv_size], axis=-1)
  return tuple(part.reshape(*x.shape[:-1], -1, hd) for part in parts)


def _split_qkv_inv(p, cfg):
  return np.concatenate([a.reshape(*a.shape[:-2], -1) for a in p], axis=-1)


def _conv1d_from_heads(x, cfg):
  """GPT-2 attn c_proj.weight (Conv1D, `[H*hd, D]`) -> `[H, hd, D]`."""
  return (x.reshape(-1, cfg.resolved_head_dim, x.shape[-1]),)


def _conv1d_from_heads_inv(p, cfg):
  (w,) = p
  return w.reshape(-1, w.shape[-1])


SAME = Transform("same", _same, _same_inv)
TRANSPOSE = Transform("transpose", _transpose, _transpose_inv)
LINEAR_TO_HEADS = Transform("linear_to_heads", _linear_to_heads, _linear_to_heads_inv)
LINEAR_FROM_HEADS = Transform("linear_from_heads", _linear_from_heads, _linear_from_heads_inv)
BIAS_TO_HEADS = Transform("bias_to_heads", _bias_to_heads, _bias_to_heads_inv)
SPLIT_QKV = Transform("split_qkv", _split_qkv, _split_qkv_inv)
CONV1D_FROM_HEADS = Transform("conv1d_from_heads", _conv1d_from_heads, _conv1d_from_heads_inv)


# ------------------------------------------------------------------------------------------------
# Name tables.


@dataclasses.dataclass(frozen=True)
class Rule:
  """One HF tensor <-> parameter(s). `{i}` in both templates is the layer index."""

  hf: str
  params: tuple[str, ...]
  transform: Transform = SAME


@dataclasses.dataclass(frozen=True)
class Family:
  """How one group of HF model types names its tensors."""

  model_types: tuple[str, ...]
  architectures: dict[str, str]  # model_type -> the *ForCausalLM class written on export
  rules: tuple[Rule, ...]
  # Checkpoints saved from the bare base model (`LlamaModel`, `GPT2Model`, original gpt2 files)
  # lack this prefix on the body's keys.
  prefix: str
  # Buffers some checkpoints carry that are recomputed, never loaded.
  ignorable: tuple[str, ...] = ()


_L = "model.layers.{i}."
LLAMA_RULES = (
    Rule("model.embed_tokens.weight", ("embed",)),
    Rule(_L + "input_layernorm.weight", ("layers/{i}/attn_norm/scale",)),
    Rule(_L + "self_attn.q_proj.weight", ("layers/{i}/attn/q",), LINEAR_TO_HEADS),
    Rule(_L + "self_attn.k_proj.weight", ("layers/{i}/attn/k",), LINEAR_TO_HEADS),
    Rule(_L + "self_attn.v_proj.weight", ("layers/{i}/attn/v",), LINEAR_TO_HEADS),
    Rule(_L + "self_attn.o_proj.weight", ("layers/{i}/attn/o",), LINEAR_FROM_HEADS),
    Rule(_L + "self_attn.q_proj.bias", ("layers/{i}/attn/q_bias",), BIAS_TO_HEADS),
    Rule(_L + "self_attn.k_proj.bias", ("layers/{i}/attn/k_bias",), BIAS_TO_HEADS),
    Rule(_L + "self_attn.v_proj.bias", ("layers/{i}/attn/v_bias",), BIAS_TO_HEADS),
    Rule(_L + "self_attn.o_proj.bias", ("layers/{i}/attn/o_bias",)),
    Rule(_L + "post_attention_layernorm.weight", ("layers/{i}/mlp_norm/scale",)),
    Rule(_L + "mlp.gate_proj.weight", ("layers/{i}/mlp/gate",), TRANSPOSE),
    Rule(_L + "mlp.up_proj.weight", ("layers/{i}/mlp/up",), TRANSPOSE),
    Rule(_L + "mlp.down_proj.weight", ("layers/{i}/mlp/down",), TRANSPOSE),
    Rule("model.norm.weight", ("final_norm/scale",)),
    Rule("lm_head.weight", ("lm_head",), TRANSPOSE),
)

_H = "transformer.h.{i}."
GPT2_RULES = (
    Rule("transformer.wte.weight", ("embed",)),
    Rule("transformer.wpe.weight", ("pos_embed",)),
    Rule(_H + "ln_1.weight", ("layers/{i}/attn_norm/scale",)),
    Rule(_H + "ln_1.bias", ("layers/{i}/attn_norm/bias",)),
    Rule(_H + "attn.c_attn.weight", ("layers/{i}/attn/q", "layers/{i}/attn/k", "layers/{i}/attn/v"),
         SPLIT_QKV),
    Rule(_H + "attn.c_attn.bias",
         ("layers/{i}/attn/q_bias", "layers/{i}/attn/k_bias", "layers/{i}/attn/v_bias"), SPLIT_QKV),
    Rule(_H + "attn.c_proj.weight", ("layers/{i}/attn/o",), CONV1D_FROM_HEADS),
    Rule(_H + "attn.c_proj.bias", ("layers/{i}/attn/o_bias",)),
    Rule(_H + "ln_2.weight", ("layers/{i}/mlp_norm/scale",)),
    Rule(_H + "ln_2.bias", ("layers/{i}/mlp_norm/bias",)),
    Rule(_H + "mlp.c_fc.weight", ("layers/{i}/mlp/up",)),  # Conv1D is already [in, out]
    Rule(_H + "mlp.c_fc.bias", ("layers/{i}/mlp/up_bias",)),
    Rule(_H + "mlp.c_proj.weight", ("layers/{i}/mlp/down",)),
    Rule(_H + "mlp.c_proj.bias", ("layers/{i}/mlp/down_bias",)),
    Rule("transformer.ln_f.weight", ("final_norm/scale",)),
    Rule("transformer.ln_f.bias", ("final_norm/bias",)),
    Rule("lm_head.weight", ("lm_head",), TRANSPOSE),
)

LLAMA_FAMILY = Family(
    model_types=("llama", "mistral", "qwen2"),
    architectures={"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                   "qwen2": "Qwen2ForCausalLM"},
    rules=LLAMA_RULES, prefix="model.", ignorable=(r"rotary_emb\.inv_freq$",))
GPT2_FAMILY = Family(
    model_types=("gpt2",), architectures={"gpt2": "GPT2LMHeadModel"}, rules=GPT2_RULES,
    prefix="transformer.", ignorable=(r"\.attn\.bias$", r"\.attn\.masked_bias$"))

FAMILIES: dict[str, Family] = {t: f for f in (LLAMA_FAMILY, GPT2_FAMILY) for t in f.model_types}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
# `architectures` entries that identify a model type when config.json has no `model_type`.
_ARCHITECTURES = {
    "LlamaForCausalLM": "llama", "LlamaModel": "llama", "MistralForCausalLM": "mistral",
    "MistralModel": "mistral", "Qwen2ForCausalLM": "qwen2", "Qwen2Model": "qwen2",
    "GPT2LMHeadModel": "gpt2", "GPT2Model": "gpt2",
}


def _param_path(template: str, i: int | None) -> ParamPath:
  parts = template.format(i=i).split("/")
  return tuple(int(p) if p.isdigit() else p for p in parts)


def _plan(family: Family, cfg: ModelConfig, have: Mapping[ParamPath, Any]
          ) -> dict[str, tuple[Rule, tuple[ParamPath, ...]]]:
  """{hf_key: (rule, param paths)} for every rule whose parameters all exist in `have`.

  Expanding the table over the parameter tree (rather than matching names) makes optional tensors
  (biases, lm_head, pos_embed) follow the config automatically in both directions.
  """
  plan = {}
  for rule in family.rules:
    layers = range(cfg.num_layers) if "{i}" in rule.hf else [None]
    for i in layers:
      paths = tuple(_param_path(t, i) for t in rule.params)
      present = [p in have for p in paths]
      if all(present):
        plan[rule.hf.format(i=i)] = (rule, paths)
      elif any(present):  # a table bug, not a user error
        raise AssertionError(f"rule {rule.hf} only partly matches the model's parameters")
  return plan


# ------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig.


def _family_of(config: dict, origin: str) -> str:
  model_type = config.get("model_type")
  archs = config.get("architectures") or []
  supported = ", ".join(SUPPORTED_MODEL_TYPES)
  if model_type is None:
    known = [_ARCHITECTURES[a] for a in archs if a in _ARCHITECTURES]
    if not known:
      name = archs[0] if archs else None
      raise CheckpointError(f"unknown architecture {name!r} in {origin}; supported: {supported}")
    model_type = known[0]
  if model_type not in FAMILIES:
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
  model_type = _family_of(config, origin)
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
  if model_type not in FAMILIES:
    raise CheckpointError(f"cannot export as model_type {model_type!r}; supported: "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)}")

  def need(cond: bool, why: str):
    if not cond:
      raise CheckpointError(f"cannot export this model as {model_type}: {why}")

  out: dict[str, Any] = {
      "architectures": [FAMILIES[model_type].architectures[model_type]],
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


# ------------------------------------------------------------------------------------------------
# Reading safetensors.


def _checkpoint_index(folder: Path) -> dict[str, Path]:
  """{tensor key: file} from `model.safetensors` or `model.safetensors.index.json` + shards."""
  single = folder / "model.safetensors"
  index = folder / "model.safetensors.index.json"
  if index.exists():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError) as e:
      raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
    files = {name: folder / name for name in set(weight_map.values())}
    for name, path in files.items():
      if not path.exists():
        raise CheckpointError(f"{index}: shard {name!r} is listed but missing")
    return {key: files[name] for key, name in weight_map.items()}
  if single.exists():
    with _open(single) as f:
      return {key: single for key in f.keys()}
  raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def _open(path: Path):
  try:
    return safe_open(str(path), framework="numpy")
  except Exception as e:  # safetensors raises its own error types for corrupt headers
    raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None


_RAW_DTYPES = {"BF16": ml_dtypes.bfloat16}


def _read_header(path: Path) -> tuple[int, dict]:
  """(offset of the data section, header) of a safetensors file."""
  with open(path, "rb") as f:
    (header_len,) = struct.unpack("<Q", f.read(8))
    return 8 + header_len, json.loads(f.read(header_len))


def _raw_tensor(path: Path, key: str, data_start: int, header: dict) -> np.ndarray:
  """Read one tensor by its header offsets; for dtypes numpy lacks (bf16)."""
  entry = header[key]
  begin, end = entry["data_offsets"]
  with open(path, "rb") as f:
    f.seek(data_start + begin)
    data = f.read(end - begin)
  return np.frombuffer(data, dtype=_RAW_DTYPES[entry["dtype"]]).reshape(entry["shape"])


class _Reader:
  """Keeps one safetensors handle open at a time while streaming keys file by file."""

  def __init__(self):
    self.path: Path | None = None
    self.handle = None
    self.header: tuple[int, dict] | None = None

  def read(self, path: Path, key: str) -> np.ndarray:
    if path != self.path:
      self.close()
      self.handle, self.path = _open(path).__enter__(), path
    dtype = self.handle.get_slice(key).get_dtype()
    if dtype in _RAW_DTYPES:
      if self.header is None:
        self.header = _read_header(path)
      return _raw_tensor(path, key, *self.header)
    try:
      return self.handle.get_tensor(key)
    except TypeError as e:
      raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {dtype} ({e})") from None

  def close(self):
    if self.handle is not None:
      self.handle.__exit__(None, None, None)
    self.handle = self.path = self.header = None


# ------------------------------------------------------------------------------------------------
# Import / export.


def load_hf(folder: str | os.PathLike, mesh=None, rules: Mapping | None = None,
            dtype: str | None = None) -> tuple[ModelConfig, Params]:
  """(ModelConfig, params) from an HF folder, each tensor placed directly on its sharding.

  `mesh` + `rules` (logical axis -> mesh axes, default `parallel.DEFAULT_RULES`) give the same
  shardings as `ModelRuntime.create(cfg, mesh, rules).param_shardings`; without a mesh, arrays land
  on the default device. `dtype` ('float32' / 'bfloat16') overrides the parameter dtype (default:
  ff_jax's float32, whatever the file holds). Only one tensor is on the host at a time.
  """
  folder = Path(folder)
  config_path = folder / "config.json"
  if not config_path.exists():
    raise CheckpointError(f"{config_path}: not found")
  try:
    hf_config = json.loads(config_path.read_text())
  except ValueError as e:
    raise CheckpointError(f"{config_path}: invalid JSON ({e})") from None
  cfg = config_from_hf(hf_config, str(config_path))
  if dtype is not None:
    cfg = cfg.replace(param_dtype=dtype)
  model_type = _family_of(hf_config, str(config_path))
  family = FAMILIES[model_type]

  _, abstract, logical = abstract_model(cfg)
  shardings = None
  if mesh is not None:
    shardings = parallel.tree_shardings(abstract, logical, mesh, rules or parallel.DEFAULT_RULES)
  planned = flatten(abstract)
  plan = _plan(family, cfg, planned)

  files = _checkpoint_index(folder)
  keys: dict[str, tuple[str, Path]] = {}  # canonical key -> (key in the file, file)
  ignorable = [re.compile(p) for p in family.ignorable]
  for key, path in files.items():
    canonical = key if key in plan or key.startswith(family.prefix) else family.prefix + key
    if canonical in plan:
      keys[canonical] = (key, path)
    elif key == "lm_head.weight" and cfg.tie_embeddings:
      continue  # some exporters still write the tied head; the embedding is the source, as in HF
    elif not any(p.search(key) for p in ignorable):
      raise CheckpointError(f"{path}: tensor {key!r} has no place in a {model_type} model with "
                            f"this config.json (num_layers={cfg.num_layers}, "
                            f"qkv_bias={cfg.qkv_bias}, tie_embeddings={cfg.tie_embeddings})")
  missing = [k for k in plan if k not in keys]
  if missing:
    shown = ", ".join(repr(k) for k in missing[:6])
    more = f" and {len(missing) - 6} more" if len(missing) > 6 else ""
    raise CheckpointError(f"{folder}: checkpoint is missing tensor(s) {shown}{more}")

  def tensors() -> Iterator[tuple[ParamPath, np.ndarray, str]]:
    reader = _Reader()
    try:
      # File by file, so each shard is opened once.
      for canonical, (key, path) in sorted(keys.items(), key=lambda kv: (str(kv[1][1]), kv[0])):
        rule, paths = plan[canonical]
        array = reader.read(path, key)
        try:
          parts = rule.transform.to_params(array, cfg)
        except ValueError as e:
          raise CheckpointError(f"{path}: tensor {key!r} has shape {tuple(array.shape)}, which "
                                f"does not fit {', '.join(map(path_str, paths))} ({e})") from None
        for param, part in zip(paths, parts):
          want = planned[param].shape
          if tuple(part.shape) != tuple(want):
            raise CheckpointError(
                f"{path}: tensor {key!r} has shape {tuple(array.shape)}, which gives "
                f"{tuple(part.shape)} for {path_str(param)}; config.json expects {tuple(want)}")
          yield param, np.ascontiguousarray(part), key
    finally:
      reader.close()

  params = assemble_params(abstract, shardings, tensors(), str(folder))
  return cfg, params


def export_tensors(cfg: ModelConfig, params: Params, model_type: str) -> dict[str, np.ndarray]:
  """{HF key: host array} for `params`, in the parameters' own dtype."""
  if model_type not in FAMILIES:
    raise CheckpointError(f"cannot export as model_type {model_type!r}; supported: "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)}")
  flat = flatten(params)
  plan = _plan(FAMILIES[model_type], cfg, flat)
  covered = {p for _, paths in plan.values() for p in paths}
  left = sorted(path_str(p) for p in flat if p not in covered)
  if left:
    raise CheckpointError(f"cannot export as {model_type}: no HF name for parameter(s) {left}")
  out = {}
  for key, (rule, paths) in plan.items():
    arrays = tuple(np.asarray(jax.device_get(flat[p])) for p in paths)
    out[key] = np.ascontiguousarray(rule.transform.to_hf(arrays, cfg))
  return out


def save_hf(folder: str | os.PathLike, cfg: ModelConfig, params: Params, model_type: str,
            tokenizer: TextTokenizer | None = None) -> Path:
  """Write an HF folder (config.json, model.safetensors, tokenizer files) for `params`.

  transformers' `AutoModelForCausalLM.from_pretrained` loads it. Tensors keep the parameters'
  dtype (float32 or bfloat16). The folder is built next to its destination and renamed into place,
  so a crash never leaves a half-written checkpoint under `folder`. Arrays must be addressable from
  this process (single host, or gather first).
  """
  folder = Path(folder)
  config = hf_config_from(cfg, model_type)
  tensors = export_tensors(cfg, params, model_type)
  folder.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
  try:
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
      tokenizer.save(tmp)
    old = None
    if folder.exists():
      old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
      folder.rename(old)
    tmp.rename(folder)
    if old is not None:
      shutil.rmtree(old)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return folder


def load_tokenizer(folder: str | os.PathLike) -> TextTokenizer:
  """The tokenizer of an HF folder (`tokenizer.json` + `tokenizer_config.json`)."""
  return TextTokenizer.from_folder(folder)
