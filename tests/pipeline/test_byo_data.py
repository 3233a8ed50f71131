"""Bring your own data: `ff-jax filter` on every input shape gives back the user's own rows, minus
the dropped ones, in the input's format; bad bytes are one error and leave no run directory.

Every shape (CSV with a column map, TRL messages, prompt/completion, gzipped JSONL, parquet, an
HF dataset folder, a TFDS dataset, each adapter) runs the command on one shared tiny model, with the
cheapest deterministic filter.
"""

import csv
import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ff_jax import cli
from ff_jax.config import load_config
from ff_jax.data.formats import load_source
from ff_jax.data.records import fingerprint
from ff_jax.data.templates import PromptTemplate
from ff_jax.errors import RunDirError
from ff_jax.pipeline.context import encode_inputs
from ff_jax.pipeline.filter import kept_and_flagged
from ff_jax.pipeline.inputs import load_inputs, subsample_safe
from ff_jax.pipeline.rundir import RunDir
from tests.data.test_formats import ADAPTER_CASES
from tests.helpers.pipeline_helpers import (
  NOISY,
  SAFE,
  TINY_FILTER,
  make_tiny_hf_model,
  run_ok,
  write_jsonl,
)

# The cheapest deterministic filter: one noisy finetune, the plain NLL signal, half flagged.
CHEAP = [*(a for a in TINY_FILTER if not a.startswith("scoring.noisy_replicas")),
         "scoring.noisy_replicas=1", "filter.signal=nll", "filter.threshold=quantile:0.5"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
  """A random model whose word-level vocabulary knows the adapters' texts as well: unknown words
  would all score alike and leave the threshold nothing to tell apart."""
  texts = [r["prompt"] + " " + r["response"] for r in NOISY + SAFE]
  for name, case in ADAPTER_CASES.items():
    folder = tmp_path_factory.mktemp(f"vocab_{name}")
    texts += [r.prompt + " " + r.response for r in load_source(case(folder).spec).records]
  return make_tiny_hf_model(tmp_path_factory.mktemp("model") / "tiny-llama", texts)


@pytest.fixture(scope="module")
def safe(tmp_path_factory) -> Path:
  return write_jsonl(tmp_path_factory.mktemp("safe") / "safe.jsonl", SAFE)


def filter_cli(model: Path, noisy: str, safe: Path, run_dir: Path, *extra: str) -> Path:
  run_ok("filter", "--model", str(model), "--noisy", noisy, "--safe", str(safe), "--run-dir",
         str(run_dir), "--until", "filter", *CHEAP, *extra)
  return run_dir


def flags(run_dir: Path) -> dict[str, bool]:
  with (run_dir / "scores.csv").open(newline="") as handle:
    return {row["id"]: row["flagged"] == "1" for row in csv.DictReader(handle)}


def kept_ids(run_dir: Path) -> set[str]:
  return {rid for rid, flagged in flags(run_dir).items() if not flagged}


def flagged_ids(run_dir: Path) -> list[str]:
  return [json.loads(line)["id"] for line in (run_dir / "flagged.jsonl").read_text().splitlines()]


# -- the table shapes -------------------------------------------------------------------------


def _messages_row(r: dict) -> dict:
  return {"id": r["id"], "kind": r["kind"],
          "messages": [{"role": "user", "content": r["prompt"]},
                       {"role": "assistant", "content": r["response"]}]}


def _table_shape(name: str, folder: Path) -> tuple[str, dict, list]:
  """One table shape holding NOISY's examples in order: (spec, data.columns, the rows as written,
  in the form the output is compared in)."""
  if name == "messages_gz":
    lines = [json.dumps(_messages_row(r)) + "\n" for r in NOISY]
    (folder / "chat.jsonl.gz").write_bytes(gzip.compress("".join(lines).encode()))
    return str(folder / "chat.jsonl.gz"), {}, [s.encode() for s in lines]
  if name == "prompt_completion":
    lines = [json.dumps({"prompt": r["prompt"], "completion": r["response"], "kind": r["kind"],
                         "tag": i}) + "\n" for i, r in enumerate(NOISY)]
    (folder / "pc.jsonl").write_text("".join(lines))
    return str(folder / "pc.jsonl"), {}, [s.encode() for s in lines]
  if name == "jsonl_gz":
    lines = [json.dumps(r) + "\n" for r in NOISY]
    (folder / "schema.jsonl.gz").write_bytes(gzip.compress("".join(lines).encode()))
    return str(folder / "schema.jsonl.gz"), {}, [s.encode() for s in lines]
  if name == "parquet":
    table = pa.table({"qid": [r["id"] for r in NOISY], "question": [r["prompt"] for r in NOISY],
                      "answer": [r["response"] for r in NOISY],
                      "kind": [r["kind"] for r in NOISY],
                      "n": pa.array(range(len(NOISY)), pa.int16())})
    pq.write_table(table, folder / "d.parquet")
    return (str(folder / "d.parquet"), {"id": "qid", "prompt": "question", "response": "answer"},
            table.to_pylist())
  if name == "hf_folder":
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{**r, "n": i} for i, r in enumerate(NOISY)])
    ds.save_to_disk(str(folder / "hf"))
    return str(folder / "hf"), {}, ds.to_list()
  assert name == "tfds"
  tfds = pytest.importorskip("tensorflow_datasets")
  from tests.helpers.tfds_datasets import prepare_tfds

  rows = [{"question": r["prompt"], "answer": r["response"], "kind": r["kind"], "n": i}
          for i, r in enumerate(NOISY)]
  features = {"question": tfds.features.Text(), "answer": tfds.features.Text(),
              "kind": tfds.features.Text(), "n": np.int64}
  prepare_tfds(folder / "tfds", "noisy_rows", {"train": rows}, features)
  return "tfds://noisy_rows:train", {"prompt": "question", "response": "answer"}, rows


