"""Batched decoding: left-padded prompts, an explicit KV cache and one jitted `lax.while_loop`.

Prompts are left-padded to a bucket length P so that every row's next token lands in the same cache
slot (one `dynamic_update_slice` per step). Positions come from the padding mask, not from the
slot index: a row with k pad slots still starts at position 0, which is what makes batched output
equal one-at-a-time output. Rows stop on EOS or on a stop token sequence; the loop exits when every
row is done or the budget is spent.

Rows never interact, so a batch whose rows are split over a mesh's data-parallel axes (each host
building only its own rows, `decode_batch(row_sharding=...)`) gives every row the tokens that the
whole batch on one device gives it; `generate` is the one-process form.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from ff_jax.models import forward, init_cache, positions_from_mask


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Greedy when temperature is 0; otherwise temperature + nucleus (top-p) sampling."""

  max_new_tokens: int = 32
  temperature: float = 0.0
  top_p: float = 1.0
  seed: int = 0


def _bucket(length: int, multiple: int = 16) -> int:
  return max(multiple, -(-length // multiple) * multiple)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int,
             length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [B, P], mask [B, P]) with each prompt flush right."""
  length = length or _bucket(max(len(p) for p in prompts))
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), np.int32)
  for row, prompt in enumerate(prompts):
    if len(prompt) > length:
      raise ValueError(f"prompt of {len(prompt)} tokens does not fit the bucket of {length}")
    if prompt:
      tokens[row, length - len(prompt):] = prompt
      mask[row, length - len(prompt):] = 1
  return tokens, mask


def _sample(logits: jax.Array, rng: jax.Array, temperature: float, top_p: float) -> jax.Array:
  if temperature <= 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # Keep the smallest set whose mass reaches top_p (the top token is always kept).
    cutoff_index = jnp.sum(cumulative < top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _ends_with(generated: jax.Array, length: jax.Array, stops: jax.Array) -> jax.Array:
  """[B] bool: does row b's generated text end with any stop sequence (right-aligned, -1 pad)?"""
  if stops.shape[0] == 0:
    return jnp.zeros(generated.shape[0], bool)
  width = stops.shape[1]
  idx = length[:, None] - width + jnp.arange(width)[None, :]  # [B, width]
  tail = jnp.take_along_axis(generated, jnp.clip(idx, 0, generated.shape[1] - 1), axis=1)
  tail = jnp.where(idx >= 0, tail, -2)
  match = (stops[None, :, :] == -1) | (stops[None, :, :] == tail[:, None, :])
  return jnp.any(jnp.all(match, axis=-1), axis=-1)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new", "temperature", "top_p",
                                             "rows"))
def _generate(graphdef: nnx.GraphDef, params: Any, tokens: jax.Array, mask: jax.Array,
              stops: jax.Array, eos_id: jax.Array, pad_id: jax.Array, rng: jax.Array, *,
              max_new: int, temperature: float, top_p: float, rows: NamedSharding | None):
  batch, prompt_len = tokens.shape
  total = prompt_len + max_new
  cache = init_cache(graphdef, params, batch, total)
  kv_mask = jnp.zeros((batch, total), jnp.int32).at[:, :prompt_len].set(mask)
  logits, cache = forward(graphdef, params, tokens, positions_from_mask(mask), kv_mask, cache, 0,
                          last_only=True)
  rng, sub = jax.random.split(rng)
  first = _sample(logits[:, -1], sub, temperature, top_p)
  out = jnp.full((batch, max_new), pad_id, jnp.int32).at[:, 0].set(first)
  lengths = jnp.ones((batch,), jnp.int32)
  done = (first == eos_id) | _ends_with(out, lengths, stops)
  next_pos = jnp.sum(mask, axis=-1).astype(jnp.int32)

  def cond(carry):
    step, _, _, _, done, _, _ = carry
    return (step < max_new) & ~jnp.all(done)

  def body(carry):
    step, out, cache, kv_mask, done, next_pos, rng = carry
    slot = prompt_len + step - 1
    last = out[:, step - 1]
    kv_mask = kv_mask.at[:, slot].set(1)
    logits, cache = forward(graphdef, params, last[:, None], next_pos[:, None], kv_mask, cache,
                            slot)
    rng, sub = jax.random.split(rng)
    token = _sample(logits[:, -1], sub, temperature, top_p)
    token = jnp.where(done, pad_id, token)
    out = out.at[:, step].set(token)
    lengths = jnp.where(done, step, step + 1)
    done = done | (token == eos_id) | _ends_with(out, lengths, stops)
    return step + 1, out, cache, kv_mask, done, next_pos + 1, rng

  carry = (jnp.ones((), jnp.int32), out, cache, kv_mask, done, next_pos, rng)
  _, out, *_ = jax.lax.while_loop(cond, body, carry)
  # Each device keeps the new tokens of its own rows; the caller gathers them.
  return out if rows is None else jax.lax.with_sharding_constraint(out, rows)


