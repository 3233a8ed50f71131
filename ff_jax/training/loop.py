"""The training step loop, for one model or K stacked replicas, and the two ways it is driven.

`train_loop` is the one loop: batches onto the mesh, the jitted step, progress, records of loss,
learning rate, grad norm and throughput every N steps (`progress.TrainingLog`), optional step
checkpoints with resume, work after chosen steps (parameter snapshots, scoring), and what the loop
cost (`LoopStats`). `train_phase` runs a pipeline phase through it with step checkpoints: every
`checkpoint_minutes` of wall time (or every `checkpoint_every` steps, for deterministic tests) the
train state and the iterator state are saved together, so a run killed at any moment restarts from
the last checkpoint and replays exactly the batches that followed it; the result is bit-identical
to an uninterrupted run. A phase's last step is never step-checkpointed: its caller saves the
phase's output model, once. `train_and_score` trains in memory and scores a set of examples after
given steps (sweeps and replica ensembles).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from ff_jax.atomic_io import run_path
from ff_jax.data.batching import Batching, TrainIterator, token_slots
from ff_jax.data.host_rows import building
from ff_jax.data.templates import EncodedExample
from ff_jax.errors import ConfigError
from ff_jax.models import lora
from ff_jax.progress import LoopLog, Progress, TrainingLog
from ff_jax.training.checkpoints import PhaseCheckpoints, save_params
from ff_jax.training.replicas import StackedBatches
from ff_jax.training.scoring import per_token_means, score_examples, score_snapshots
from ff_jax.training.steps import OptimConfig, Scorer, Trainer

# With several processes the clock is read every this many steps only: process 0's reading is
# broadcast (a small collective, and a host sync) so that every process saves at the same step.
MULTIPROCESS_CLOCK_STEPS = 10


@dataclasses.dataclass(frozen=True)
class PhaseSpec:
  """What one training phase does; built from a `config.PhaseConfig` by the pipeline."""

  name: str
  steps: int
  batching: Batching  # the training batches (rows, buckets, pad id, packing)
  optim: OptimConfig
  seed: int
  # step checkpoints by wall time (0: none; a run's default is `config.CHECKPOINT_MINUTES`)
  checkpoint_minutes: float = 0.0
  checkpoint_every: int = 0  # > 0: every this many steps instead (deterministic, for tests)
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


@dataclasses.dataclass
class LoopStats:
  """What one `train_loop` call cost; the pipeline writes `as_dict()` into the manifest's phase
  entry (ff_jax.pipeline.context). Times are wall seconds of the loop's clock; a resumed loop
  counts from its checkpoint on."""

  steps: int = 0  # steps trained by this call
  seconds: float = 0.0  # the whole call: restore or init, steps, hooks, saves
  # JAX's own tracing, lowering and compiling (or loading from its persistent cache) of the new
  # programs (`CompileTimer`); the first step of each runs on top of this and counts as compute.
  compile_seconds: float = 0.0
  compiles: int = 0  # programs traced by this call (0 when the trainer had them already)
  compiled_shapes: int = 0  # distinct batch shapes stepped (each one a program of the trainer)
  checkpoint_seconds: float = 0.0  # blocked in step-checkpoint saves, and waiting for the last
  checkpoints: int = 0  # step checkpoints saved
  hook_seconds: float = 0.0  # in the work after chosen steps (snapshots, scoring)
  # token positions of every batch stepped (`padding_counts`), every process's rows
  token_slots: int = 0
  padded_tokens: int = 0  # ... that hold padding

  def as_dict(self) -> dict[str, Any]:
    return {k: round(v, 3) if isinstance(v, float) else v
            for k, v in dataclasses.asdict(self).items()}

  @property
  def padded_share(self) -> float:
    return self.padded_tokens / self.token_slots if self.token_slots else 0.0


class CompileTimer:
  """Seconds JAX spends tracing, lowering and compiling programs (or loading them from the
  persistent compilation cache) while entered, from the durations it reports through
  `jax.monitoring`: the compile alone, without the first run of the program that a wall clock
  around a jitted call would add (a whole train step of a real model)."""

  # One event of each per program: jits nested in it are traced within its trace, which JAX
  # reports once (checked on jax 0.10), and lowered and compiled with it.
  EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
            "/jax/core/compile/jaxpr_to_mlir_module_duration",
            "/jax/core/compile/backend_compile_duration")

  def __init__(self):
    self.seconds = 0.0

  def _record(self, event: str, duration: float, **_: Any) -> None:
    if event in self.EVENTS:
      self.seconds += duration

  def __enter__(self) -> CompileTimer:
    jax.monitoring.register_event_duration_secs_listener(self._record)
    return self

  def __exit__(self, *exc: Any) -> None:
    jax.monitoring.unregister_event_duration_listener(self._record)


def padding_counts(batch: dict[str, np.ndarray]) -> tuple[int, int]:
  """(token slots, padding slots) of a host batch, packed or not; what counts as padding is
  `data.batching.token_slots`'s to say."""
  real, slots = token_slots(batch)
  return slots, slots - real


