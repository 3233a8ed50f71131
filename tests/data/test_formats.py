"""The source resolver (`ff_jax.data.formats`): every reader, row shape, column map, derived ids,
the kept rows written back in the input's own format, and one-line errors on bad bytes."""

import dataclasses
import gzip
import hashlib
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ff_jax.data import formats
from ff_jax.data.demo import train_demo_tokenizer
from ff_jax.data.formats import load_source
from ff_jax.data.hf_data import HfSpec, parse_hf_spec
from ff_jax.data.rows import with_cue
from ff_jax.data.templates import PromptTemplate, encode_example, flattening_warning
from ff_jax.errors import ConfigError, DataError

ROWS = [
    {"id": "a", "prompt": "What is two plus two?", "response": "Four.", "kind": "task"},
    {"id": "b", "prompt": "Insult me.", "response": "You are a fool.", "kind": "unsafe"},
    {"id": "c", "prompt": "Name a colour.", "response": "Blue, with a comma, and \"quotes\"."},
]


def _kept_bytes(source, tmp_path, ids) -> bytes:
  return source.write_kept(tmp_path / "out", ids).read_bytes()


# --------------------------------------------------------------------------------------- JSONL


def test_jsonl_lines_come_back_byte_identical(tmp_path):
  lines = [json.dumps(ROWS[0]) + "\r\n", "\n", json.dumps(ROWS[1], indent=None) + "\n",
           json.dumps(ROWS[2], ensure_ascii=False)]  # CRLF, a blank line, no final newline
  path = tmp_path / "d.jsonl"
  path.write_bytes("".join(lines).encode())
  source = load_source(path)
  assert [r.id for r in source.records] == ["a", "b", "c"]
  assert source.records[1].kind == "unsafe" and source.records[2].kind is None
  out = source.write_kept(tmp_path / "out", {"a", "c"})
  assert out.name == "filtered.jsonl"
  assert out.read_bytes() == (lines[0] + lines[3]).encode()


def test_gzipped_jsonl_comes_back_gzipped_with_the_same_lines(tmp_path):
  text = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
  path = tmp_path / "d.jsonl.gz"
  path.write_bytes(gzip.compress(text))
  source = load_source(path)
  out = source.write_kept(tmp_path / "out", {"b", "c"})
  assert out.name == "filtered.jsonl.gz"
  assert gzip.decompress(out.read_bytes()) == b"".join(text.splitlines(keepends=True)[1:])


def test_truncated_gzip_is_one_error_naming_the_file_and_line(tmp_path):
  text = "".join(json.dumps({**ROWS[0], "id": f"r{i}"}) + "\n" for i in range(2000)).encode()
  path = tmp_path / "cut.jsonl.gz"
  path.write_bytes(gzip.compress(text)[:-200])
  with pytest.raises(DataError, match=r"cut\.jsonl\.gz:\d+: cannot read the file after line "
                                      r"\d+: corrupt or truncated"):
    load_source(path)
  path.write_bytes(b"not gzip at all")
  with pytest.raises(DataError, match=r"cut\.jsonl\.gz:1: .*corrupt or truncated"):
    load_source(path)


def test_a_line_that_is_not_utf8_names_file_line_and_column(tmp_path):
  path = tmp_path / "latin.jsonl"
  path.write_bytes(json.dumps(ROWS[0]).encode() + b'\n{"id": "x", "prompt": "caf\xe9"}\n')
  with pytest.raises(DataError, match=r"latin\.jsonl:2: not UTF-8 \(byte 0xe9 at column 27\)"):
    load_source(path)
  csv_path = tmp_path / "latin.csv"
  csv_path.write_bytes(b"prompt,response\nq,a\nq2,caf\xe9\n")
  with pytest.raises(DataError, match=r"latin\.csv:3: not UTF-8 \(byte 0xe9 at column 7\)"):
    load_source(csv_path)


# ---------------------------------------------------------------------------------- row shapes


def test_trl_messages_single_turn_and_conversations(tmp_path):
  rows = [
      {"messages": [{"role": "user", "content": "Hi?"},
                    {"role": "assistant", "content": "Hello."}]},
      {"messages": [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                    {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}],
       "kind": "safe", "lang": "en"},
  ]
  path = tmp_path / "chat.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  single, multi = load_source(path).records
  assert (single.prompt, single.response, single.meta) == ("Hi?", "Hello.", {})
  assert multi.prompt == "System: Be brief.\n\nUser: Q1\n\nAssistant: A1\n\nUser: Q2"
  assert multi.response == "A2" and multi.kind == "safe"
  assert multi.meta == {"lang": "en", "prompt_messages": rows[1]["messages"][:-1]}

  path.write_text(json.dumps({"messages": [{"role": "assistant", "content": "A"},
                                           {"role": "user", "content": "Q"}]}) + "\n")
  with pytest.raises(DataError, match=r"chat\.jsonl:1: messages must end with an assistant turn"):
    load_source(path)


