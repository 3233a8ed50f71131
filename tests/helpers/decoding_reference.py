"""Reference decoding for tests: greedy by full forward passes, no KV cache, no batching."""

import jax
import jax.numpy as jnp
import numpy as np

from ff_jax.models import forward, positions_from_mask


def uncached_greedy(graphdef, params, prompt, max_new, eos):
  """Greedy decoding by full forward passes over a fixed-width, right-padded buffer."""
  width = len(prompt) + max_new

  @jax.jit
  def next_token(tokens, length):
    mask = (jnp.arange(width) < length)[None].astype(jnp.int32)
    logits, _ = forward(graphdef, params, tokens, positions_from_mask(mask), mask)
    return jnp.argmax(logits[0, length - 1])

  tokens = np.zeros((1, width), np.int32)
  tokens[0, :len(prompt)] = prompt
  out = []
  for length in range(len(prompt), width):
    token = int(next_token(tokens, length))
    if token == eos:
      break
    tokens[0, length] = token
    out.append(token)
  return out
