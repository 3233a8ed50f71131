"""Hugging Face checkpoints: `config.json` + safetensors folders in and out of ff_jax.

Each family (Llama/Mistral/Qwen2 share one; Qwen3, Gemma 3 and GPT-2 have their own) has ONE
declarative name table: a
list of `Rule(hf_key_template, param_path_templates, transform)`. Import and export are both derived
from it, so a name can never be mapped one way and forgotten the other:

  * import plans the exact set of HF keys the config needs by expanding the table over the abstract
    parameter tree, streams each tensor from the safetensors file(s) one at a time, applies the
    transform's `to_params` and hands `(path, array, key)` to `loading.assemble_params`, which puts
    it straight onto its sharding and checks full coverage;
  * export expands the same table over the concrete parameters and applies `to_hf`, one tensor at
    a time (gathered across processes when sharded), into safetensors shards that process 0
    alone writes (`save_hf`).

Transforms are small named pairs of exact inverses (transposes and reshapes only), so
HF -> ff_jax -> HF reproduces every tensor bit for bit.

HF layouts: `nn.Linear` stores `[out, in]`; GPT-2's `Conv1D` stores `[in, out]` and fuses q/k/v into
one `c_attn` tensor. ff_jax keeps heads as their own axis (`q [D, H, hd]`, `o [H, hd, D]`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils
from safetensors import safe_open
from safetensors.numpy import save_file

from ff_jax import parallel
from ff_jax.atomic_io import run_path, write_folder
from ff_jax.errors import CheckpointError
from ff_jax.models import abstract_model
from ff_jax.models.config import ModelConfig
from ff_jax.models.hf_config import (
  GEMMA3_MULTIMODAL,
  SUPPORTED_MODEL_TYPES,
  config_from_hf,
  hf_config_from,
  hf_model_type,
  model_type_of,
  require_export_type,
)
from ff_jax.models.loading import LayerSlice, assemble_params, flatten, layer_slices, path_str
from ff_jax.models.tokenizer import TextTokenizer

__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "EXPORT_DTYPES", "FAMILIES", "Family", "MODEL_CARD",
    "Rule", "Transform", "SUPPORTED_MODEL_TYPES", "checkpoint_dtype", "config_from_hf",
    "MAX_SHARD_SIZE", "export_tensors", "generation_config_from", "hf_config_from", "hf_model_type",
    "load_hf", "load_tokenizer", "peft_adapter_tensors", "peft_target_modules", "save_hf",
    "save_peft_adapter", "shard_files",
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
  rules: tuple[Rule, ...]
  # Checkpoints saved from the bare base model (`LlamaModel`, `GPT2Model`, original gpt2 files)
  # lack this prefix on the body's keys.
  prefix: str
  # Buffers some checkpoints carry that are recomputed, never loaded (and, for a multimodal
  # checkpoint, the parts ff_jax does not model).
  ignorable: tuple[str, ...] = ()
  # (pattern, replacement) applied to a file's keys before matching: other layouts of the same
  # tensors (a multimodal checkpoint's `language_model.` prefixes).
  renames: tuple[tuple[str, str], ...] = ()


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

QK_NORM_RULES = (
    Rule(_L + "self_attn.q_norm.weight", ("layers/{i}/attn/q_norm/scale",)),
    Rule(_L + "self_attn.k_norm.weight", ("layers/{i}/attn/k_norm/scale",)),
)
QWEN3_RULES = LLAMA_RULES + QK_NORM_RULES

# Gemma's four norms per block: input (before attention), post_attention (on its output),
# pre_feedforward (before the MLP; Llama's `post_attention_layernorm` plays that part) and
# post_feedforward (on the MLP's output).
GEMMA3_RULES = tuple(
    rule for rule in LLAMA_RULES if "post_attention_layernorm" not in rule.hf) + QK_NORM_RULES + (
    Rule(_L + "post_attention_layernorm.weight", ("layers/{i}/attn_post_norm/scale",)),
    Rule(_L + "pre_feedforward_layernorm.weight", ("layers/{i}/mlp_norm/scale",)),
    Rule(_L + "post_feedforward_layernorm.weight", ("layers/{i}/mlp_post_norm/scale",)),
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
    model_types=("llama", "mistral", "qwen2"), rules=LLAMA_RULES, prefix="model.",
    ignorable=(r"rotary_emb\.inv_freq$",))
GPT2_FAMILY = Family(
    model_types=("gpt2",), rules=GPT2_RULES,
    prefix="transformer.", ignorable=(r"\.attn\.bias$", r"\.attn\.masked_bias$"))
QWEN3_FAMILY = Family(model_types=("qwen3",), rules=QWEN3_RULES, prefix="model.",
                      ignorable=(r"rotary_emb\.inv_freq$",))
GEMMA3_FAMILY = Family(model_types=("gemma3_text",), rules=GEMMA3_RULES, prefix="model.")
# Gemma3ForConditionalGeneration: transformers 5 writes `model.language_model.*`, 4 wrote
# `language_model.model.*` (+ `language_model.lm_head.weight`); the vision tower and projector
# are not part of the text model.
GEMMA3_MULTIMODAL_FAMILY = Family(
    model_types=(GEMMA3_MULTIMODAL,), rules=GEMMA3_RULES, prefix="model.",
    ignorable=(r"^(model\.)?vision_tower\.", r"^(model\.)?multi_modal_projector\."),
    renames=((r"^model\.language_model\.", "model."), (r"^language_model\.model\.", "model."),
             (r"^language_model\.lm_head\.", "lm_head.")))

FAMILIES: dict[str, Family] = {
    t: f for f in (LLAMA_FAMILY, GPT2_FAMILY, QWEN3_FAMILY, GEMMA3_FAMILY, GEMMA3_MULTIMODAL_FAMILY)
    for t in f.model_types}
assert set(FAMILIES) == set(SUPPORTED_MODEL_TYPES), "name tables and config translation disagree"
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

# What an export may be written in, by config.json's name for it (`dtype`, `torch_dtype`), and the
# safetensors header's names of the same.
EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def checkpoint_dtype(folder: str | os.PathLike) -> str | None:
  """The float dtype an HF folder's weights are stored in (a key of EXPORT_DTYPES), or None.

  config.json's `dtype` (transformers 5) or `torch_dtype` (4.x) says it when it names one; else
  (missing, or `auto`) the safetensors headers do: the float dtype holding the most bytes, so a
  bf16 checkpoint with a few float32 norms counts as bf16. Headers only: no weight is read.
  """
  folder = run_path(folder)
  try:
    config = json.loads((folder / "config.json").read_text())
  except (OSError, ValueError):
    config = {}
  for key in ("dtype", "torch_dtype"):
    if config.get(key) in EXPORT_DTYPES:
      return config[key]
  try:
    files = set(_checkpoint_index(folder).values())
  except CheckpointError:
    return None
  size: dict[str, int] = {}
  for path in files:
    _, header = _read_header(path)
    for key, entry in header.items():
      if key != "__metadata__" and entry.get("dtype") in _SAFETENSORS_DTYPES:
        name = _SAFETENSORS_DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        size[name] = size.get(name, 0) + end - begin
  return max(size, key=size.get) if size else None


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
  folder = run_path(folder)
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
  model_type = model_type_of(hf_config, str(config_path))
  family = FAMILIES[model_type]

  _, abstract, logical = abstract_model(cfg)
  shardings = None
  if mesh is not None:
    shardings = parallel.tree_shardings(abstract, logical, mesh, rules or parallel.DEFAULT_RULES)
  planned = layer_slices(flatten(abstract))  # per-layer paths, as the file names them
  plan = _plan(family, cfg, planned)

  files = _checkpoint_index(folder)
  keys: dict[str, tuple[str, Path]] = {}  # canonical key -> (key in the file, file)
  ignorable = [re.compile(p) for p in family.ignorable]
  for key, path in files.items():
    renamed = key
    for pattern, replacement in family.renames:
      renamed = re.sub(pattern, replacement, renamed)
    canonical = (renamed if renamed in plan or renamed.startswith(family.prefix)
                 else family.prefix + renamed)
    if canonical in plan:
      keys[canonical] = (key, path)
    elif renamed == "lm_head.weight" and cfg.tie_embeddings:
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


# ------------------------------------------------------------------------------------------------
# Export: streamed tensor by tensor into safetensors shards, written by process 0 alone.

# Bytes per safetensors file: transformers 4's default ("5GB"; 5.x raised it to 50GB). Process 0
# holds one shard in host memory while it fills it, so this also bounds the export's host memory.
MAX_SHARD_SIZE = 5 * 10**9
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
_SAFETENSORS_METADATA = {"format": "pt"}  # what transformers writes; it refuses files without it


@dataclasses.dataclass(frozen=True)
class _ExportItem:
  """One HF tensor of an export: its key, how it is made, and its size in bytes."""

  key: str
  rule: Rule
  paths: tuple[ParamPath, ...]
  nbytes: int


def _natural_key(key: str) -> tuple:
  """Sort key with numbers compared as numbers, so each layer's tensors sit together, in order."""
  return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key))


