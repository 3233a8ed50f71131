"""Fused attention kernels for uncached calls (training, scoring), one per platform, and the
choice between them and the einsum path (`ModelConfig.attention`).

- `cudnn` / `xla`: `jax.nn.dot_product_attention`, cuDNN's flash kernel on a GPU (`xla` is JAX's
  reference implementation of the same call, to check it where cuDNN is absent).
- `splash`: Pallas splash attention on TPU (`jax.experimental.pallas.ops.tpu.splash_attention`,
  as MaxText and Tunix use it): causal or sliding-window masks evaluated block by block, segment
  ids for packed rows and for padding, grouped-query heads; never a [T, S] score tensor in HBM.
  Off a TPU it runs in Pallas interpret mode (tests check it against the einsum path on a CPU).

Every kernel takes q [B, T, H, D] and k/v [B, T, K, D] of right-padded rows (or packed rows with
segment ids) and gives [B, T, H, D]; the einsum path in `ff_jax.models.transformer` stays the
reference and the path of cached decoding.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import NamedSharding, PartitionSpec

from ff_jax.models.config import ModelConfig

# Splash attention tiles the sequence in blocks of a multiple of the TPU's 128 lanes; rows are
# padded to a multiple of LANES and the largest of SPLASH_BLOCKS that divides the length is used.
LANES = 128
SPLASH_BLOCKS = (512, 256, 128)


def attention_kernel(cfg: ModelConfig, dtype, cached: bool, platform: str | None = None) -> str:
  """'einsum', 'splash', 'cudnn' or 'xla': which attention one call runs on `platform` (the
  mesh's; default JAX's backend). `auto` takes splash on a TPU and cuDNN on a GPU in bfloat16."""
  if cached or cfg.attention == "einsum":
    return "einsum"
  if cfg.attention != "auto":
    return cfg.attention
  platform = platform or jax.default_backend()
  if platform == "tpu":
    return "splash"
  # cuDNN's flash kernels take fp16/bf16 and head dims that are multiples of 8 up to 128.
  hd = cfg.resolved_head_dim
  cudnn = platform == "gpu" and dtype == jnp.bfloat16 and hd % 8 == 0 and hd <= 128
  return "cudnn" if cudnn else "einsum"


def same_segment(segment_ids: jax.Array) -> jax.Array:
  """[B, T, T] bool: query slot i and key slot j hold the same example of a packed row."""
  return segment_ids[:, :, None] == segment_ids[:, None, :]


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_mask: jax.Array,
                    implementation: str, segment_ids: jax.Array | None = None,
                    window: int | None = None, scale: float | None = None) -> jax.Array:
  """Causal grouped-query attention through `jax.nn.dot_product_attention`.

  Right-padded rows: each row's visible keys are its first n slots, so the kernel gets lengths
  (cuDNN's padding-causal mask) and never builds a [T, S] mask; query slots past n see the same
  keys as in the einsum path. A filler row (n = 0, zero loss weight) keeps one key so its softmax
  is not 0/0.

  Packed rows (`segment_ids`): the public kernel takes no segment ids (cuDNN's packed layout,
  q/kv offsets, is reachable only through JAX internals), so the same-segment rule goes in as a
  [B, 1, T, T] boolean mask, which cuDNN applies as an additive bias, with its causal mask on top.
  Every slot sees at least itself, so no softmax is empty.

  A sliding `window` is the kernel's left window of window - 1 slots (cuDNN's causal sliding
  window of `window` slots); with segments it joins the boolean mask instead, which cuDNN already
  applies, rather than relying on its window and a bias mask together. `scale` multiplies q·k
  (None: head_dim ** -0.5).
  """
  k, v = k.astype(q.dtype), v.astype(q.dtype)
  if segment_ids is not None:
    mask = same_segment(segment_ids)
    if window is not None:
      slots = jnp.arange(segment_ids.shape[1])
      mask = mask & (slots[None, :] > slots[:, None] - window)[None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale,
                                        is_causal=True, implementation=implementation)
  lengths = jnp.maximum(kv_mask.sum(-1), 1).astype(jnp.int32)
  local = None if window is None else (window - 1, 0)
  return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                      key_value_seq_lengths=lengths, local_window_size=local,
                                      implementation=implementation)


@functools.cache
def _splash_kernel(heads: int, length: int, window: int | None, interpret: bool):
  """A splash kernel for one row: `heads` query heads over `length` slots (a multiple of LANES),
  causal, and with a sliding `window` of slots where given. Built once per shape (its block
  masks are computed on the host)."""
  block = next(b for b in SPLASH_BLOCKS if length % b == 0)
  shape = (length, length)
  one = (splash.CausalMask(shape) if window is None else
         splash.LocalMask(shape, window_size=(window - 1, 0), offset=0))
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  # Called while a step is traced: the block masks must still be concrete arrays, or the cached
  # kernel would hold that trace's tracers.
  with jax.ensure_compile_time_eval():
    return splash.make_splash_mha(splash.MultiHeadMask([one] * heads), head_shards=1,
                                  q_seq_shards=1, block_sizes=sizes, interpret=interpret)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_mask: jax.Array,
                     segment_ids: jax.Array | None = None, window: int | None = None,
                     scale: float | None = None, placement: NamedSharding | None = None,
                     interpret: bool = False) -> jax.Array:
  """Causal grouped-query attention through Pallas splash attention (see the module docstring).

  Unpacked rows become one segment each (`kv_mask`), so padding slots see only padding, as in
  `fused_attention`'s packed case; rows are padded to a multiple of LANES with more padding. The
  kernel has no scale argument: q is scaled first (`scale`, None: head_dim ** -0.5).

  `placement`: the sharding of q [B, T, H, D] (rows over the data-parallel axes, heads over the
  tensor axis; `ff_jax.models.layout.StepLayout.heads`). The kernel is a per-device program, so
  it runs under `shard_map` over that mesh, each device on its own rows and heads; K/V heads are
  split the same way where the split divides them, else every device holds all of them and the
  query heads stay whole too. `interpret`: Pallas interpret mode (any platform).
  """
  batch, length, heads, head_dim = q.shape
  padded = -(-length // LANES) * LANES
  segments = (kv_mask if segment_ids is None else segment_ids).astype(jnp.int32)
  scale = 1.0 / math.sqrt(head_dim) if scale is None else scale

  def heads_major(x):  # [B, T, N, D] -> [B, N, T', D], padded to the kernel's length
    return jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, padded - length), (0, 0)))

  q = heads_major(q * jnp.asarray(scale, q.dtype))
  k, v = heads_major(k.astype(q.dtype)), heads_major(v.astype(q.dtype))
  segments = jnp.pad(segments, ((0, 0), (0, padded - length)))

  def per_device(q, k, v, segments):
    kernel = _splash_kernel(q.shape[1], padded, window, interpret)
    one_row = lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(s, s))
    return jax.vmap(one_row)(q, k, v, segments)

  if placement is None:
    out = per_device(q, k, v, segments)
  else:
    rows, _, split, _ = placement.spec
    split_axes = (split,) if isinstance(split, str) else tuple(split or ())
    ways = math.prod(placement.mesh.shape[a] for a in split_axes)
    if k.shape[1] % ways:  # K/V heads that the split does not divide: no head split at all
      split = None
    q_spec, kv_spec = PartitionSpec(rows, split), PartitionSpec(rows, split)
    out = jax.shard_map(per_device, mesh=placement.mesh,
                        in_specs=(q_spec, kv_spec, kv_spec, PartitionSpec(rows)),
                        out_specs=q_spec, check_vma=False)(q, k, v, segments)
  return out[:, :, :length].transpose(0, 2, 1, 3)
