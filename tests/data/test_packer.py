"""Sequence packing in the data layer: the packer's invariants, its shapes, resume and sharding."""

import json

import numpy as np
import pytest

from ff_jax.data import batching
from ff_jax.data.templates import EncodedExample
from ff_jax.errors import DataError

BUCKETS = (16, 32, 64)
PAD = 0


def _examples(lengths, seed=0):
  """Examples with random tokens (never the pad id), the last two thirds of each a response."""
  rng = np.random.default_rng(seed)
  out = []
  for i, n in enumerate(lengths):
    loss_mask = np.zeros(n, np.int32)
    loss_mask[n // 3 + 1:] = 1
    out.append(EncodedExample(tokens=rng.integers(3, 200, n).astype(np.int32),
                              loss_mask=loss_mask, prompt_len=n // 3 + 1, truncated=False,
                              id=f"e{i}"))
  return out


def _mixed(n, seed=0):
  """`n` examples from 2 to 64 tokens: very different lengths, as in a real mixture."""
  return _examples(np.random.default_rng(seed).integers(2, 65, n).tolist(), seed)


def _check_packed(batch, examples, segments):
  """Every segment holds its example verbatim, positions restart, nothing predicts an example's
  first token; returns the example ids seen."""
  tokens, seg, pos = batch["tokens"], batch["segment_ids"], batch["positions"]
  eid, lm, mask = batch["example_id"], batch["loss_mask"], batch["mask"]
  for key, value in batch.items():
    assert value.dtype == np.int32, key
  assert eid.shape == (tokens.shape[0], segments)
  np.testing.assert_array_equal(mask, seg > 0)
  seen = []
  for r in range(tokens.shape[0]):
    start = 0
    for s, i in enumerate(eid[r]):
      if i < 0:
        assert (eid[r, s:] == -1).all()
        break
      n = len(examples[i])
      np.testing.assert_array_equal(tokens[r, start:start + n], examples[i].tokens)
      np.testing.assert_array_equal(pos[r, start:start + n], np.arange(n))
      assert (seg[r, start:start + n] == s + 1).all()
      want = examples[i].loss_mask.copy()
      want[0] = 0
      np.testing.assert_array_equal(lm[r, start:start + n], want)
      seen.append(int(i))
      start += n
    assert (seg[r, start:] == 0).all() and (tokens[r, start:] == PAD).all()
    assert (lm[r, start:] == 0).all()
  return seen


def test_ladder_values():
  steps = batching.LADDER_STEPS
  for value in range(1, 3000):
    got = batching.ladder_up(value)
    mantissa = got >> max(0, got.bit_length() - steps.bit_length())
    assert value <= got <= value * (1 + 1 / steps), value
    assert got <= steps or steps <= mantissa < 2 * steps, value
  if steps == 8:
    assert [batching.ladder_up(v) for v in (9, 17, 100, 129, 256, 257)] == [
        9, 18, 104, 144, 256, 288]


def test_first_fit_decreasing_is_deterministic_and_fills_rows():
  rows = batching.first_fit_decreasing([5, 9, 3, 9, 4], 12)
  assert rows == [[1, 2], [3], [0, 4]]
  with pytest.raises(DataError, match="exceeds the packed width"):
    batching.packed_layout([70], 64)


def test_packed_layout_rows_and_widths_come_from_the_ladder():
  lengths = np.random.default_rng(0).integers(2, 65, 16).tolist()
  rows, width, packed = batching.packed_layout(lengths, 256)
  assert rows >= len(packed) and width == batching.ladder_up(width) and width <= 256
  assert sorted(i for row in packed for i in row) == list(range(16))
  assert all(sum(lengths[i] for i in row) <= width for row in packed)
  rows8, _, _ = batching.packed_layout(lengths, 256, row_multiple=8)
  assert rows8 % 8 == 0


def test_train_iterator_packs_the_same_examples_as_unpacked():
  exs = _mixed(45)
  kw = dict(batch_size=8, seed=3, buckets=BUCKETS, pad_id=PAD)
  plain = batching.TrainIterator(exs, **kw)
  packed = batching.TrainIterator(exs, **kw, packing=True)
  shapes = set()
  for _ in range(3 * plain.steps_per_epoch):
    want = plain.next_batch()[0]["example_id"]
    batch, _ = packed.next_batch()
    got = _check_packed(batch, exs, segments=8)
    assert sorted(got) == sorted(i for i in want.tolist() if i >= 0)
    shapes.add(batch["tokens"].shape)
  # 18 batches of 8 examples of 2-64 tokens (the token count varies by +-20%): ladder widths of
  # at most 2 largest buckets, 10 shapes.
  widths = {w for _, w in shapes}
  assert all(batching.ladder_up(w) == w <= 2 * max(BUCKETS) for w in widths), shapes
  assert len(shapes) <= 12, shapes


def test_a_longer_bucket_does_not_widen_batches_of_short_examples():
  # `data.max_len: auto` adds the bucket of the data's longest row; batches without such a row
  # must pack as they would without that bucket (rows of at most 2 of their own buckets), and a
  # batch with one gets rows wide enough for it.
  exs = _mixed(48) + _examples([200], seed=9)
  order = np.random.default_rng(5).permutation(48)
  for batch in np.split(order, 6):
    idx = batch.tolist()
    assert (batching.packed_rows(exs, idx, BUCKETS + (256,))
            == batching.packed_rows(exs, idx, BUCKETS))
  _, width, _ = batching.packed_rows(exs, idx[:7] + [48], BUCKETS + (256,))
  assert 200 <= width <= 2 * 256
  evals = batching.eval_batches(exs[:48], 8, BUCKETS + (256,), pad_id=PAD, packing=True)
  assert evals[0]["tokens"].shape[1] <= 2 * max(BUCKETS)
  # Scoring may pack narrower than the longest example's bucket: rows from its own width up.
  evals = batching.eval_batches(exs, 8, BUCKETS + (256,), pad_id=PAD, packing=True)
  assert 200 <= evals[0]["tokens"].shape[1] < 256


def test_packed_iterator_resume_replays_the_same_batches():
  exs = _mixed(30, seed=1)
  kw = dict(batch_size=8, seed=7, buckets=BUCKETS, pad_id=PAD, packing=True)
  a = batching.TrainIterator(exs, **kw)
  for _ in range(5):  # into the second epoch
    _, state = a.next_batch()
  state = json.loads(json.dumps(state))
  expected = [a.next_batch()[0] for _ in range(6)]
  b = batching.TrainIterator(exs, **kw)
  b.restore(state)
  for want in expected:
    got = b.next_batch()[0]
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_packed_rows_split_over_processes():
  exs = _mixed(20, seed=2)
  kw = dict(batch_size=8, seed=1, buckets=BUCKETS, pad_id=PAD, packing=True, row_multiple=2)
  whole = batching.TrainIterator(exs, **kw).next_batch()[0]
  assert whole["tokens"].shape[0] % 2 == 0
  parts = [batching.TrainIterator(exs, **kw, process_index=p, process_count=2).next_batch()[0]
           for p in range(2)]
  for key in whole:
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


def test_packed_eval_batches_cover_each_example_once_in_one_shape():
  exs = _mixed(61, seed=3)
  batches = batching.eval_batches(exs, 8, BUCKETS, pad_id=PAD, packing=True)
  assert len({(b["tokens"].shape, b["example_id"].shape) for b in batches}) == 1
  segments = batches[0]["example_id"].shape[1]
  seen = [i for b in batches for i in _check_packed(b, exs, segments)]
  assert sorted(seen) == list(range(61))
  # Never more token slots per batch than an unpacked batch of the largest bucket.
  assert batches[0]["tokens"].size <= 8 * max(BUCKETS)
  multi = batching.eval_batches(exs, 8, BUCKETS, pad_id=PAD, packing=True, row_multiple=4)
  assert multi[0]["tokens"].shape[0] % 4 == 0
  assert batching.eval_batches([], 8, BUCKETS, pad_id=PAD, packing=True) == []


def test_padded_share():
  exs = _mixed(40, seed=4)
  plain = batching.make_batch(exs, list(range(8)), BUCKETS, PAD)
  real = sum(len(exs[i]) for i in range(8))
  assert batching.token_slots(plain) == (real, plain["tokens"].size)
  packed = batching.pack_batch(exs, list(range(8)), BUCKETS, PAD)
  assert batching.token_slots(packed)[0] == real
  assert batching.padded_share(packed) < batching.padded_share(plain)