def _export_items(cfg: ModelConfig, params: Params, model_type: str, dtype: str | None = None
                  ) -> tuple[dict[ParamPath, Any], list[_ExportItem]]:
  """(flat params, the export's tensors in HF key order); CheckpointError for a parameter without
  an HF name. Sizes come from the parameters' shapes (the transforms only move elements) and
  `dtype` (None: the parameters' own), so every process plans the same shards before any tensor
  is gathered."""
  require_export_type(model_type)
  flat = layer_slices(flatten(params))  # per-layer paths, as the file names them
  plan = _plan(FAMILIES[model_type], cfg, flat)
  covered = {p for _, paths in plan.values() for p in paths}
  left = sorted(path_str(p) for p in flat if p not in covered)
  if left:
    raise CheckpointError(f"cannot export as {model_type}: no HF name for parameter(s) {left}")
  items = []
  for key in sorted(plan, key=_natural_key):
    rule, paths = plan[key]
    nbytes = sum(math.prod(flat[p].shape) * np.dtype(EXPORT_DTYPES.get(dtype, flat[p].dtype)
                                                      ).itemsize for p in paths)
    items.append(_ExportItem(key, rule, paths, nbytes))
  return flat, items


def _host_value(x: Any) -> np.ndarray:
  """The whole of one parameter in this process's memory.

  A parameter sharded over several processes is gathered with `process_allgather`: a collective,
  so every process must ask for the same parameters in the same order (the sharding, and so the
  branch taken, is the same on every process). One layer of a stacked parameter is sliced on
  device first, so only that layer comes to the host.
  """
  if isinstance(x, LayerSlice):
    x = x.value()
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))  # already whole on this process
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _hf_tensor(cfg: ModelConfig, flat: Mapping[ParamPath, Any], item: _ExportItem,
               dtype: str | None = None) -> np.ndarray:
  """One HF tensor on the host, converted from its parameter(s) with the rule's `to_hf`, and cast
  to `dtype` (None: the parameters' own; a cast rounds to nearest, as torch's `.to` does)."""
  arrays = tuple(_host_value(flat[p]) for p in item.paths)
  tensor = item.rule.transform.to_hf(arrays, cfg)
  if dtype is not None:
    tensor = tensor.astype(EXPORT_DTYPES[dtype], copy=False)
  tensor = np.ascontiguousarray(tensor)
  assert tensor.nbytes == item.nbytes, f"{item.key}: {tensor.nbytes} bytes, planned {item.nbytes}"
  return tensor