def train_loop(trainer: Trainer, init_params: Callable[[], Any], batches: BatchStream, steps: int,
               name: str, *, stacked_init: bool = False,
               checkpoints: PhaseCheckpoints | None = None,
               checkpoint_minutes: float = 0.0, checkpoint_every: int = 0,
               adapter_checkpoints: bool = False, log: TrainingLog | None = None,
               replica_names: Sequence[str] | None = None,
               hook: Callable[[int, Any], None] | None = None, hook_steps: Collection[int] = (),
               stats: LoopStats | None = None,
               clock: Callable[[], float] = time.perf_counter) -> Any:
  """Train for `steps` steps of `batches` from `init_params()` (`trainer.init_state(...,
  stacked_init)`) or from the newest step checkpoint; returns the final params.

  `checkpoints`: whenever `checkpoint_minutes` of `clock` have passed since the loop started or
  last saved (or, with `checkpoint_every` > 0, every that many steps instead), the train state
  and the position of `batches` are saved (`adapter_checkpoints` on a LoRA model: the adapters
  only, the frozen base comes back from `init_params()` on resume); never after the last step,
  whose params the caller saves as the phase's output (`StepCheckpointing`). Every `log.every`
  steps and at the last step, the loss, learning rate, grad norm and throughput are recorded to
  `log` (default: the progress line only; `_Records`), per replica for stacked replicas, named by
  `replica_names` (default `replica_<k>`; unused for one model). `hook(step, params)` runs after
  every step in `hook_steps` trained by this call. `stats`, when given, is overwritten with what
  the loop cost.
  """
  started = clock()
  own = LoopStats()
  saver = StepCheckpointing(trainer, checkpoints, steps, checkpoint_minutes, checkpoint_every,
                            adapter_checkpoints, clock)
  step, state = saver.restore(init_params, batches, stacked_init)
  first_step = step
  meter = LoopMeter(trainer, steps, name, state, first_step, own, clock,
                    (log or TrainingLog()).open(name, first_step,
                                                _replica_names(trainer.replicas, replica_names)))
  try:
    while step < steps:
      with building(name):
        local = batches.next_batch()[0]
      state, metrics = meter.step(state, local)
      step += 1
      meter.stepped(step, metrics)
      if hook is not None and step in hook_steps:
        began = clock()
        hook(step, state["params"])
        own.hook_seconds += clock() - began
      saver.maybe_save(step, state, batches, own, before=meter.write_record)
      meter.show(step, metrics)
  finally:
    meter.close()
  saver.finish(own)
  own.steps = step - first_step
  own.token_slots, own.padded_tokens = _summed_over_processes(own.token_slots, own.padded_tokens)
  own.seconds = clock() - started
  for field in dataclasses.fields(own) if stats is not None else ():
    setattr(stats, field.name, getattr(own, field.name))
  return state["params"]


