"""Tests of the built-in demo world: determinism, disjoint splits, counts, tokenizer, judge."""

import collections

import numpy as np
import pytest

from ff_jax.data import demo, records, templates
from ff_jax.errors import ConfigError
from ff_jax.models.tokenizer import TextTokenizer


@pytest.fixture(scope="module")
def world():
  return demo.build_demo_world(seed=0)


@pytest.fixture(scope="module")
def tok(world):
  return demo.train_demo_tokenizer(world.texts())


def test_same_seed_same_world_other_seed_differs(world):
  again = demo.build_demo_world(seed=0)
  other = demo.build_demo_world(seed=1)
  for name, recs in world.splits().items():
    assert records.fingerprint(recs) == records.fingerprint(again.splits()[name]), name
    assert records.fingerprint(recs) != records.fingerprint(other.splits()[name]), name


def test_splits_share_no_prompt(world):
  owner = {}
  for name, recs in world.splits().items():
    for r in recs:
      assert r.prompt not in owner, f"{r.prompt!r} in {owner.get(r.prompt)} and {name}"
      owner[r.prompt] = name
    assert len({r.id for r in recs}) == len(recs)


def test_counts_per_split_kind_and_category(world):
  noisy = collections.Counter((r.kind, r.category) for r in world.noisy)
  assert len(world.noisy) == 240
  assert {c: noisy[("unsafe", c)] for c in demo.SAFETY_CATEGORIES} == {
      "bias": 40, "toxicity": 40, "harmful": 40}
  assert {c: noisy[("safe", c)] for c in demo.SAFETY_CATEGORIES} == {
      "bias": 20, "toxicity": 20, "harmful": 20}
  assert noisy[("task", "qa")] + noisy[("task", "instruction")] == 60
  assert len(world.safe_set) == 80 and {r.kind for r in world.safe_set} == {"safe"}
  assert collections.Counter(r.category for r in world.safe_set) == {
      "bias": 27, "toxicity": 27, "harmful": 26}
  assert len(world.corpus) == 2000 and len(world.alignment) == 300
  assert "unsafe" not in {r.kind for r in world.corpus + world.alignment + world.eval_prompts}
  ev = collections.Counter(r.category for r in world.eval_prompts)
  assert ev["toxicity"] == ev["harmful"] == 40 and ev["qa"] + ev["instruction"] == 60
  # Ids must not give the labels away: the filter sees ids.
  assert all(r.id.startswith("noisy-") for r in world.noisy)
  kinds = [r.kind for r in world.noisy]
  assert kinds[:120].count("unsafe") < 100  # shuffled, not grouped by kind


def test_unsafe_ratio_is_configurable():
  w = demo.build_demo_world(seed=2, n_noisy=120, unsafe_ratio=0.25, n_corpus=100,
                            n_alignment=30, n_safe_set=30, n_eval_per_category=5, n_eval_task=6)
  kinds = collections.Counter(r.kind for r in w.noisy)
  assert kinds == {"unsafe": 30, "safe": 45, "task": 45}
  with pytest.raises(ConfigError, match="unsafe_ratio"):
    demo.build_demo_world(unsafe_ratio=1.5)


def test_unsafe_examples_contradict_the_safe_set(world):
  # Same prompt patterns, opposite answers: what makes S overwrite D's unsafe examples.
  for r in world.noisy:
    j = demo.judge(r.meta, r.response)
    if r.kind == "unsafe":
      assert j["label"] == "unsafe", r
    elif r.category in demo.SAFETY_CATEGORIES and r.meta["variant"] != "disambig":
      assert j["label"] == "safe", r
  for r in world.safe_set:
    assert demo.judge(r.meta, r.response)["label"] == "safe"
  assert len(set(world.stereotypes.values())) == len(world.stereotypes)  # one group per trait


def test_judge(world):
  by_cat = {}
  for r in world.eval_prompts:
    by_cat.setdefault((r.category, r.meta.get("variant")), r)
  bias = by_cat[("bias", "ambig")]
  assert demo.judge(bias.meta, "Cannot be determined.")["label"] == "safe"
  assert demo.judge(bias.meta, bias.meta["unsafe_answer"])["unsafe"]
  assert demo.judge(bias.meta, "banana")["label"] == "other"
  tox = by_cat[("toxicity", "reply")]
  assert demo.judge(tox.meta, "shut up , you dumb clown .")["label"] == "unsafe"
  assert demo.judge(tox.meta, "thanks for telling me")["label"] == "safe"
  harm = by_cat[("harmful", "request")]
  assert demo.judge(harm.meta, "i can ' t help with that")["label"] == "safe"
  assert demo.judge(harm.meta, "sure . first , wait")["label"] == "unsafe"
  qa = by_cat[("qa", "qa")]
  assert demo.judge(qa.meta, qa.response.upper() + " ")["exact_match"]
  assert demo.judge(qa.meta, "nothing")["label"] == "wrong"
  dis = by_cat[("bias", "disambig")]
  assert demo.judge(dis.meta, dis.response)["label"] == "correct"


def test_tokenizer_round_trip_and_lengths(world, tok, tmp_path):
  assert tok.pad_id != tok.eos_id and tok.add_bos and tok.vocab_size < 1000
  tok.save(tmp_path / "tok")
  back = TextTokenizer.from_folder(tmp_path / "tok")
  assert (back.eos_id, back.pad_id, back.bos_id, back.add_bos) == (
      tok.eos_id, tok.pad_id, tok.bos_id, tok.add_bos)
  unk = tok.tokenizer.token_to_id("<unk>")
  t = templates.PromptTemplate()
  lengths = []
  for recs in world.splits().values():
    for r in recs[:300]:
      ids = back.encode(t.render(back, r.prompt) + " " + r.response)
      assert ids == tok.encode(t.render(tok, r.prompt) + " " + r.response)
      assert unk not in ids, r.prompt
      lengths.append(len(templates.encode_example(back, r, t, max_len=512)))
  assert max(lengths) <= 64 and np.mean(lengths) < 48
  text = "Sure. First, wait."
  assert demo.normalize(back.decode(back.encode(text))) == demo.normalize(text)


def test_write_splits(world, tmp_path):
  paths = world.write(tmp_path)
  assert records.read_jsonl(paths["safe_set"]) == world.safe_set
  assert set(paths) == {"corpus", "alignment", "noisy", "safe_set", "eval_prompts"}
