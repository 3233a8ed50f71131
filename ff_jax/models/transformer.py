"""One Flax NNX decoder-only transformer for the Llama, Qwen2/3, Gemma 3 and GPT-2 families.

Every parameter carries logical axis names in its `out_sharding` metadata ('vocab', 'embed',
'heads', 'kv_heads', 'head_dim', 'mlp', 'norm', 'position'); `ff_jax.parallel` maps them to mesh
axes. The forward pass is the same for training, scoring and decoding:

  logits, cache = model(tokens, positions, kv_mask, cache=None, cache_index=None,
                        segment_ids=None)

`positions` feed RoPE / learned position embeddings and are derived from the padding mask by the
caller (`positions_from_mask`), so left- and right-padded rows see the same positions as an unpadded
row. Attention visibility is by *slot*: slot j is visible from slot i iff j <= i and `kv_mask[j]`.
Without a cache the slots are the T input columns; with a cache they are the cache's S columns and
the inputs occupy slots `cache_index .. cache_index+T-1`.

Uncached calls (training, scoring) get right-padded rows, `kv_mask` a prefix of ones per row (what
`ff_jax.data.batching` builds); the fused attention kernels (`ModelConfig.attention`) rely on it
and take each row's length instead of a [T, S] mask.

Packed rows (several examples one after another, uncached calls only) pass `segment_ids` [B, T]
(1, 2, ... per example, 0 on padding) and positions that restart at each example: slot j is then
visible from slot i iff j <= i and segment_ids[j] == segment_ids[i], so no example sees another
(padding slots see only padding, which keeps every softmax NaN-free); `kv_mask` is not needed.

Sliding-window layers (`ModelConfig.layer_types`) also need i - j < sliding_window, on every path
(einsum with or without a cache, fused kernels, packed rows). The window counts slots, as HF's
masks count cache positions: every layout here keeps a row's (or a segment's) real tokens in
consecutive slots, so slot distance is position distance.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ff_jax.models.config import LORA_TARGETS, ModelConfig
from ff_jax.models.head import Head
from ff_jax.models.kernels import (
  attention_kernel,
  fused_attention,
  same_segment,
  splash_attention,
)
from ff_jax.models.layout import UNSHARDED, StepLayout

# Logical name of the stacked blocks' leading axis.
LAYERS_AXIS = "layers"

# The KV cache of every layer, stacked like the blocks: {'k': [L, B, K, S, D], 'v': ...}.
Cache = dict[str, jax.Array]

# A layer's attention kind inside the scan over blocks: a Python bool where every layer has the
# same kind (the static path, unchanged from a single block), else a traced scalar bool.
Sliding = bool | jax.Array

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def positions_from_mask(mask: jax.Array) -> jax.Array:
  """Position ids that ignore padding: 0 for the first real token of each row."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def dense(x: jax.Array, w: jax.Array, contract: int = 1, transpose_w: bool = False,
          out_dtype: Any = None) -> jax.Array:
  """A projection: x's last `contract` dims against w's first ones ([..., *in] · [*in, *out]).

  `transpose_w` takes w as [out, in] (a tied embedding used as the LM head); `out_dtype` is the
  matmul's accumulation/output dtype (fp32 logits from bf16 inputs). The value equals the einsum;
  the custom gradient only orients the weight gradient's matmul (see `_dense_bwd`).
  """
  return _dense_fwd(x, w, contract, transpose_w, out_dtype)[0]


def _flat(x: jax.Array, w: jax.Array, contract: int, transpose_w: bool):
  """(x as [tokens, in], w as [in, out] or [out, in], the output's shape)."""
  if transpose_w:
    fan_out, fan_in = w.shape[:w.ndim - contract], w.shape[w.ndim - contract:]
  else:
    fan_in, fan_out = w.shape[:contract], w.shape[contract:]
  k, n = math.prod(fan_in), math.prod(fan_out)
  w2 = w.reshape((n, k) if transpose_w else (k, n))
  return x.reshape(-1, k), w2, (*x.shape[:x.ndim - contract], *fan_out)