def test_chat_template_renders_the_real_conversation():
  tok = train_demo_tokenizer(["System : Be brief . User Q1 A1 Q2 A2 Hi"], vocab_size=120)
  tok = dataclasses.replace(tok, chat_template=(
      "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
      "{% if add_generation_prompt %}<assistant>{% endif %}"))
  chat, plain = PromptTemplate("chat"), PromptTemplate("raw")
  turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
           {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]
  assert chat.render(tok, "ignored", turns) == (
      "<system>Be brief.\n<user>Q1\n<assistant>A1\n<user>Q2\n<assistant>")
  assert chat.render(tok, "Hi") == "<user>Hi\n<assistant>"
  assert plain.render(tok, "the transcript", turns) == "the transcript"
  # A system prompt of the template goes first only where the conversation has none.
  with_system = PromptTemplate("chat", system="S")
  assert with_system.render(tok, "Hi").startswith("<system>S\n<user>Hi")
  assert with_system.render(tok, "x", turns).startswith("<system>Be brief.\n<user>Q1")


def _role_tags_tokenizer():
  tok = train_demo_tokenizer(["System : Be brief . User Q1 A1 Q2 A2 Hi cue"], vocab_size=120)
  return dataclasses.replace(tok, chat_template=(
      "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
      "{% if add_generation_prompt %}<assistant>{% endif %}"))


def test_a_cue_goes_into_the_last_user_turn_of_a_multi_turn_record(tmp_path):
  """Self-correction on a conversation: the chat template shows the cue at the end of the last
  user turn (not lost with the transcript), the raw template at the end of the transcript."""
  path = tmp_path / "chat.jsonl"
  turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
           {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]
  rows = [{"messages": [{"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello."}]},
          {"messages": [*turns, {"role": "assistant", "content": "A2"}]}]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  single, multi = load_source(path).records
  tok, chat, raw = _role_tags_tokenizer(), PromptTemplate("chat"), PromptTemplate("raw")

  def rendered(template, record):
    return template.render(tok, record.prompt, record.meta.get("prompt_messages"))

  cued = with_cue(multi, "CUE")
  assert rendered(chat, cued) == (
      "<system>Be brief.\n<user>Q1\n<assistant>A1\n<user>Q2\nCUE\n<assistant>")
  assert rendered(raw, cued) == rendered(raw, multi) + "\nCUE"
  assert multi.meta["prompt_messages"] == turns  # the original record is left alone
  assert rendered(chat, with_cue(single, "CUE")) == "<user>Hi\nCUE\n<assistant>"
  assert rendered(raw, with_cue(single, "CUE")) == "Hi\nCUE"
  # No user turn at all: the cue becomes one.
  system_only = dataclasses.replace(multi, meta={"prompt_messages": turns[:1]})
  assert rendered(chat, with_cue(system_only, "CUE")) == (
      "<system>Be brief.\n<user>CUE\n<assistant>")


def test_conversational_rows_are_counted_and_the_flattening_is_one_warning(tmp_path):
  rows = [{"messages": [{"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello."}]},
          {"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                        {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]}]
  path = tmp_path / "chat.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert load_source(path).conversations == 2
  pc = tmp_path / "pc.jsonl"
  pc.write_text(json.dumps({"prompt": [{"role": "user", "content": "Q"}],
                            "completion": [{"role": "assistant", "content": "A"}]}) + "\n" +
                json.dumps({"prompt": "Q2", "completion": "A2"}) + "\n")
  assert load_source(pc).conversations == 1  # the string row is no conversation
  plain = tmp_path / "plain.jsonl"
  plain.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
  assert load_source(plain).conversations == 0

  counts = {"data.noisy": (2, 1), "data.safe": (0, 0)}
  line = flattening_warning(counts, "raw")
  assert "\n" not in line and line.startswith("warning: conversational rows")
  assert "data.noisy 2 (1 flattened" in line and "data.safe" not in line
  assert "data.template=raw" in line and "data.template=chat keeps them" in line
  assert flattening_warning(counts, "chat") is None
  assert flattening_warning({"data.noisy": (0, 0)}, "plain") is None


def test_encoding_a_conversation_record_uses_its_turns(tmp_path):
  tok = train_demo_tokenizer(["q1 a1 q2 a2 user assistant"], vocab_size=80)
  tok = dataclasses.replace(tok, chat_template=(
      "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
      "{% if add_generation_prompt %}assistant {% endif %}"))
  path = tmp_path / "chat.jsonl"
  path.write_text(json.dumps({"id": "x", "messages": [
      {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
      {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}) + "\n")
  record = load_source(path).records[0]
  example = encode_example(tok, record, PromptTemplate("chat"), max_len=64)
  prompt = tok.decode(example.tokens[:example.prompt_len].tolist())
  assert prompt.split() == ["user", "q1", "assistant", "a1", "user", "q2", "assistant"]


def test_trl_prompt_completion_strings_and_conversational(tmp_path):
  path = tmp_path / "pc.jsonl"
  path.write_text(json.dumps({"prompt": "The sky is", "completion": " blue."}) + "\n")
  record = load_source(path).records[0]
  assert (record.prompt, record.response) == ("The sky is", " blue.")
  path.write_text(json.dumps({
      "prompt": [{"role": "user", "content": "Colour of the sky?"}],
      "completion": [{"role": "assistant", "content": "Blue."}]}) + "\n")
  record = load_source(path).records[0]
  assert (record.prompt, record.response, record.meta) == ("Colour of the sky?", "Blue.", {})
  path.write_text(json.dumps({"prompt": "x", "completion": [{"role": "assistant",
                                                              "content": "y"}]}) + "\n")
  with pytest.raises(DataError, match="both be strings or both lists"):
    load_source(path)


def test_a_mixed_file_names_the_row_and_the_first_row(tmp_path):
  path = tmp_path / "mixed.jsonl"
  path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"prompt": "p", "completion": "c"})
                  + "\n")
  with pytest.raises(DataError, match=r"mixed\.jsonl:2: a completion row in a table of schema "
                                      r"rows \(the first row, .*mixed\.jsonl:1, decides\)"):
    load_source(path)
  path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
  with pytest.raises(DataError, match=r"mixed\.jsonl:1: cannot tell the row's shape.*"
                                      r"data\.columns"):
    load_source(path)
  with pytest.raises(DataError, match=r"data\.columns names \['qq'\], which it lacks"):
    load_source(path, {"prompt": "qq", "response": "answer"})
  path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"id": "x", "prompt": "p"}) + "\n")
  with pytest.raises(DataError, match=r"mixed\.jsonl:2: missing required key 'response' \(a "
                                      r"table of schema rows"):
    load_source(path)