def export_tensors(cfg: ModelConfig, params: Params, model_type: str) -> dict[str, np.ndarray]:
  """{HF key: host array} for `params`, in the parameters' own dtype (the whole model at once: for
  tests and small models; `save_hf` streams)."""
  flat, items = _export_items(cfg, params, model_type)
  return {item.key: _hf_tensor(cfg, flat, item) for item in items}


def shard_files(sizes: Sequence[tuple[str, int]], max_shard_size: int = MAX_SHARD_SIZE
                ) -> dict[str, list[str]]:
  """{file name: keys} for `(key, bytes)` pairs kept in order.

  A file is closed when the next tensor would take it past `max_shard_size`, so a tensor larger
  than that gets a file of its own. One file is `model.safetensors`; several are named
  `model-00001-of-00003.safetensors` ... as transformers names them.
  """
  groups: list[list[str]] = [[]]
  size = 0
  for key, nbytes in sizes:
    if groups[-1] and size + nbytes > max_shard_size:
      groups.append([])
      size = 0
    groups[-1].append(key)
    size += nbytes
  if len(groups) == 1:
    return {SINGLE_FILE: groups[0]}
  return {f"model-{i:05d}-of-{len(groups):05d}.safetensors": keys
          for i, keys in enumerate(groups, start=1)}