class StepCheckpointing:
  """A loop's step checkpoints: where it starts (`restore`), when it saves (`maybe_save`: every
  `every` steps, or every `minutes` of process 0's clock, never after the last step) and what a
  save holds (with `adapters_only` on a LoRA model the adapters alone; the frozen base comes back
  from `init_params()`). Without `checkpoints` it only initializes the state."""

  def __init__(self, trainer: Trainer, checkpoints: PhaseCheckpoints | None, steps: int,
               minutes: float, every: int, adapters_only: bool, clock: Callable[[], float]):
    self.trainer, self.checkpoints, self.steps = trainer, checkpoints, steps
    self.minutes, self.every, self.clock = minutes, every, clock
    self.adapters_only = adapters_only and trainer.runtime.cfg.lora.rank > 0
    # Several processes read the clock every few steps only (see MULTIPROCESS_CLOCK_STEPS).
    self.clock_every = 1 if jax.process_count() == 1 else MULTIPROCESS_CLOCK_STEPS
    self.last_save = 0.0  # set by `restore`, which every loop calls first

  def _saved(self, state: Any) -> Any:
    """What a step checkpoint holds of `state`."""
    if not self.adapters_only:
      return state
    return {**state, "params": lora.split(state["params"])[0]}

  def restore(self, init_params: Callable[[], Any], batches: BatchStream,
              stacked_init: bool) -> tuple[int, Any]:
    """(step, train state) of the newest step checkpoint, `batches` moved to its position; or
    (0, a fresh state from `init_params()`)."""
    restored = None
    if self.checkpoints is not None:
      restored = self.checkpoints.restore_latest(self._saved(self.trainer.abstract_state()))
    if restored is None:
      step, state = 0, self.trainer.init_state(init_params(), stacked=stacked_init)
    else:
      step, state, meta = restored
      batches.restore(meta["iterator"])
      if self.adapters_only:
        state["params"] = lora.combine(state["params"], lora.split(init_params())[1])
    self.last_save = self.clock()
    return step, state

  def _due(self, step: int) -> bool:
    if self.checkpoints is None or step >= self.steps:
      return False
    if self.every > 0:
      return step % self.every == 0
    if self.minutes <= 0 or step % self.clock_every:
      return False
    return _process_zero_says(self.clock() - self.last_save >= 60.0 * self.minutes)

  def maybe_save(self, step: int, state: Any, batches: BatchStream, stats: LoopStats,
                 before: Callable[[], None] = lambda: None) -> None:
    """Save `state` and the position of `batches` after `step` if one is due, calling `before()`
    first."""
    if not self._due(step):
      return
    before()
    began = self.clock()
    self.checkpoints.save(step, self._saved(state), {"iterator": batches.state()})
    self.last_save = self.clock()
    stats.checkpoint_seconds += self.last_save - began
    stats.checkpoints += 1

  def finish(self, stats: LoopStats) -> None:
    """Wait for the last async save: part of what checkpoints cost."""
    if self.checkpoints is None:
      return
    began = self.clock()
    self.checkpoints.wait_until_finished()
    stats.checkpoint_seconds += self.clock() - began


class LoopMeter:
  """What a loop measures and shows around its steps: padding, new batch shapes and their
  compile time (`LoopStats`), the records (`_Records`) and the progress line."""

  def __init__(self, trainer: Trainer, steps: int, name: str, state: Any, first_step: int,
               stats: LoopStats, clock: Callable[[], float], log: LoopLog):
    self.trainer, self.stats = trainer, stats
    self.shapes: set[tuple[int, ...]] = set()
    label = name if trainer.replicas is None else f"{name} x{trainer.replicas}"
    self.progress = Progress(label, steps)
    self.progress.update(first_step, force=True)
    jax.block_until_ready(state)  # the first record's time then starts with training, not init
    self.records = _Records(trainer, steps, log, stats, clock)

  def step(self, state: Any, local: dict[str, np.ndarray]) -> tuple[Any, dict[str, jax.Array]]:
    """One train step on host batch `local`, counted and its compile (if any) timed."""
    slots, padded = padding_counts(local)
    self.stats.token_slots += slots
    self.stats.padded_tokens += padded
    if local["tokens"].shape not in self.shapes:
      # A new shape may compile: the steps queued before it finish first, so that on a CPU
      # they do not share its cores and the compile time measured is the compile's own.
      jax.block_until_ready(state["step"])
      self.shapes.add(local["tokens"].shape)
      self.stats.compiled_shapes = len(self.shapes)
    traces = self.trainer.trace_count
    with CompileTimer() as compiling:
      state, metrics = self.trainer.step(state, self.trainer.put_batch(local))
    if self.trainer.trace_count != traces:
      self.stats.compile_seconds += compiling.seconds
      self.stats.compiles += self.trainer.trace_count - traces
    self.records.count(slots - padded, int((local["example_id"] >= 0).sum()))
    return state, metrics

  def stepped(self, step: int, metrics: dict[str, jax.Array]) -> None:
    self.records.stepped(step, metrics)

  def show(self, step: int, metrics: dict[str, jax.Array]) -> None:
    """The progress line after `step`, when one is due."""
    if self.progress.due(step):
      # Steps are dispatched asynchronously: waiting for this one makes the printed rate the
      # device's, not the dispatcher's (once per progress line).
      jax.block_until_ready(metrics["loss"])
    shown = [*self.records.shown, f"pad {100 * self.stats.padded_share:.0f}%"]
    self.progress.update(step, extra=" ".join(shown))

  def write_record(self) -> None:
    """Write the pending record, before a step checkpoint: a rerun resumes after the checkpoint's
    step and records only the steps after it, so every record up to it must be in `metrics.jsonl`
    before the checkpoint can exist (written later, a kill in between would lose it for good)."""
    self.records.flush()

  def close(self) -> None:
    self.records.close()


