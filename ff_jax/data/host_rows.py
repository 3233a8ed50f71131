"""Which rows of a global batch a host builds: the one rule every batch builder follows, and a log
of the rows each host built, for tests.

Rule: the rows of a global batch are cut into `process_count` equal blocks, in order, and the
process with index p builds block p only (`host_block`). Training batches (one model, or each
stream of stacked replicas), scoring batches, packed or not, and the prompts of a greedy decode
all take their rows here (`ff_jax.data.batching`, `ff_jax.training.scoring.generate_texts`), so
`parallel.global_batch` puts block p of every batch on process p's devices. A host that built any
other row would still give the same mean losses, and scores gathered by example id, as one that
built only its own: no result shows it, so tests read this log instead.

`FF_JAX_ROW_LOG=FOLDER` (tests): every block a host builds is appended, as one line
`process_index purpose row row ...`, to `FOLDER/rows.<process_index>.log`. `purpose` names what the
rows are built for (`building`: a training phase, a scoring pass, a decode; `-` where no caller
said); a row is its example's index in the set being batched, `i+j+k` for a packed row of several
examples, `-` for a row without any (filler or empty). Lines of one purpose come in the order the
batches were built, so line n of every host is its block of the same global batch.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator, Sequence
from typing import TypeVar

import jax
import numpy as np

# Names the folder of the row logs (see the module docstring); unset: no log.
ROW_LOG_ENV = "FF_JAX_ROW_LOG"

Row = TypeVar("Row")

# What the rows being built are for, innermost last (`building`).
_PURPOSE: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("row_purpose",
                                                                           default=())


@contextlib.contextmanager
def building(purpose: str) -> Iterator[None]:
  """Label the rows built inside with `purpose`, after the labels of enclosing `building`s
  (`noisy_1-2` then `stream_1`: `noisy_1-2/stream_1`)."""
  token = _PURPOSE.set((*_PURPOSE.get(), purpose))
  try:
    yield
  finally:
    _PURPOSE.reset(token)


def host_block(rows: Sequence[Row], process_index: int, process_count: int) -> list[Row]:
  """Block `process_index` of `process_count` equal blocks of a global batch's `rows` (dataset
  indices, -1 for a filler row; or for packed rows, each row's list of indices): the rows this
  host builds. Logged under `FF_JAX_ROW_LOG`."""
  per_host = len(rows) // process_count
  mine = list(rows[process_index * per_host:(process_index + 1) * per_host])
  folder = os.environ.get(ROW_LOG_ENV)
  if folder:
    _log(folder, mine)
  return mine


def _token(row: int | Sequence[int]) -> str:
  """A row as the log writes it: `i`, `i+j+k` for a packed row, `-` for a row of no example."""
  ids = [i for i in ([int(row)] if np.ndim(row) == 0 else map(int, row)) if i >= 0]
  return "+".join(map(str, ids)) if ids else "-"


def _log(folder: str, rows: Sequence[int | Sequence[int]]) -> None:
  # The process that really built the rows, whichever block it was told to build.
  index = jax.process_index()
  purpose = "/".join(_PURPOSE.get()).replace(" ", "_") or "-"  # one field of the line
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, f"rows.{index}.log"), "a", encoding="utf-8") as handle:
    handle.write(" ".join([str(index), purpose, *map(_token, rows)]) + "\n")