def generation_config_from(cfg: ModelConfig) -> dict[str, Any]:
  """`generation_config.json` as transformers' `GenerationConfig.from_model_config` writes it for
  the exported config.json: the special token ids that are set (no version stamp)."""
  ids = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
         "pad_token_id": cfg.pad_token_id}
  return {"_from_model_config": True, **{k: v for k, v in ids.items() if v is not None},
          "use_cache": True}


def _write_json(path: Path, value: Any) -> None:
  path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def _raise_any_failure(failure: Exception | None, folder: Path) -> None:
  """Raise this process's failure, or process 0's on the others. On several processes this is
  also the barrier after which the export is in place."""
  failed = failure is not None
  if jax.process_count() > 1:
    failed = bool(multihost_utils.broadcast_one_to_all(np.int32(failed)))
  if failure is not None:
    raise failure
  if failed:
    raise CheckpointError(f"{folder}: process 0 could not write the HF export; its log says why")


def save_hf(folder: str | os.PathLike, cfg: ModelConfig, params: Params, model_type: str,
            tokenizer: TextTokenizer | None = None,
            max_shard_size: int = MAX_SHARD_SIZE, dtype: str | None = None,
            card: str | None = None) -> Path:
  """Write an HF folder for `params`: config.json, generation_config.json, the weights as
  `model.safetensors` or, past `max_shard_size` bytes, as `model-0000k-of-0000n.safetensors`
  shards with `model.safetensors.index.json`, the tokenizer files and, given `card`, a README.md
  (the model card).

  transformers' `AutoModelForCausalLM.from_pretrained` loads it. Tensors are written in `dtype`
  (a key of EXPORT_DTYPES; None: the parameters' own, float32 or bfloat16), which config.json's
  `dtype` names: a model trained in float32 from a bf16 checkpoint goes back as bf16, the size it
  came in. The model is never gathered whole: tensors are brought to the host
  one at a time (on a multi-process mesh, gathered from every process), converted and added to
  the current shard, which is written out once full. Process 0 alone writes, so its host memory
  holds at most one shard plus one tensor (GPT-2's fused q/k/v: plus its parts); the other
  processes hold one tensor at a time. Every process must call this with the same arguments.
  Process 0 builds the folder next to its destination and renames it into place
  (`atomic_io.write_folder`), so a crash never leaves a half-written checkpoint under `folder`;
  the other processes return once it is in place.
  """
  folder = run_path(folder)
  config = hf_config_from(cfg, model_type)
  if dtype is not None:
    if dtype not in EXPORT_DTYPES:
      raise CheckpointError(f"cannot export in dtype {dtype!r}; choose from "
                            f"{', '.join(EXPORT_DTYPES)}")
    config["dtype"] = dtype
  flat, items = _export_items(cfg, params, model_type, dtype)  # both raise on every process alike
  files = shard_files([(item.key, item.nbytes) for item in items], max_shard_size)
  by_key = {item.key: item for item in items}
  index = {"metadata": {"total_parameters": sum(math.prod(p.shape) for p in flat.values()),
                        "total_size": sum(item.nbytes for item in items)},
           "weight_map": {key: name for name, keys in files.items() for key in keys}}

  def stream(tmp: Path | None) -> None:
    """Every process gathers every tensor, in the same order; process 0 (`tmp`) also writes. A
    failed write ends the writing but not the gathers, which the other processes are waiting in;
    it is raised at the end."""
    failure = None
    for name, keys in files.items():
      shard = {}
      for key in keys:
        tensor = _hf_tensor(cfg, flat, by_key[key], dtype)  # a gather if sharded over processes
        if tmp is not None and failure is None:
          shard[key] = tensor
      if tmp is not None and failure is None:
        try:
          save_file(shard, str(tmp / name), metadata=_SAFETENSORS_METADATA)  # no copies made
        except Exception as e:
          failure = e
    if failure is not None:
      raise failure
    if tmp is not None:
      _write_json(tmp / "config.json", config)
      _write_json(tmp / GENERATION_CONFIG_FILE, generation_config_from(cfg))
      if len(files) > 1:
        _write_json(tmp / INDEX_FILE, index)
      if tokenizer is not None:
        tokenizer.save(tmp)
      if card is not None:
        (tmp / MODEL_CARD).write_text(card)

  _gather_and_write(folder, stream)
  return folder


