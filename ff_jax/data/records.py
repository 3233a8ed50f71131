"""The one record shape every data source becomes, its strict readers, and safe writing.

`{"id", "prompt", "response", "kind", "category", "source", "meta"}` is what the rest of ff_jax
reads; `kind` ("unsafe" | "safe" | "task" | None) is known only in experiments and is never read by
the filter. Readers validate every line up front and raise one `DataError` naming the file and line
(or row, or key), so a bad customer file fails before any compute is spent on it.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ff_jax.atomic_io import write_atomic
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


def _check_unique(records: list[Record], where_of: list[str], path: Path) -> None:
  first: dict[str, str] = {}
  for rec, where in zip(records, where_of):
    if rec.id in first:
      raise DataError(f"{where}: duplicate id {rec.id!r} (first seen at {first[rec.id]})")
    first[rec.id] = where
  if not records:
    raise DataError(f"{path}: no records (the file is empty)")


def iter_jsonl(path: str | Path) -> Iterator[tuple[str, Any]]:
  """("file:line", object) for each non-blank line; `.gz` files are decompressed.

  A line that is not valid JSON is a `DataError` naming the file and line.
  """
  path = Path(path)
  if not path.is_file():
    raise DataError(f"{path}: file not found")
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rt", encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      try:
        raw = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
      yield where, raw


def read_jsonl(path: str | Path) -> list[Record]:
  """All records of a JSONL file; blank lines are skipped, anything else malformed is an error."""
  path = Path(path)
  records, wheres = [], []
  for where, raw in iter_jsonl(path):
    records.append(Record.from_dict(raw, where))
    wheres.append(where)
  _check_unique(records, wheres, path)
  return records


def read_csv(path: str | Path, prompt_col: str = "prompt", response_col: str = "response",
             id_col: str | None = "id", kind_col: str | None = "kind",
             category_col: str | None = "category", source: str | None = None) -> list[Record]:
  """Records from a CSV with a header row; other columns go to `meta`.

  `id_col` may be absent from the header, then ids are `row<N>` (N = the data row, from 1). Empty
  `kind`/`category` cells mean null.
  """
  path = Path(path)
  if not path.is_file():
    raise DataError(f"{path}: file not found")
  records, wheres = [], []
  with path.open(encoding="utf-8", newline="") as f:
    reader = csv.DictReader(f)
    header = reader.fieldnames or []
    for col, key in ((prompt_col, "prompt_col"), (response_col, "response_col")):
      if col not in header:
        raise DataError(f"{path}:1: column {col!r} ({key}) not in header {header}")
    named = {prompt_col, response_col, id_col, kind_col, category_col}
    for rowno, row in enumerate(reader, start=1):
      where = f"{path}:{reader.line_num}"
      if None in row:
        raise DataError(f"{where}: more cells than header columns")
      rid = row.get(id_col) if id_col and id_col in header else f"row{rowno}"
      rec = {
          "id": rid, "prompt": row.get(prompt_col), "response": row.get(response_col),
          "kind": (row.get(kind_col) or None) if kind_col else None,
          "category": (row.get(category_col) or None) if category_col else None,
          "source": source or path.name,
          "meta": {k: v for k, v in row.items() if k not in named},
      }
      if rec["prompt"] is None or rec["response"] is None:
        raise DataError(f"{where}: fewer cells than header columns")
      records.append(Record.from_dict(rec, where))
      wheres.append(where)
  _check_unique(records, wheres, path)
  return records


def read_hf_dataset(name_or_path: str, split: str = "train",
                    fields: Mapping[str, str] | None = None) -> list[Record]:
  """Records from a Hugging Face dataset (hub name or a `save_to_disk` folder).

  `fields` maps schema keys to dataset columns, e.g. `{"prompt": "question", "response": "answer"}`;
  unmapped schema keys use the column of the same name if present. Ids default to `<split>-<row>`.
  """
  try:
    import datasets  # optional and heavy: only needed for this source
  except ImportError:
    raise DataError(f"hf://{name_or_path}: reading Hugging Face datasets needs the optional "
                    "`datasets` package (pip install 'ff_jax[datasets]')") from None
  where0 = f"hf://{name_or_path}:{split}"
  try:
    if Path(name_or_path).is_dir():
      ds = datasets.load_from_disk(name_or_path)
      if isinstance(ds, datasets.DatasetDict):
        ds = ds[split]
    else:
      ds = datasets.load_dataset(name_or_path, split=split)
  except Exception as e:  # any loading failure here means the user's source is wrong
    raise DataError(f"{where0}: cannot load ({type(e).__name__}: {e})") from None
  fields = dict(fields or {})
  columns = list(ds.column_names)
  for key, col in fields.items():
    if key not in _FIELDS:
      raise DataError(f"{where0}: field map key {key!r} is not one of {_FIELDS}")
    if col not in columns:
      raise DataError(f"{where0}: field map {key}={col!r} is not a column of {columns}")
  cols = {k: fields.get(k, k) for k in _FIELDS if fields.get(k, k) in columns}
  records, wheres = [], []
  for i, row in enumerate(ds):
    where = f"{where0} row {i}"
    rec = {k: row[c] for k, c in cols.items()}
    rec.setdefault("id", f"{split}-{i}")
    rec.setdefault("source", name_or_path)
    rec["meta"] = {c: row[c] for c in columns if c not in cols.values()}
    records.append(Record.from_dict(rec, where))
    wheres.append(where)
  _check_unique(records, wheres, Path(where0))
  return records


def load_records(source: str | Path, **kwargs: Any) -> list[Record]:
  """Dispatch on the source: `*.jsonl`, `*.csv` or `hf://name[:split]`; kwargs go to the reader."""
  text = str(source)
  if text.startswith("hf://"):
    name, _, split = text[len("hf://"):].partition(":")
    if not name:
      raise DataError(f"{text}: expected hf://<name>[:<split>]")
    return read_hf_dataset(name, split or "train", **kwargs)
  suffix = Path(text).suffix.lower()
  if suffix == ".jsonl":
    return read_jsonl(text, **kwargs)
  if suffix == ".csv":
    return read_csv(text, **kwargs)
  raise DataError(f"{text}: unknown data source (expected *.jsonl, *.csv or hf://name[:split])")


def write_jsonl_atomic(path: str | Path, items: Iterable[Record | Mapping[str, Any]]) -> None:
  """Write JSONL so that `path` holds either its old content or the complete new file."""
  lines = [json.dumps(item.to_dict() if isinstance(item, Record) else dict(item),
                      ensure_ascii=False) + "\n" for item in items]
  write_atomic(path, "".join(lines))


def fingerprint(records: Iterable[Record | Mapping[str, Any]]) -> str:
  """sha256 of the records' canonical JSON, in order (reordering a dataset changes training)."""
  h = hashlib.sha256()
  for item in records:
    d = item.to_dict() if isinstance(item, Record) else dict(item)
    h.update(json.dumps(d, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode())
    h.update(b"\n")
  return h.hexdigest()