def _dense_fwd(x, w, contract, transpose_w, out_dtype):
  x2, w2, shape = _flat(x, w, contract, transpose_w)
  y = jax.lax.dot_general(x2, w2, (((1,), (1 if transpose_w else 0,)), ((), ())),
                          preferred_element_type=out_dtype)
  return y.reshape(shape), (x, w)


def _dense_bwd(contract, transpose_w, out_dtype, residuals, g):
  x, w = residuals
  x2, w2, _ = _flat(x, w, contract, transpose_w)
  g2 = g.reshape(x2.shape[0], -1)
  dims = (((1,), (0 if transpose_w else 1,)), ((), ()))
  dx = jax.lax.dot_general(g2, w2, dims, preferred_element_type=out_dtype)
  # The weight gradient contracts over tokens. XLA:CPU's dot wants its right operand with the
  # contracted dim minor, so it physically transposes that operand first, and a transpose fused
  # into the backward's elementwise ops (SwiGLU') runs ~20x slower than the matmul wants. Putting
  # the narrower of x and g on the right keeps that copy small: x for up-projections, g for
  # down-projections and the LM head, whose [tokens, vocab] gradient is the widest array of the
  # step. Same value either way; GPU/TPU compilers fold the orientation into the matmul.
  tokens = (((0,), (0,)), ((), ()))
  if x2.shape[1] <= g2.shape[1]:
    dw = jax.lax.dot_general(g2, x2, tokens, preferred_element_type=out_dtype)  # [out, in]
    dw = dw if transpose_w else dw.T
  else:
    dw = jax.lax.dot_general(x2, g2, tokens, preferred_element_type=out_dtype)  # [in, out]
    dw = dw.T if transpose_w else dw
  return dx.reshape(x.shape).astype(x.dtype), dw.reshape(w.shape).astype(w.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


def _param(rngs: nnx.Rngs, init, shape: tuple[int, ...], axes: tuple[str | None, ...],
           dtype) -> nnx.Param:
  assert len(shape) == len(axes), (shape, axes)
  # Never shard eagerly: ff_jax.parallel places parameters through jit out_shardings, so building
  # a model needs no mesh context (and works under nnx.eval_shape).
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=axes, eager_sharding=False)


def _add_adapter(module: nnx.Module, cfg: ModelConfig, rngs: nnx.Rngs, name: str,
                 in_shape: tuple[int, ...], in_axes: tuple[str | None, ...],
                 out_shape: tuple[int, ...], out_axes: tuple[str | None, ...]) -> None:
  """LoRA factors of projection `name` when it is a target: A [*in, r] and B [r, *out] (B = 0,
  so an adapted model starts exactly as the base model)."""
  if not (cfg.lora.rank and name in cfg.lora.targets):
    return
  pdt = _DTYPES[cfg.param_dtype]
  rank = cfg.lora.rank
  init_a = nnx.initializers.normal(1.0 / math.sqrt(math.prod(in_shape)))
  setattr(module, f"{name}_lora_a", _param(rngs, init_a, (*in_shape, rank), (*in_axes, None), pdt))
  setattr(module, f"{name}_lora_b", _param(rngs, nnx.initializers.zeros, (rank, *out_shape),
                                           (None, *out_axes), pdt))


def _adapter_delta(module: nnx.Module, cfg: ModelConfig, name: str, x: jax.Array,
                   rng: jax.Array | None) -> jax.Array | float:
  """(alpha / r) · B A dropout(x) for an adapted projection (0 otherwise); x's trailing dims are
  the projection's input dims."""
  if not (cfg.lora.rank and name in cfg.lora.targets):
    return 0.0
  dt = x.dtype
  a = getattr(module, f"{name}_lora_a")[...].astype(dt)
  b = getattr(module, f"{name}_lora_b")[...].astype(dt)
  if rng is not None and cfg.lora.dropout:
    keep = jax.random.bernoulli(jax.random.fold_in(rng, LORA_TARGETS.index(name)),
                                1.0 - cfg.lora.dropout, x.shape)
    x = jnp.where(keep, x / (1.0 - cfg.lora.dropout), 0).astype(dt)
  low = jnp.tensordot(x, a, axes=a.ndim - 1)  # [..., r]: the rank-r bottleneck
  return jnp.tensordot(low, b, axes=1) * jnp.asarray(cfg.lora.scale, dt)