def _gather_and_write(folder: Path, stream: Callable[[Path | None], None]) -> None:
  """Run `stream(tmp)` on process 0 inside `write_folder(folder)` and `stream(None)` (the gathers
  alone) on the others, then raise any process's failure on all of them."""
  failure = None
  gathered = False

  def fill(tmp: Path) -> None:
    nonlocal gathered
    gathered = True
    stream(tmp)

  try:
    write_folder(folder, fill)  # process 0 only; no fill if it cannot make the temp folder
  except Exception as e:
    failure = e
  if not gathered:  # the other processes, and process 0 if it failed before filling
    try:
      stream(None)
    except Exception as e:
      failure = failure or e
  _raise_any_failure(failure, folder)


# ------------------------------------------------------------------------------------------------
# LoRA adapters as a PEFT folder (`PeftModel.from_pretrained(base, folder)` loads it).

MODEL_CARD = "README.md"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Transforms under which the HF tensor is the parameter flattened to [in, out] and transposed
# (nn.Linear's [out, in]): an adapter A [*in, r], B [r, *out] is then PEFT's lora_A [r, in] and
# lora_B [out, r] by the same flattening, and HF's W + s·B_hf A_hf is the merged weight's export.
_LINEAR_TRANSFORMS = (TRANSPOSE, LINEAR_TO_HEADS, LINEAR_FROM_HEADS)


def _adapted_weight_rules(cfg: ModelConfig, model_type: str) -> dict[str, Rule]:
  """{ff_jax weight template (`layers/{i}/attn/q`): its HF rule} for every LoRA target of
  `cfg`; CheckpointError when a target has no nn.Linear of its own in `model_type` (GPT-2 fuses
  q/k/v into one Conv1D)."""
  require_export_type(model_type)
  rules = {rule.params[0]: rule for rule in FAMILIES[model_type].rules if len(rule.params) == 1}
  out = {}
  for target in cfg.lora.targets:
    where = "attn" if target in ("q", "k", "v", "o") else "mlp"
    template = f"layers/{{i}}/{where}/{target}"
    rule = rules.get(template)
    if rule is None or rule.transform not in _LINEAR_TRANSFORMS:
      raise CheckpointError(f"cannot write a PEFT adapter for {model_type}: lora target "
                            f"{target!r} is not one nn.Linear there")
    out[template] = rule
  return out


def peft_target_modules(cfg: ModelConfig, model_type: str) -> list[str]:
  """PEFT's `target_modules` for `cfg.lora.targets` (`q_proj`, `down_proj`, ...), sorted;
  CheckpointError when `model_type` cannot hold the adapters as PEFT LoRA layers."""
  rules = _adapted_weight_rules(cfg, model_type)
  return sorted({rule.hf.removesuffix(".weight").rsplit(".", 1)[-1] for rule in rules.values()})