def _stop_array(stop_sequences: Sequence[Sequence[int]]) -> np.ndarray:
  stop_sequences = [list(s) for s in stop_sequences if len(s)]
  if not stop_sequences:
    return np.zeros((0, 1), np.int32)
  width = max(len(s) for s in stop_sequences)
  arr = np.full((len(stop_sequences), width), -1, np.int32)
  for i, seq in enumerate(stop_sequences):
    arr[i, width - len(seq):] = seq  # right-aligned: compared with the newest tokens
  return arr


def decode_batch(graphdef: nnx.GraphDef, params: Any, tokens: Any, mask: Any, *, eos_id: int,
                 pad_id: int, sampling: SamplingConfig = SamplingConfig(),
                 stop_sequences: Sequence[Sequence[int]] = (),
                 row_sharding: NamedSharding | None = None) -> jax.Array:
  """New tokens [B, max_new_tokens] of a left-padded batch (`left_pad`), uncut, on device.

  `tokens` and `mask` are numpy arrays on one process, or global arrays whose rows are split over
  the mesh's data-parallel axes (`ff_jax.parallel.global_batch`); `row_sharding` is then theirs,
  and the output stays split the same way: each device decodes only its rows, with the
  parameters on their own shardings.
  """
  return _generate(graphdef, params, jnp.asarray(tokens), jnp.asarray(mask),
                   jnp.asarray(_stop_array(stop_sequences)), jnp.int32(eos_id),
                   jnp.int32(pad_id), jax.random.key(sampling.seed),
                   max_new=int(sampling.max_new_tokens), temperature=float(sampling.temperature),
                   top_p=float(sampling.top_p), rows=row_sharding)


def cut_rows(out: np.ndarray, eos_id: int,
             stop_sequences: Sequence[Sequence[int]] = ()) -> list[list[int]]:
  """Each row of `decode_batch`'s output cut before EOS / its first stop sequence."""
  results = []
  for row in np.asarray(out):
    row = row.tolist()
    cut = len(row)
    if eos_id in row:
      cut = row.index(eos_id)
    for seq in stop_sequences:
      seq = list(seq)
      for end in range(len(seq), cut + 1):
        if row[end - len(seq):end] == seq:
          cut = min(cut, end - len(seq))
          break
    results.append(row[:cut])
  return results


def generate(graphdef: nnx.GraphDef, params: Any, prompts: Sequence[Sequence[int]], *,
             eos_id: int, pad_id: int, sampling: SamplingConfig = SamplingConfig(),
             stop_sequences: Sequence[Sequence[int]] = (), prompt_length: int | None = None,
             ) -> list[list[int]]:
  """New tokens for each prompt, cut after EOS / a stop sequence (both excluded); one process.
  (Prompts split over the hosts of a pod: `ff_jax.training.scoring.generate_texts`.)"""
  tokens, mask = left_pad(prompts, pad_id, prompt_length)
  out = decode_batch(graphdef, params, tokens, mask, eos_id=eos_id, pad_id=pad_id,
                     sampling=sampling, stop_sequences=stop_sequences)
  return cut_rows(np.asarray(out), eos_id, stop_sequences)