class Norm(nnx.Module):
  """RMSNorm (Llama; Gemma's scales by 1 + weight) or LayerNorm with bias (GPT-2) over the last
  axis of size `size` (default hidden_size; head_dim for q/k norms); statistics always in fp32."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, size: int | None = None):
    pdt = _DTYPES[cfg.param_dtype]
    size = cfg.hidden_size if size is None else size
    self.kind = cfg.norm
    self.eps = cfg.norm_eps
    self.plus_one = cfg.norm_plus_one
    # Gemma stores the offset from 1, so a fresh norm (weight 0) is the identity scale there too.
    init = nnx.initializers.zeros if cfg.norm_plus_one else nnx.initializers.ones
    self.scale = _param(rngs, init, (size,), ("norm",), pdt)
    if cfg.norm == "layer":
      self.bias = _param(rngs, nnx.initializers.zeros, (size,), ("norm",), pdt)

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    x = x.astype(jnp.float32)
    if self.kind == "rms":
      x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
      scale = self.scale[...].astype(jnp.float32)
      return (x * (1.0 + scale if self.plus_one else scale)).astype(dtype)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    x = (x - mean) * jax.lax.rsqrt(var + self.eps)
    return (x * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(
        dtype)


def rope_inv_freq(cfg: ModelConfig, local: bool = False) -> jax.Array:
  """Inverse RoPE frequencies, with HF's 'linear' and 'llama3' scaling rules. `local`: those of a
  sliding-window layer, which has its own unscaled base where `rope_local_theta` is set."""
  hd = cfg.resolved_head_dim
  exponents = jnp.arange(0, hd, 2, dtype=jnp.float32) / hd
  if local and cfg.rope_local_theta is not None:
    return 1.0 / (cfg.rope_local_theta ** exponents)
  inv_freq = 1.0 / (cfg.rope_theta ** exponents)
  scaling = cfg.rope_scaling
  if scaling.kind == "linear":
    inv_freq = inv_freq / scaling.factor
  elif scaling.kind == "llama3":
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv_freq = jnp.where(is_medium, smoothed, scaled)
  return inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotate `x` [B, T, H, D] by position, in HF's half-split layout (rotate_half)."""
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, D/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


