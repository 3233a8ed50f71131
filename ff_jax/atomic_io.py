"""The one writer of every run artifact that is not a checkpoint, and who writes it; the one place
that tells a local run directory from one in a bucket (`run_path`).

Written once, complete or absent, wherever the run directory lives:
- on a local disk, a write goes to a temp file (or folder) in the same directory, is fsynced and
  renamed, so readers (and a rerun after a kill) see either the old file or the complete new one;
- in a bucket (`gs://...`, through etils.epath, the path layer Orbax uses), an object is created
  whole when its upload is finalized, so a file is written in place; a folder, which a bucket
  cannot rename, is uploaded under its own name and committed by a marker object written last
  (`COMMIT_MARKER`, as Orbax commits a checkpoint there), and `folder_complete` reads the marker.
On several processes only process 0 writes (`write_atomic`, `write_json_atomic`, `write_folder`,
`remove` do nothing elsewhere): hosts writing the same file or object at once would race. Every
phase and command ends at a `barrier`, after which the others see what process 0 wrote. Orbax
checkpoints are not written here: every process calls Orbax, which coordinates them and writes to
a bucket natively (TensorStore's GCS driver).

`FF_JAX_WRITE_LOG=FOLDER` (tests): every file written here is also appended, as `process_index
path`, to `FOLDER/writes.<process_index>.log`, so a test can prove each artifact had one writer.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fsspec  # etils.epath's object-store backend (installed with huggingface_hub)
import jax
from etils import epath
from jax.experimental import multihost_utils

from ff_jax.errors import ConfigError

# Names the folder of the write logs (see the module docstring); unset: no log.
WRITE_LOG_ENV = "FF_JAX_WRITE_LOG"
# Run directories and files in a bucket: Cloud Storage (what Orbax, TensorStore and gcsfs are
# tested against here).
BUCKET_SCHEMES = ("gs://",)
# The object that commits a folder written into a bucket, written after every other file of it.
COMMIT_MARKER = ".ff_jax_complete"

# A run directory or input path: a local `Path`, or an `epath.Path` for a bucket URL. Both offer
# the pathlib methods the package uses (`/`, name, parent, exists, is_dir, iterdir, glob, open,
# read_text, read_bytes); only this module writes or deletes.
AnyPath = Path | epath.Path


def is_remote(path: str | os.PathLike) -> bool:
  """Whether `path` names an object in a bucket (`gs://bucket/...`), not a local file. Other
  `scheme://` specs (`hf://`, `tfds://`) are data sources with readers of their own."""
  return str(path).startswith(BUCKET_SCHEMES)


def run_path(path: str | os.PathLike) -> AnyPath:
  """`path` as the package handles it: an absolute local `Path`, or an `epath.Path` for a bucket.

  Listings are not cached (fsspec's `use_listings_cache`): several processes write one run
  directory, and a cached listing would hide from one host what another just committed."""
  if is_remote(path):
    if importlib.util.find_spec("gcsfs") is None:  # else a bare ImportError deep in epath
      raise ConfigError(f"{path}: a bucket path needs gcsfs: pip install 'ff_jax[gcs]'")
    _uncached_listings()
    return epath.Path(path)
  return Path(path).absolute()


def _uncached_listings() -> None:
  for protocol in ("gs", "gcs"):
    fsspec.config.conf.setdefault(protocol, {})["use_listings_cache"] = False


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
  """Write via a temp file in the same directory and rename (in a bucket: one object upload,
  finalized whole): readers never see half a file. Process 0 only."""
  if not is_primary():
    return
  path = run_path(path)
  if isinstance(path, epath.Path):
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data, encoding="utf-8")
    _log_writes([path])
    return
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


def write_folder(path: str | os.PathLike, fill: Callable[[Path], Any]) -> None:
  """A folder written by `fill(tmp)` into a local temp folder and moved into place, replacing an
  older one: renamed beside `path`, or in a bucket uploaded file by file and committed by
  `COMMIT_MARKER`. Process 0 only."""
  if not is_primary():
    return
  path = run_path(path)
  if isinstance(path, epath.Path):
    _upload_folder(path, fill)
    return
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


def _upload_folder(path: epath.Path, fill: Callable[[Path], Any]) -> None:
  """`write_folder` into a bucket: the old folder (and its marker) goes first, so a reader never
  takes a mix of old and new files for complete; the marker is the last object written."""
  with tempfile.TemporaryDirectory(prefix=f"{path.name}.") as tmp:
    fill(Path(tmp))
    remove(path)
    files = sorted(p for p in Path(tmp).rglob("*") if p.is_file())
    for local in files:
      _copy(local, path / local.relative_to(tmp).as_posix())
    (path / COMMIT_MARKER).write_text("")
  _log_writes([path / p.relative_to(tmp).as_posix() for p in files])


def folder_complete(path: str | os.PathLike) -> bool:
  """Whether `write_folder` finished `path`: a local folder exists only once renamed into place; a
  bucket's has its commit marker."""
  path = run_path(path)
  if isinstance(path, epath.Path):
    return (path / COMMIT_MARKER).exists()
  return path.is_dir()


@contextlib.contextmanager
def local_folder(path: str | os.PathLike) -> Iterator[Path]:
  """A folder as a local path, for readers that take only local files (tokenizers): itself, or a
  bucket's folder downloaded to a temp folder for the `with` block."""
  path = run_path(path)
  if not isinstance(path, epath.Path):
    yield path
    return
  with tempfile.TemporaryDirectory(prefix=f"{path.name}.") as tmp:
    for remote in files_under(path):
      if remote.name != COMMIT_MARKER:
        local = Path(tmp, str(remote)[len(str(path)):].lstrip("/"))
        local.parent.mkdir(parents=True, exist_ok=True)
        _copy(remote, local)
    yield Path(tmp)


def text_handle(path: str | os.PathLike) -> io.StringIO:
  """A run file's text (UTF-8) as a handle that keeps its newlines as written, what `csv` reads;
  local or in a bucket (epath's `open` takes no `newline=`)."""
  return io.StringIO(run_path(path).read_bytes().decode("utf-8"), newline="")


def files_under(folder: AnyPath) -> Iterator[AnyPath]:
  """Every file under `folder`, at any depth (by `iterdir`: epath's `walk` and `rglob` do not
  take bucket paths)."""
  for path in folder.iterdir():
    if path.is_dir():
      yield from files_under(path)
    else:
      yield path


def local_file(path: str | os.PathLike) -> Path:
  """A file as a local path, for readers that take only local files (pyarrow, csv, gzip): itself,
  or a bucket's object downloaded once into a temp folder that lives as long as the process."""
  path = run_path(path)
  if not isinstance(path, epath.Path):
    return path
  if not path.is_file():
    raise FileNotFoundError(str(path))
  folder = Path(tempfile.mkdtemp(prefix="ff_jax_object_"))
  atexit.register(shutil.rmtree, folder, ignore_errors=True)
  local = folder / path.name
  _copy(path, local)
  return local


def _copy(source: AnyPath, dest: AnyPath) -> None:
  """One file to another, local or in a bucket, streamed: an HF export's shards are GBs."""
  with source.open("rb") as src, dest.open("wb") as dst:
    shutil.copyfileobj(src, dst, 16 << 20)


def remove(path: str | os.PathLike) -> None:
  """Delete a file or folder of the run (gone already: nothing to do). Process 0 only."""
  if not is_primary():
    return
  path = run_path(path)
  if isinstance(path, epath.Path):
    if path.is_dir():
      path.rmtree(missing_ok=True)
    elif path.exists():
      path.unlink()
  elif path.is_dir() and not path.is_symlink():
    shutil.rmtree(path, ignore_errors=True)
  else:
    path.unlink(missing_ok=True)


def _log_writes(paths: list[AnyPath]) -> None:
  folder = os.environ.get(WRITE_LOG_ENV)
  if not folder:
    return
  index = jax.process_index()
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, f"writes.{index}.log"), "a", encoding="utf-8") as handle:
    handle.write("".join(f"{index} {p}\n" for p in paths))


def is_primary() -> bool:
  """Only process 0 writes run artifacts (scores, JSONL, reports, plots)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Every process waits here until all arrive: what process 0 wrote before is visible after."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"ff_jax:{name}")


def write_json_atomic(path: str | os.PathLike, value: Any) -> None:
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
