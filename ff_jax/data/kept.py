"""A loaded source: its records, the source row each came from, and how to write rows back.

The filter hands back the user's own rows minus the dropped ones, in the input's own format
(`ff_jax.data.formats` and `ff_jax.data.adapter_rows` build a `Source` for every kind of input). A
row is written back when every record it yielded was kept; a row that yielded no record (one an
adapter skips, e.g. an unscored RealToxicityPrompts row) was never judged and is not written.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from collections.abc import Callable, Collection, Hashable
from pathlib import Path
from typing import Any

from ff_jax.atomic_io import run_path, write_atomic
from ff_jax.data.records import Record

# Writes the rows with these keys (in source order) to this path.
RowWriter = Callable[[Path, list[Hashable]], None]


@dataclasses.dataclass
class Source:
  """The records of a source spec and how to write a subset of its rows in its own format."""

  spec: str
  records: list[Record]
  row_of: list[Hashable]  # per record: the key of the source row it came from
  output_name: str  # the filtered output's name: filtered.<ext>, or filtered/ for a folder
  write_rows: RowWriter
  # Rows that were conversations (TRL messages or turn lists): what TRL renders with the chat
  # template, which the raw and plain templates do not (`templates.flattening_warning`).
  conversations: int = 0

  def kept_rows(self, kept_ids: Collection[str]) -> list[Hashable]:
    """Keys of the rows whose records were all kept, in source order."""
    kept: dict[Hashable, bool] = {}
    for record, row in zip(self.records, self.row_of):
      kept[row] = kept.get(row, True) and record.id in kept_ids
    return [row for row, ok in kept.items() if ok]

  def write_kept(self, folder: Path, kept_ids: Collection[str]) -> Path:
    """Write the kept rows as `folder/output_name`; returns that path."""
    path = run_path(folder) / self.output_name.rstrip("/")
    self.write_rows(path, self.kept_rows(kept_ids))
    return path


def write_lines(path: Path, lines: list[bytes], gz: bool) -> None:
  """Lines byte-identical to the input's; gzipped (with no timestamp: reproducible) if `gz`."""
  data = b"".join(lines)
  write_atomic(path, gzip.compress(data, mtime=0) if gz else data)


def write_json(path: Path, value: Any) -> None:
  """A JSON document (value-identical to the input's structure, not its whitespace)."""
  write_atomic(path, json.dumps(value, ensure_ascii=False, indent=2) + "\n")