class Attention(nnx.Module):
  """Grouped-query attention with optional q/k/v and output biases, q/k norms, a sliding window
  and an explicit KV cache.

  Whether a call is a sliding-window layer comes with the call (`sliding`), not the module: the
  blocks are one stacked module run by a scan, so every layer shares this code and its kind is
  data where a model mixes kinds (Gemma 3's five local layers to one global).
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    pdt = _DTYPES[cfg.param_dtype]
    d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    init = nnx.initializers.normal(cfg.initializer_range)
    zeros = nnx.initializers.zeros
    self.cfg = cfg
    self.q = _param(rngs, init, (d, h, hd), ("embed", "heads", "head_dim"), pdt)
    self.k = _param(rngs, init, (d, kv, hd), ("embed", "kv_heads", "head_dim"), pdt)
    self.v = _param(rngs, init, (d, kv, hd), ("embed", "kv_heads", "head_dim"), pdt)
    self.o = _param(rngs, init, (h, hd, d), ("heads", "head_dim", "embed"), pdt)
    if cfg.qkv_bias:
      self.q_bias = _param(rngs, zeros, (h, hd), ("heads", "head_dim"), pdt)
      self.k_bias = _param(rngs, zeros, (kv, hd), ("kv_heads", "head_dim"), pdt)
      self.v_bias = _param(rngs, zeros, (kv, hd), ("kv_heads", "head_dim"), pdt)
    if cfg.out_bias:
      self.o_bias = _param(rngs, zeros, (d,), ("norm",), pdt)
    if cfg.qk_norm:
      self.q_norm = Norm(cfg, rngs, hd)
      self.k_norm = Norm(cfg, rngs, hd)
    _add_adapter(self, cfg, rngs, "q", (d,), ("embed",), (h, hd), ("heads", "head_dim"))
    _add_adapter(self, cfg, rngs, "k", (d,), ("embed",), (kv, hd), ("kv_heads", "head_dim"))
    _add_adapter(self, cfg, rngs, "v", (d,), ("embed",), (kv, hd), ("kv_heads", "head_dim"))
    _add_adapter(self, cfg, rngs, "o", (h, hd), ("heads", "head_dim"), (d,), ("embed",))

  def __call__(self, x, positions, kv_mask, layer_cache, cache_index, rng=None,
               segment_ids=None, sliding: Sliding = False, layout: StepLayout = UNSHARDED):
    cfg = self.cfg
    dt = x.dtype
    q = dense(x, self.q[...].astype(dt))
    k = dense(x, self.k[...].astype(dt))
    v = dense(x, self.v[...].astype(dt))
    if cfg.lora.rank:
      q = q + _adapter_delta(self, cfg, "q", x, rng)
      k = k + _adapter_delta(self, cfg, "k", x, rng)
      v = v + _adapter_delta(self, cfg, "v", x, rng)
    if cfg.qkv_bias:
      q = q + self.q_bias[...].astype(dt)
      k = k + self.k_bias[...].astype(dt)
      v = v + self.v_bias[...].astype(dt)
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    if cfg.positions == "rope":
      if isinstance(sliding, bool):
        inv_freq = rope_inv_freq(cfg, local=sliding)
      else:  # both frequency tables are [D/2] constants: selecting one costs nothing
        inv_freq = jnp.where(sliding, rope_inv_freq(cfg, local=True), rope_inv_freq(cfg))
      q = apply_rope(q, positions, inv_freq)
      k = apply_rope(k, positions, inv_freq)

    if segment_ids is not None and layer_cache is not None:
      raise ValueError("segment_ids (packed rows) are for uncached calls only")
    kernel = attention_kernel(cfg, dt, cached=layer_cache is not None, platform=layout.platform)
    if kernel != "einsum":
      def fused(window):
        if kernel == "splash":
          return splash_attention(q, k, v, kv_mask, segment_ids, window, attention_scale(cfg),
                                  layout.heads, interpret=layout.platform != "tpu")
        return fused_attention(q, k, v, kv_mask, kernel, segment_ids, window,
                               attention_scale(cfg))
      if isinstance(sliding, bool):
        out = fused(cfg.sliding_window if sliding else None)
      else:  # the kernels take their window statically: one branch per kind
        out = jax.lax.cond(sliding, lambda: fused(cfg.sliding_window), lambda: fused(None))
    else:
      out, layer_cache = self._einsum_attention(q, k, v, kv_mask, layer_cache, cache_index,
                                                segment_ids, sliding)
    adapted = _adapter_delta(self, cfg, "o", out, rng)
    out = dense(out, self.o[...].astype(dt), 2) + adapted
    if cfg.out_bias:
      out = out + self.o_bias[...].astype(dt)
    return out, layer_cache

  def _einsum_attention(self, q, k, v, kv_mask, layer_cache, cache_index, segment_ids=None,
                        sliding: Sliding = False):
    """Attention by slot visibility (any padding, with or without a KV cache, or packed segments
    without one): [B, T, H, D]."""
    cfg = self.cfg
    dt = q.dtype
    batch, length = q.shape[:2]
    # K/V are kept head-major, [B, K, S, D]: the score and value contractions then batch over
    # (B, K) without transposing the whole cache at every decode step.
    k = k.transpose(0, 2, 1, 3)
    v = v.transpose(0, 2, 1, 3)
    if layer_cache is None:
      q_slots = jnp.arange(length)
    else:
      # Left-padded batches share one write index, so a plain dynamic_update_slice suffices.
      k = jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype),
                                       (0, 0, cache_index, 0))
      v = jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype),
                                       (0, 0, cache_index, 0))
      layer_cache = {"k": k, "v": v}
      q_slots = cache_index + jnp.arange(length)
    k_slots = jnp.arange(k.shape[2])
    causal = k_slots[None, :] <= q_slots[:, None]
    if sliding is not False:
      in_window = k_slots[None, :] > q_slots[:, None] - cfg.sliding_window
      causal = causal & (in_window if sliding is True else in_window | ~sliding)
    causal = causal[None]
    if segment_ids is None:
      visible = causal & kv_mask[:, None, :].astype(bool)
    else:
      visible = causal & same_segment(segment_ids)

    groups = cfg.num_heads // cfg.num_kv_heads
    q = q.reshape(batch, length, cfg.num_kv_heads, groups, cfg.resolved_head_dim)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k.astype(dt),
                        preferred_element_type=jnp.float32)
    scale = attention_scale(cfg)
    scores = scores / math.sqrt(cfg.resolved_head_dim) if scale is None else scores * scale
    # A large finite negative (not -inf) keeps fully-masked padding rows NaN-free.
    scores = jnp.where(visible[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v.astype(dt))
    return out.reshape(batch, length, cfg.num_heads, cfg.resolved_head_dim), layer_cache


def attention_scale(cfg: ModelConfig) -> float | None:
  """The factor on q·k when it is query_pre_attn_scalar ** -0.5 (Gemma); None for the usual
  head_dim ** -0.5, which each path keeps in its own form so existing models compute exactly as
  they always did."""
  return None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar ** -0.5


def softcap(x: jax.Array, cap: float) -> jax.Array:
  """cap · tanh(x / cap): bounds logits smoothly to (-cap, cap)."""
  return jnp.tanh(x / cap) * cap


class Mlp(nnx.Module):
  """SwiGLU (Llama, Qwen), GeGLU (Gemma) or GELU (GPT-2) feed-forward block; GELU is always the
  tanh approximation (HF's gelu_new / gelu_pytorch_tanh)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    pdt = _DTYPES[cfg.param_dtype]
    d, f = cfg.hidden_size, cfg.intermediate_size
    init = nnx.initializers.normal(cfg.initializer_range)
    zeros = nnx.initializers.zeros
    self.kind = cfg.mlp
    self.bias = cfg.mlp_bias
    gated = cfg.mlp in ("swiglu", "geglu")
    if gated:
      self.gate = _param(rngs, init, (d, f), ("embed", "mlp"), pdt)
    self.up = _param(rngs, init, (d, f), ("embed", "mlp"), pdt)
    self.down = _param(rngs, init, (f, d), ("mlp", "embed"), pdt)
    if cfg.mlp_bias:
      self.up_bias = _param(rngs, zeros, (f,), ("mlp",), pdt)
      self.down_bias = _param(rngs, zeros, (d,), ("norm",), pdt)
    self.cfg = cfg
    if gated:
      _add_adapter(self, cfg, rngs, "gate", (d,), ("embed",), (f,), ("mlp",))
    _add_adapter(self, cfg, rngs, "up", (d,), ("embed",), (f,), ("mlp",))
    _add_adapter(self, cfg, rngs, "down", (f,), ("mlp",), (d,), ("embed",))

  def __call__(self, x, rng=None):
    dt = x.dtype
    cfg = self.cfg
    up = dense(x, self.up[...].astype(dt)) + _adapter_delta(self, cfg, "up", x, rng)
    if self.bias:
      up = up + self.up_bias[...].astype(dt)
    if self.kind in ("swiglu", "geglu"):
      gate = dense(x, self.gate[...].astype(dt)) + _adapter_delta(self, cfg, "gate", x, rng)
      act = jax.nn.silu(gate) if self.kind == "swiglu" else jax.nn.gelu(gate, approximate=True)
      hidden = act * up
    else:
      hidden = jax.nn.gelu(up, approximate=True)
    out = dense(hidden, self.down[...].astype(dt)) + _adapter_delta(self, cfg, "down", hidden, rng)
    if self.bias:
      out = out + self.down_bias[...].astype(dt)
    return out


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)); with `post_norms`
  (Gemma) x + norm(attn(norm(x))), then x + norm(mlp(norm(x))).

  Every layer is the same Block (its attention kind comes with the call), so the model holds one
  Block whose parameters are stacked over layers (`Transformer.layers`)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.attn_norm = Norm(cfg, rngs)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = Norm(cfg, rngs)
    self.mlp = Mlp(cfg, rngs)
    if cfg.post_norms:
      self.attn_post_norm = Norm(cfg, rngs)
      self.mlp_post_norm = Norm(cfg, rngs)
    self.post_norms = cfg.post_norms

  def __call__(self, x, positions, kv_mask, layer_cache, cache_index, rng=None,
               segment_ids=None, sliding: Sliding = False, layout: StepLayout = UNSHARDED):
    attn_rng, mlp_rng = (None, None) if rng is None else jax.random.split(rng)
    attn_out, layer_cache = self.attn(self.attn_norm(x), positions, kv_mask, layer_cache,
                                      cache_index, attn_rng, segment_ids, sliding, layout)
    if self.post_norms:
      attn_out = self.attn_post_norm(attn_out)
    x = x + attn_out
    mlp_out = self.mlp(self.mlp_norm(x), mlp_rng)
    if self.post_norms:
      mlp_out = self.mlp_post_norm(mlp_out)
    return x + mlp_out, layer_cache


