"""Atomic file writes for every run artifact that is not a checkpoint, and who writes them.

A write goes to a temp file in the same directory, is fsynced and renamed, so readers (and a rerun
after a kill) see either the old file or the complete new one, never half. On several processes
only the primary one writes; the others wait at a `barrier` for what it wrote.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
from jax.experimental import multihost_utils


def write_atomic(path: str | Path, data: str | bytes) -> None:
  """Write via a temp file in the same directory and rename: readers never see half a file."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  mode = "wb" if isinstance(data, bytes) else "w"
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as handle:
      handle.write(data)
      handle.flush()
      os.fsync(handle.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def is_primary() -> bool:
  """Only one process writes run artifacts (scores, JSONL, reports)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Every process waits here until all arrive: what process 0 wrote before is visible after."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"ff_jax:{name}")


def write_json_atomic(path: str | Path, value: Any) -> None:
  """`json_text(value)` (strict JSON, sorted keys, NaN as null), written atomically."""
  write_atomic(path, json_text(value) + "\n")


def json_text(value: Any, indent: int | None = 2) -> str:
  """Strict JSON (RFC 8259) of `value`: sorted keys, arrays and NumPy scalars as plain lists and
  numbers, and every NaN or infinity as null, so any parser (jq, JavaScript) reads it. Readers that
  turn a column back into an array get NaN again from `np.asarray(column, dtype=np.float64)`."""
  return json.dumps(finite_json(value), indent=indent, sort_keys=True, allow_nan=False)


def finite_json(value: Any) -> Any:
  """`value` as plain JSON types: dicts, lists, str, int, bool, None and finite floats (a
  non-finite float becomes None, a NumPy array a list, a NumPy scalar a Python one)."""
  if isinstance(value, dict):
    return {key: finite_json(item) for key, item in value.items()}
  if isinstance(value, list | tuple):
    return [finite_json(item) for item in value]
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if value is None or isinstance(value, str | int):  # bool is an int
    return value
  if hasattr(value, "tolist"):  # NumPy/JAX arrays and scalars
    return finite_json(value.tolist())
  raise TypeError(f"not JSON serialisable: {type(value).__name__}")
