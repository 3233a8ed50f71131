"""Orbax checkpoints: a training phase's step checkpoints and the models each phase ends with.

Each training phase owns one `CheckpointManager` directory holding the train state (params,
optimizer state, step) and a JSON item (data-iterator position, phase metadata) saved together, so a
restored step always resumes with the batch that follows it. Restores pass target shardings, so a
run can resume on another mesh. Every process calls save/restore (Orbax picks the writer); a phase
ends with `wait_until_finished()` so nothing half-written is ever taken as complete.

Orbax's managers sync processes with barriers whose names are fixed strings; two managers alive in
one process at once (a phase's async save still finalizing while a snapshot is written) would wait
on the same name from two threads, which the coordination service refuses ("Barrier ... is already
ongoing"). Each manager's barriers are therefore prefixed with a name derived from its directory,
the same on every process.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from ff_jax.atomic_io import run_path


class PhaseCheckpoints:
  """Step checkpoints of one phase: `save(step, state, meta)`, `restore_latest(target)`."""

  def __init__(self, directory: str | Path):
    self.directory = run_path(directory)
    barrier_prefix = "ff_" + hashlib.sha1(str(self.directory).encode()).hexdigest()[:12]
    # The newest step only: Orbax deletes the previous one once the new one is committed, so a
    # kill mid-save still finds a complete checkpoint.
    options = ocp.CheckpointManagerOptions(
      max_to_keep=1, create=True, enable_async_checkpointing=True,
      multiprocessing_options=ocp.options.MultiprocessingOptions(
        barrier_sync_key_prefix=barrier_prefix))
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=True)

  def restore_latest(self, target: Any) -> tuple[int, Any, dict[str, Any]] | None:
    """(step, state, meta) of the newest complete checkpoint, restored onto `target`'s shardings."""
    step = self.manager.latest_step()
    if step is None:
      return None
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    return step, restored.state, restored.meta

  def wait_until_finished(self) -> None:
    """Block until every async save is committed."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def save_params(directory: str | Path, params: Any) -> None:
  """One-shot Orbax save of a parameter tree (phase outputs such as M0, M1, M2, clean).

  A resumed phase may save again where a killed run already saved (Orbax refuses to overwrite a
  step): the new tree goes in as the next step and the old one is dropped once it is complete.
  """
  ckpt = PhaseCheckpoints(directory)
  latest = ckpt.latest_step()
  ckpt.save(0 if latest is None else latest + 1, params, {})
  ckpt.close()


def has_params(directory: str | Path) -> bool:
  """Whether `directory` holds a complete tree saved by `save_params`."""
  if not run_path(directory).is_dir():
    return False
  ckpt = PhaseCheckpoints(directory)
  latest = ckpt.latest_step()
  ckpt.close()
  return latest is not None


def restore_params(directory: str | Path, target: Any) -> Any:
  """Restore a tree saved by `save_params` onto the shardings in `target` (ShapeDtypeStructs)."""
  ckpt = PhaseCheckpoints(directory)
  restored = ckpt.restore_latest(target)
  ckpt.close()
  if restored is None:
    raise FileNotFoundError(f"{directory}: no checkpoint")
  return restored[1]
