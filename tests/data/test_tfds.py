"""`tfds://` sources for real: tiny TFDS datasets prepared in the test, read without TensorFlow.

`prepare_tfds` writes a dataset the way `tfds build` does (a `GeneratorBasedBuilder` and its
`download_and_prepare`) from rows the test gives, offline and in a fraction of a second; an
end-to-end run can use it the same way (`TFDS_DATA_DIR=<data_dir>`, `tfds://<name>:<split>`).
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ff_jax.data.formats import load_source
from ff_jax.data.sources import read_tfds
from ff_jax.errors import DataError
from tests.helpers.tfds_datasets import prepare_tfds

# A tfrecord dataset, which writing needs TensorFlow for (see its README).
TFRECORD_FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "tfds"

CHAT_TRAIN = [
    {"prompt": "What is the capital of France?", "response": "Paris.", "turn": 1},
    {"prompt": "Écris « bonjour ».", "response": "Bonjour !\nÀ bientôt.", "turn": 2},
    {"prompt": "Count to three.", "response": "One, two, three.", "turn": 3},
]
CHAT_TEST = [{"prompt": "Name a prime.", "response": "Seven.", "turn": 1}]
CHAT_FEATURES = {"prompt": tfds.features.Text(), "response": tfds.features.Text(), "turn": np.int64}

# Other feature names (mapped with a column map), stored in TFDS's default hashed order. Scores are
# exact in float32, so the rows read back equal these dicts.
QA_TRAIN = [
    {"qid": f"q{i}", "question": f"Question {i}?", "answer": f"Answer {i}.",
     "tags": ["t", f"n{i}"][: 1 + i % 2], "score": i / 4, "info": {"site": "s", "votes": i}}
    for i in range(6)
]
QA_FEATURES = {
    "qid": tfds.features.Text(), "question": tfds.features.Text(), "answer": tfds.features.Text(),
    "tags": tfds.features.Sequence(tfds.features.Text()), "score": np.float32,
    "info": {"site": tfds.features.Text(), "votes": np.int64},
}
QA_COLUMNS = {"prompt": "question", "response": "answer", "id": "qid"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
  root = tmp_path_factory.mktemp("tfds")
  prepare_tfds(root, "tiny_chat", {"train": CHAT_TRAIN, "test": CHAT_TEST}, CHAT_FEATURES)
  prepare_tfds(root, "tiny_chat_parquet", {"train": CHAT_TRAIN}, CHAT_FEATURES,
               file_format="parquet")
  prepare_tfds(root, "qa_pairs", {"train": QA_TRAIN}, QA_FEATURES, shuffled=True)
  prepare_tfds(root, "binary_rows",
               {"train": [{"prompt": "p", "response": "r", "blob": blob} for blob in
                          (b"fine", b"\xff\xfe", b"")]},
               {"prompt": tfds.features.Text(), "response": tfds.features.Text(),
                "blob": tfds.features.Tensor(shape=(), dtype=np.str_)})
  return root


@pytest.fixture
def tfds_env(data_dir, monkeypatch) -> Path:
  # Set after tensorflow_datasets was imported: ff_jax must read it at each call.
  monkeypatch.setenv("TFDS_DATA_DIR", str(data_dir))
  return data_dir


def test_rows_and_records_in_order_from_tfds_data_dir(tfds_env, tmp_path):
  source = load_source("tfds://tiny_chat:train")
  records = source.records
  assert [(r.prompt, r.response) for r in records] == [(row["prompt"], row["response"])
                                                       for row in CHAT_TRAIN]
  assert [r.meta for r in records] == [{"turn": row["turn"]} for row in CHAT_TRAIN]
  assert {r.source for r in records} == {"tfds:tiny_chat"}
  # The same rows get the same ids from TFDS as from a JSONL file (ids derive from the content).
  jsonl = tmp_path / "chat.jsonl"
  jsonl.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in CHAT_TRAIN))
  assert [r.id for r in records] == [r.id for r in load_source(str(jsonl)).records]
  assert len({r.id for r in records}) == len(CHAT_TRAIN)
  # No split named: train. Another split: its own rows.
  assert [r.id for r in load_source("tfds://tiny_chat").records] == [r.id for r in records]
  assert [r.prompt for r in load_source("tfds://tiny_chat:test").records] == ["Name a prime."]


def test_rows_are_the_original_dicts_and_written_back_value_identical(tfds_env, tmp_path):
  rows = read_tfds("tiny_chat", "train")
  assert rows == CHAT_TRAIN
  assert all(type(row["turn"]) is int for row in rows)  # plain Python, not numpy
  source = load_source("tfds://tiny_chat:train")
  kept = {source.records[0].id, source.records[2].id}
  out = source.write_kept(tmp_path, kept)
  lines = out.read_text(encoding="utf-8").splitlines()
  assert [json.loads(line) for line in lines] == [CHAT_TRAIN[0], CHAT_TRAIN[2]]


def test_parquet_dataset_reads_the_same_rows(tfds_env):
  assert read_tfds("tiny_chat_parquet", "train") == CHAT_TRAIN


def test_column_map_ids_meta_and_tfds_stored_order(tfds_env):
  records = load_source("tfds://qa_pairs:train", columns=QA_COLUMNS).records
  # TFDS stores these rows in its hashed order: ff_jax keeps the order TFDS's own reader gives.
  stored = tfds.data_source("qa_pairs", split="train", data_dir=str(tfds_env), download=False)
  assert [r.id for r in records] == [example["qid"].decode() for example in stored]
  assert sorted(r.id for r in records) == [row["qid"] for row in QA_TRAIN]
  by_qid = {row["qid"]: row for row in QA_TRAIN}
  for record in records:
    row = by_qid[record.id]
    assert (record.prompt, record.response) == (row["question"], row["answer"])
    assert record.meta == {"tags": row["tags"], "score": row["score"], "info": row["info"]}
  assert sorted(read_tfds("qa_pairs", "train"), key=lambda row: row["qid"]) == QA_TRAIN


def test_split_slice(tfds_env):
  records = load_source("tfds://tiny_chat:train[1:]").records
  assert [r.prompt for r in records] == [row["prompt"] for row in CHAT_TRAIN[1:]]


def test_explicit_data_dir_wins_and_a_missing_dataset_names_the_dir(data_dir, monkeypatch,
                                                                      tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  monkeypatch.setenv("TFDS_DATA_DIR", str(empty))
  assert read_tfds("tiny_chat", "test", data_dir=data_dir) == CHAT_TEST
  with pytest.raises(DataError, match=rf"tfds://tiny_chat:train: no prepared TFDS dataset "
                                      rf"'tiny_chat' in {empty} .*tfds build tiny_chat"):
    load_source("tfds://tiny_chat:train")


def test_unknown_split_names_the_splits(tfds_env):
  with pytest.raises(DataError, match=r"tfds://tiny_chat:validation: no split 'validation' .*"
                                      r"splits are \['test', 'train'\]"):
    load_source("tfds://tiny_chat:validation")


def test_missing_and_unmapped_features(tfds_env):
  with pytest.raises(DataError, match=r"tfds://tiny_chat:train row 0: no feature 'question' "
                                      r"\(the column map's prompt\); the dataset's features are "
                                      r"\['prompt', 'response', 'turn'\]"):
    load_source("tfds://tiny_chat:train", columns={"prompt": "question"})
  # Without a column map, features of other names leave no prompt/response: the row names them.
  with pytest.raises(DataError, match=r"tfds://qa_pairs:train row 0: cannot tell the row's shape "
                                      r"from its columns \['answer', 'info', 'qid', 'question'"):
    load_source("tfds://qa_pairs:train")
  with pytest.raises(DataError, match=r"tfds://tiny_chat:train row 0: key 'prompt' must be a "
                                      r"string, got int"):
    load_source("tfds://tiny_chat:train", columns={"prompt": "turn"})


def test_a_feature_that_is_not_utf8_text(tfds_env):
  with pytest.raises(DataError, match=r"tfds://binary_rows:train row 1: feature 'blob' is not "
                                      r"UTF-8 text \(byte 0xff at offset 0\)"):
    read_tfds("binary_rows", "train")


def test_tfrecord_dataset_is_refused_with_how_to_convert(monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(TFRECORD_FIXTURES))
  with pytest.raises(DataError, match=r"tfds://tiny_tfrecord:train: .*tiny_tfrecord/1\.0\.0 holds "
                                      r"tfrecord files, which only TensorFlow reads; .*"
                                      r"tfds convert_format"):
    load_source("tfds://tiny_tfrecord:train")


def copy_dataset(data_dir: Path, name: str, to: Path) -> Path:
  """A copy of a prepared dataset's version folder under the data_dir `to`, to damage."""
  copy = to / name / "1.0.0"
  copy.mkdir(parents=True)
  for path in (data_dir / name / "1.0.0").iterdir():
    copy.joinpath(path.name).write_bytes(path.read_bytes())
  return copy


def test_a_truncated_record_file(data_dir, tmp_path):
  shard = next(copy_dataset(data_dir, "tiny_chat", tmp_path).glob("tiny_chat-train.array_record-*"))
  shard.write_bytes(shard.read_bytes()[:100])
  with pytest.raises(DataError, match=r"tfds://tiny_chat:train row 0: cannot read it from .*"
                                      r"prepare the dataset again"):
    read_tfds("tiny_chat", "train", data_dir=tmp_path)


def test_a_corrupt_dataset_info(data_dir, tmp_path):
  copy_dataset(data_dir, "tiny_chat", tmp_path).joinpath("dataset_info.json").write_text("{oops")
  with pytest.raises(DataError, match=rf"tfds://tiny_chat:train: cannot open the TFDS dataset in "
                                      rf"{tmp_path} \(ParseError"):
    read_tfds("tiny_chat", "train", data_dir=tmp_path)


def test_without_tensorflow_datasets(monkeypatch):
  # None in sys.modules makes the import fail, as when the package is not installed.
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(DataError, match=r"tfds://tiny_chat:train: .*needs the optional "
                                      r"`tensorflow_datasets` package .*ff_jax\[tfds\]"):
    read_tfds("tiny_chat", "train")
