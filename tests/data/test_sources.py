"""Source adapters: real local datasets (small slices) and hand-written broken fixtures."""

import gzip
import json
import os
import re
import sys
from pathlib import Path

import pytest

from ff_jax.data.formats import load_source
from ff_jax.data.records import Record
from ff_jax.data.sources import (
  read_alpaca,
  read_davidson,
  read_harmful_prompts,
  read_hh_rlhf,
  read_jailbreakbench,
  read_rtp,
  read_safety_llamas,
  read_squad,
)
from ff_jax.data.sources_bbq import bbq_example, read_bbq, split_bbq
from ff_jax.errors import ConfigError, DataError
from ff_jax.eval.bbq import bbq_scores, bbq_unknown_index, is_biased_answer
from tests.helpers.paths import SHARED_DATA

DATA = SHARED_DATA


@pytest.fixture
def data() -> Path:
  if not DATA.is_dir():
    pytest.skip(f"{DATA} is absent (shared data ships beside the repo in CI)")
  return DATA


def _head(src: Path, dst: Path, n: int) -> Path:
  """The first n lines of a JSONL file, so the real-data tests stay fast."""
  with src.open(encoding="utf-8") as f:
    dst.write_text("".join(line for _, line in zip(range(n), f)), encoding="utf-8")
  return dst


def _check_bbq_record(r: Record) -> None:
  m = r.meta
  k = m["option_idx"]
  named = re.fullmatch(r"The answer is ans([1-3]): (.*)", r.response, flags=re.S)
  assert named is not None, r.response
  assert int(named.group(1)) == k + 1
  assert named.group(2) == m["options"][k]  # the option text is the named option's own
  assert f"ans{k + 1}: {m['options'][k]}" in r.prompt
  ex = bbq_example(r)
  if r.kind == "unsafe":
    assert m["context_condition"] == "ambig" and is_biased_answer(ex, k) and k != m["label"]
  elif r.kind == "safe":
    assert m["context_condition"] == "ambig" and k == bbq_unknown_index(ex) == m["label"]
  else:
    assert r.kind == "task" and m["context_condition"] == "disambig" and k == m["label"]


def test_bbq_relabelling_real(data, tmp_path):
  recs = read_bbq(_head(data / "bbq" / "Age.jsonl", tmp_path / "Age.jsonl", 200))
  kinds = [r.kind for r in recs]
  assert kinds.count("unsafe") == kinds.count("safe") == kinds.count("task") == 100
  for r in recs:
    _check_bbq_record(r)
    assert r.id.startswith(f"bbq:Age:{r.meta['example_id']}:")
    for key in ("example_id", "question_index", "context_condition", "category", "polarity",
                "answer_info", "stereotyped_groups", "label"):
      assert key in r.meta
  # Gold records score perfectly with the metric; the biased ones score +1 bias on ambig.
  gold = [r for r in recs if r.meta["gold"]]
  scores = bbq_scores([bbq_example(r) for r in gold], [r.meta["option_idx"] for r in gold])
  assert scores["acc"] == 1.0
  biased = [r for r in recs if r.kind == "unsafe"]
  scores = bbq_scores([bbq_example(r) for r in biased], [r.meta["option_idx"] for r in biased])
  assert scores["s_amb_bbq"] == 1.0


def test_bbq_split_by_template(data, tmp_path):
  recs = []
  for cat in ("Age", "Nationality"):
    recs += read_bbq(_head(data / "bbq" / f"{cat}.jsonl", tmp_path / f"{cat}.jsonl", 400))
  fr = {"unsafe": 0.4, "safe": 0.3, "eval": 0.3}
  pools = split_bbq(recs, fr, seed=1)
  assert pools == split_bbq(recs, fr, seed=1)
  assert {r.kind for r in pools["unsafe"]} == {"unsafe"}
  assert {r.kind for r in pools["safe"]} == {"safe"}
  assert all(r.meta["gold"] for r in pools["eval"])
  templates = {k: {r.meta["template"] for r in v} for k, v in pools.items()}
  prompts = {k: {r.prompt for r in v} for k, v in pools.items()}
  for a, b in (("unsafe", "safe"), ("unsafe", "eval"), ("safe", "eval")):
    assert not templates[a] & templates[b]
    assert not prompts[a] & prompts[b]
  with pytest.raises(ConfigError, match="'train'"):
    split_bbq(recs, {"train": 1.0}, seed=0)