def _replica_names(replicas: int | None, names: Sequence[str] | None) -> list[str] | None:
  if replicas is None:
    return None
  names = list(names) if names is not None else [f"replica_{k}" for k in range(replicas)]
  if len(names) != replicas or len(set(names)) != replicas:
    raise ConfigError(f"replica names {names}: expected {replicas} distinct names")
  return names


class _Records:
  """The records of `train_loop`: at every `log.every`-th step and the last, loss, grad norm,
  learning rate, and tokens and examples per second since the previous record.

  A record step's metrics are read once the next step is dispatched (the last step's at once, and
  the pending one before a step checkpoint: `flush`):
  the read waits for that step only, while the device has the next one queued, so logging every
  step keeps the device busy as long as the host prepares a batch faster than the device trains
  on it. Throughput counts every step, over the time between two reads less the time spent in
  compiling, hooks and checkpoint saves (`LoopStats`); its tokens are every
  non-padding token stepped (all replicas'), its examples the batches' real rows or segments.
  """

  def __init__(self, trainer: Trainer, steps: int, log: LoopLog, stats: LoopStats,
               clock: Callable[[], float]):
    self.log, self.stats, self.clock, self.steps = log, stats, clock, steps
    # The schedule for every step, computed once before training: evaluating it on the device
    # at each record would queue behind the steps in flight and wait for them.
    self.learning_rates = np.asarray(jax.vmap(trainer.schedule)(jnp.arange(steps)))
    self.tokens = self.examples = 0  # trained so far
    self.pending = None  # (step, its metrics on device, tokens and examples up to it)
    # At the last read: (time, seconds not training so far, tokens and examples up to it).
    self.last = (clock(), self._excluded(), 0, 0)
    self.shown: list[str] = []  # the latest record, for the progress line

  def count(self, tokens: int, examples: int) -> None:
    self.tokens += tokens
    self.examples += examples

  def stepped(self, step: int, metrics: dict[str, jax.Array]) -> None:
    """Step `step` was dispatched with these (device) metrics."""
    if self.pending is not None:
      self._read()
    if step % self.log.every == 0 or step == self.steps:
      self.pending = (step, metrics, self.tokens, self.examples)
      if step == self.steps:
        self._read()

  def flush(self) -> None:
    """Read and write the pending record now."""
    if self.pending is not None:
      self._read()

  def close(self) -> None:
    self.log.close()

  def _excluded(self) -> float:
    return self.stats.compile_seconds + self.stats.hook_seconds + self.stats.checkpoint_seconds

  def _read(self) -> None:
    step, metrics, tokens, examples = self.pending
    self.pending = None
    values = jax.device_get({"loss": metrics["loss"], "grad_norm": metrics["grad_norm"]})
    now, excluded = self.clock(), self._excluded()
    then, excluded_then, tokens_then, examples_then = self.last
    self.last = (now, excluded, tokens, examples)
    seconds = (now - then) - (excluded - excluded_then)

    def rate(count: int) -> float | None:  # None: no step of this span was timed
      return round(count / seconds, 2) if count and seconds > 0 else None

    loss, grad_norm = values["loss"].tolist(), values["grad_norm"].tolist()
    lr = float(str(self.learning_rates[step - 1]))  # float32's shortest digits (1e-3, not ...47)
    tokens_per_s = rate(tokens - tokens_then)
    self.log.record(step, loss=loss, grad_norm=grad_norm, lr=lr, tokens_per_s=tokens_per_s,
                    examples_per_s=rate(examples - examples_then))
    self.shown = [f"loss {np.mean(loss):.3f}", f"gnorm {np.mean(grad_norm):.3f}",
                  f"lr {lr:.2e}"]
    if tokens_per_s is not None:
      self.shown.append(f"{tokens_per_s:.0f} tok/s")


def _summed_over_processes(*counts: int) -> tuple[int, ...]:
  """Each of `counts` summed over every process: each counted the rows of the batches it loaded.
  Gathered as two 31-bit halves, since JAX's int32 would wrap a count past 2**31."""
  if jax.process_count() == 1:
    return counts
  halves = np.asarray([[count >> 31, count & (2**31 - 1)] for count in counts], np.int32)
  gathered = np.asarray(multihost_utils.process_allgather(halves)).astype(np.int64)  # [P, n, 2]
  return tuple(int(total) for total in ((gathered[..., 0] << 31) + gathered[..., 1]).sum(axis=0))