def _written_rows(out: Path, kind: str) -> list:
  if kind == "parquet":
    return pq.read_table(out).to_pylist()
  if kind == "hf_folder":
    import datasets

    return datasets.load_from_disk(str(out)).to_list()
  data = out.read_bytes()
  lines = (gzip.decompress(data) if out.name.endswith(".gz") else data).splitlines(keepends=True)
  return [json.loads(line) for line in lines] if kind == "tfds" else lines


@pytest.mark.slow
def test_csv_with_a_column_map_comes_back_as_the_users_own_rows(tiny_model, safe, tmp_path):
  # A CSV with its own column names and no id column (ids derived from the content), through
  # the command line with a column map.
  header = "question,answer,kind,note\r\n"
  rows = [f'"{r["prompt"]}","{r["response"]}",{r["kind"]},note {i}\r\n'
          for i, r in enumerate(NOISY)]
  (tmp_path / "d.csv").write_text(header + "".join(rows), newline="")
  run = filter_cli(tiny_model, str(tmp_path / "d.csv"), safe, tmp_path / "csv_run",
                   "data.columns.prompt=question", "data.columns.response=answer")
  source = load_source(tmp_path / "d.csv", {"prompt": "question", "response": "answer"})
  ids = [r.id for r in source.records]
  assert list(flags(run)) == ids and all(len(i) == 16 for i in ids)
  kept = kept_ids(run)
  assert 0 < len(kept) < len(ids)
  assert (run / "filtered.csv").read_bytes() == (
      header + "".join(row for row, rid in zip(rows, ids) if rid in kept)).encode()
  assert flagged_ids(run) == [i for i in ids if i not in kept]
  # What the clean phase, evaluate and rounds train and measure on: the same split, in order.
  kept_records, flagged_records = kept_and_flagged(RunDir(run), source.records)
  assert [r.id for r in kept_records] == [i for i in ids if i in kept]
  assert [r.id for r in flagged_records] == flagged_ids(run)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["messages_gz", "prompt_completion", "jsonl_gz", "parquet",
                                  "hf_folder", "tfds"])
def test_each_table_shape_comes_back_as_the_users_own_rows(name, tiny_model, safe, tmp_path,
                                                            monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))  # read by the command's process
  spec, columns, written = _table_shape(name, tmp_path)
  overrides = [f"data.columns.{key}={column}" for key, column in columns.items()]
  run = filter_cli(tiny_model, spec, safe, tmp_path / "run", *overrides)
  shape = load_source(spec, columns)
  ids = [r.id for r in shape.records]
  assert list(flags(run)) == ids  # scores.csv: one line per row, in the input's order
  kept = kept_ids(run)
  assert 0 < len(kept) < len(ids)
  outputs = sorted(p.name for p in run.glob("filtered*"))
  assert outputs == [shape.output_name.rstrip("/")]
  expected = [row for row, rid in zip(written, ids) if rid in kept]
  assert _written_rows(run / outputs[0], name) == expected
  if name == "parquet":
    assert pq.read_schema(run / outputs[0]) == pq.read_schema(spec)
  assert flagged_ids(run) == [i for i in ids if i not in kept]