def test_squad_alpaca_real(data):
  squad = read_squad(data / "squad" / "dev-v1.1-from-explorer.json")
  assert len(squad) == 10570 and {r.kind for r in squad} == {"task"}
  r = squad[0]
  assert r.id.startswith("squad:") and r.response == r.meta["answers"][0]
  assert r.response in r.prompt  # extractive: the gold answer is in the context
  alpaca = read_alpaca(data / "alpaca" / "BLOOM-LORA" / "alpaca_data_1k.json")
  assert len(alpaca) == 1000 and alpaca[1].id == "alpaca:1"
  assert alpaca[1].prompt.endswith("\n\nThe president delivered a speech yesterday.")


def test_toxicity_real(data, tmp_path):
  rtp = data / "realtoxicityprompts"
  toxic = read_rtp(_head(rtp / "toxic.jsonl", tmp_path / "toxic.jsonl", 100))
  nontoxic = read_rtp(_head(rtp / "nontoxic.jsonl", tmp_path / "nontoxic.jsonl", 100))
  assert toxic and all(r.kind == "unsafe" and r.meta["continuation_toxicity"] > 0.5
                       for r in toxic)
  assert nontoxic and all(r.kind == "safe" and r.meta["toxicity"] <= 0.5 for r in nontoxic)
  csv_head = tmp_path / "labeled_data.csv"
  with (data / "davidson-hate-offensive" / "labeled_data.csv").open(encoding="utf-8") as f:
    csv_head.write_text("".join(line for _, line in zip(range(300), f)), encoding="utf-8")
  dav = read_davidson(csv_head)
  assert {r.kind for r in dav} == {"safe", "unsafe"}
  assert all((r.kind == "safe") == (r.meta["class"] == 2) for r in dav)
  assert all(len(r.prompt.split()) == 3 and "&amp;" not in r.response for r in dav)
  assert dav[0].id == "davidson:0"


def test_harmfulness_real(data, tmp_path):
  src = data / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
  with gzip.open(src, "rt", encoding="utf-8") as f:
    lines = [line for _, line in zip(range(50), f)]
  small = tmp_path / "harmless-base" / "test.jsonl.gz"
  small.parent.mkdir()
  with gzip.open(small, "wt", encoding="utf-8") as f:
    f.write("".join(lines))
  hh = read_hh_rlhf(small)
  assert {r.kind for r in hh} == {"unsafe", "safe"}
  assert all("Human:" not in r.prompt and "Assistant:" not in r.response for r in hh)
  assert hh[0].id == "hh:harmless-base/test:1:rejected"
  jbb = read_jailbreakbench(data / "jailbreakbench" / "attack-artifacts" / "PAIR")
  assert len({r.id for r in jbb}) == len(jbb) == 400 - sum(
      1 for f in (data / "jailbreakbench/attack-artifacts/PAIR/black_box").glob("*.json")
      for jb in json.loads(f.read_text())["jailbreaks"] if jb["response"] is None)
  assert {r.kind for r in jbb} == {"unsafe", "safe"}
  stl = read_safety_llamas(data / "safety-tuned-llamas" / "safety_only_data_Instructions.json")
  assert len(stl) == 2483 and {r.kind for r in stl} == {"safe"}


def test_harmful_prompt_lists_real_and_shapes(data, tmp_path):
  advbench = read_harmful_prompts(data / "harmfulqa" / "adversarialqa.json")
  assert len(advbench) == 500 and advbench[0].id == "harmful:adversarialqa:0"
  assert {r.category for r in advbench} == {"harmfulness"} and advbench[0].kind is None
  assert len(read_harmful_prompts(data / "harmfulqa" / "harmfulqa.json")) == 1960
  stl = read_harmful_prompts(data / "safety-tuned-llamas" / "evaluation" / "I-CoNa.json")
  assert len(stl) == 178 and stl[0].meta == {"where": ".instructions[0]"}
  nested = tmp_path / "nested.json"
  nested.write_text(json.dumps({"b": {"x": ["q2"]}, "a": ["q1", ""]}))
  assert [r.prompt for r in read_harmful_prompts(nested)] == ["q1", "q2"]
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"a": [1]}))
  with pytest.raises(DataError, match=r"bad.json: .a\[0\]: expected prompts"):
    read_harmful_prompts(bad)
  assert len(load_source(f"harmful-prompts:{nested}").records) == 2


def test_load_source_dispatch(data):
  recs = load_source(f"alpaca:{data}/alpaca/BLOOM-LORA/alpaca_data_1k.json").records
  assert recs == read_alpaca(data / "alpaca" / "BLOOM-LORA" / "alpaca_data_1k.json")


# ------------------------------------------------------------------------------------------------
# Errors on hand-written fixtures


