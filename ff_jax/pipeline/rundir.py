"""The run directory: where each phase writes, and the manifest that makes a run resumable.

`manifest.json` records the run's config, the fingerprints of its data and model, and which phases
are complete. A run resumes only with the same config and data, except for the settings of phases
that have not run yet (`RESUMABLE`). It is rewritten atomically after each phase, so a phase is
complete exactly when the manifest says so; anything a killed phase left behind is ignored or
overwritten on the rerun.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ff_jax.atomic_io import barrier, remove, run_path, write_json_atomic
from ff_jax.config import ANY_TIME, RunConfig, config_from_dict, resumable_keys
from ff_jax.errors import RunDirError
from ff_jax.run_files import MANIFEST, PHASES

MANIFEST_VERSION = 1

# Config keys that may change on resume, declared on the config's own fields
# (`ff_jax.config.resumable`): memory and batching knobs, checkpoint timing and logging at any time
# (they change results only in float rounding, or not at all), and settings that matter only from
# a phase on (e.g. a new held-out set for `evaluate`, another threshold before `filter`) while that
# phase has not completed. Every other key is fixed for the life of a run directory.
RESUMABLE = resumable_keys()


class RunDir:
  """Paths inside a run directory and its manifest."""

  def __init__(self, root: str | Path):
    self.root = run_path(root)
    self.manifest_path = self.root / MANIFEST

  def model(self, name: str) -> Path:
    return self.root / "models" / name

  def ckpt(self, phase: str) -> Path:
    return self.root / "ckpt" / phase

  def snapshots(self, phase: str) -> Path:
    return self.root / "snapshots" / phase

  def file(self, name: str) -> Path:
    return self.root / name

  @property
  def tokenizer(self) -> Path:
    return self.root / "tokenizer"

  def read_manifest(self) -> dict[str, Any] | None:
    if not self.manifest_path.exists():
      return None
    try:
      return json.loads(self.manifest_path.read_text())
    except json.JSONDecodeError as err:
      raise RunDirError(f"{self.manifest_path}: unreadable manifest ({err}); pass --restart to "
                        "start this run directory over") from None

  def read_config(self, require: str) -> RunConfig:
    """The config of the run in this directory, refusing a run whose phase `require` (and so
    every earlier one) is not complete: how the experiments and the report read a run back."""
    manifest = self.read_manifest()
    if manifest is None:
      raise RunDirError(f"{self.root}: no {MANIFEST}; run `ff-jax run` (at least up to the "
                        f"{require} phase) first")
    if not self.is_complete(manifest, require):
      raise RunDirError(f"{self.root}: the {require} phase is not complete; finish the run first")
    return config_from_dict({**manifest["config"], "run_dir": str(self.root)},
                            f"{self.manifest_path} (config)")

  def open(self, config: dict[str, Any], fingerprints: dict[str, str],
           restart: bool = False, defaults: dict[str, Any] | None = None,
           redo_from: str | None = None) -> dict[str, Any]:
    """Load the manifest, refusing one written for another config or other data.

    With `restart`, everything in the directory is removed first; with `redo_from`, that phase
    and every later one count as not run (their outputs are rewritten), so e.g. the filter can
    run again with another `filter.signal` on the scores it already has. A key the manifest's
    config lacks (one a newer ff_jax added) is compared with its value in `defaults`: an old run
    resumes as long as the new key keeps its default, which is what the old code did.
    """
    if restart:
      remove(self.root)
    barrier("run directory cleared")
    manifest = self.read_manifest()
    occupied = self.root.exists() and any(self.root.iterdir())
    # Every process decides from the same view: process 0 writes the manifest only after all have
    # looked (else a slower process finds it half-way and refuses a "non-empty" directory).
    barrier("run directory read")
    if manifest is not None and redo_from is not None:
      if redo_from not in PHASES:
        raise RunDirError(f"--from {redo_from}: not a phase; phases are {', '.join(PHASES)}")
      for phase in PHASES[PHASES.index(redo_from):]:
        manifest["phases"].pop(phase, None)
    if manifest is None:
      if occupied:
        raise RunDirError(f"{self.root}: exists, is not empty and has no manifest.json; choose "
                          "another run_dir or pass --restart to clear it")
      manifest = {"version": MANIFEST_VERSION, "config": config, "fingerprints": fingerprints,
                  "phases": {}, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
      self.write(manifest)
      return manifest
    changed = _diff(_with_defaults(manifest.get("config", {}), defaults or {}), config)
    blocking = [k for k in changed if not self._still_open(manifest, k)]
    if blocking:
      shown = ", ".join(blocking[:6]) + (" ..." if len(blocking) > 6 else "")
      raise RunDirError(f"{self.root} holds a run with another config (differs at: {shown}); "
                        "use another run_dir, or pass --restart to start over")
    old_prints = manifest.get("fingerprints", {})
    moved = sorted(k for k in set(old_prints) | set(fingerprints)
                   if old_prints.get(k) != fingerprints.get(k))
    blocking = [k for k in moved if not self._still_open(manifest, f"data.{k}")]
    if blocking:
      raise RunDirError(f"{self.root} was run on other data or another model (fingerprint of "
                        f"{', '.join(blocking)} changed); use another run_dir, or pass --restart")
    if changed or moved or redo_from:
      # Only settings of phases that have not run yet changed: the run goes on with them.
      manifest.update(config=config, fingerprints=fingerprints)
      self.write(manifest)
    return manifest

  @classmethod
  def _still_open(cls, manifest: dict[str, Any], key: str) -> bool:
    """Whether config key `key` may change: the most specific `RESUMABLE` entry that covers it
    says at any time, or names a phase that has not completed yet."""
    matches = [p for p in RESUMABLE if key == p or key.startswith(p + ".")]
    if not matches:
      return False
    until = RESUMABLE[max(matches, key=len)]
    return until == ANY_TIME or not cls.is_complete(manifest, until)

  def write(self, manifest: dict[str, Any]) -> None:
    write_json_atomic(self.manifest_path, manifest)

  def mark_complete(self, manifest: dict[str, Any], phase: str, seconds: float,
                    **info: Any) -> None:
    manifest["phases"][phase] = {"complete": True, "seconds": round(seconds, 2), **info}
    self.write(manifest)
    barrier(f"{phase} complete")  # the phase's artifacts (written by process 0) are now final

  @staticmethod
  def is_complete(manifest: dict[str, Any], phase: str) -> bool:
    return bool(manifest["phases"].get(phase, {}).get("complete"))


def _with_defaults(old: Any, defaults: Any) -> Any:
  """`old` with the keys it lacks filled in from `defaults`, recursively."""
  if not isinstance(old, dict) or not isinstance(defaults, dict):
    return old
  return {**defaults, **{k: _with_defaults(v, defaults.get(k)) for k, v in old.items()}}


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
  """Dotted keys whose values differ (run_dir itself may move)."""
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for key in sorted(set(old) | set(new)):
      if not prefix and key == "run_dir":
        continue
      out += _diff(old.get(key), new.get(key), f"{prefix}{key}.")
    return out
  return [] if old == new else [prefix.rstrip(".")]