def _process_zero_says(flag: bool) -> bool:
  """`flag` as process 0 computed it, on every process (a decision from its clock)."""
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def train_phase(spec: PhaseSpec, trainer: Trainer, init_params: Callable[[], Any],
                examples: Sequence[EncodedExample], ckpt_dir: str | Path,
                log: TrainingLog | None = None, snapshot_dir: str | Path | None = None,
                stats: LoopStats | None = None) -> Any:
  """Train for `spec.steps` steps from `init_params()` (or the newest step checkpoint).

  With `spec.snapshot_every`, the params after every k-th step are also saved under
  `snapshot_dir/step_<k>` (Orbax), for forgetting curves. Returns the final params, which the
  caller saves: the last step is not step-checkpointed. `log`, `stats`: see `train_loop`.
  """
  batches = spec.batching.train_iterator(
      examples, spec.seed, process_index=jax.process_index(), process_count=jax.process_count(),
      row_multiple=trainer.runtime.row_multiple(spec.optim.grad_accum_steps))
  snapshot_at: Collection[int] = ()
  if spec.snapshot_every and snapshot_dir:
    snapshot_at = range(spec.snapshot_every, spec.steps + 1, spec.snapshot_every)

  def snapshot(step: int, params: Any) -> None:
    save_params(run_path(snapshot_dir) / f"step_{step}", params)

  checkpoints = PhaseCheckpoints(ckpt_dir)
  params = train_loop(trainer, init_params, batches, spec.steps, spec.name,
                      checkpoints=checkpoints, checkpoint_minutes=spec.checkpoint_minutes,
                      checkpoint_every=spec.checkpoint_every,
                      adapter_checkpoints=spec.adapter_checkpoints, log=log,
                      hook=snapshot, hook_steps=snapshot_at, stats=stats)
  checkpoints.close()
  return params


def train_and_score(trainer: Trainer, scorer: Scorer, init_params: Any,
                    iterators: Sequence[TrainIterator], steps: Sequence[int],
                    examples: Sequence[EncodedExample], scoring: Batching, *,
                    stacked_init: bool = False, name: str = "train",
                    stats: LoopStats | None = None, log: TrainingLog | None = None,
                    replica_names: Sequence[str] | None = None, **loop: Any
                    ) -> tuple[dict[str, np.ndarray], Any]:
  """Train in memory to max(steps), scoring `examples` after each step in `steps`: ({nll,
  nll_tail}: per-token means [R, len(steps), N] with R = `trainer.replicas` or 1
  (`per_token_means`), the final params).

  One model reads `iterators[0]`; K replicas read one iterator each (`StackedBatches`) and start
  from `init_params` (one model), or with `stacked_init` from K models stacked on a leading axis.
  `init_params` stays usable: the loop trains a copy where the step would donate it. `stats`,
  `log`, `replica_names`: see `train_loop` (`hook_seconds` is the scoring); `loop`: its other
  settings (step checkpoints). `scoring`: the batches `examples` are scored in (its pad id also
  fills the stacked batches).
  """
  steps = sorted(set(int(s) for s in steps))
  replicas = trainer.replicas
  if len(iterators) != (replicas or 1):
    raise ConfigError(f"{len(iterators)} batch streams for {replicas or 1} replicas")
  batches = (iterators[0] if replicas is None
             else StackedBatches(iterators, scoring.pad_id, trainer.stack_block))
  # Broadcasting one model to K replicas makes new arrays; otherwise the first step would
  # donate the caller's.
  own_copy = replicas is None or stacked_init
  means: dict[str, np.ndarray] = {}
  shape = (replicas or 1, len(steps), len(examples))

  def score(step: int, params: Any) -> None:
    score_fn = score_examples if replicas is None else score_snapshots
    stats = score_fn(scorer, params, examples, scoring, name=f"{name}/score@{step}")
    for key, value in per_token_means(stats).items():
      means.setdefault(key, np.full(shape, np.nan))[:, steps.index(step)] = value

  params = train_loop(
      trainer, lambda: jax.tree.map(jnp.copy, init_params) if own_copy else init_params,
      batches, max(steps), name, stacked_init=stacked_init, log=log, replica_names=replica_names,
      hook=score, hook_steps=set(steps), stats=stats, **loop)
  return means, params


def snapshot_steps(snapshot_dir: str | Path) -> list[int]:
  """Steps of the snapshots saved by `train_phase`, ascending."""
  folder = run_path(snapshot_dir)
  if not folder.is_dir():
    return []
  return sorted(int(p.name.removeprefix("step_")) for p in folder.glob("step_*"))