# -- the adapters -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ADAPTER_CASES))
def test_each_adapter_comes_back_in_its_files_format(name, tiny_model, safe, tmp_path):
  (tmp_path / "data").mkdir()
  case = ADAPTER_CASES[name](tmp_path / "data")
  run = filter_cli(tiny_model, case.spec, safe, tmp_path / "run")
  ids = [i for row in case.row_ids for i in row]
  assert list(flags(run)) == ids
  kept = kept_ids(run)
  assert 0 < len(kept) < len(ids)
  outputs = [p for p in run.iterdir() if p.name.startswith("filtered")]
  assert len(outputs) == 1
  assert case.read(outputs[0]) == case.expect(case.kept_rows(kept))
  assert flagged_ids(run) == [i for i in ids if i not in kept]


# -- bad bytes, safe_size -----------------------------------------------------------------------


def _bad_sources(folder: Path) -> dict[str, tuple[Path, str]]:
  """name → (a broken file, what its one error line must say)."""
  good = "".join(json.dumps(r) + "\n" for r in NOISY).encode()
  bad = b'{"id": "x", "prompt": "caf\xe9", "response": "a"}\n'
  (folder / "latin.jsonl").write_bytes(good + bad)
  (folder / "cut.jsonl.gz").write_bytes(gzip.compress(good * 50)[:-40])
  table = pa.table({"prompt": [r["prompt"] for r in NOISY],
                    "response": [r["response"] for r in NOISY]})
  pq.write_table(table, folder / "cut.parquet")
  data = (folder / "cut.parquet").read_bytes()
  (folder / "cut.parquet").write_bytes(data[:len(data) - 30])
  (folder / "latin.csv").write_bytes(b"prompt,response\nq,a\nq2,caf\xe9\n")
  return {"jsonl": (folder / "latin.jsonl", "latin.jsonl:9: not UTF-8"),
          "gzip": (folder / "cut.jsonl.gz", "cut.jsonl.gz:"),
          "parquet": (folder / "cut.parquet", "cut.parquet: not a readable parquet file"),
          "csv": (folder / "latin.csv", "latin.csv:3: not UTF-8")}


@pytest.mark.parametrize("name", ["jsonl", "gzip", "parquet", "csv"])
def test_bad_bytes_are_one_error_and_no_run_directory(name, tiny_model, safe, tmp_path, capsys):
  path, needle = _bad_sources(tmp_path)[name]
  run_dir = tmp_path / "run"
  capsys.readouterr()
  assert cli.main(["filter", "--model", str(tiny_model), "--noisy", str(path), "--safe",
                   str(safe), "--run-dir", str(run_dir), "--until", "filter", *CHEAP]) == 2
  err = capsys.readouterr().err
  errors = [line for line in err.splitlines() if line.startswith("ff-jax: error:")]
  assert len(errors) == 1 and "Traceback" not in err, err
  assert f"data.noisy: {path.parent}/{needle}" in errors[0], errors[0]
  assert not run_dir.exists()


def test_safe_size_draws_a_seeded_subset_that_the_fingerprint_covers(tiny_model, tmp_path):
  big = [{"id": f"s{i}", "prompt": f"question {i}", "response": f"answer {i}"} for i in range(40)]
  path = write_jsonl(tmp_path / "big.jsonl", big)
  noisy = write_jsonl(tmp_path / "noisy.jsonl", NOISY)

  def inputs(*overrides):
    cfg = load_config(None, [f"model.source={tiny_model}", "model.config=null",
                             f"data.noisy={noisy}", f"data.safe={path}",
                             f"run_dir={tmp_path / 'run'}", *overrides])
    return load_inputs(cfg, RunDir(cfg.run_dir))

  full = inputs()
  assert len(full.safe) == 40
  first, again, other = (inputs("data.safe_size=10"), inputs("data.safe_size=10"),
                         inputs("data.safe_size=10", "seed=1"))
  ids = [r.id for r in first.safe]
  assert len(ids) == 10 and ids == [r.id for r in again.safe]
  assert ids == sorted(ids, key=lambda i: int(i[1:]))  # in source order
  assert ids != [r.id for r in other.safe]
  assert first.fingerprints["safe"] == fingerprint(first.safe) != full.fingerprints["safe"]
  assert first.fingerprints["safe"] != other.fingerprints["safe"]
  assert inputs("data.safe_size=40").safe == full.safe
  assert subsample_safe(full.safe, 0, seed=3) == full.safe
  assert not (tmp_path / "run").exists()  # loading inputs writes nothing