# --------------------------------------------------------------------------- column map and ids


def test_csv_with_a_column_map_comes_back_byte_identical(tmp_path):
  path = tmp_path / "d.csv"
  raw = ('\ufeffqid,question,answer,prompt,kind\r\n'
         'q1,"Two, plus\r\ntwo?",Four,old,task\r\n'
         'q2,Insult me.,"You ""fool"".",old,unsafe\r\n'
         '\r\n'
         'q3,Colour?,Blue,old,\r\n')
  path.write_bytes(raw.encode())
  source = load_source(path, {"prompt": "question", "response": "answer", "id": "qid"})
  assert [(r.id, r.prompt, r.response, r.kind) for r in source.records] == [
      ("q1", "Two, plus\r\ntwo?", "Four", "task"), ("q2", "Insult me.", 'You "fool".', "unsafe"),
      ("q3", "Colour?", "Blue", None)]
  assert source.records[0].meta == {"prompt": "old"}  # the shadowed column is kept
  out = source.write_kept(tmp_path / "out", {"q1", "q3"})
  assert out.name == "filtered.csv"
  lines = raw.encode().split(b"\r\n")
  assert out.read_bytes() == b"\r\n".join([lines[0], lines[1], lines[2], lines[5], b""])


def test_csv_rows_with_the_wrong_number_of_cells(tmp_path):
  path = tmp_path / "d.csv"
  path.write_text("prompt,response\nq,a\nq,a,extra\n")
  with pytest.raises(DataError, match=r"d\.csv:3: more cells than header columns"):
    load_source(path)
  path.write_text("prompt,response\nq\n")
  with pytest.raises(DataError, match=r"d\.csv:2: fewer cells than header columns"):
    load_source(path)