def _adapter_items(cfg: ModelConfig, params: Params, model_type: str
                   ) -> tuple[dict[ParamPath, Any], list[tuple[str, ParamPath, str]]]:
  """(flat params, [(PEFT key, factor path, "A" or "B")] in key order) for the adapters in
  `params`."""
  rules = _adapted_weight_rules(cfg, model_type)
  flat = layer_slices(flatten(params))  # per-layer paths, as the file names them
  items = []
  for path in flat:
    name = str(path[-1])
    if not name.endswith(("_lora_a", "_lora_b")):
      continue
    layer = next((p for p in path if isinstance(p, int)), None)
    weight = "/".join("{i}" if isinstance(p, int) else str(p) for p in path[:-1])
    weight += "/" + name[:-len("_lora_a")]
    if weight not in rules:
      raise CheckpointError(f"adapter {path_str(path)} adapts no lora target of this config")
    module = rules[weight].hf.format(i=layer).removesuffix(".weight")
    factor = "A" if name.endswith("_lora_a") else "B"
    items.append((f"base_model.model.{module}.lora_{factor}.weight", path, factor))
  if not items:
    raise CheckpointError("no LoRA adapters in these parameters")
  return flat, sorted(items, key=lambda item: _natural_key(item[0]))


def _peft_tensor(flat: Mapping[ParamPath, Any], path: ParamPath, factor: str) -> np.ndarray:
  """PEFT's lora_A [r, in] from A [*in, r], or lora_B [out, r] from B [r, *out] (a gather when
  sharded over processes)."""
  value = _host_value(flat[path])
  if factor == "A":
    return np.ascontiguousarray(value.reshape(-1, value.shape[-1]).T)
  return np.ascontiguousarray(value.reshape(value.shape[0], -1).T)


def peft_adapter_tensors(cfg: ModelConfig, params: Params, model_type: str
                         ) -> dict[str, np.ndarray]:
  """{PEFT key: host array} of the adapters in `params` (all at once: for tests)."""
  flat, items = _adapter_items(cfg, params, model_type)
  return {key: _peft_tensor(flat, path, factor) for key, path, factor in items}


def peft_adapter_config(cfg: ModelConfig, model_type: str, base_model: str | None) -> dict:
  """`adapter_config.json` for `cfg.lora`: PEFT's LoraConfig fields that every PEFT release
  since 0.6 reads (a newer field would make an older PEFT refuse the file)."""
  alpha = cfg.lora.alpha
  return {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
      "r": cfg.lora.rank, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
      "lora_dropout": cfg.lora.dropout, "target_modules": peft_target_modules(cfg, model_type),
      "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None,
      "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
      "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
  }


def save_peft_adapter(folder: str | os.PathLike, cfg: ModelConfig, params: Params,
                      model_type: str, base_model: str | None = None,
                      card: str | None = None) -> Path:
  """Write the LoRA adapters in `params` (their own dtype) as a PEFT folder:
  `adapter_config.json` (`base_model` as `base_model_name_or_path`),
  `adapter_model.safetensors` and, given `card`, README.md. Every process must call this with the
  same arguments; process 0 alone writes, atomically (as `save_hf`)."""
  folder = run_path(folder)
  config = peft_adapter_config(cfg, model_type, base_model)
  flat, items = _adapter_items(cfg, params, model_type)

  def stream(tmp: Path | None) -> None:
    # Adapters are small (rank r on a few projections): gathered whole, written as one file.
    tensors = {key: _peft_tensor(flat, path, factor) for key, path, factor in items}
    if tmp is not None:
      save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata=_SAFETENSORS_METADATA)
      _write_json(tmp / ADAPTER_CONFIG, config)
      if card is not None:
        (tmp / MODEL_CARD).write_text(card)

  _gather_and_write(folder, stream)
  return folder


def load_tokenizer(folder: str | os.PathLike) -> TextTokenizer:
  """The tokenizer of an HF folder (`tokenizer.json` + `tokenizer_config.json`)."""
  return TextTokenizer.from_folder(folder)
