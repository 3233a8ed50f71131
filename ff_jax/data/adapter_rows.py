"""The public datasets' adapters as `Source`s: which row of the file each record came from, and the
kept rows written back in the file's own format.

  JSONL files (bbq, rtp, hh; .jsonl.gz stays gzipped)  the kept lines, byte-identical
  CSV (davidson)                                     the header and the kept rows, byte-identical
  JSON lists (alpaca, safety-llamas)                 the kept items (value-identical)
  SQuAD                                              the articles/paragraphs/qas structure with the
                                                     kept questions only (empty paragraphs and
                                                     articles go)
  JailbreakBench                                     the artifact with the kept `jailbreaks` only
  harmful prompt files                               the same nesting with the kept prompts only
  a folder (bbq, jbb)                                a folder of the same files, each filtered as
                                                     above (files left with nothing are not written)

Where one row yields several records (hh-rlhf: the `rejected` and the `chosen` reply of one line;
BBQ: the biased and the "unknown" answer of one ambiguous example), the row is written back only if
all of its records were kept. A row the adapter skipped (no record) was never judged, so it is not
written back either. Row keys are read back from the adapters' ids, which name the source row.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

from ff_jax.atomic_io import write_folder
from ff_jax.data.kept import Source, write_json, write_lines
from ff_jax.data.records import Record, check_unique, iter_jsonl, read_csv_rows, read_lines
from ff_jax.data.sources import ADAPTERS, jailbreakbench_files
from ff_jax.data.sources_bbq import bbq_files
from ff_jax.errors import DataError

# One file's adapter source: (records, row key per record, output suffix, row writer).
FileRows = tuple[list[Record], list[Hashable], str, Callable[[Path, list[Hashable]], None]]


def _load_json(path: Path) -> Any:
  return json.loads(path.read_text(encoding="utf-8"))  # the adapter has validated it


def _jsonl_lines(path: Path, records: list[Record],
                 line_of: Callable[[Record], int]) -> FileRows:
  lines = dict(read_lines(path))
  gz = path.suffix == ".gz"

  def write(out: Path, keep: list[Hashable]) -> None:
    write_lines(out, [lines[k] for k in keep], gz)

  return records, [line_of(r) for r in records], ".jsonl.gz" if gz else ".jsonl", write


def _bbq(path: Path) -> FileRows:
  records = ADAPTERS["bbq"](path)
  line_of_example = {f"bbq:{raw['category']}:{raw['example_id']}": int(where.rsplit(":", 1)[1])
                     for where, raw in iter_jsonl(path)}
  return _jsonl_lines(path, records, lambda r: line_of_example[r.id.rsplit(":", 1)[0]])


def _rtp(path: Path) -> FileRows:
  return _jsonl_lines(path, ADAPTERS["rtp"](path), lambda r: int(r.id.rsplit(":", 1)[1]))


def _hh(path: Path) -> FileRows:
  return _jsonl_lines(path, ADAPTERS["hh"](path), lambda r: int(r.id.split(":")[-2]))


def _json_list(name: str) -> Callable[[Path], FileRows]:
  def rows(path: Path) -> FileRows:
    records = ADAPTERS[name](path)
    items = _load_json(path)
    return (records, [int(r.id.rsplit(":", 1)[1]) for r in records], ".json",
            lambda out, keep: write_json(out, [items[k] for k in keep]))
  return rows


def _squad(path: Path) -> FileRows:
  records = ADAPTERS["squad"](path)
  doc = _load_json(path)

  def write(out: Path, keep: list[Hashable]) -> None:
    wanted = set(keep)
    articles = []
    for article in doc["data"]:
      paragraphs = []
      for para in article["paragraphs"]:
        qas = [qa for qa in para["qas"] if qa["id"] in wanted]
        if qas:
          paragraphs.append({**para, "qas": qas})
      if paragraphs:
        articles.append({**article, "paragraphs": paragraphs})
    write_json(out, {**doc, "data": articles})

  return records, [r.id.removeprefix("squad:") for r in records], ".json", write


def _davidson(path: Path) -> FileRows:
  records = ADAPTERS["davidson"](path)
  header, rows = read_csv_rows(path)
  # The adapter's id: the unnamed index column, else the data row's number (from 1).
  text_of = {(row.cells.get("") or "").strip() or str(n): row.text
             for n, row in enumerate(rows, start=1)}

  def write(out: Path, keep: list[Hashable]) -> None:
    write_lines(out, [(header + "".join(text_of[k] for k in keep)).encode("utf-8")], gz=False)

  return records, [r.id.removeprefix("davidson:") for r in records], ".csv", write


def _jailbreakbench(path: Path) -> FileRows:
  records = ADAPTERS["jbb"](path)
  doc = _load_json(path)
  position = {jb.get("index", i): i for i, jb in enumerate(doc["jailbreaks"])}

  def write(out: Path, keep: list[Hashable]) -> None:
    write_json(out, {**doc, "jailbreaks": [doc["jailbreaks"][k] for k in keep]})

  return records, [position[_jbb_index(r)] for r in records], ".json", write


def _jbb_index(record: Record) -> Any:
  index = record.id.rsplit(":", 1)[1]
  return int(index) if index.lstrip("-").isdigit() else index


def _keep_prompts(node: Any, where: str, keep: set[str]) -> tuple[Any, bool]:
  """`node` with only the prompts at the `where` paths in `keep` (the adapter's walk)."""
  if isinstance(node, str):
    return node, where in keep
  if isinstance(node, list):
    items = [v for i, item in enumerate(node)
             for v, ok in [_keep_prompts(item, f"{where}[{i}]", keep)] if ok]
    return items, bool(items)
  if isinstance(node, dict) and "instructions" in node:
    count = len(node["instructions"])
    idx = [i for i in range(count) if f"{where}.instructions[{i}]" in keep]
    out = {key: [value[i] for i in idx] if isinstance(value, list) and len(value) == count
           else value for key, value in node.items()}
    return out, bool(idx)
  if isinstance(node, dict):
    out = {}
    for key, value in node.items():
      kept, ok = _keep_prompts(value, f"{where}.{key}", keep)
      if ok:
        out[key] = kept
    return out, bool(out)
  return node, False


def _harmful_prompts(path: Path) -> FileRows:
  records = ADAPTERS["harmful-prompts"](path)
  doc = _load_json(path)
  return (records, [r.meta["where"] for r in records], ".json",
          lambda out, keep: write_json(out, _keep_prompts(doc, "", set(keep))[0]))


_FILE_ROWS: dict[str, Callable[[Path], FileRows]] = {
    "bbq": _bbq, "squad": _squad, "alpaca": _json_list("alpaca"), "rtp": _rtp,
    "davidson": _davidson, "hh": _hh, "jbb": _jailbreakbench,
    "safety-llamas": _json_list("safety-llamas"), "harmful-prompts": _harmful_prompts,
}
_FOLDER_FILES = {"bbq": bbq_files, "jbb": jailbreakbench_files}


def adapter_source(name: str, path: Path, spec: str) -> Source:
  """The `Source` of `<name>:<path>` (a file, or a folder of files for bbq and jbb)."""
  if name not in _FILE_ROWS:
    raise DataError(f"{spec}: unknown adapter {name!r}; one of {sorted(_FILE_ROWS)}")
  if not (path.is_dir() and name in _FOLDER_FILES):
    records, row_of, suffix, write = _FILE_ROWS[name](path)
    check_unique(records, [spec] * len(records), spec)
    return Source(spec, records, row_of, f"filtered{suffix}", write)
  parts = [(f.relative_to(path), _FILE_ROWS[name](f)) for f in _FOLDER_FILES[name](path)]
  writers = {str(rel): part[3] for rel, part in parts}

  def write(out: Path, keep: list[Hashable]) -> None:
    def fill(folder: Path) -> None:
      for rel, _ in parts:
        rows = [row for file, row in keep if file == str(rel)]
        if rows:
          writers[str(rel)](folder / rel, rows)
    write_folder(out, fill)

  records = [r for _, part in parts for r in part[0]]
  row_of = [(str(rel), row) for rel, part in parts for row in part[1]]
  check_unique(records, [f"{path / rel}" for rel, part in parts for _ in part[0]], spec)
  return Source(spec, records, row_of, "filtered/", write)
