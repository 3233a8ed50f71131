"""Model configuration: one frozen dataclass that covers the Llama, Qwen2 and GPT-2 families.

Architectures differ only by flags here (norm type, position scheme, MLP kind, biases, tying), so
one decoder implementation serves all of them and the HF/GGUF importers only translate names.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from ff_jax.errors import ConfigError

Norm = Literal["rms", "layer"]
Positions = Literal["rope", "learned"]
Mlp = Literal["swiglu", "gelu"]


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
  mlp: Mlp = "swiglu"
  qkv_bias: bool = False  # Qwen2 has biases on q/k/v only
  out_bias: bool = False  # GPT-2 has biases everywhere
  mlp_bias: bool = False
  tie_embeddings: bool = False
  # Compute dtype for activations and matmuls; parameters stay in `param_dtype`.
  dtype: Literal["float32", "bfloat16"] = "float32"
  param_dtype: Literal["float32", "bfloat16"] = "float32"
  remat: bool = False  # recompute each block's activations in the backward pass
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
    need(self.mlp in ("swiglu", "gelu"), "mlp", f"must be 'swiglu' or 'gelu', got {self.mlp!r}")
    need(self.dtype in ("float32", "bfloat16"), "dtype", f"unsupported dtype {self.dtype!r}")
    need(self.param_dtype in ("float32", "bfloat16"), "param_dtype",
         f"unsupported dtype {self.param_dtype!r}")
    if self.positions == "rope":
      need(self.resolved_head_dim % 2 == 0, "head_dim", "RoPE needs an even head dimension")

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