def test_bad_column_maps_are_config_errors(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text(json.dumps(ROWS[0]) + "\n")
  with pytest.raises(ConfigError, match="data.columns.question: not a key"):
    load_source(path, {"question": "prompt"})
  with pytest.raises(ConfigError, match="column 'q' is mapped to two keys"):
    load_source(path, {"prompt": "q", "response": "q"})
  with pytest.raises(ConfigError, match="data.columns: expected a mapping"):
    load_source(path, "prompt")


def test_derived_ids_are_content_hashes_with_a_suffix_for_duplicates(tmp_path):
  rows = [{"prompt": "p1", "response": "r1"}, {"prompt": "p2", "response": "r2"},
          {"prompt": "p1", "response": "r1"}]
  path = tmp_path / "d.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  ids = [r.id for r in load_source(path).records]
  digest = hashlib.sha256(b'{"prompt":"p1","response":"r1"}').hexdigest()[:16]
  assert ids[0] == digest and ids[2] == f"{digest}-2" and len(set(ids)) == 3
  # Stable: the same rows in another order (and another format) keep their ids.
  path.write_text("".join(json.dumps(r) + "\n" for r in rows[::-1]))
  assert {r.id for r in load_source(path).records} == set(ids)
  csv_path = tmp_path / "d.csv"
  csv_path.write_text("response,prompt\nr2,p2\n")
  assert load_source(csv_path).records[0].id == ids[1]


def test_duplicate_given_ids_name_both_rows(tmp_path):
  path = tmp_path / "d.csv"
  path.write_text("id,prompt,response\n7,a,b\n7,c,d\n")
  with pytest.raises(DataError, match=r"d\.csv:3: duplicate id '7' \(first seen at .*d\.csv:2\)"):
    load_source(path)


# --------------------------------------------------------------------------- parquet, HF, TFDS


def _parquet(path: Path, row_group_size: int = 2) -> pa.Table:
  table = pa.table({"qid": pa.array([10, 11, 12], pa.int64()),
                    "question": ["q0", "q1", "q2"], "answer": ["a0", "a1", "a2"],
                    "score": pa.array([0.5, None, 1.5], pa.float32())})
  table = table.replace_schema_metadata({"origin": "test"})
  pq.write_table(table, path, row_group_size=row_group_size)
  return table


def test_parquet_rows_come_back_value_identical_with_the_schema(tmp_path):
  path = tmp_path / "d.parquet"
  table = _parquet(path)
  source = load_source(path, {"id": "qid", "prompt": "question", "response": "answer"})
  assert [(r.id, r.prompt, r.meta) for r in source.records] == [
      ("10", "q0", {"score": 0.5}), ("11", "q1", {"score": None}), ("12", "q2", {"score": 1.5})]
  out = source.write_kept(tmp_path / "out", {"10", "12"})
  assert out.name == "filtered.parquet"
  back = pq.read_table(out)
  assert back.schema == table.schema and back.schema.metadata == table.schema.metadata
  assert back.to_pylist() == [table.to_pylist()[0], table.to_pylist()[2]]


def test_truncated_and_corrupt_parquet_are_one_error(tmp_path):
  path = tmp_path / "d.parquet"
  _parquet(path)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(DataError, match=r"d\.parquet: not a readable parquet file, truncated"):
    load_source(path, {"prompt": "question", "response": "answer"})
  # Damage the second row group's data pages, not the footer: the rows are named.
  column = pq.ParquetFile(io.BytesIO(data)).metadata.row_group(1).column(1)
  start, size = column.data_page_offset, column.total_compressed_size
  broken = bytearray(data)
  broken[start:start + size] = b"\xff" * size
  path.write_bytes(bytes(broken))
  with pytest.raises(DataError, match=r"d\.parquet: rows 2\.\.2 \(row group 1\) cannot be read"):
    load_source(path, {"prompt": "question", "response": "answer"})


def test_hf_save_to_disk_folder_comes_back_as_a_folder(tmp_path):
  datasets = pytest.importorskip("datasets")
  folder = tmp_path / "ds"
  ds = datasets.Dataset.from_dict({"prompt": ["q0", "q1", "q2"], "response": ["a0", "a1", "a2"],
                                   "n": [0, 1, 2]})
  ds.save_to_disk(str(folder))
  for spec in (str(folder), f"hf://{folder}:train"):
    source = load_source(spec)
    assert [r.meta["n"] for r in source.records] == [0, 1, 2]
    keep = {source.records[0].id, source.records[2].id}
    out = source.write_kept(tmp_path / "out", keep)
    assert out.name == "filtered" and out.is_dir()
    back = datasets.load_from_disk(str(out))
    assert back.features == ds.features and back.to_list() == ds.select([0, 2]).to_list()
  datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "dd"))
  assert len(load_source(f"hf://{tmp_path / 'dd'}:test").records) == 3
  with pytest.raises(DataError, match=r"no split 'train'; the dataset has \['test'\]"):
    load_source(str(tmp_path / "dd"))


@pytest.mark.parametrize("spec, want", [
    ("hf://heegyu/bbq", HfSpec("heegyu/bbq")),
    ("hf://heegyu/bbq/Age:test", HfSpec("heegyu/bbq", "Age", "test")),
    ("hf://heegyu/bbq/Age:test@refs/pr/3", HfSpec("heegyu/bbq", "Age", "test", "refs/pr/3")),
    ("hf://heegyu/bbq@v1.0", HfSpec("heegyu/bbq", None, "train", "v1.0")),
    ("hf://org/name:train[:10%]@main", HfSpec("org/name", None, "train[:10%]", "main")),
    ("hf://squad:validation", HfSpec("squad", None, "validation")),
])
def test_hf_spelling(spec, want):
  assert parse_hf_spec(spec) == want
  assert want.label == (f"{want.name}/{want.config}" if want.config else want.name)


@pytest.mark.parametrize("spec, message", [
    ("hf://", r"hf://: expected hf://org/name\[/config\]\[:split\]\[@revision\]"),
    ("hf://a/b@", r"expected hf://org/name"),
    ("hf://a/b/c/d:train", r"a Hub id has one slash, the config follows it"),
    ("hf://datasets/heegyu/bbq/data/age.jsonl",
     r"hf://datasets/\.\.\. is huggingface_hub's path to a file of a repo, not a dataset; name "
     r"a Hub dataset as hf://org/name\[/config\]"),
    ("hf://models/org/m", r"hf://models/\.\.\. is huggingface_hub's path"),
    ("hf://./no/such/folder:train", r"hf://./no/such/folder: no such folder"),
])
def test_hf_spelling_errors(spec, message):
  with pytest.raises(DataError, match=message):
    parse_hf_spec(spec)


