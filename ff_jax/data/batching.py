"""Fixed-shape numpy batches for the jitted train/score steps, and a resumable train iterator.

Batch contract (every array numpy int32):
  tokens     [B, T]  right-padded with the tokenizer's pad id;
  mask       [B, T]  1 on real tokens;
  loss_mask  [B, T]  1 where tokens[b, t] is a target predicted from position t-1 (column 0 is 0);
  example_id [B]     index into the encoded dataset list, -1 for filler rows (all-zero masks).
T is the smallest of a few bucket lengths that fits the *global* batch, so jit compiles a handful
of shapes and every host picks the same T. Each host builds only its rows of the global batch.
The training order is a pure function of (seed, epoch, position), so a restored iterator yields
exactly the batches the original would have.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ff_jax.data.templates import EncodedExample
from ff_jax.errors import ConfigError, DataError


def pick_bucket(length: int, buckets: Sequence[int]) -> int:
  """The smallest bucket that holds `length` tokens."""
  for b in sorted(buckets):
    if b >= length:
      return int(b)
  raise DataError(f"a sequence of {length} tokens exceeds the largest bucket {max(buckets)} "
                  "(raise data.max_len or encode with truncation)")


def _check_sharding(batch_size: int, process_index: int, process_count: int) -> None:
  if batch_size < 1:
    raise ConfigError(f"batch_size: must be positive, got {batch_size}")
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ConfigError(f"process_index={process_index} is not in [0, {process_count})")
  if batch_size % process_count:
    raise ConfigError(f"batch_size={batch_size} must be divisible by the process count "
                      f"{process_count}")


def make_batch(examples: Sequence[EncodedExample], indices: Sequence[int], buckets: Sequence[int],
               pad_id: int, process_index: int = 0,
               process_count: int = 1) -> dict[str, np.ndarray]:
  """This host's rows of the global batch `indices` (-1 = filler row)."""
  longest = max((len(examples[i]) for i in indices if i >= 0), default=1)
  t = pick_bucket(longest, buckets)
  rows = len(indices) // process_count
  local = list(indices)[process_index * rows:(process_index + 1) * rows]
  tokens = np.full((rows, t), pad_id, dtype=np.int32)
  mask = np.zeros((rows, t), dtype=np.int32)
  loss_mask = np.zeros((rows, t), dtype=np.int32)
  for r, i in enumerate(local):
    if i < 0:
      continue
    ex = examples[i]
    n = len(ex)
    tokens[r, :n] = ex.tokens
    mask[r, :n] = 1
    loss_mask[r, :n] = ex.loss_mask
  loss_mask[:, 0] = 0  # nothing predicts the first token
  return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask,
          "example_id": np.asarray(local, dtype=np.int32)}


class TrainIterator:
  """Infinite, deterministic epochs of shuffled fixed-shape batches.

  `next_batch()` returns `(batch, state)` where `state` is what `restore` needs to continue right
  after this batch; save it with the train step's checkpoint.
  """

  def __init__(self, examples: Sequence[EncodedExample], batch_size: int, seed: int,
               buckets: Sequence[int], *, pad_id: int, drop_last: bool = False,
               process_index: int = 0, process_count: int = 1):
    _check_sharding(batch_size, process_index, process_count)
    if not examples:
      raise DataError("cannot train on an empty dataset")
    if drop_last and len(examples) < batch_size:
      raise ConfigError(f"batch_size={batch_size} with drop_last exceeds the dataset size "
                        f"{len(examples)}: an epoch would have no batches")
    longest = max(len(e) for e in examples)
    pick_bucket(longest, buckets)  # fail now, not at some later step
    self.examples = examples
    self.batch_size = batch_size
    self.seed = int(seed)
    self.buckets = tuple(sorted(int(b) for b in buckets))
    self.pad_id = pad_id
    self.drop_last = drop_last
    self.process_index = process_index
    self.process_count = process_count
    self.epoch = 0
    self.position = 0  # batches already taken from this epoch
    self._order_epoch: int | None = None
    self._order: np.ndarray | None = None

  @property
  def steps_per_epoch(self) -> int:
    n = len(self.examples)
    return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

  def epoch_order(self, epoch: int) -> np.ndarray:
    """The permutation of example indices for `epoch` (seeded by (seed, epoch) only)."""
    if self._order_epoch != epoch:
      rng = np.random.default_rng([self.seed, epoch])
      self._order = rng.permutation(len(self.examples))
      self._order_epoch = epoch
    return self._order

  def state(self) -> dict[str, Any]:
    return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
            "num_examples": len(self.examples), "batch_size": self.batch_size}

  def restore(self, state: dict[str, Any]) -> None:
    """Continue from a `state()`; refuses one saved for other data, seed or batch size."""
    for key in ("epoch", "position"):
      if not isinstance(state.get(key), int) or state[key] < 0:
        raise DataError(f"iterator state: key {key!r} must be a non-negative integer, "
                        f"got {state.get(key)!r}")
    for key, mine in (("seed", self.seed), ("num_examples", len(self.examples)),
                      ("batch_size", self.batch_size)):
      if key in state and state[key] != mine:
        raise DataError(f"iterator state: {key}={state[key]} was saved, but this run has "
                        f"{key}={mine} (the data or config changed since the checkpoint)")
    if state["position"] > self.steps_per_epoch:
      raise DataError(f"iterator state: position {state['position']} is beyond an epoch of "
                      f"{self.steps_per_epoch} batches")
    self.epoch, self.position = state["epoch"], state["position"]

  def next_batch(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    if self.position >= self.steps_per_epoch:
      self.epoch, self.position = self.epoch + 1, 0
    order = self.epoch_order(self.epoch)
    start = self.position * self.batch_size
    idx = order[start:start + self.batch_size].tolist()
    idx += [-1] * (self.batch_size - len(idx))  # filler rows keep the last batch's shape
    batch = make_batch(self.examples, idx, self.buckets, self.pad_id, self.process_index,
                       self.process_count)
    self.position += 1
    return batch, self.state()

  def __iter__(self):
    return self

  def __next__(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    return self.next_batch()


def eval_batches(examples: Sequence[EncodedExample], batch_size: int, buckets: Sequence[int], *,
                 pad_id: int, sort_by_length: bool = True, process_index: int = 0,
                 process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """One pass over every example exactly once, longest first (fewer pad tokens per batch)."""
  _check_sharding(batch_size, process_index, process_count)
  order = list(range(len(examples)))
  if sort_by_length:
    order.sort(key=lambda i: -len(examples[i]))  # stable: ties keep dataset order
  out = []
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    idx += [-1] * (batch_size - len(idx))
    out.append(make_batch(examples, idx, buckets, pad_id, process_index, process_count))
  return out

