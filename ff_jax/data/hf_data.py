"""Hugging Face `datasets` sources: the `hf://` spelling, loading, and the kept rows written back.

The spelling follows `datasets.load_dataset(path, name, split=..., revision=...)`, with the config
(`name`, the "subset" of the Hub's viewer) as a path segment after the dataset, where the Hub's
viewer and its parquet conversion put it (`/datasets/heegyu/bbq/viewer/Age/test`):

  hf://org/name[/config][:split][@revision]   load_dataset("org/name", config, split=split,
                                              revision=revision); a Hub id has exactly one slash,
                                              so a third segment is always the config
  hf://name[:split][@revision]                a Hub id without an org (a legacy one such as
                                              `squad`); its configs need the org/name id
  hf://PATH[/config][:split]                  a local folder: PATH starts with /, ./, ../ or ~,
                                              or is an existing folder; a `save_to_disk` folder
                                              (its split of a DatasetDict) or a dataset repo on
                                              disk (README.md with configs, or data files), whose
                                              config is the last segment when PATH/config is no
                                              dataset folder itself
  FOLDER (no scheme)                          the same as hf://FOLDER:train

The split defaults to `train`. `hf://datasets/...`, `hf://models/...` and `hf://spaces/...` are
huggingface_hub's file-system paths (HfFileSystem: one file of a repo), not datasets; they are
refused with the spelling above. The spec, config and revision included, is part of the run's
config, so a run directory refuses to resume on another config or revision; the records'
`source` names the dataset and its config, so their fingerprint differs too.

The kept rows of every `datasets` source come back as a `save_to_disk` folder
(`ds.select(kept).save_to_disk`): same features, same rows, reloaded with `load_from_disk`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from pathlib import Path
from typing import Any

from ff_jax.atomic_io import write_folder
from ff_jax.data.kept import Source
from ff_jax.data.rows import records_from_rows
from ff_jax.errors import DataError

SCHEME = "hf://"
SPELLING = "hf://org/name[/config][:split][@revision]"
# huggingface_hub's own `hf://` file-system roots (HfFileSystem), never a dataset id's org.
_HUB_FS_ROOTS = ("datasets/", "models/", "spaces/")
# The files that make a folder a dataset of its own (save_to_disk folders, a repo's card).
_DATASET_FILES = ("dataset_dict.json", "state.json", "README.md")
# What `datasets` says of a multi-config dataset named without its config (with and without
# features declared in its card).
_NO_CONFIG_MESSAGES = ("Config name is missing", "BuilderConfig 'default' not found")


@dataclasses.dataclass(frozen=True)
class HfSpec:
  """A parsed `hf://` spec: what `load_dataset` (or `load_from_disk`) is called with."""

  name: str  # a Hub id or a local folder
  config: str | None = None
  split: str = "train"
  revision: str | None = None
  local: bool = False

  @property
  def label(self) -> str:
    """The records' `source`: the dataset and its config."""
    return f"{self.name}/{self.config}" if self.config else self.name


def _is_dataset_folder(path: Path) -> bool:
  return path.is_dir() and any((path / f).is_file() for f in _DATASET_FILES)


def _saved_folder(path: Path) -> bool:
  """A `save_to_disk` folder (a Dataset's state.json or a DatasetDict's dataset_dict.json)."""
  return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _local_name(text: str) -> tuple[str, str | None]:
  """(folder, config) of a local `hf://` path: the folder itself unless it is no dataset folder
  and its parent is one (a config-named data folder of a repo is no dataset folder: no card).
  The folder stays as written (`~` included): it is the records' `source`."""
  path = Path(text).expanduser()
  if _is_dataset_folder(path):
    return text, None
  if path.name and _is_dataset_folder(path.parent):
    return text.rstrip("/").rsplit("/", 1)[0], path.name
  if path.is_dir():
    return text, None  # data files only: load_dataset infers their builder
  raise DataError(f"{SCHEME}{text}: no such folder (a local dataset folder, optionally "
                  "followed by /config)")