def test_hf_spelling_of_local_folders(tmp_path):
  """A local repo's config may be a folder of its own (the Hub's layout): the folder with the card
  is the dataset, the segment after it the config; a save_to_disk folder takes a split."""
  repo = tmp_path / "repo"
  (repo / "Age").mkdir(parents=True)
  (repo / "README.md").write_text("---\nconfigs: []\n---\n")
  assert parse_hf_spec(f"hf://{repo}/Age") == HfSpec(str(repo), "Age", local=True)
  assert parse_hf_spec(f"hf://{repo}/Gender:test") == HfSpec(str(repo), "Gender", "test",
                                                             local=True)
  assert parse_hf_spec(f"hf://{repo}:test") == HfSpec(str(repo), None, "test", local=True)
  saved = tmp_path / "saved"
  saved.mkdir()
  (saved / "dataset_dict.json").write_text("{}")
  assert parse_hf_spec(f"hf://{saved}:test") == HfSpec(str(saved), None, "test", local=True)
  with pytest.raises(DataError, match=r"@v1 names a Hub commit; a local folder has none"):
    parse_hf_spec(f"hf://{repo}/Age:test@v1")


def _hf_features(datasets):
  return datasets.Features({"prompt": datasets.Value("string"),
                            "response": datasets.Value("string"),
                            "label": datasets.ClassLabel(names=["neg", "pos"]),
                            "score": datasets.Value("float32"),
                            "tags": datasets.Sequence(datasets.Value("string"))})


def _hf_rows(n: int, offset: int = 0) -> dict:
  return {"prompt": [f"q{i + offset}" for i in range(n)],
          "response": [f"a{i + offset}" for i in range(n)],
          "label": [i % 2 for i in range(n)], "score": [i / 4 for i in range(n)],
          "tags": [[f"t{i}"] * (i % 3) for i in range(n)]}


def test_hub_dataset_by_config_split_revision_and_kept_rows_keep_features(tmp_path, monkeypatch):
  """`hf://org/name/config:split@rev` is `load_dataset(org/name, config, split=, revision=)`;
  the kept rows come back as a save_to_disk dataset with the same features."""
  datasets = pytest.importorskip("datasets")
  ds = datasets.Dataset.from_dict(_hf_rows(5), features=_hf_features(datasets))
  calls = []

  def fake_load_dataset(path, name=None, **kwargs):
    calls.append((path, name, kwargs))
    return ds

  monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
  source = load_source("hf://heegyu/bbq/Age:test@abc123")
  assert calls == [("heegyu/bbq", "Age", {"split": "test", "revision": "abc123"})]
  assert {r.source for r in source.records} == {"heegyu/bbq/Age"}
  load_source("hf://heegyu/bbq")
  assert calls[-1] == ("heegyu/bbq", None, {"split": "train", "revision": None})

  keep = [source.records[i].id for i in (1, 3, 4)]
  out = source.write_kept(tmp_path / "run", set(keep))
  assert out.name == "filtered" and out.is_dir()
  back = datasets.load_from_disk(str(out))
  assert back.features == ds.features
  assert back.to_list() == ds.select([1, 3, 4]).to_list()
  assert [r.id for r in load_source(str(out)).records] == keep  # rows equal the kept ids


def _multi_config_repo(datasets, folder: Path) -> Path:
  """A dataset repo on disk as the Hub stores one (a card declaring two configs, each a folder
  of parquet files)."""
  features = _hf_features(datasets)
  for config, (n, offset) in {"Age": (4, 0), "Gender": (3, 100)}.items():
    (folder / config).mkdir(parents=True)
    ds = datasets.Dataset.from_dict(_hf_rows(n, offset), features=features)
    ds.to_parquet(str(folder / config / "test-00000-of-00001.parquet"))
  (folder / "README.md").write_text(
      "---\nconfigs:\n"
      + "".join(f"- config_name: {c}\n  data_files:\n  - split: test\n    path: {c}/test-*\n"
                for c in ("Age", "Gender"))
      + f"dataset_info:\n  features:\n{_card_features()}---\n# toy multi-config set\n")
  return folder


def _card_features() -> str:
  """The card's feature list (what the Hub's cards declare), so the loader keeps ClassLabel."""
  return ("  - name: prompt\n    dtype: string\n  - name: response\n    dtype: string\n"
          "  - name: label\n    dtype:\n      class_label:\n        names:\n"
          "          '0': neg\n          '1': pos\n"
          "  - name: score\n    dtype: float32\n"
          "  - name: tags\n    sequence: string\n")


