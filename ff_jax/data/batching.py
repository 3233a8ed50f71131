"""Fixed-shape numpy batches for the jitted train/score steps, and a resumable train iterator.

Batch contract (every array numpy int32):
  tokens     [B, T]  right-padded with the tokenizer's pad id;
  mask       [B, T]  1 on real tokens;
  loss_mask  [B, T]  1 where tokens[b, t] is a target predicted from position t-1 (column 0 is 0);
  example_id [B]     index into the encoded dataset list, -1 for filler rows (all-zero masks).
T is the smallest of a few bucket lengths that fits the *global* batch, so jit compiles a handful
of shapes and every host picks the same T. Each host builds only its rows of the global batch
(its block of them, `host_rows.host_block`).
The training order is a pure function of (seed, epoch, position), so a restored iterator yields
exactly the batches the original would have.

Packed batches (`packing=True`) put several examples into each row instead, one after another,
and add two keys; the loss of every example is the same as unpacked:
  segment_ids [B, T]  1..k for the k examples of a row, in order; 0 on padding;
  positions   [B, T]  0, 1, ... restarting at each example (RoPE and learned positions);
  example_id  [B, S]  the example of segment s+1 of each row, -1 where a row has fewer than S.
`mask` is `segment_ids > 0` and `loss_mask` is 0 on every example's first token, so neither
attention (`segment_ids`) nor a target crosses from one example to the next. A training batch
packs exactly the examples the unpacked iterator would take for that step (first-fit-decreasing);
its shape (rows, width) is chosen per batch from a small deterministic set (`packed_layout`).
Scoring packs a whole set into batches of one shape (`eval_batches`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ff_jax.data.host_rows import host_block
from ff_jax.data.templates import EncodedExample
from ff_jax.errors import ConfigError, DataError

# Packed rows are at most this many times as wide as the bucket of the longest example they pack
# (of the batch in training, of the set in scoring). Wider rows leave less room unfilled (rows of 1
# bucket pad 12-20% on the demo and the bias mixture, rows of 2 about 8%), but each token attends
# over its whole row (the einsum path and the masked fused kernel compute every (query, key) pair
# of a row): on CPU, rows of 4 buckets trained slower than rows of 2, for the demo model and for
# SmolLM2's widths alike. The batch's own bucket, not the largest one, because one long row of the
# data (which sets `data.max_len: auto`) must not widen every other batch: on the tuning mixture,
# rows of up to 2 x 512 where 2 x 256 held the batch made the noisy finetune 1.5x slower.
PACKED_WIDTH_FACTOR = 2
# Packed widths and row counts are rounded up to 8 values per octave (8..15 x 2^e): rounding costs
# ~4% of the slots, and a phase compiles one shape per ~9% step of its batches' token counts
# (measured: 3-8 per demo phase, 8-11 per noisy phase of the bias mixtures, whose batches of 8
# vary most). 4 per octave compiles about half as many and pads ~11% instead of ~7%.
LADDER_STEPS = 8


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


def bucket_width(examples: Sequence[EncodedExample], indices: Sequence[int],
                 buckets: Sequence[int]) -> int:
  """The width of the unpacked global batch `indices`: the smallest bucket that holds its longest
  example (the same on every host)."""
  return pick_bucket(max((len(examples[i]) for i in indices if i >= 0), default=1), buckets)


def make_batch(examples: Sequence[EncodedExample], indices: Sequence[int], buckets: Sequence[int],
               pad_id: int, process_index: int = 0, process_count: int = 1,
               width: int | None = None) -> dict[str, np.ndarray]:
  """This host's rows of the global batch `indices` (-1 = filler row), `width` tokens wide
  (default: `bucket_width`; wider to stack it with other streams' batches)."""
  t = bucket_width(examples, indices, buckets) if width is None else width
  local = host_block(list(indices), process_index, process_count)
  rows = len(local)
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


def is_packed(batch: dict[str, Any]) -> bool:
  """Whether `batch` (numpy or on device) holds packed rows."""
  return "segment_ids" in batch


def ladder_up(value: int) -> int:
  """The smallest number >= `value` of the form k·2^e with k in [LADDER_STEPS, 2·LADDER_STEPS)
  (every number up to LADDER_STEPS is one)."""
  if value <= LADDER_STEPS:
    return max(int(value), 1)
  step = 1 << max(0, int(value).bit_length() - LADDER_STEPS.bit_length())
  return -(-int(value) // step) * step


def _round_up(value: int, multiple: int) -> int:
  return -(-int(value) // multiple) * multiple


def first_fit_decreasing(lengths: Sequence[int], width: int) -> list[list[int]]:
  """Positions into `lengths` grouped into rows of at most `width` tokens: longest first (ties in
  input order), each into the first row with room. Deterministic."""
  order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
  room = np.zeros(len(lengths), dtype=np.int64)
  rows: list[list[int]] = []
  for i in order:
    fits = np.flatnonzero(room[:len(rows)] >= lengths[i])
    if fits.size:
      r = int(fits[0])
    else:
      r = len(rows)
      rows.append([])
      room[r] = width
    rows[r].append(i)
    room[r] -= lengths[i]
  return rows


def packed_layout(lengths: Sequence[int], max_width: int,
                  row_multiple: int = 1) -> tuple[int, int, list[list[int]]]:
  """(rows, width, positions into `lengths` per row) of one packed training batch.

  The fewest rows (a multiple of `row_multiple`) that fit the tokens in rows of at most
  `max_width`, then the narrowest ladder width (`ladder_up`) into which first-fit-decreasing fits
  them: long rows leave little unfilled, and both numbers come from a small set, so a phase
  compiles a few shapes.
  """
  longest, total = max(lengths), sum(lengths)
  if longest > max_width:
    raise DataError(f"an example of {longest} tokens exceeds the packed width {max_width}")
  rows = _round_up(ladder_up(-(-total // max_width)), row_multiple)
  while True:
    width = min(max_width, ladder_up(max(longest, -(-total // rows))))
    while True:
      packed = first_fit_decreasing(lengths, width)
      if len(packed) <= rows:
        return rows, width, packed
      if width == max_width:
        break
      width = min(max_width, ladder_up(width + 1))
    rows = _round_up(ladder_up(rows + 1), row_multiple)


def _fill_packed(examples: Sequence[EncodedExample], rows: Sequence[Sequence[int]],
                 num_rows: int, width: int, segments: int,
                 pad_id: int) -> dict[str, np.ndarray]:
  """A packed batch of `num_rows` x `width` from `rows` (dataset indices per row; missing rows
  are left empty) with `segments` example ids per row."""
  tokens = np.full((num_rows, width), pad_id, dtype=np.int32)
  loss_mask = np.zeros((num_rows, width), dtype=np.int32)
  segment_ids = np.zeros((num_rows, width), dtype=np.int32)
  positions = np.zeros((num_rows, width), dtype=np.int32)
  example_id = np.full((num_rows, segments), -1, dtype=np.int32)
  for r, row in enumerate(rows):
    start = 0
    for s, i in enumerate(row):
      ex = examples[i]
      end = start + len(ex)
      tokens[r, start:end] = ex.tokens
      loss_mask[r, start:end] = ex.loss_mask
      loss_mask[r, start] = 0  # never a target of the previous example's last token
      segment_ids[r, start:end] = s + 1
      positions[r, start:end] = np.arange(len(ex))
      example_id[r, s] = i
      start = end
  return {"tokens": tokens, "mask": (segment_ids > 0).astype(np.int32), "loss_mask": loss_mask,
          "segment_ids": segment_ids, "positions": positions, "example_id": example_id}


def packed_rows(examples: Sequence[EncodedExample], indices: Sequence[int],
                buckets: Sequence[int], row_multiple: int = 1,
                process_count: int = 1) -> tuple[int, int, list[list[int]]]:
  """(rows, width, dataset indices per row) of the global batch `indices` packed
  (`packed_layout`, rows a multiple of `row_multiple` and of the process count): the same on every
  host."""
  real = [i for i in indices if i >= 0]
  lengths = [len(examples[i]) for i in real]
  num_rows, width, packed = packed_layout(lengths,
                                          PACKED_WIDTH_FACTOR * pick_bucket(max(lengths), buckets),
                                          math.lcm(row_multiple, process_count))
  return num_rows, width, [[real[p] for p in row] for row in packed]


def pack_batch(examples: Sequence[EncodedExample], indices: Sequence[int], buckets: Sequence[int],
               pad_id: int, row_multiple: int = 1, process_index: int = 0,
               process_count: int = 1,
               shape: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
  """This host's rows of the global batch `indices` (-1 = no example), packed (`packed_rows`),
  with one example id per index. `shape`: the global (rows, width) to pad the batch to before it
  is split over the hosts (to stack it with other streams' batches; empty rows go last)."""
  num_rows, width, rows = packed_rows(examples, indices, buckets, row_multiple, process_count)
  if shape is not None:
    num_rows, width = shape
  mine = host_block(_empty_rows_last(rows, num_rows), process_index, process_count)
  return _fill_packed(examples, mine, len(mine), width, len(indices), pad_id)


def _empty_rows_last(rows: Sequence[list[int]], num_rows: int) -> list[list[int]]:
  """`rows` (dataset indices per packed row) grown to `num_rows` with empty rows."""
  return [*rows, *[[] for _ in range(num_rows - len(rows))]]


def token_slots(batch: dict[str, np.ndarray]) -> tuple[int, int]:
  """(real tokens, token slots) of a host batch, packed or not (stacked ones too): the padded
  share is 1 - real / slots."""
  mask = batch["mask"]
  return int(mask.sum()), int(mask.size)


def padded_share(batch: dict[str, np.ndarray]) -> float:
  """The fraction of a batch's token slots that hold padding (see `token_slots`)."""
  real, slots = token_slots(batch)
  return 1.0 - real / max(slots, 1)


@dataclasses.dataclass(frozen=True)
class Batching:
  """How a set of examples is cut into batches: rows per batch, the bucket lengths, the pad id and
  whether examples are packed. One value, because the four always travel together; a run has two
  (its finetunes' batches and `scoring.batch_size`'s)."""

  batch_size: int
  buckets: tuple[int, ...]
  pad_id: int
  packing: bool = False

  def __post_init__(self):
    # Any sequence is accepted; a tuple keeps the value hashable and comparable.
    object.__setattr__(self, "buckets", tuple(int(b) for b in self.buckets))

  def train_iterator(self, examples: Sequence[EncodedExample], seed: int,
                     **kwargs: Any) -> TrainIterator:
    """`TrainIterator` over `examples` with these batches (`kwargs`: its other settings)."""
    return TrainIterator(examples, self.batch_size, seed, self.buckets, pad_id=self.pad_id,
                         packing=self.packing, **kwargs)

  def eval_batches(self, examples: Sequence[EncodedExample], **kwargs: Any
                   ) -> list[dict[str, np.ndarray]]:
    """`eval_batches` of `examples` with these batches (`kwargs`: its other settings)."""
    return eval_batches(examples, self.batch_size, self.buckets, pad_id=self.pad_id,
                        packing=self.packing, **kwargs)


class TrainIterator:
  """Infinite, deterministic epochs of shuffled fixed-shape batches.

  `next_batch()` returns `(batch, state)` where `state` is what `restore` needs to continue right
  after this batch; save it with the train step's checkpoint. With `packing`, each batch holds
  the same examples packed (`pack_batch`; rows a multiple of `row_multiple`, see
  `Trainer.row_multiple`), so a packed and an unpacked run see the same data at every step and
  resume from each other's states.
  """

  def __init__(self, examples: Sequence[EncodedExample], batch_size: int, seed: int,
               buckets: Sequence[int], *, pad_id: int, drop_last: bool = False,
               process_index: int = 0, process_count: int = 1, packing: bool = False,
               row_multiple: int = 1):
    _check_sharding(batch_size, process_index, process_count)
    if row_multiple < 1:
      raise ConfigError(f"row_multiple: must be positive, got {row_multiple}")
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
    self.packing = packing
    self.row_multiple = row_multiple
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

  def next_indices(self) -> list[int]:
    """The dataset indices of the next global batch (-1: filler row); moves the stream on."""
    if self.position >= self.steps_per_epoch:
      self.epoch, self.position = self.epoch + 1, 0
    order = self.epoch_order(self.epoch)
    start = self.position * self.batch_size
    idx = order[start:start + self.batch_size].tolist()
    idx += [-1] * (self.batch_size - len(idx))  # filler rows keep the last batch's shape
    self.position += 1
    return idx

  def batch_shape(self, indices: Sequence[int]) -> tuple[int, int]:
    """(rows, width) of the global batch of `indices`, known on every host without building it."""
    if self.packing:
      rows, width, _ = packed_rows(self.examples, indices, self.buckets, self.row_multiple,
                                   self.process_count)
      return rows, width
    return len(indices), bucket_width(self.examples, indices, self.buckets)

  def make(self, indices: Sequence[int],
           shape: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """This host's rows of the global batch of `indices`, padded to the global (rows, width)
    `shape` when given (at least `batch_shape(indices)`; unpacked batches keep their rows)."""
    if self.packing:
      return pack_batch(self.examples, indices, self.buckets, self.pad_id, self.row_multiple,
                        self.process_index, self.process_count, shape)
    if shape is not None and shape[0] != len(indices):
      raise ConfigError(f"an unpacked batch of {len(indices)} rows cannot be padded to "
                        f"{shape[0]} rows: give every stacked stream the same batch_size")
    return make_batch(self.examples, indices, self.buckets, self.pad_id, self.process_index,
                      self.process_count, None if shape is None else shape[1])

  def next_batch(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    batch = self.make(self.next_indices())
    return batch, self.state()

  def __iter__(self):
    return self

  def __next__(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    return self.next_batch()


def eval_batches(examples: Sequence[EncodedExample], batch_size: int, buckets: Sequence[int], *,
                 pad_id: int, sort_by_length: bool = True, process_index: int = 0,
                 process_count: int = 1, packing: bool = False,
                 row_multiple: int = 1) -> list[dict[str, np.ndarray]]:
  """One pass over every example exactly once, longest first (fewer pad tokens per batch), or
  with `packing` packed into batches of one shape (`packed_eval_batches`, rows a multiple of
  `row_multiple`)."""
  _check_sharding(batch_size, process_index, process_count)
  if packing:
    return packed_eval_batches(examples, batch_size, buckets, pad_id=pad_id,
                               row_multiple=row_multiple, process_index=process_index,
                               process_count=process_count)
  order = list(range(len(examples)))
  if sort_by_length:
    order.sort(key=lambda i: -len(examples[i]))  # stable: ties keep dataset order
  out = []
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    idx += [-1] * (batch_size - len(idx))
    out.append(make_batch(examples, idx, buckets, pad_id, process_index, process_count))
  return out


def packed_eval_batches(examples: Sequence[EncodedExample], batch_size: int,
                        buckets: Sequence[int], *, pad_id: int, row_multiple: int = 1,
                        process_index: int = 0,
                        process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """Every example exactly once, packed first-fit-decreasing over the whole set into batches of
  one shape (one compile per set).

  A batch holds at most the token slots of an unpacked batch in the longest example's bucket
  (`batch_size` x that bucket; a single row may exceed it), in rows of a ladder width from the
  longest example's to PACKED_WIDTH_FACTOR such buckets: whichever needs the fewest slots in all
  (ties: the narrower, cheaper attention). From the example's width, not its bucket's: a few rows
  just over a bucket (which `data.max_len: auto` keeps whole) would otherwise double the narrowest
  width every batch can take. The rows are spread evenly over the batches, each a multiple of
  `row_multiple` rows and of the process count.
  """
  if not examples:
    return []
  row_multiple = math.lcm(row_multiple, process_count)
  lengths = [len(e) for e in examples]
  longest_bucket = pick_bucket(max(lengths), buckets)
  widths = sorted({min(ladder_up(w), PACKED_WIDTH_FACTOR * longest_bucket)
                   for w in range(max(lengths), PACKED_WIDTH_FACTOR * longest_bucket + 1)})
  best = None
  for width in widths:
    rows = first_fit_decreasing(lengths, width)
    budget = batch_size * longest_bucket // width
    per_batch_max = max(row_multiple, budget // row_multiple * row_multiple)
    num_batches = -(-len(rows) // per_batch_max)
    per_batch = _round_up(-(-len(rows) // num_batches), row_multiple)
    slots = num_batches * per_batch * width
    if best is None or slots < best[0]:
      best = (slots, width, rows, num_batches, per_batch)
  _, width, rows, num_batches, per_batch = best
  segments = max(len(row) for row in rows)
  out = []
  for b in range(num_batches):
    mine = host_block(_empty_rows_last(rows[b * per_batch:(b + 1) * per_batch], per_batch),
                      process_index, process_count)
    out.append(_fill_packed(examples, mine, len(mine), width, segments, pad_id))
  return out