def _hub_name(spec: str, text: str) -> tuple[str, str | None]:
  """(Hub id, config) of `org/name[/config]` or `name`."""
  parts = text.split("/")
  if len(parts) > 3 or not all(parts):
    raise DataError(f"{spec}: expected {SPELLING} (a Hub id has one slash, the config follows "
                    "it); a local folder starts with /, ./ or ~")
  return "/".join(parts[:2]), (parts[2] if len(parts) == 3 else None)


def _is_local(text: str) -> bool:
  return text.startswith(("/", "./", "../", "~")) or Path(text).expanduser().is_dir()


def parse_hf_spec(spec: str) -> HfSpec:
  """The parts of an `hf://` spec (module docstring); a malformed one is a `DataError`."""
  body = spec[len(SCHEME):]
  if body.startswith(_HUB_FS_ROOTS):
    raise DataError(f"{spec}: hf://{body.split('/')[0]}/... is huggingface_hub's path to a file "
                    f"of a repo, not a dataset; name a Hub dataset as {SPELLING} (e.g. "
                    "hf://heegyu/bbq/Age:test), or download the file (hf download org/name FILE "
                    "--repo-type dataset) and pass its local path")
  if body and Path(body).expanduser().is_dir():  # a folder as a whole: no split or revision
    return HfSpec(*_local_name(body), local=True)
  rest, at, revision = body.partition("@")
  text, _, split = rest.partition(":")
  if not text or (at and not revision):
    raise DataError(f"{spec}: expected {SPELLING}")
  if _is_local(text):
    if at:
      raise DataError(f"{spec}: @{revision} names a Hub commit; a local folder has none")
    return HfSpec(*_local_name(text), split=split or "train", local=True)
  name, config = _hub_name(spec, text)
  return HfSpec(name, config, split or "train", revision or None)


def _load_saved(spec: str, hf: HfSpec) -> Any:
  import datasets  # optional and heavy: only needed for this source

  if hf.config:
    raise DataError(f"{spec}: {hf.name} is a save_to_disk folder, which has no configs")
  ds = datasets.load_from_disk(hf.name)
  if isinstance(ds, datasets.DatasetDict):
    if hf.split not in ds:
      raise DataError(f"{spec}: no split {hf.split!r}; the dataset has {sorted(ds)}")
    ds = ds[hf.split]
  return ds


def _load(spec: str, hf: HfSpec) -> Any:
  """The split as a `datasets.Dataset`; any loading failure is one `DataError`."""
  try:
    import datasets  # optional and heavy: only needed for this source
  except ImportError:
    raise DataError(f"{spec}: reading Hugging Face datasets needs the optional `datasets` "
                    "package (pip install 'ff_jax[datasets]')") from None
  try:
    name = str(Path(hf.name).expanduser()) if hf.local else hf.name
    if hf.local and _saved_folder(Path(name)):
      return _load_saved(spec, dataclasses.replace(hf, name=name))
    return datasets.load_dataset(name, hf.config, split=hf.split, revision=hf.revision)
  except DataError:
    raise
  except Exception as e:  # any loading failure here means the user's source is wrong
    hint = ""
    if hf.config is None and any(m in str(e) for m in _NO_CONFIG_MESSAGES):
      hint = f"; name one as {SCHEME}{hf.name}/<config>[:split]"
    raise DataError(f"{spec}: cannot load ({type(e).__name__}: {e}){hint}") from None


def hf_source(spec: str, hf: HfSpec, columns: dict[str, str]) -> Source:
  """The records of a `datasets` source; its kept rows come back as a `save_to_disk` folder."""
  ds = _load(spec, hf)
  rows = ((f"{spec} row {i}", row) for i, row in enumerate(ds))
  records, conversations = records_from_rows(rows, columns, hf.label, spec)

  def write(out: Path, keep: list[Hashable]) -> None:
    write_folder(out, lambda tmp: ds.select(keep).save_to_disk(str(tmp)))

  return Source(spec, records, list(range(len(records))), "filtered/", write, conversations)