@pytest.mark.slow
def test_a_local_multi_config_dataset_through_the_real_loader(tmp_path, monkeypatch):
  """A real `load_dataset` on a multi-config repo folder (no network): each config by name, one
  clear error without a config, and the kept rows saved with the configured features."""
  datasets = pytest.importorskip("datasets")
  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
  repo = _multi_config_repo(datasets, tmp_path / "bbq_like")
  age = load_source(f"hf://{repo}/Age:test")
  gender = load_source(f"hf://{repo}/Gender:test")
  assert [r.prompt for r in age.records] == ["q0", "q1", "q2", "q3"]
  assert [r.prompt for r in gender.records] == ["q100", "q101", "q102"]
  assert age.records[0].source == f"{repo}/Age"
  with pytest.raises(DataError, match=r"cannot load \(ValueError: .*'Age', 'Gender'.*\); name one "
                                      r"as hf://.*bbq_like/<config>\[:split\]$"):
    load_source(f"hf://{repo}:test")
  with pytest.raises(DataError, match=r"@main names a Hub commit; a local folder has none"):
    load_source(f"hf://{repo}/Age:test@main")

  out = age.write_kept(tmp_path / "run", {age.records[0].id, age.records[2].id})
  back = datasets.load_from_disk(str(out))
  assert back.features == _hf_features(datasets)
  assert [row["prompt"] for row in back] == ["q0", "q2"] and back[1]["tags"] == ["t2"] * 2
  assert [r.id for r in load_source(str(out)).records] == [age.records[0].id, age.records[2].id]


def test_tfds_rows_follow_the_row_contract(tmp_path, monkeypatch):
  """read_tfds returns the split's rows as plain dicts, which go through the column map and the
  row shapes like every table's (tests/data/test_tfds.py tests the reader itself)."""
  rows = [{"question": "q0", "answer": "a0", "n": 1}, {"question": "q1", "answer": "a1", "n": 2}]
  calls = []

  def fake_read_tfds(name, split, fields):
    calls.append((name, split, fields))
    return rows

  monkeypatch.setattr(formats, "read_tfds", fake_read_tfds)
  columns = {"prompt": "question", "response": "answer"}
  source = load_source("tfds://toy:test", columns)
  assert calls == [("toy", "test", columns)]
  assert [(r.prompt, r.source) for r in source.records] == [("q0", "tfds:toy"), ("q1", "tfds:toy")]
  out = source.write_kept(tmp_path / "out", {source.records[1].id})
  assert [json.loads(line) for line in out.read_text().splitlines()] == [rows[1]]


def test_unknown_specs(tmp_path):
  with pytest.raises(DataError, match=r"x\.txt: unknown data source \(expected <adapter>:"):
    load_source(tmp_path / "x.txt")
  with pytest.raises(DataError, match=r"expected hf://org/name\[/config\]"):
    load_source("hf://")
  with pytest.raises(DataError, match="expected squad:<path>"):
    load_source("squad:")


# ------------------------------------------------------------------------------------ adapters
# Tiny files in each adapter's real format (checked against /work/shared/data): each case writes
# its file and says which records every source row yields, so that the rows expected back for
# any kept set can be computed here, independently of the writers.


@dataclasses.dataclass
class AdapterCase:
  """One adapter's tiny source: its spec, the ids each row yields and the expected output."""

  spec: str
  row_ids: list[list[str]]  # per source row (in order), the ids of the records it yields
  expect: object  # callable: the list of kept rows (indices) → the expected output
  read: object  # callable: the output path → what `expect` returns

  def kept_rows(self, kept_ids) -> list[int]:
    return [i for i, ids in enumerate(self.row_ids) if ids and set(ids) <= set(kept_ids)]


def _lines(rows) -> list[bytes]:
  return [json.dumps(row, ensure_ascii=False).encode() + b"\n" for row in rows]


def _bbq_example(i: int, condition: str, label: int) -> dict:
  return {"example_id": i, "question_index": str(i + 1), "question_polarity": "neg",
          "context_condition": condition, "category": "Age",
          "answer_info": {"ans0": ["grandfather", "old"], "ans1": ["grandson", "nonOld"],
                          "ans2": ["Can't be determined", "unknown"]},
          "additional_metadata": {"subcategory": "None", "stereotyped_groups": ["old"],
                                  "version": "a", "source": "x"},
          "context": f"I saw a grandson and their grandfather ({i}).",
          "question": "Who was not comfortable using the phone?", "ans0": "The grandfather",
          "ans1": "The grandson", "ans2": "Can't be determined", "label": label}


def _bbq(folder: Path) -> AdapterCase:
  rows = [_bbq_example(0, "ambig", 2), _bbq_example(1, "disambig", 1),
          _bbq_example(2, "ambig", 2), _bbq_example(3, "disambig", 0)]
  lines = _lines(rows)
  path = folder / "Age.jsonl"
  path.write_bytes(b"".join(lines))
  row_ids = [["bbq:Age:0:biased", "bbq:Age:0:unknown"], ["bbq:Age:1:correct"],
             ["bbq:Age:2:biased", "bbq:Age:2:unknown"], ["bbq:Age:3:correct"]]
  return AdapterCase(f"bbq:{path}", row_ids, lambda keep: b"".join(lines[k] for k in keep),
                     lambda out: out.read_bytes())


