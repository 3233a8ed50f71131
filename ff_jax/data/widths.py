"""Sequence widths from the data: what `data.max_len: auto` and `data.buckets: auto` resolve to.

A row cut to fit `data.max_len` is finetuned and scored as another example than the user gave:
on the tuning mixture four cut rows lowered the filter's F1 from 0.996 to 0.943
(docs/fidelity.md). So by default the width is the data's own: the longest row of data.noisy and
data.safe as encoded, rounded up to the next bucket, and at most the model's context
(`max_position_embeddings`), the one limit a row is still cut at. The buckets are powers of two
from `SMALLEST_BUCKET` up to that width, the width itself last, so short rows are padded (or
packed) to a short width and a step compiles once per bucket.
"""

from __future__ import annotations

from collections.abc import Sequence

from ff_jax.data.batching import pick_bucket
from ff_jax.errors import ConfigError

AUTO = "auto"
SMALLEST_BUCKET = 64


def _power_of_two_at_least(length: int) -> int:
  """The smallest power of two from `SMALLEST_BUCKET` that holds `length` tokens."""
  size = SMALLEST_BUCKET
  while size < length:
    size *= 2
  return size


def bucket_ladder(width: int, smallest: int = SMALLEST_BUCKET) -> tuple[int, ...]:
  """Powers of two from `smallest` below `width`, then `width`: (64, 128, 256, 300) for 300."""
  ladder, size = [], smallest
  while size < width:
    ladder.append(size)
    size *= 2
  return (*ladder, width)


def _round_up(longest: int, buckets: Sequence[int] | None, context: int) -> int:
  """The width a row of `longest` tokens needs: the bucket of `buckets` that holds it
  (`batching.pick_bucket`), else of the power-of-two ladder, at most `context`."""
  if buckets and max(buckets) >= longest:
    return min(pick_bucket(longest, buckets), context)
  return min(_power_of_two_at_least(longest), context)


def resolve_widths(max_len: int | str, buckets: Sequence[int] | str, longest: int,
                   context: int) -> tuple[int, tuple[int, ...]]:
  """(max_len, buckets) for a run whose longest encoded row has `longest` tokens.

  `max_len`: a number stays (rows longer are cut, `data.overflow`); `auto` is the bucket that
  holds the longest row, at most `context`. `buckets`: a list stays, with the width appended when
  it is wider than the list's last (a row of that width needs a bucket); `auto` is the ladder up
  to the width (`bucket_ladder`).
  """
  if context < 2:
    raise ConfigError(f"the model's context ({context} tokens) is too short for a row")
  explicit = None if buckets == AUTO else tuple(sorted(int(b) for b in buckets))
  width = _round_up(longest, explicit, context) if max_len == AUTO else int(max_len)
  if explicit is None:
    return width, bucket_ladder(width)
  return width, explicit if explicit[-1] >= width else (*explicit, width)
