"""The training step loop, for one model or K stacked replicas, and the two ways it is driven.

`train_loop` is the one loop: batches onto the mesh, the jitted step, progress, optional step
checkpoints with resume, and work after chosen steps (parameter snapshots, scoring).
`train_phase` runs a pipeline phase through it with step checkpoints: every `checkpoint_every`
steps the train state and the iterator state are saved together, so a run killed at any moment
restarts from the last checkpoint and replays exactly the batches that followed it; the result is
bit-identical to an uninterrupted run. `train_and_score` trains in memory and scores a set of
examples after given steps (sweeps and replica ensembles).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from ff_jax.data.batching import TrainIterator
from ff_jax.data.templates import EncodedExample
from ff_jax.errors import ConfigError
from ff_jax.models import lora
from ff_jax.progress import MetricsLog, Progress
from ff_jax.training.checkpoints import PhaseCheckpoints, save_params
from ff_jax.training.replicas import StackedBatches
from ff_jax.training.scoring import score_examples, score_snapshots
from ff_jax.training.steps import ModelRuntime, OptimConfig, Scorer, Trainer


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


class BatchStream(Protocol):
  """A deterministic, resumable source of host batches (`TrainIterator`, `StackedBatches`)."""

  def next_batch(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]: ...

  def state(self) -> dict[str, Any]: ...

  def restore(self, state: dict[str, Any]) -> None: ...


def train_loop(trainer: Trainer, init_params: Callable[[], Any], batches: BatchStream, steps: int,
               name: str, *, stacked_init: bool = False,
               checkpoints: PhaseCheckpoints | None = None, checkpoint_every: int = 50,
               adapter_checkpoints: bool = False, metrics: MetricsLog | None = None,
               hook: Callable[[int, Any], None] | None = None,
               hook_steps: Collection[int] = ()) -> Any:
  """Train for `steps` steps of `batches` from `init_params()` (`trainer.init_state(...,
  stacked_init)`) or from the newest step checkpoint; returns the final params.

  `checkpoints`: every `checkpoint_every` steps and after the last, the train state and the
  position of `batches` are saved (`adapter_checkpoints` on a LoRA model: the adapters only, the
  frozen base comes back from `init_params()` on resume), and the loss is read, shown and written
  to `metrics`. `hook(step, params)` runs after every step in `hook_steps` trained by this call.
  """
  adapters_only = adapter_checkpoints and trainer.runtime.cfg.lora.rank > 0

  def saved(state):  # what a step checkpoint holds
    if not adapters_only:
      return state
    return {**state, "params": lora.split(state["params"])[0]}

  restored = None
  if checkpoints is not None:
    restored = checkpoints.restore_latest(saved(trainer.abstract_state()))
  if restored is not None:
    step, state, meta = restored
    batches.restore(meta["iterator"])
    if adapters_only:
      state["params"] = lora.combine(state["params"], lora.split(init_params())[1])
  else:
    step = 0
    state = trainer.init_state(init_params(), stacked=stacked_init)
  progress = Progress(name if trainer.replicas is None else f"{name} x{trainer.replicas}", steps)
  progress.update(step, force=True)
  loss = np.float32("nan")  # one per replica once read
  while step < steps:
    local, _ = batches.next_batch()
    state, step_metrics = trainer.step(state, trainer.put_batch(local))
    step += 1
    if hook is not None and step in hook_steps:
      hook(step, state["params"])
    if checkpoints is not None and (step % max(1, checkpoint_every) == 0 or step == steps):
      loss = np.asarray(step_metrics["loss"])
      if metrics is not None:
        metrics.write(phase=name, step=step, loss=loss.tolist(),
                      grad_norm=np.asarray(step_metrics["grad_norm"]).tolist(),
                      lr=trainer.learning_rate(step - 1))
      checkpoints.save(step, saved(state), {"iterator": batches.state()})
    elif progress.due(step):
      # Steps are dispatched asynchronously: wait for the device before printing, so the rate
      # shown is the device's, not the dispatcher's.
      jax.block_until_ready(state["step"])
    progress.update(step, extra=f"loss {loss.mean():.3f}" if np.isfinite(loss).all() else "")
  return state["params"]


def train_phase(spec: PhaseSpec, runtime: ModelRuntime, init_params: Callable[[], Any],
                examples: Sequence[EncodedExample], pad_id: int, ckpt_dir: str | Path,
                metrics: MetricsLog | None = None, snapshot_dir: str | Path | None = None) -> Any:
  """Train for `spec.steps` steps from `init_params()` (or the newest step checkpoint).

  With `spec.snapshot_every`, the params after every k-th step are also saved under
  `snapshot_dir/step_<k>` (Orbax), for forgetting curves. Returns the final params.
  """
  trainer = Trainer(runtime, spec.optim, spec.steps)
  batches = TrainIterator(examples, spec.batch_size, spec.seed, spec.buckets, pad_id=pad_id,
                          process_index=jax.process_index(), process_count=jax.process_count())
  snapshot_at: Collection[int] = ()
  if spec.snapshot_every and snapshot_dir:
    snapshot_at = range(spec.snapshot_every, spec.steps + 1, spec.snapshot_every)

  def snapshot(step: int, params: Any) -> None:
    save_params(Path(snapshot_dir) / f"step_{step}", params)

  checkpoints = PhaseCheckpoints(ckpt_dir)
  params = train_loop(trainer, init_params, batches, spec.steps, spec.name,
                      checkpoints=checkpoints, checkpoint_every=spec.checkpoint_every,
                      adapter_checkpoints=spec.adapter_checkpoints, metrics=metrics,
                      hook=snapshot, hook_steps=snapshot_at)
  checkpoints.close()
  return params


def train_and_score(trainer: Trainer, scorer: Scorer, init_params: Any,
                    iterators: Sequence[TrainIterator], steps: Sequence[int],
                    examples: Sequence[EncodedExample], score_batch_size: int,
                    buckets: Sequence[int], pad_id: int, *, stacked_init: bool = False,
                    name: str = "train") -> tuple[np.ndarray, Any]:
  """Train in memory to max(steps), scoring `examples` after each step in `steps`: (per-token
  NLL [R, len(steps), N] with R = `trainer.replicas` or 1, the final params).

  One model reads `iterators[0]`; K replicas read one iterator each (`StackedBatches`) and start
  from `init_params` (one model), or with `stacked_init` from K models stacked on a leading axis.
  `init_params` stays usable: the loop trains a copy where the step would donate it.
  """
  steps = sorted(set(int(s) for s in steps))
  replicas = trainer.replicas
  if len(iterators) != (replicas or 1):
    raise ConfigError(f"{len(iterators)} batch streams for {replicas or 1} replicas")
  batches = iterators[0] if replicas is None else StackedBatches(iterators, pad_id)
  # Broadcasting one model to K replicas makes new arrays; otherwise the first step would
  # donate the caller's.
  own_copy = replicas is None or stacked_init
  nll = np.full((replicas or 1, len(steps), len(examples)), np.nan)

  def score(step: int, params: Any) -> None:
    score_fn = score_examples if replicas is None else score_snapshots
    stats = score_fn(scorer, params, examples, score_batch_size, buckets, pad_id,
                     name=f"{name}/score@{step}")
    nll[:, steps.index(step)] = stats["nll_sum"] / np.maximum(stats["tokens"], 1.0)

  params = train_loop(
      trainer, lambda: jax.tree.map(jnp.copy, init_params) if own_copy else init_params,
      batches, max(steps), name, stacked_init=stacked_init, hook=score, hook_steps=set(steps))
  return nll, params


def snapshot_steps(snapshot_dir: str | Path) -> list[int]:
  """Steps of the snapshots saved by `train_phase`, ascending."""
  folder = Path(snapshot_dir)
  if not folder.is_dir():
    return []
  return sorted(int(p.name.removeprefix("step_")) for p in folder.glob("step_*"))