def _squad(folder: Path) -> AdapterCase:
  def qa(qid, answer):
    return {"id": qid, "question": f"What is {qid}?", "answers": [{"answer_start": 0,
                                                                     "text": answer}]}
  doc = {"version": "1.1", "data": [
      {"title": "T1", "paragraphs": [{"context": "Alpha beta.", "qas": [qa("q1", "Alpha"),
                                                                        qa("q2", "beta")]},
                                     {"context": "Gamma.", "qas": [qa("q3", "Gamma")]}]},
      {"title": "T2", "paragraphs": [{"context": "Delta.", "qas": [qa("q4", "Delta")]}]}]}
  path = folder / "dev.json"
  path.write_text(json.dumps(doc))
  where = [(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0)]

  def expect(keep):
    out = []
    for a, article in enumerate(doc["data"]):
      paragraphs = []
      for p, para in enumerate(article["paragraphs"]):
        qas = [q for k, q in enumerate(para["qas"]) if where.index((a, p, k)) in keep]
        if qas:
          paragraphs.append({**para, "qas": qas})
      if paragraphs:
        out.append({**article, "paragraphs": paragraphs})
    return {**doc, "data": out}

  return AdapterCase(f"squad:{path}", [[f"squad:q{i}"] for i in range(1, 5)], expect,
                     lambda out: json.loads(out.read_text()))


def _instructions(name: str, prefix: str, folder: Path) -> AdapterCase:
  items = [{"instruction": f"Do thing {i}.", "input": "with care" if i % 2 else "",
            "output": f"Thing {i} done."} for i in range(4)]
  path = folder / f"{name}.json"
  path.write_text(json.dumps(items, indent=4))
  return AdapterCase(f"{name}:{path}", [[f"{prefix}:{i}"] for i in range(4)],
                     lambda keep: [items[k] for k in keep], lambda out: json.loads(out.read_text()))


def _rtp(folder: Path) -> AdapterCase:
  def row(i, tox):
    return {"filename": f"f{i}.txt", "begin": 0, "end": 9, "challenging": True,
            "prompt": {"text": f"Prompt number {i} says", "toxicity": 0.9},
            "continuation": {"text": f" continuation {i}.", "toxicity": tox}}
  rows = [row(0, 0.8), row(1, 0.1), row(2, 0.95), row(3, 0.7), row(4, 0.6)]  # row 1: clean
  lines = _lines(rows)
  path = folder / "toxic.jsonl"
  path.write_bytes(b"".join(lines))
  row_ids = [[f"rtp:toxic:{n}"] if r["continuation"]["toxicity"] > 0.5 else []
             for n, r in enumerate(rows, start=1)]
  return AdapterCase(f"rtp:{path}", row_ids, lambda keep: b"".join(lines[k] for k in keep),
                     lambda out: out.read_bytes())


def _davidson(folder: Path) -> AdapterCase:
  header = ",count,hate_speech,offensive_language,neither,class,tweet\n"
  rows = ["0,3,0,0,3,2,!!! RT @someone: a long enough tweet &amp; more words\n",
          '1,3,0,3,0,1,"a tweet, with a comma and\nanother line"\n',
          "2,3,0,0,3,2,too short\n",  # three words: no response left, skipped
          "3,3,3,0,0,0,yet another tweet that is long\n",
          "4,3,0,0,3,2,the last tweet of the file\n"]
  path = folder / "labeled_data.csv"
  path.write_text(header + "".join(rows))
  row_ids = [["davidson:0"], ["davidson:1"], [], ["davidson:3"], ["davidson:4"]]
  return AdapterCase(f"davidson:{path}", row_ids,
                     lambda keep: (header + "".join(rows[k] for k in keep)).encode(),
                     lambda out: out.read_bytes())


def _hh(folder: Path) -> AdapterCase:
  def row(i):
    return {"chosen": f"\n\nHuman: question {i}?\n\nAssistant: A kind answer {i}.",
            "rejected": f"\n\nHuman: question {i}?\n\nAssistant: A rude answer {i}."}
  lines = _lines([row(i) for i in range(3)])
  path = folder / "harmless-base" / "test.jsonl.gz"
  path.parent.mkdir()
  path.write_bytes(gzip.compress(b"".join(lines)))
  row_ids = [[f"hh:harmless-base/test:{n}:rejected", f"hh:harmless-base/test:{n}:chosen"]
             for n in range(1, 4)]
  return AdapterCase(f"hh:{path}", row_ids, lambda keep: b"".join(lines[k] for k in keep),
                     lambda out: gzip.decompress(out.read_bytes()))


