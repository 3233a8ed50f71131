"""The one record shape every data source becomes, the line and CSV readers under every source,
and safe writing.

`{"id", "prompt", "response", "kind", "category", "source", "meta"}` is what the rest of ff_jax
reads; `kind` ("unsafe" | "safe" | "task" | None) is known only in experiments and is never read by
the filter. Readers validate every line up front and raise one `DataError` naming the file and line
(or row, or key), so a bad customer file fails before any compute is spent on it: bytes that are
not UTF-8 and truncated gzip streams included. A user's source of any format and row shape is read
by `ff_jax.data.formats.load_source`; `read_jsonl` reads the files ff_jax writes in this schema.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import io
import json
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ff_jax.atomic_io import finite_json, write_atomic
from ff_jax.errors import DataError

KINDS = ("unsafe", "safe", "task")
_FIELDS = ("id", "prompt", "response", "kind", "category", "source", "meta")


@dataclasses.dataclass(frozen=True)
class Record:
  """One (prompt, response) example; `meta` carries anything source-specific."""

  id: str
  prompt: str
  response: str
  kind: str | None = None
  category: str | None = None
  source: str | None = None
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    _check_fields(self.to_dict(), where=f"record {self.id!r}")

  def to_dict(self) -> dict[str, Any]:
    return {f: getattr(self, f) for f in _FIELDS}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], where: str) -> Record:
    """Validate a raw mapping; keys outside the schema are kept in `meta` rather than rejected."""
    if not isinstance(d, Mapping):
      raise DataError(f"{where}: expected a JSON object, got {type(d).__name__}")
    for key in ("id", "prompt", "response"):
      if key not in d:
        raise DataError(f"{where}: missing required key {key!r}")
    meta = d.get("meta")
    if meta is None:
      meta = {}
    if not isinstance(meta, Mapping):
      raise DataError(f"{where}: key 'meta' must be an object, got {type(meta).__name__}")
    meta = dict(meta)
    for key, value in d.items():
      if key not in _FIELDS:
        meta.setdefault(key, value)
    rid = d["id"]
    if isinstance(rid, int) and not isinstance(rid, bool):
      rid = str(rid)  # integer ids are common in exported datasets; the schema keeps strings
    values = {"id": rid, "prompt": d["prompt"], "response": d["response"], "kind": d.get("kind"),
              "category": d.get("category"), "source": d.get("source"), "meta": meta}
    _check_fields(values, where)  # first, so messages name the file location, not the id
    return cls(**values)


def _check_fields(rec: Mapping[str, Any], where: str) -> None:
  for key in ("id", "prompt", "response"):
    value = rec[key]
    if not isinstance(value, str):
      raise DataError(f"{where}: key {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
      raise DataError(f"{where}: key {key!r} is empty")
  if rec["kind"] is not None and rec["kind"] not in KINDS:
    raise DataError(f"{where}: key 'kind' must be one of {KINDS} or null, got {rec['kind']!r}")
  for key in ("category", "source"):
    value = rec[key]
    if value is not None and not isinstance(value, str):
      raise DataError(f"{where}: key {key!r} must be a string or null, got {type(value).__name__}")
  if not isinstance(rec["meta"], dict):
    raise DataError(f"{where}: key 'meta' must be an object, got {type(rec['meta']).__name__}")


def check_unique(records: list[Record], where_of: list[str], path: Path | str) -> None:
  """Ids must be unique (the filter's outputs are keyed by id) and a source must hold records."""
  first: dict[str, str] = {}
  for rec, where in zip(records, where_of):
    if rec.id in first:
      raise DataError(f"{where}: duplicate id {rec.id!r} (first seen at {first[rec.id]})")
    first[rec.id] = where
  if not records:
    raise DataError(f"{path}: no records (the file is empty)")


def read_lines(path: str | Path) -> Iterator[tuple[int, bytes]]:
  """(line number, the line's bytes with its newline) of every line of a file, `.gz` decompressed.

  Lines end at b"\\n" only, so line numbers are the ones an editor shows and a line written back is
  byte-identical. A corrupt or truncated gzip stream is a `DataError` naming the file and the last
  whole line read.
  """
  path = Path(path)
  if not path.is_file():
    raise DataError(f"{path}: file not found")
  lineno = 0
  try:
    with (gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")) as handle:
      for lineno, line in enumerate(handle, start=1):
        yield lineno, line
  except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
    raise DataError(f"{path}:{lineno + 1}: cannot read the file after line {lineno}: corrupt or "
                    f"truncated ({type(e).__name__}: {e}); copy it again") from None


def decode_line(raw: bytes, where: str) -> str:
  """A line's text; bytes that are not UTF-8 are a `DataError` naming the line and column."""
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{where}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                    "save the file as UTF-8") from None


def parse_json_line(raw: bytes, where: str) -> Any:
  """The JSON value of one JSONL line (a leading byte-order mark is ignored); None if blank."""
  line = decode_line(raw, where).removeprefix("\ufeff")
  if not line.strip():
    return None
  try:
    return json.loads(line)
  except json.JSONDecodeError as e:
    raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None


def read_text(path: str | Path) -> str:
  """A whole file's text; bytes that are not UTF-8 are a `DataError` naming the line and column."""
  path = Path(path)
  if not path.is_file():
    raise DataError(f"{path}: file not found")
  data = path.read_bytes()
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line_start = data.rfind(b"\n", 0, e.start) + 1
    lineno = data.count(b"\n", 0, e.start) + 1
    raise DataError(f"{path}:{lineno}: not UTF-8 (byte "
                    f"{data[e.start]:#04x} at column {e.start - line_start + 1}); save the file "
                    "as UTF-8") from None


@dataclasses.dataclass(frozen=True)
class CsvRow:
  """One data row of a CSV file: where it starts, its cells by column, and its exact text."""

  lineno: int
  cells: dict[str, str]
  text: str  # the row's lines as in the file (a quoted cell may span several)


def read_csv_rows(path: str | Path) -> tuple[str, list[CsvRow]]:
  """(the header's exact text, the data rows) of a CSV file with a header row; blank lines are
  skipped. A row with more or fewer cells than the header is a `DataError` naming its line."""
  path = Path(path)
  text = read_text(path)
  # Split as `open(newline="")` does, the way the csv module wants its input.
  lines = io.StringIO(text, newline="").readlines()
  reader = csv.reader(lines)
  try:
    header = next(reader, None)
    if header is None:
      raise DataError(f"{path}: no header row (the file is empty)")
    header_text = "".join(lines[:reader.line_num])
    header = [header[0].removeprefix("\ufeff"), *header[1:]] if header else header
    rows, start = [], reader.line_num
    for cells in reader:
      first, start = start, reader.line_num
      if not cells:
        continue
      where = f"{path}:{first + 1}"
      if len(cells) > len(header):
        raise DataError(f"{where}: more cells than header columns")
      if len(cells) < len(header):
        raise DataError(f"{where}: fewer cells than header columns")
      rows.append(CsvRow(first + 1, dict(zip(header, cells)), "".join(lines[first:start])))
  except csv.Error as e:
    raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
  return header_text, rows


def iter_jsonl(path: str | Path) -> Iterator[tuple[str, Any]]:
  """("file:line", object) for each non-blank line; `.gz` files are decompressed.

  A line that is not UTF-8 or not valid JSON, or a truncated gzip stream, is a `DataError` naming
  the file and line.
  """
  for lineno, raw in read_lines(path):
    where = f"{path}:{lineno}"
    value = parse_json_line(raw, where)
    if value is not None:
      yield where, value


def read_jsonl(path: str | Path) -> list[Record]:
  """All records of a JSONL file in ff_jax's schema (what ff_jax itself writes); blank lines are
  skipped, anything else malformed is an error. A user's file of any shape: `formats.load_source`.
  """
  path = Path(path)
  records, wheres = [], []
  for where, raw in iter_jsonl(path):
    records.append(Record.from_dict(raw, where))
    wheres.append(where)
  check_unique(records, wheres, path)
  return records


def write_jsonl_atomic(path: str | Path, items: Iterable[Record | Mapping[str, Any]]) -> None:
  """Write JSONL so that `path` holds either its old content or the complete new file; strict
  JSON (a non-finite score becomes null), keys in the items' own order."""
  lines = [json.dumps(finite_json(item.to_dict() if isinstance(item, Record) else dict(item)),
                      ensure_ascii=False, allow_nan=False) + "\n" for item in items]
  write_atomic(path, "".join(lines))


def fingerprint(records: Iterable[Record | Mapping[str, Any]]) -> str:
  """sha256 of the records' canonical JSON, in order (reordering a dataset changes training)."""
  h = hashlib.sha256()
  for item in records:
    d = item.to_dict() if isinstance(item, Record) else dict(item)
    h.update(json.dumps(d, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode())
    h.update(b"\n")
  return h.hexdigest()
