"""The one way a run's phases train: `Finetunes` builds the `Trainer` of every finetune of a run,
one model (`single`) or a pass of K stacked replicas (`replica_pass`), resumes it from its step
checkpoints and returns what it cost, which the phase returns to the driver for its manifest entry.

Step checkpoints are a finetune's only resume mechanism: a finetune killed part-way restarts from
its newest one and replays the same batches. What a finished finetune produced (a model, a pass's
scores) is saved once by its caller, after which its step checkpoints are dropped.

`experiments.sweep`, the memory planner (`training.memory`) and `perf.bench` build their own
trainers: they sweep or measure settings and train none of a run's finetunes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ff_jax.atomic_io import remove
from ff_jax.config import PhaseConfig
from ff_jax.data.batching import TrainIterator
from ff_jax.data.templates import EncodedExample
from ff_jax.errors import DataError
from ff_jax.pipeline.context import RunContext
from ff_jax.progress import log
from ff_jax.run_files import finetune_seed
from ff_jax.training.checkpoints import PhaseCheckpoints, has_params, restore_params, save_params
from ff_jax.training.loop import LoopStats, PhaseSpec, train_and_score, train_phase
from ff_jax.training.steps import ModelRuntime, Trainer

# What finetunes cost, by finetune name: `LoopStats.as_dict()`, plus `output_save_seconds` where
# the finetune saved an output model. A phase returns it under "finetunes" (ff_jax.pipeline.driver).
Costs = dict[str, dict[str, Any]]


def cost(name: str, stats: LoopStats, **extra: float) -> Costs:
  """Finetune `name`'s cost record: its `LoopStats` and e.g. the seconds its output took to
  save."""
  return {name: {**stats.as_dict(), **{k: round(v, 3) for k, v in extra.items()}}}


class Finetunes:
  """The finetunes of one phase of a run (see the module docstring)."""

  def __init__(self, ctx: RunContext):
    self.ctx = ctx
    # One trainer per setting: a phase's passes of one size compile their step once.
    self._trainers: dict[tuple[int, Any, int, int | None], Trainer] = {}

  def seed(self, finetune: str, replica: int = 0) -> int:
    """The seed of `finetune` (a `layout.SEED_OFFSETS` key) or of its replica `replica`."""
    return finetune_seed(self.ctx.cfg.seed, finetune, replica)

  def single(self, name: str, phase: PhaseConfig, init: Callable[[], Any],
             examples: Sequence[EncodedExample], output: str, seed: int,
             snapshot_every: int = 0, runtime: ModelRuntime | None = None,
             reuse_output: bool = False) -> tuple[Any, Costs]:
    """Finetune `init()` on `examples` with `seed`, resuming from `name`'s step checkpoints; save
    the result as model `output` (once: the last step is not step-checkpointed), drop the step
    checkpoints and return (the parameters, the cost record; empty when restored).

    `reuse_output`: a later finetune of the same phase still runs, so a phase killed there reruns
    this one; it then restores `output` if it is saved already instead of training again. Only
    for a finetune whose settings are fixed for the run directory (no `rundir.RESUMABLE` key
    names its phase): a saved output is then the one this config trains.
    """
    ctx = self.ctx
    if not examples:
      raise DataError(f"phase {name}: no examples to train on")
    runtime = runtime or ctx.runtime
    costs: Costs = {}
    if reuse_output and has_params(ctx.run.model(output)):
      log(f"{name}: model {output} is saved already; restored, not trained again")
      params = restore_params(ctx.run.model(output), runtime.abstract_with_shardings())
    else:
      spec = ctx.spec(name, phase, len(examples), seed, snapshot_every)
      snapshot_dir = ctx.run.snapshots(name) if snapshot_every else None
      stats = LoopStats()
      params = train_phase(spec, self._trainer(spec, 1, runtime), init, examples,
                           ctx.run.ckpt(name), ctx.training_log, snapshot_dir, stats)
      began = time.perf_counter()
      save_params(ctx.run.model(output), params)
      costs = cost(name, stats, output_save_seconds=time.perf_counter() - began)
    # A finetune's output is saved on its own; step checkpoints only serve a resume of it.
    remove(ctx.run.ckpt(name))
    return params, costs

  def replica_pass(self, name: str, spec: PhaseSpec, finetune: str, replicas: Sequence[int],
                   init: Any, examples: Sequence[EncodedExample], ckpt_dir: Path, *,
                   stacked_init: bool = False, record: str | None = None
                   ) -> tuple[dict[str, np.ndarray], Any, Costs]:
    """Replicas `replicas` of `finetune` (`spec`'s settings, seeds `seed(finetune, i)`) trained
    together on `examples` from `init` (one model; with `stacked_init`, one per replica stacked),
    resuming from the step checkpoints in `ckpt_dir`, and the noisy set scored after the last step.

    Returns ({nll, nll_tail}: per-token means [K, N]; the final params, stacked for K > 1; the
    cost record under `record`, default `name`). One replica trains with the ordinary step, K
    with one vmapped step (`Trainer(replicas=K)`). The caller saves what it keeps of the pass and
    drops `ckpt_dir`.
    """
    ctx = self.ctx
    trainer = self._trainer(spec, len(replicas))
    streams = [self.batches(examples, spec, self.seed(finetune, i)) for i in replicas]
    checkpoints = PhaseCheckpoints(ckpt_dir)
    stats = LoopStats()
    means, params = train_and_score(
        trainer, ctx.scorer, init, streams, [spec.steps], ctx.noisy, ctx.scoring,
        stacked_init=stacked_init, name=name, stats=stats, log=ctx.training_log,
        replica_names=[f"replica_{i}" for i in replicas], checkpoints=checkpoints,
        checkpoint_minutes=spec.checkpoint_minutes, checkpoint_every=spec.checkpoint_every,
        adapter_checkpoints=spec.adapter_checkpoints)
    checkpoints.close()
    return {k: v[:, -1] for k, v in means.items()}, params, cost(record or name, stats)

  def _trainer(self, spec: PhaseSpec, replicas: int,
               runtime: ModelRuntime | None = None) -> Trainer:
    """The one place a run's finetunes get a `Trainer`: one per runtime, optimizer, schedule
    length and stack size, so finetunes with the same settings share a compiled step."""
    runtime = runtime or self.ctx.runtime
    stacked = None if replicas == 1 else replicas
    key = (id(runtime), spec.optim, spec.steps, stacked)
    if key not in self._trainers:
      self._trainers[key] = Trainer(runtime, spec.optim, spec.steps, replicas=stacked)
    return self._trainers[key]

  def batches(self, examples: Sequence[EncodedExample], spec: PhaseSpec,
              seed: int) -> TrainIterator:
    """The batch stream of finetune `spec` with `seed`, as `train_phase` builds it: this host's
    rows of every batch, for one model or as one of stacked replicas (the run's mesh has no
    `replica` axis, so a stacked trainer's `stack_block` is every replica and these rows)."""
    row_multiple = self.ctx.runtime.row_multiple(spec.optim.grad_accum_steps)
    return spec.batching.train_iterator(examples, seed, row_multiple=row_multiple,
                                        process_index=jax.process_index(),
                                        process_count=jax.process_count())