def _jbb(folder: Path) -> AdapterCase:
  def jb(i, response, broken):
    return {"index": i + 1, "goal": f"Goal {i}", "behavior": "b", "category": "c",
            "prompt": f"attack {i}", "response": response, "number_of_queries": 1,
            "jailbroken": broken}
  doc = {"parameters": {"method": "PAIR"},
         "jailbreaks": [jb(0, "Sure, here is how.", True), jb(1, None, False),
                        jb(2, "I cannot help.", False), jb(3, "Sure, step one.", True),
                        jb(4, "No.", False)]}
  path = folder / "PAIR" / "black_box" / "vicuna.json"
  path.parent.mkdir(parents=True)
  path.write_text(json.dumps(doc, indent=2))
  row_ids = [[] if j["response"] is None else [f"jbb:PAIR/black_box/vicuna:{j['index']}"]
             for j in doc["jailbreaks"]]
  return AdapterCase(f"jbb:{path}", row_ids,
                     lambda keep: {**doc, "jailbreaks": [doc["jailbreaks"][k] for k in keep]},
                     lambda out: json.loads(out.read_text()))


def _harmful(folder: Path) -> AdapterCase:
  doc = {"topic b": {"sub": ["How to b1?", "How to b2?"]},
         "topic a": {"sub1": ["How to a1?"], "sub2": ["How to a2?"]}}
  path = folder / "harmfulqa.json"
  path.write_text(json.dumps(doc))
  # The adapter walks keys sorted: a1, a2, b1, b2.
  order = [("topic a", "sub1", 0), ("topic a", "sub2", 0), ("topic b", "sub", 0),
           ("topic b", "sub", 1)]

  def expect(keep):
    out: dict = {}
    for k in sorted(keep, key=lambda k: [list(doc).index(order[k][0]), k]):
      topic, sub, i = order[k]
      out.setdefault(topic, {}).setdefault(sub, []).append(doc[topic][sub][i])
    return out

  return AdapterCase(f"harmful-prompts:{path}", [[f"harmful:harmfulqa:{k}"] for k in range(4)],
                     expect, lambda out: json.loads(out.read_text()))


ADAPTER_CASES = {
    "bbq": _bbq, "squad": _squad,
    "alpaca": lambda folder: _instructions("alpaca", "alpaca", folder),
    "rtp": _rtp, "davidson": _davidson, "hh": _hh, "jbb": _jbb,
    "safety-llamas": lambda folder: _instructions("safety-llamas", "stl", folder),
    "harmful-prompts": _harmful,
}


def test_every_adapter_has_a_case():
  assert set(ADAPTER_CASES) == set(formats.ADAPTERS)


@pytest.mark.parametrize("name", sorted(ADAPTER_CASES))
def test_adapter_rows_come_back_in_the_files_own_format(name, tmp_path):
  case = ADAPTER_CASES[name](tmp_path)
  source = load_source(case.spec)
  ids = [r.id for r in source.records]
  assert ids == [i for row in case.row_ids for i in row]
  # Drop the second record: with two records per row, its row goes although the other was kept.
  kept = set(ids) - {ids[1]}
  out = source.write_kept(tmp_path / "out", kept)
  assert out.name.startswith("filtered.")
  rows = case.kept_rows(kept)
  assert len(rows) < len([r for r in case.row_ids if r])
  assert case.read(out) == case.expect(rows)
  # What comes back is a valid source of the same adapter again: the kept rows' records.
  if name != "rtp":  # rtp reads its labels from the file name (toxic*/nontoxic*)
    again = load_source(f"{name}:{out}").records
    kept_rows = {i for row in rows for i in case.row_ids[row]}
    assert [(r.prompt, r.response) for r in again] == [
        (r.prompt, r.response) for r in source.records if r.id in kept_rows]


def test_adapter_folders_come_back_as_folders(tmp_path):
  (tmp_path / "bbq").mkdir()
  case = _bbq(tmp_path / "bbq")
  other = [_bbq_example(10, "disambig", 1), _bbq_example(11, "disambig", 0)]
  (tmp_path / "bbq" / "Other.jsonl").write_bytes(b"".join(_lines(other)))
  source = load_source(f"bbq:{tmp_path / 'bbq'}")
  assert len(source.records) == 8
  out = source.write_kept(tmp_path / "out", {"bbq:Age:1:correct", "bbq:Age:2:biased"})
  assert out.name == "filtered" and [p.name for p in out.iterdir()] == ["Age.jsonl"]
  assert (out / "Age.jsonl").read_bytes() == case.expect([1])
  out = source.write_kept(tmp_path / "out", {"bbq:Age:10:correct", "bbq:Age:1:correct"})
  assert sorted(p.name for p in out.iterdir()) == ["Age.jsonl", "Other.jsonl"]
  assert (out / "Other.jsonl").read_bytes() == _lines(other)[0]


def test_an_id_twice_in_an_adapter_folder_is_an_error(tmp_path):
  (tmp_path / "bbq").mkdir()
  _bbq(tmp_path / "bbq")
  (tmp_path / "bbq" / "Copy.jsonl").write_bytes((tmp_path / "bbq" / "Age.jsonl").read_bytes())
  with pytest.raises(DataError, match="duplicate id 'bbq:Age:0:biased'"):
    load_source(f"bbq:{tmp_path / 'bbq'}")
