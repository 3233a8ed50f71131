"""The phase training loop: jitted steps, step checkpoints with the iterator position, resume.

A training phase is `steps` optimizer steps over a deterministic batch stream. Every
`checkpoint_every` steps the train state and the iterator state are saved together, so a run killed
at any moment restarts from the last checkpoint and replays exactly the batches that followed it:
the result is bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ff_jax import parallel
from ff_jax.data.batching import TrainIterator
from ff_jax.data.templates import EncodedExample
from ff_jax.errors import ConfigError
from ff_jax.models import lora
from ff_jax.progress import MetricsLog, Progress
from ff_jax.training.checkpoints import PhaseCheckpoints, save_params
from ff_jax.training.steps import ModelRuntime, OptimConfig, Trainer


@dataclasses.dataclass(frozen=True)
class PhaseSpec:
  """What one training phase does; built from a `config.PhaseConfig` by the pipeline."""

  name: str
  steps: int
  batch_size: int
  optim: OptimConfig
  seed: int
  buckets: Sequence[int]
  checkpoint_every: int = 50
  snapshot_every: int = 0  # also keep the params every k steps (forgetting curves)
  # LoRA: step checkpoints keep the adapters (and their optimizer state) only; the frozen base
  # comes back from `init_params()` on resume.
  adapter_checkpoints: bool = False


def phase_steps(steps: int, epochs: float, num_examples: int, batch_size: int, name: str) -> int:
  """Optimizer steps of a phase: explicit `steps`, else `epochs` passes over the data.

  Exactly one of the two is used; the official code's `max_steps=999999` default silently
  overrode epochs, so an ambiguous setting is an error here.
  """
  if steps and epochs:
    raise ConfigError(f"{name}: set either steps ({steps}) or epochs ({epochs}), not both")
  if steps:
    return int(steps)
  if epochs:
    return max(1, math.ceil(epochs * num_examples / batch_size))
  raise ConfigError(f"{name}: set steps or epochs")


def train_phase(spec: PhaseSpec, runtime: ModelRuntime, init_params: Callable[[], Any],
                examples: Sequence[EncodedExample], pad_id: int, ckpt_dir: str | Path,
                metrics: MetricsLog | None = None, snapshot_dir: str | Path | None = None) -> Any:
  """Train for `spec.steps` steps from `init_params()` (or the newest step checkpoint).

  With `spec.snapshot_every`, the params after every k-th step are also saved under
  `snapshot_dir/step_<k>` (Orbax), for forgetting curves. Returns the final params.
  """
  trainer = Trainer(runtime, spec.optim, spec.steps)
  iterator = TrainIterator(examples, spec.batch_size, spec.seed, spec.buckets, pad_id=pad_id,
                           process_index=jax.process_index(),
                           process_count=jax.process_count())
  ckpts = PhaseCheckpoints(ckpt_dir)
  adapters_only = spec.adapter_checkpoints and runtime.cfg.lora.rank > 0

  def saved(state):  # what a step checkpoint holds
    if not adapters_only:
      return state
    return {**state, "params": lora.split(state["params"])[0]}

  restored = ckpts.restore_latest(saved(trainer.abstract_state()))
  if restored is not None:
    step, state, meta = restored
    iterator.restore(meta["iterator"])
    if adapters_only:
      state["params"] = lora.combine(state["params"], lora.split(init_params())[1])
  else:
    step = 0
    state = trainer.init_state(init_params())
  progress = Progress(spec.name, spec.steps)
  progress.update(step, force=True)
  loss = float("nan")
  while step < spec.steps:
    local, _ = iterator.next_batch()
    batch = parallel.global_batch(local, runtime.mesh, runtime.rules)
    state, step_metrics, _ = trainer.step(state, batch)
    step += 1
    if spec.snapshot_every and snapshot_dir and step % spec.snapshot_every == 0:
      save_params(Path(snapshot_dir) / f"step_{step}", state["params"])
    if step % max(1, spec.checkpoint_every) == 0 or step == spec.steps:
      loss = float(step_metrics["loss"])
      if metrics is not None:
        metrics.write(phase=spec.name, step=step, loss=loss,
                      grad_norm=float(step_metrics["grad_norm"]),
                      lr=trainer.learning_rate(step - 1))
      ckpts.save(step, saved(state), {"iterator": iterator.state()})
    progress.update(step, extra=f"loss {loss:.3f}" if np.isfinite(loss) else "")
  ckpts.close()
  return state["params"]


def snapshot_steps(snapshot_dir: str | Path) -> list[int]:
  """Steps of the snapshots saved by `train_phase`, ascending."""
  folder = Path(snapshot_dir)
  if not folder.is_dir():
    return []
  return sorted(int(p.name.removeprefix("step_")) for p in folder.glob("step_*"))