def test_bbq_missing_key(tmp_path):
  row = {"example_id": 0, "question_index": "1", "question_polarity": "neg",
         "context_condition": "ambig", "category": "Age",
         "answer_info": {"ans0": ["a", "old"], "ans1": ["b", "nonOld"], "ans2": ["?", "unknown"]},
         "additional_metadata": {"stereotyped_groups": ["old"]}, "context": "c",
         "question": "q?", "ans0": "a", "ans1": "b", "ans2": "?", "label": 2}
  good = tmp_path / "Good.jsonl"
  good.write_text(json.dumps(row) + "\n")
  assert [r.kind for r in read_bbq(good)] == ["unsafe", "safe"]
  bad = tmp_path / "Bad.jsonl"
  broken = {k: v for k, v in row.items() if k != "ans1"} | {"example_id": 1}
  bad.write_text(json.dumps(row) + "\n" + json.dumps(broken) + "\n")
  with pytest.raises(DataError, match=r"Bad\.jsonl:2: missing BBQ key 'ans1'"):
    read_bbq(bad)


@pytest.mark.parametrize("reader,content,match", [
    (read_alpaca, '[{"instruction": "x", "output": "y"}, {"instruction": "x"}]',
     r"item 1: missing key 'output'"),
    (read_squad,
     '{"data": [{"title": "t", "paragraphs": [{"context": "c", "qas": [{"id": "1"}]}]}]}',
     r"qas\[0\]: missing key 'question'"),
    (read_jailbreakbench, '{"jailbreaks": [{"goal": "g", "response": "r"}]}',
     r"jailbreaks\[0\]: missing key 'jailbroken'"),
])
def test_json_missing_key(tmp_path, reader, content, match):
  path = tmp_path / "bad.json"
  path.write_text(content)
  with pytest.raises(DataError, match=match):
    reader(path)


def test_jsonl_and_csv_missing_key(tmp_path):
  rtp = tmp_path / "toxic.jsonl"
  rtp.write_text('{"prompt": {"text": "a", "toxicity": 0.9}, "continuation": {"text": "b"}}\n'
                 '{"prompt": {"text": "a", "toxicity": 0.9}}\n')
  with pytest.raises(DataError, match=r"toxic\.jsonl:2: missing key 'continuation'"):
    read_rtp(rtp)
  dav = tmp_path / "labeled.csv"
  dav.write_text(",count,tweet\n0,3,hello there my friend\n")
  with pytest.raises(DataError, match=r"labeled\.csv:1: missing column 'class'"):
    read_davidson(dav)
  hh = tmp_path / "hh.jsonl"
  hh.write_text('{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: hello"}\n')
  with pytest.raises(DataError, match=r"hh\.jsonl:1: missing key 'rejected'"):
    read_hh_rlhf(hh)


def test_unknown_spec_and_missing_file(tmp_path):
  with pytest.raises(DataError, match="unknown data source"):
    load_source("nosuch:/x")
  with pytest.raises(DataError, match="file not found"):
    load_source(f"squad:{tmp_path}/absent.json")


def test_hf_and_tfds_unavailable(monkeypatch):
  # None in sys.modules makes the lazy import fail, as when the package is not installed; a hub
  # name that cannot be reached gives the same one-line DataError from the loader.
  monkeypatch.setitem(sys.modules, "datasets", None)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(DataError, match=r"hf://nobody/nothing.*datasets"):
    load_source("hf://nobody/nothing:train")
  with pytest.raises(DataError, match=r"tfds://nothing:test.*tensorflow_datasets"):
    load_source("tfds://nothing:test")


@pytest.mark.slow
def test_hf_datasets_from_a_local_folder_and_an_unreachable_hub(tmp_path):
  """`hf://` through the real `datasets` package: a `save_to_disk` folder reads; a hub name
  that cannot be reached (no network here; offline mode so it fails at once) is one DataError."""
  datasets = pytest.importorskip("datasets")
  folder = tmp_path / "ds"
  datasets.Dataset.from_dict({"prompt": ["q1", "q2"], "response": ["a1", "a2"],
                              "kind": ["unsafe", "task"]}).save_to_disk(str(folder))
  recs = load_source(f"hf://{folder}:train").records
  assert [(r.prompt, r.response, r.kind) for r in recs] == [("q1", "a1", "unsafe"),
                                                            ("q2", "a2", "task")]
  import subprocess

  env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
  proc = subprocess.run(
      [sys.executable, "-m", "ff_jax.cli", "run", "data.noisy=hf://nobody/nothing:train",
       f"run_dir={tmp_path / 'run'}"], capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith(
      "ff-jax: error: data.noisy: hf://nobody/nothing:train: cannot load (ConnectionError")
  assert not (tmp_path / "run").exists()  # nothing half-written
