"""The one resolver of data sources: `load_source(spec, columns)` → a `Source` (records + rows).

Every place a run takes data (data.noisy, data.safe, data.eval, the experiments) resolves its spec
here:

  <adapter>:<path>        a public dataset's own files (`ff_jax.data.sources.ADAPTERS`)
  hf://org/name[/config][:split][@revision]
                          a Hugging Face dataset: a Hub id (with its config and revision) or a
                          local folder (`ff_jax.data.hf_data` has the rules)
  <folder>                a `save_to_disk` folder or a dataset repo on disk (split `train`)
  tfds://name[:split]     a TensorFlow Datasets dataset
  *.jsonl, *.jsonl.gz     one JSON object per line
  *.csv                   a header row, then one row per example
  *.parquet               a parquet file (pyarrow)

Tables (every source but an adapter) go through `data.columns` and the row shapes of
`ff_jax.data.rows`. TFDS rows come from `sources.read_tfds(name, split, fields)`, called with
`data.columns` as `fields`; the contract (its docstring): it returns the split's rows in order, each
a dict of plain Python values, which become records like any table's rows and are written back as
JSONL.

Each source writes its kept rows back in its own format (`Source.write_kept`): JSONL lines
byte-identical (gzipped again if the input was), CSV rows byte-identical under the header, parquet
rows value-identical with the same schema, every `datasets` source (a Hub dataset, a local dataset
folder) as a `save_to_disk` folder with its features (`select(...).save_to_disk`), a TFDS dataset
as JSONL of its original row dicts, an adapter's file in that file's format
(`ff_jax.data.adapter_rows`).

A file that cannot be read (not UTF-8, a truncated gzip, a truncated or corrupt parquet file) is one
`DataError` naming the file and the line, or the rows.
"""

from __future__ import annotations

import io
import json
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ff_jax.atomic_io import is_remote, local_file, write_atomic
from ff_jax.data.adapter_rows import adapter_source
from ff_jax.data.hf_data import SPELLING as HF_SPELLING
from ff_jax.data.hf_data import HfSpec, hf_source, parse_hf_spec
from ff_jax.data.kept import Source, write_lines
from ff_jax.data.records import parse_json_line, read_csv_rows, read_lines
from ff_jax.data.rows import check_columns, records_from_rows
from ff_jax.data.sources import ADAPTERS, read_tfds
from ff_jax.errors import DataError

SPEC_HELP = (f"<adapter>:<path> with adapter one of {sorted(ADAPTERS)}, {HF_SPELLING}, "
             "tfds://name[:split], a save_to_disk or dataset folder, *.jsonl, *.jsonl.gz, *.csv "
             "or *.parquet")


def _identity(n: int) -> list[Hashable]:
  return list(range(n))


def _jsonl_source(spec: str, path: Path, columns: dict[str, str]) -> Source:
  lines, rows = [], []
  for lineno, raw in read_lines(path):
    where = f"{path}:{lineno}"
    value = parse_json_line(raw, where)
    if value is not None:  # blank lines are no rows
      lines.append(raw)
      rows.append((where, value))
  records, conversations = records_from_rows(rows, columns, None, path)
  gz = path.suffix == ".gz"
  return Source(spec, records, _identity(len(records)),
                "filtered.jsonl.gz" if gz else "filtered.jsonl",
                lambda out, keep: write_lines(out, [lines[k] for k in keep], gz), conversations)


def _csv_source(spec: str, path: Path, columns: dict[str, str]) -> Source:
  header, rows = read_csv_rows(path)
  records, _ = records_from_rows(((f"{path}:{row.lineno}", row.cells) for row in rows), columns,
                                 path.name, path)  # CSV cells are strings: no conversations
  return Source(spec, records, _identity(len(records)), "filtered.csv",
                lambda out, keep: write_lines(
                    out, [(header + "".join(rows[k].text for k in keep)).encode("utf-8")], False))