def stacked_blocks(cfg: ModelConfig, keys: jax.Array) -> Block:
  """One Block whose parameters are stacked over `keys` ([L] keys, one per layer).

  Layer i is `Block(cfg, nnx.Rngs(keys[i]))`, and each parameter's logical axes gain a leading
  'layers' axis (`ff_jax.parallel` leaves it unsharded)."""

  @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS})
  def make(key):
    return Block(cfg, nnx.Rngs(key))

  return make(keys)


def layer_keys(key: jax.Array, num_layers: int) -> jax.Array:
  """[L] keys, fold_in(key, i) for layer i."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num_layers))


class Transformer(nnx.Module):
  """Decoder-only language model. See the module docstring for the call contract."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, num_layers: int | None = None):
    # `num_layers=0` builds only the non-layer parameters (`ff_jax.models.init_params` creates the
    # stacked blocks in a program of their own).
    pdt = _DTYPES[cfg.param_dtype]
    self.cfg = cfg
    init = nnx.initializers.normal(cfg.initializer_range)
    self.embed = _param(rngs, init, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pdt)
    if cfg.positions == "learned":
      self.pos_embed = _param(rngs, init, (cfg.max_position_embeddings, cfg.hidden_size),
                              ("position", "embed"), pdt)
    count = cfg.num_layers if num_layers is None else num_layers
    if count:
      self.layers = stacked_blocks(cfg, layer_keys(rngs.params(), count))
    self.final_norm = Norm(cfg, rngs)
    if not cfg.tie_embeddings:
      self.lm_head = _param(rngs, init, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                            pdt)

  def init_cache(self, batch: int, length: int) -> Cache:
    """An empty KV cache of `length` slots, in the compute dtype."""
    cfg = self.cfg
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, length, cfg.resolved_head_dim)
    dtype = _DTYPES[cfg.dtype]
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

  def hidden_states(self, tokens, positions, kv_mask, cache: Cache | None = None,
                    cache_index: Any = 0, dropout_rng: jax.Array | None = None,
                    segment_ids: jax.Array | None = None, layout: StepLayout = UNSHARDED):
    """The final-normed residual stream [B, T, D] and the new cache. `layout`: the residual
    stream's sharding constraint at every block boundary, and the attention kernels' placement
    (`ff_jax.models.layout`)."""
    cfg = self.cfg

    def pinned(x):
      if layout.activations is None:
        return x
      return jax.lax.with_sharding_constraint(x, layout.activations)

    dt = _DTYPES[cfg.dtype]
    x = jnp.take(self.embed[...], tokens, axis=0).astype(dt)
    if cfg.scale_embeddings:  # rounded to the compute dtype first, as HF does
      x = x * jnp.asarray(math.sqrt(cfg.hidden_size), dt)
    if cfg.positions == "learned":
      x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(dt)
    x = pinned(x)
    kinds = {cfg.is_sliding(i) for i in range(cfg.num_layers)}
    # One kind for every layer stays a static bool; mixed kinds become one flag per layer.
    sliding = (kinds.pop() if len(kinds) == 1 else
               jnp.asarray([cfg.is_sliding(i) for i in range(cfg.num_layers)]))

    def block_forward(block, x, layer, layer_cache, layer_sliding):
      rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, layer)
      x, layer_cache = block(x, positions, kv_mask, layer_cache, cache_index, rng, segment_ids,
                             sliding if layer_sliding is None else layer_sliding, layout)
      return pinned(x), layer_cache

    # What the backward pass keeps of each block: with `remat`, only its input (everything is
    # recomputed: memory for FLOPs); otherwise its matmul outputs, with the elementwise ops on
    # them (norms, activations, softmax) recomputed. Storing those too would fill one more
    # [L, B, T, ...] stack per op, which the scan must allocate, zero and copy at every step; on
    # the 2-core CPU that cost 2-7% of a train step, and recomputing them is cheaper.
    policy = (jax.checkpoint_policies.nothing_saveable if cfg.remat
              else jax.checkpoint_policies.dots_saveable)
    block_forward = nnx.remat(block_forward, prevent_cse=False, policy=policy)
    # The scan traces and compiles one block whatever the depth; layer i reads slice i of every
    # stacked parameter (and of the cache), and the updated caches come out stacked again.
    scan = nnx.scan(block_forward, in_axes=(0, nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0),
                    unroll=1 if cfg.scan_layers else True)
    x, new_cache = scan(self.layers, x, jnp.arange(cfg.num_layers), cache,
                        None if isinstance(sliding, bool) else sliding)
    return self.final_norm(x), new_cache

  def head(self) -> tuple[jax.Array, Head]:
    """The LM head: its weight in the compute dtype ([D, V], or the tied embedding [V, D]) and
    how it is applied (`ff_jax.models.head` applies it where a step has targets)."""
    dt = _DTYPES[self.cfg.dtype]
    weight = self.embed if self.cfg.tie_embeddings else self.lm_head
    return weight[...].astype(dt), Head(self.cfg.tie_embeddings, self.cfg.final_logit_softcap)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Vocabulary logits in fp32 (sampling needs the precision), [..., V] for every position of
    `hidden`: for decoding and parity checks; train and score steps use
    `ff_jax.models.head.target_cross_entropy` instead."""
    weight, head = self.head()
    out = dense(hidden, weight, transpose_w=head.transposed, out_dtype=jnp.float32)
    if head.softcap is not None:
      out = softcap(out, head.softcap)
    return out

  def __call__(self, tokens, positions, kv_mask, cache: Cache | None = None,
               cache_index: Any = 0, last_only: bool = False,
               dropout_rng: jax.Array | None = None, segment_ids: jax.Array | None = None):
    # `dropout_rng` (training only) drives LoRA dropout; None is the deterministic forward.
    # `segment_ids`: packed rows (see the module docstring).
    hidden, new_cache = self.hidden_states(tokens, positions, kv_mask, cache, cache_index,
                                           dropout_rng, segment_ids)
    if last_only:  # decoding needs only the next-token logits, not the prompt's [B, P, V]
      hidden = hidden[:, -1:]
    return self.logits(hidden), new_cache
