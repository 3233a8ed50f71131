"""Synthetic encoded examples for training and scoring tests: random tokens (never the pad id 0
or the special ids below 3), a random prompt length, the loss on the response."""

import numpy as np

from ff_jax.data.templates import EncodedExample


def random_examples(n: int, seed: int, lo: int = 6, hi: int = 30) -> list[EncodedExample]:
  """`n` examples of `lo` to `hi` - 1 tokens, ids `ex0`, `ex1`, ... (the same for a seed)."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    length = int(rng.integers(lo, hi))
    prompt = int(rng.integers(2, length - 2))
    tokens = rng.integers(3, 256, length).astype(np.int32)
    loss_mask = np.zeros(length, np.int32)
    loss_mask[prompt:] = 1
    out.append(EncodedExample(tokens=tokens, loss_mask=loss_mask, prompt_len=prompt,
                              truncated=False, id=f"ex{i}"))
  return out