def _parquet_table(path: Path) -> pa.Table:
  if not path.is_file():
    raise DataError(f"{path}: file not found")
  try:
    handle = pq.ParquetFile(path)
  except Exception as e:  # pyarrow raises several types for a file that is no (whole) parquet
    raise DataError(f"{path}: not a readable parquet file, truncated or corrupt "
                    f"({type(e).__name__}: {e})") from None
  groups, start = [], 0
  for g in range(handle.num_row_groups):
    count = handle.metadata.row_group(g).num_rows
    try:
      groups.append(handle.read_row_group(g))
    except Exception as e:  # a damaged page or column chunk
      raise DataError(f"{path}: rows {start}..{start + count - 1} (row group {g}) cannot be "
                      f"read, the file is corrupt ({type(e).__name__}: {e})") from None
    start += count
  return pa.concat_tables(groups) if groups else handle.schema_arrow.empty_table()


def _parquet_source(spec: str, path: Path, columns: dict[str, str]) -> Source:
  table = _parquet_table(path)
  rows = ((f"{path} row {i}", row) for i, row in enumerate(table.to_pylist()))
  records, conversations = records_from_rows(rows, columns, path.name, path)

  def write(out: Path, keep: list[Hashable]) -> None:
    sink = io.BytesIO()
    pq.write_table(table.take(pa.array(keep, type=pa.int64())), sink)
    write_atomic(out, sink.getvalue())

  return Source(spec, records, _identity(len(records)), "filtered.parquet", write, conversations)


def _write_row_dicts(out: Path, rows: list[Mapping[str, Any]], keep: list[Hashable]) -> None:
  """Rows of a dataset without a file of its own, as JSONL of their original dicts."""
  text = "".join(json.dumps(rows[k], ensure_ascii=False, default=str) + "\n" for k in keep)
  write_lines(out, [text.encode("utf-8")], False)


def _tfds_source(spec: str, name: str, split: str, columns: dict[str, str]) -> Source:
  rows = read_tfds(name, split, columns or None)
  records, conversations = records_from_rows(
      ((f"{spec} row {i}", row) for i, row in enumerate(rows)), columns, f"tfds:{name}", spec)
  return Source(spec, records, _identity(len(records)), "filtered.jsonl",
                lambda out, keep: _write_row_dicts(out, rows, keep), conversations)


def _name_split(spec: str, scheme: str) -> tuple[str, str]:
  name, _, split = spec[len(scheme):].partition(":")
  if not name:
    raise DataError(f"{spec}: expected {scheme}<name>[:<split>]")
  return name, split or "train"


def _remote_source(spec: str, columns: dict[str, str]) -> Source:
  """A file in a bucket (`gs://...`, also after an adapter's `name:`): read from a local copy,
  with every message naming the object, not the copy."""
  prefix, sep, rest = spec.partition(":")
  url = rest if sep and prefix in ADAPTERS else spec
  try:
    local = local_file(url)
  except FileNotFoundError:
    raise DataError(f"{url}: file not found") from None
  try:
    source = load_source(spec.replace(url, str(local)), columns)
  except DataError as err:
    raise DataError(str(err).replace(str(local), url)) from None
  source.spec = spec
  return source


def load_source(spec: str | Path, columns: Mapping[str, str] | None = None) -> Source:
  """The records of a source spec (see the module docstring) and how to write its rows back.

  `columns` (`data.columns`) maps record keys to the columns of a table; adapters ignore it (each
  reads its dataset's own fields).
  """
  text = str(spec)
  columns = check_columns(columns)
  if is_remote(text.partition(":")[2] if text.partition(":")[0] in ADAPTERS else text):
    return _remote_source(text, columns)
  if text.startswith("hf://"):
    return hf_source(text, parse_hf_spec(text), columns)
  if text.startswith("tfds://"):
    return _tfds_source(text, *_name_split(text, "tfds://"), columns)
  prefix, sep, rest = text.partition(":")
  if sep and prefix in ADAPTERS:
    if not rest:
      raise DataError(f"{text}: expected {prefix}:<path>")
    return adapter_source(prefix, Path(rest).expanduser(), text)
  path = Path(text).expanduser()
  name = path.name.lower()
  if name.endswith((".jsonl", ".jsonl.gz")):
    return _jsonl_source(text, path, columns)
  if name.endswith(".csv"):
    return _csv_source(text, path, columns)
  if name.endswith(".parquet"):
    return _parquet_source(text, path, columns)
  if path.is_dir():
    return hf_source(text, HfSpec(str(path), local=True), columns)
  raise DataError(f"{text}: unknown data source (expected {SPEC_HELP})")
