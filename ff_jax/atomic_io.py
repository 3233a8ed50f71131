"""The one writer of every run artifact that is not a checkpoint, and who writes it.

A write goes to a temp file (or folder) in the same directory, is fsynced and renamed, so readers
(and a rerun after a kill) see either the old file or the complete new one, never half. On several
processes only process 0 writes (`write_atomic`, `write_json_atomic`, `write_folder`, `remove`
do nothing elsewhere): on gcsfuse, where a rename is a copy, hosts writing the same object at once
would race. Every phase and command ends at a `barrier`, after which the others see what process 0
wrote. Orbax checkpoints are not written here: every process calls Orbax, which coordinates them.

`FF_JAX_WRITE_LOG=FOLDER` (tests): every file written here is also appended, as `process_index
path`, to `FOLDER/writes.<process_index>.log`, so a test can prove each artifact had one writer.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from jax.experimental import multihost_utils

# Names the folder of the write logs (see the module docstring); unset: no log.
WRITE_LOG_ENV = "FF_JAX_WRITE_LOG"


def write_atomic(path: str | Path, data: str | bytes) -> None:
  """Write via a temp file in the same directory and rename: readers never see half a file.
  Process 0 only."""
  if not is_primary():
    return
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  mode = "wb" if isinstance(data, bytes) else "w"
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as handle:
      handle.write(data)
      handle.flush()
      os.fsync(handle.fileno())
    os.chmod(tmp, _created_mode(0o666))  # mkstemp's 0600 would hide the file from other users
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise
  _log_writes([path])


def _created_mode(full: int) -> int:
  """The mode `open` would give a new file (0o666) or folder (0o777) under this process's umask."""
  umask = os.umask(0)
  os.umask(umask)
  return full & ~umask


def write_folder(path: str | Path, fill: Callable[[Path], Any]) -> None:
  """A folder written by `fill(tmp)` into a temp folder beside `path` and renamed into place
  (replacing an older one). Process 0 only."""
  if not is_primary():
    return
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
  try:
    fill(tmp)
    os.chmod(tmp, _created_mode(0o777))  # mkdtemp's 0700 would hide the folder from other users
    if path.exists():
      shutil.rmtree(path) if path.is_dir() else path.unlink()
    tmp.rename(path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  _log_writes(sorted(p for p in path.rglob("*") if p.is_file()))


def remove(path: str | Path) -> None:
  """Delete a file or folder of the run (gone already: nothing to do). Process 0 only."""
  if not is_primary():
    return
  path = Path(path)
  if path.is_dir() and not path.is_symlink():
    shutil.rmtree(path, ignore_errors=True)
  else:
    path.unlink(missing_ok=True)


def _log_writes(paths: list[Path]) -> None:
  folder = os.environ.get(WRITE_LOG_ENV)
  if not folder:
    return
  index = jax.process_index()
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, f"writes.{index}.log"), "a", encoding="utf-8") as handle:
    handle.write("".join(f"{index} {p.absolute()}\n" for p in paths))


def is_primary() -> bool:
  """Only process 0 writes run artifacts (scores, JSONL, reports, plots)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Every process waits here until all arrive: what process 0 wrote before is visible after."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"ff_jax:{name}")


def write_json_atomic(path: str | Path, value: Any) -> None:
  """`json_text(value)` (strict JSON, sorted keys, NaN as null), written atomically on process 0."""
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
