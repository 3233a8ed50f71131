"""Tests of the data layer: record IO and validation, templates and loss masks, batching."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from ff_jax.data import batching, records, templates
from ff_jax.data.demo import train_demo_tokenizer
from ff_jax.data.formats import load_source
from ff_jax.data.records import Record
from ff_jax.errors import DataError


@pytest.fixture(scope="module")
def tok():
  texts = ["the cat sat on the mat . who is it ? a b c d e f g h i j k l m n o p",
           templates.PLAIN_TEMPLATE, "one two three four five six seven eight nine ten"]
  return train_demo_tokenizer(texts, vocab_size=200)


def _write(path: Path, lines: list[str]) -> Path:
  path.write_text("\n".join(lines) + "\n")
  return path


def _rec(i, prompt="who is it ?", response="the cat"):
  return {"id": f"r{i}", "prompt": prompt, "response": response}


# ------------------------------------------------------------------------------------- records


def test_read_jsonl_roundtrip_and_unknown_keys_go_to_meta(tmp_path):
  p = _write(tmp_path / "d.jsonl", [json.dumps({**_rec(1), "kind": "unsafe", "label": 3}), "",
                                    json.dumps({**_rec(2), "meta": {"x": 1}})])
  recs = records.read_jsonl(p)
  assert [r.id for r in recs] == ["r1", "r2"]
  assert recs[0].kind == "unsafe" and recs[0].meta == {"label": 3}
  assert recs[1].kind is None and recs[1].meta == {"x": 1} and recs[1].category is None
  out = tmp_path / "out.jsonl"
  records.write_jsonl_atomic(out, recs)
  assert records.read_jsonl(out) == recs
  assert records.fingerprint(recs) == records.fingerprint(records.read_jsonl(out))
  assert records.fingerprint(recs) != records.fingerprint(recs[::-1])


def test_malformed_json_names_file_and_line(tmp_path):
  p = _write(tmp_path / "bad.jsonl", [json.dumps(_rec(1)), json.dumps(_rec(2)), '{"id": "x",'])
  with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON"):
    records.read_jsonl(p)


@pytest.mark.parametrize("key", ["prompt", "response", "id"])
def test_missing_or_empty_required_key(tmp_path, key):
  missing = {k: v for k, v in _rec(2).items() if k != key}
  p = _write(tmp_path / "m.jsonl", [json.dumps(_rec(1)), json.dumps(missing)])
  with pytest.raises(DataError, match=rf"m\.jsonl:2: missing required key '{key}'"):
    records.read_jsonl(p)
  p = _write(tmp_path / "e.jsonl", [json.dumps({**_rec(1), key: "  "})])
  with pytest.raises(DataError, match=rf"e\.jsonl:1: key '{key}' is empty"):
    records.read_jsonl(p)


def test_bad_kind_and_non_object(tmp_path):
  p = _write(tmp_path / "k.jsonl", [json.dumps({**_rec(1), "kind": "evil"})])
  with pytest.raises(DataError, match=r"k\.jsonl:1: key 'kind'"):
    records.read_jsonl(p)
  p = _write(tmp_path / "a.jsonl", ["[1, 2]"])
  with pytest.raises(DataError, match=r"a\.jsonl:1: expected a JSON object"):
    records.read_jsonl(p)


def test_duplicate_id_names_both_lines(tmp_path):
  p = _write(tmp_path / "dup.jsonl", [json.dumps(_rec(1)), json.dumps(_rec(2)),
                                      json.dumps(_rec(1))])
  with pytest.raises(DataError, match=r"dup\.jsonl:3: duplicate id 'r1'.*dup\.jsonl:1"):
    records.read_jsonl(p)


def test_empty_and_missing_files(tmp_path):
  p = _write(tmp_path / "empty.jsonl", [""])
  with pytest.raises(DataError, match="empty"):
    records.read_jsonl(p)
  with pytest.raises(DataError, match="not found"):
    load_source(tmp_path / "nope.jsonl")
  with pytest.raises(DataError, match="unknown data source"):
    load_source(tmp_path / "x.xlsx")


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None,
                    reason="datasets is installed")
def test_hf_source_without_datasets_is_a_clear_error():
  with pytest.raises(DataError, match="needs the optional `datasets` package"):
    load_source("hf://some/dataset:train")


def test_atomic_write_leaves_no_partial_file(tmp_path):
  out = tmp_path / "out.jsonl"
  records.write_jsonl_atomic(out, [_rec(0)])
  before = out.read_text()

  def items():
    yield _rec(1)
    raise RuntimeError("crash mid-write")

  with pytest.raises(RuntimeError):
    records.write_jsonl_atomic(out, items())
  assert out.read_text() == before  # old content intact
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]  # no temp file left
  with pytest.raises(RuntimeError):
    records.write_jsonl_atomic(tmp_path / "new.jsonl", items())
  assert not (tmp_path / "new.jsonl").exists()


# ----------------------------------------------------------------------------------- templates


def test_loss_mask_covers_response_and_eos_only(tok):
  assert tok.pad_id != tok.eos_id
  rec = Record(id="a", prompt="who is it ?", response="the cat")
  ex = templates.encode_example(tok, rec, templates.PromptTemplate(), max_len=64)
  prompt = templates.encode_prompt(tok, rec, templates.PromptTemplate())
  response = tok.encode("the cat")
  assert ex.tokens[0] == tok.bos_id
  np.testing.assert_array_equal(ex.tokens[:ex.prompt_len], prompt)
  np.testing.assert_array_equal(ex.tokens[ex.prompt_len:], response + [tok.eos_id])
  assert ex.loss_mask.tolist() == [0] * len(prompt) + [1] * (len(response) + 1)
  assert ex.tokens[-1] == tok.eos_id and ex.loss_mask[-1] == 1  # EOS is learned
  assert not ex.truncated


def test_plain_template_is_the_same_for_training_and_generation(tok):
  t = templates.PromptTemplate()
  text = t.render(tok, "hi {x}")
  assert text == "### Instruction:\nhi {x}\n\n### Response:\n"
  with pytest.raises(Exception, match="exactly once"):
    templates.PromptTemplate(plain="no placeholder")


def test_raw_template_is_the_prompt_as_written(tok):
  t = templates.PromptTemplate(mode="raw")
  assert t.render(tok, "### Instruction:\nhi\n\n### Response:\n") == (
      "### Instruction:\nhi\n\n### Response:\n")
  with pytest.raises(Exception, match="'raw', 'plain' or 'chat'"):
    templates.PromptTemplate(mode="alpaca")


@pytest.mark.parametrize("mode", ["raw", "plain"])
def test_responses_alone_follow_an_empty_prompt_in_the_same_template(tok, mode):
  t = templates.PromptTemplate(mode=mode)
  rec = Record(id="a", prompt="who is it ?", response="the cat")
  (alone,) = templates.encode_responses_alone(tok, [rec], t, max_len=64)
  ex = templates.encode_example(tok, rec, t, max_len=64)
  # The same targets as after the real prompt: the response and its EOS.
  np.testing.assert_array_equal(alone.tokens[alone.loss_mask == 1], ex.tokens[ex.loss_mask == 1])
  prefix = alone.tokens[:alone.prompt_len].tolist()
  assert alone.loss_mask[:alone.prompt_len].sum() == 0 and prefix
  if mode == "plain":  # the template's own empty prompt (BOS first, as every prompt)
    assert prefix == templates.encode_prompt(tok, "", t).tolist()
  else:  # the raw template renders nothing: EOS separates, so the first token is a target too
    assert prefix in ([tok.eos_id], [tok.bos_id])
  window = len(prefix) + 3
  (cut,) = templates.encode_responses_alone(
      tok, [Record(id="b", prompt="p", response=" ".join("abcdefghij"))], t, max_len=window)
  assert len(cut) == window and cut.truncated and cut.tokens[-1] != tok.eos_id


def test_truncation_cuts_prompt_left_then_response_right(tok):
  t = templates.PromptTemplate()
  long_prompt = " ".join("abcdefghijklmnop") * 3
  rec = Record(id="long", prompt=long_prompt, response="one two three")
  full = templates.encode_example(tok, rec, t, max_len=1000)
  ex = templates.encode_example(tok, rec, t, max_len=24)
  assert len(ex) == 24 and ex.truncated
  assert ex.prompt_dropped == len(full) - 24 and ex.response_dropped == 0
  assert ex.tokens[0] == tok.bos_id  # BOS survives the left cut
  np.testing.assert_array_equal(ex.tokens[1:ex.prompt_len], full.tokens[ex.prompt_dropped + 1:
                                                                        full.prompt_len])
  np.testing.assert_array_equal(ex.tokens[ex.prompt_len:], full.tokens[full.prompt_len:])

  rec = Record(id="longr", prompt="hi", response=" ".join(["one"] * 30))
  ex = templates.encode_example(tok, rec, t, max_len=16)
  # The prompt keeps max_len // 4 tokens; the response loses its end, EOS included.
  assert len(ex) == 16 and ex.prompt_len == 4 and ex.prompt_dropped > 0
  assert ex.response_dropped == 31 - 12 and tok.eos_id not in ex.tokens.tolist()
  assert ex.loss_mask.sum() == 12

  with pytest.raises(DataError, match=r"record 'longr': \d+ tokens .* exceed max_len=16"):
    templates.encode_example(tok, rec, t, max_len=16, overflow="error")


# ------------------------------------------------------------------------------------ batching


def _examples(tok, n, rng_seed=0):
  rng = np.random.default_rng(rng_seed)
  words = "one two three four five six seven eight nine ten".split()
  recs = [Record(id=f"e{i}", prompt=" ".join(rng.choice(words, size=rng.integers(1, 20))),
                 response=" ".join(rng.choice(words, size=rng.integers(1, 8)))) for i in range(n)]
  return templates.encode_examples(tok, recs, templates.PromptTemplate(), max_len=64)


def _check_batch(batch, examples, pad_id, buckets):
  tokens, mask, lm, eid = batch["tokens"], batch["mask"], batch["loss_mask"], batch["example_id"]
  assert tokens.dtype == mask.dtype == lm.dtype == eid.dtype == np.int32
  assert tokens.shape[1] in buckets and tokens.shape == mask.shape == lm.shape
  assert (lm[:, 0] == 0).all() and (lm <= mask).all()
  for row, i in enumerate(eid):
    if i < 0:
      assert mask[row].sum() == 0 and lm[row].sum() == 0
      continue
    n = len(examples[i])
    np.testing.assert_array_equal(tokens[row, :n], examples[i].tokens)
    assert (tokens[row, n:] == pad_id).all() and mask[row].sum() == n
    np.testing.assert_array_equal(lm[row, :n], examples[i].loss_mask)


def test_pick_bucket():
  assert batching.pick_bucket(17, (16, 32, 64)) == 32
  with pytest.raises(DataError, match="exceeds the largest bucket"):
    batching.pick_bucket(65, (16, 32, 64))


def test_train_iterator_epochs_cover_every_example_once(tok):
  exs = _examples(tok, 23)
  buckets = (16, 32, 64)
  it = batching.TrainIterator(exs, batch_size=4, seed=3, buckets=buckets, pad_id=tok.pad_id)
  assert it.steps_per_epoch == 6
  for _ in range(2):
    seen = []
    for _ in range(it.steps_per_epoch):
      batch, _state = it.next_batch()
      assert batch["tokens"].shape[0] == 4
      _check_batch(batch, exs, tok.pad_id, buckets)
      seen += [i for i in batch["example_id"].tolist() if i >= 0]
    assert sorted(seen) == list(range(23))
  assert not np.array_equal(it.epoch_order(0), it.epoch_order(1))
  dropped = batching.TrainIterator(exs, 4, 3, buckets, pad_id=tok.pad_id, drop_last=True)
  assert dropped.steps_per_epoch == 5


def test_train_iterator_restore_mid_epoch_is_identical(tok):
  exs = _examples(tok, 19)
  kw = dict(batch_size=4, seed=7, buckets=(16, 32, 64), pad_id=tok.pad_id)
  a = batching.TrainIterator(exs, **kw)
  for _ in range(7):  # into the second epoch
    _, state = a.next_batch()
  state = json.loads(json.dumps(state))  # must survive a JSON checkpoint
  expected = [a.next_batch()[0] for _ in range(8)]
  b = batching.TrainIterator(exs, **kw)
  b.restore(state)
  for want in expected:
    got = b.next_batch()[0]
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  c = batching.TrainIterator(exs, **{**kw, "seed": 8})
  with pytest.raises(DataError, match="seed=7 was saved"):
    c.restore(state)
  d = batching.TrainIterator(exs[:-1], **kw)
  with pytest.raises(DataError, match="num_examples"):
    d.restore(state)


def test_sharded_rows_reassemble_the_global_batch(tok):
  exs = _examples(tok, 10)
  kw = dict(batch_size=4, seed=1, buckets=(16, 32, 64), pad_id=tok.pad_id)
  whole = batching.TrainIterator(exs, **kw).next_batch()[0]
  parts = [batching.TrainIterator(exs, **kw, process_index=p, process_count=2).next_batch()[0]
           for p in range(2)]
  for key in whole:
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
  with pytest.raises(Exception, match="divisible"):
    batching.TrainIterator(exs, **{**kw, "batch_size": 3}, process_count=2)


def test_eval_batches_cover_each_example_once(tok):
  exs = _examples(tok, 11)
  buckets = (16, 32, 64)
  batches = batching.eval_batches(exs, 4, buckets, pad_id=tok.pad_id)
  ids = np.concatenate([b["example_id"] for b in batches]).tolist()
  assert len(batches) == 3 and ids.count(-1) == 1
  assert sorted(i for i in ids if i >= 0) == list(range(11))
  lengths = [len(exs[i]) for i in ids if i >= 0]
  assert lengths == sorted(lengths, reverse=True)
  for b in batches:
    _check_batch(b, exs, tok.pad_id, buckets)
    real = b["mask"].sum(axis=1).max()
    assert b["tokens"].shape[1] == batching.pick_bucket(real, buckets)  # smallest fitting