def test_conversations_under_a_template_without_roles_are_one_warning(tiny_model, tmp_path,
                                                                        capsys):
  """TRL messages under data.template=raw (the filter preset's): one line says how many rows lose
  the chat template and how many are flattened; under chat, nothing is said."""
  rows = [_messages_row(r) for r in NOISY]
  rows[0]["messages"] = [{"role": "system", "content": "Be brief."}, *rows[0]["messages"]]
  noisy = write_jsonl(tmp_path / "chat.jsonl", rows)
  safe = write_jsonl(tmp_path / "safe.jsonl", SAFE)

  def warnings(template: str) -> list[str]:
    cfg = load_config("configs/filter.yaml", [
        f"model.source={tiny_model}", "model.config=null", f"data.noisy={noisy}",
        f"data.safe={safe}", f"data.template={template}", f"run_dir={tmp_path / 'run'}"])
    capsys.readouterr()
    load_inputs(cfg, RunDir(cfg.run_dir))
    return [line for line in capsys.readouterr().err.splitlines() if "conversational" in line]

  raw = warnings("raw")
  assert raw == [f"warning: conversational rows (TRL messages) under data.template=raw, rendered "
                 f"without the model's chat template that TRL applies to them: data.noisy "
                 f"{len(NOISY)} (1 flattened into 'Role: text' transcripts); data.template=chat "
                 "keeps them as conversations (docs/fidelity.md: why the filter preset uses raw)"]
  assert len(warnings("plain")) == 1 and warnings("chat") == []


def test_another_hub_config_or_revision_is_another_run(tmp_path):
  """The hf:// spec, config and revision included, is part of the run's config: a run directory
  refuses to resume on another config or revision of the same dataset."""
  base = ["data.noisy=hf://heegyu/bbq/Age:test@v1", f"run_dir={tmp_path / 'run'}"]
  cfg = load_config(None, base)
  RunDir(cfg.run_dir).open(cfg.to_dict(), {"noisy": "x"})
  for other in ("hf://heegyu/bbq/Gender:test@v1", "hf://heegyu/bbq/Age:test@v2"):
    changed = load_config(None, [f"data.noisy={other}", base[1]])
    with pytest.raises(RunDirError, match=r"another config \(differs at: data\.noisy\)"):
      RunDir(changed.run_dir).open(changed.to_dict(), {"noisy": "x"})
  RunDir(cfg.run_dir).open(cfg.to_dict(), {"noisy": "x"})  # the same spec resumes


def test_max_len_auto_is_the_longest_rows_width_and_cuts_nothing(tiny_model, tmp_path):
  """The filter preset's `data.max_len: auto`: the longest row's bucket, nothing truncated; the
  model's context caps it, and a number the user sets still cuts."""
  words = " ".join(SAFE[0]["response"].split() * 20)
  long_row = {"id": "long", "prompt": NOISY[0]["prompt"], "response": words[:300]}
  noisy = write_jsonl(tmp_path / "noisy.jsonl", [*NOISY, long_row])
  safe = write_jsonl(tmp_path / "safe.jsonl", SAFE)

  def encoded(*overrides):
    cfg = load_config("configs/filter.yaml", [
        f"model.source={tiny_model}", "model.config=null", f"data.noisy={noisy}",
        f"data.safe={safe}", f"run_dir={tmp_path / 'run'}", *overrides])
    inputs = load_inputs(cfg, RunDir(cfg.run_dir))
    return encode_inputs(cfg, inputs, PromptTemplate(mode=cfg.data.template))

  cfg, rows, _ = encoded()
  longest = max(len(e.tokens) for e in rows)
  assert 64 < longest <= 128 and not any(e.truncated for e in rows)
  assert (cfg.data.max_len, cfg.data.buckets) == (128, (64, 128))  # 128: the model's context too
  assert cfg.to_dict()["data"]["max_len"] == 128  # what the manifest records
  cut, rows, _ = encoded("data.max_len=64")
  assert (cut.data.max_len, cut.data.buckets) == (64, (64,))
  assert [e.id for e in rows if e.truncated] == ["long"]
  listed, _, _ = encoded("data.buckets=[32,64]")  # a list gets the width the longest row needs
  assert listed.data.buckets == (32, 64, 128)
