"""Model configuration: one frozen dataclass that covers the Llama, Qwen2/3, Gemma 3 and GPT-2
families.

Architectures differ only by flags here (norm type, position scheme, MLP kind, biases, tying, q/k
norms, sliding-window layers), so one decoder implementation serves all of them and the HF/GGUF
importers only translate names.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from ff_jax.errors import ConfigError

Norm = Literal["rms", "layer"]
Positions = Literal["rope", "learned"]
Mlp = Literal["swiglu", "geglu", "gelu"]
# Per-layer attention kinds, spelled as HF's `layer_types`.
FULL_ATTENTION, SLIDING_ATTENTION = "full_attention", "sliding_attention"

# Projections LoRA can adapt: attention q/k/v/o and the MLP's gate/up/down.
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters (Hu et al., 2021): W x + (alpha / rank) B A dropout(x) on `targets`.

  rank 0 means full finetuning. With adapters, only they are trained and kept in the optimizer;
  `adapter_checkpoints` also keeps only them (and their optimizer state) in step checkpoints.
  """

  rank: int = 0
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = ("q", "k", "v", "o")
  adapter_checkpoints: bool = True

  def __post_init__(self):
    if self.rank < 0:
      raise ConfigError(f"lora.rank: must be >= 0, got {self.rank}")
    if not 0.0 <= self.dropout < 1.0:
      raise ConfigError(f"lora.dropout: must be in [0, 1), got {self.dropout}")
    unknown = sorted(set(self.targets) - set(LORA_TARGETS))
    if unknown or (self.rank and not self.targets):
      raise ConfigError(f"lora.targets: {list(self.targets)}; choose from {list(LORA_TARGETS)}")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank if self.rank else 0.0


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling, as HF's `rope_scaling` / `rope_parameters` describe it."""

  kind: Literal["default", "linear", "llama3"] = "default"
  factor: float = 1.0
  # llama3 only: the wavelength band in which frequencies are interpolated.
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a decoder-only transformer."""

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  intermediate_size: int
  max_position_embeddings: int = 2048
  head_dim: int | None = None  # None: hidden_size // num_heads
  norm: Norm = "rms"
  norm_eps: float = 1e-5
  positions: Positions = "rope"
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling = dataclasses.field(default_factory=RopeScaling)
  # swiglu: silu(gate) * up (Llama); geglu: gelu_tanh(gate) * up (Gemma); gelu: no gate (GPT-2).
  mlp: Mlp = "swiglu"
  qkv_bias: bool = False  # Qwen2 has biases on q/k/v only
  out_bias: bool = False  # GPT-2 has biases everywhere
  mlp_bias: bool = False
  tie_embeddings: bool = False
  # RMSNorm over each head's q and k before RoPE (Qwen3, Gemma 3).
  qk_norm: bool = False
  # RMSNorm multiplies by (1 + weight) and its weights start at 0 (Gemma).
  norm_plus_one: bool = False
  # Attention and MLP outputs are normalised again before the residual add (Gemma's four norms).
  post_norms: bool = False
  # Token embeddings are multiplied by sqrt(hidden_size), rounded to the compute dtype (Gemma).
  scale_embeddings: bool = False
  # Attention scores are scaled by query_pre_attn_scalar ** -0.5; None: head_dim ** -0.5.
  query_pre_attn_scalar: float | None = None
  # Per-layer attention kind ("full_attention" / "sliding_attention"); None: every layer is full.
  # A sliding layer's query at slot i sees keys at slots (i - sliding_window, i] only.
  layer_types: tuple[str, ...] | None = None
  sliding_window: int | None = None  # set exactly when some layer is a sliding one
  # RoPE base of the sliding layers, which then use no frequency scaling (Gemma 3's local layers);
  # None: every layer uses rope_theta and rope_scaling.
  rope_local_theta: float | None = None
  # Final logits become c * tanh(logits / c) (Gemma's final_logit_softcapping); None: uncapped.
  final_logit_softcap: float | None = None
  # Compute dtype for activations and matmuls; parameters stay in `param_dtype`.
  dtype: Literal["float32", "bfloat16"] = "float32"
  param_dtype: Literal["float32", "bfloat16"] = "float32"
  remat: bool = False  # recompute each block's activations in the backward pass
  # Run the stacked blocks as one `nnx.scan` (one compiled block, whatever the depth); False
  # unrolls the same scan into straight-line code, which compiles in time linear in depth and is
  # kept for benchmarks and debugging (the parameters are stacked either way).
  scan_layers: bool = True
  # Attention kernel of uncached calls (training, scoring; `ff_jax.models.kernels`): "auto"
  # takes Pallas splash attention on a TPU, cuDNN's fused kernel (`jax.nn.dot_product_attention`)
  # on a GPU in bfloat16 and the einsum path elsewhere; "xla" is the cuDNN call with JAX's
  # reference implementation, and "splash" off a TPU runs in Pallas interpret mode (both to
  # check the fused paths where their hardware is absent). Decoding with a KV cache always uses
  # the einsum path.
  attention: Literal["auto", "einsum", "splash", "cudnn", "xla"] = "auto"
  lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)  # rank 0: no adapters
  initializer_range: float = 0.02
  # Token ids the tokenizer uses; kept here so decoding and batching agree with the checkpoint.
  bos_token_id: int | None = None
  eos_token_id: int | None = None
  pad_token_id: int | None = None

  def __post_init__(self):
    def need(cond: bool, key: str, why: str):
      if not cond:
        raise ConfigError(f"model.{key}: {why}")

    for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                "intermediate_size", "max_position_embeddings"):
      value = getattr(self, key)
      need(int(value) > 0, key, f"must be a positive integer, got {value}")
    need(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
         f"{self.num_kv_heads} must divide num_heads={self.num_heads}")
    if self.head_dim is None:
      need(self.hidden_size % self.num_heads == 0, "num_heads",
           f"{self.num_heads} must divide hidden_size={self.hidden_size} (or set head_dim)")
    need(self.norm in ("rms", "layer"), "norm", f"must be 'rms' or 'layer', got {self.norm!r}")
    need(self.positions in ("rope", "learned"), "positions",
         f"must be 'rope' or 'learned', got {self.positions!r}")
    need(self.mlp in ("swiglu", "geglu", "gelu"), "mlp",
         f"must be 'swiglu', 'geglu' or 'gelu', got {self.mlp!r}")
    need(self.dtype in ("float32", "bfloat16"), "dtype", f"unsupported dtype {self.dtype!r}")
    need(self.param_dtype in ("float32", "bfloat16"), "param_dtype",
         f"unsupported dtype {self.param_dtype!r}")
    need(self.attention in ("auto", "einsum", "splash", "cudnn", "xla"), "attention",
         f"must be 'auto', 'einsum', 'splash', 'cudnn' or 'xla', got {self.attention!r}")
    if self.attention == "cudnn":
      need(self.dtype == "bfloat16", "attention",
           f"cuDNN's fused attention needs dtype bfloat16, got {self.dtype!r}")
    self._check_layers(need)
    if self.positions == "rope":
      need(self.resolved_head_dim % 2 == 0, "head_dim", "RoPE needs an even head dimension")

  def _check_layers(self, need) -> None:
    """layer_types / sliding_window / rope_local_theta / softcap / query_pre_attn_scalar."""
    if self.layer_types is not None:
      need(isinstance(self.layer_types, tuple), "layer_types",
           "must be a tuple (ModelConfig.from_dict converts lists)")
      need(len(self.layer_types) == self.num_layers, "layer_types",
           f"has {len(self.layer_types)} entries for num_layers={self.num_layers}")
      bad = sorted(set(self.layer_types) - {FULL_ATTENTION, SLIDING_ATTENTION})
      need(not bad, "layer_types", f"unknown kind(s) {bad}; use {FULL_ATTENTION!r} or "
                                   f"{SLIDING_ATTENTION!r}")
    sliding = any(self.is_sliding(i) for i in range(self.num_layers))
    if self.sliding_window is None:
      need(not sliding, "sliding_window", "sliding_attention layers need a window size")
    else:
      need(int(self.sliding_window) > 0, "sliding_window",
           f"must be a positive integer, got {self.sliding_window}")
      need(sliding, "sliding_window",
           "is set but no layer_types entry is 'sliding_attention'")
    if self.rope_local_theta is not None:
      need(sliding, "rope_local_theta", "only sliding_attention layers use it; none is sliding")
      need(self.positions == "rope", "rope_local_theta", "needs positions='rope'")
    for key in ("query_pre_attn_scalar", "final_logit_softcap", "rope_local_theta"):
      value = getattr(self, key)
      need(value is None or float(value) > 0, key, f"must be positive or null, got {value}")

  def is_sliding(self, layer: int) -> bool:
    """Whether layer `layer` attends through the sliding window."""
    return self.layer_types is not None and self.layer_types[layer] == SLIDING_ATTENTION

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

  def replace(self, **changes: Any) -> ModelConfig:
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
    values = dict(values)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ConfigError(f"model: unknown key(s) {unknown}; known keys are {sorted(known)}")
    if isinstance(values.get("layer_types"), list):  # YAML / JSON have no tuples
      values["layer_types"] = tuple(values["layer_types"])
    if isinstance(values.get("lora"), dict):
      lora = dict(values["lora"])
      if "targets" in lora:
        lora["targets"] = tuple(lora["targets"])
      values["lora"] = LoraConfig(**lora)
    scaling = values.get("rope_scaling")
    if isinstance(scaling, dict):
      values["rope_scaling"] = RopeScaling(**scaling)
    elif scaling is None:
      values.pop("rope_scaling", None)
    return cls(**values)


def tiny_llama(**overrides: Any) -> ModelConfig:
  """A few-hundred-kilobyte Llama-style config for tests and the demo."""
  base = dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
              intermediate_size=128, max_position_embeddings=256)
  base.update(overrides)
  return ModelConfig(**base)
