"""Per-device memory of compiled steps, known before anything is allocated, and how many stacked
replicas one pass of an ensemble phase trains at once.

`Planner` lowers and compiles a run's train and score steps ahead of time from ShapeDtypeStructs
with the run's shardings, one model or K stacked replicas (`Trainer(..., replicas=K)`), and reads
XLA's memory analysis of each program. `ff-jax plan` (ff_jax.perf.plan) reports it; a run sizes
its replica passes with it (`scoring.replicas_per_pass: auto`, `pass_size`), so the plan and the
run decide alike.

A pass of K replicas keeps more alive than its programs' arguments: the model the pass starts
from (M0 or M1; the K M1s of a noisy pass's safety finetunes), and while it scores, the replicas'
optimizer moments. `PassPlan` counts them as `resident` bytes beside each program.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ff_jax import parallel
from ff_jax.training.steps import ModelRuntime, OptimConfig, Scorer, Trainer

GIB = 2.0**30


@dataclasses.dataclass
class StepPlan:
  """Per-device memory of one compiled step (bytes)."""

  name: str
  batch: int
  seq_len: int
  params: int
  optimizer: int
  batch_bytes: int
  arguments: int
  outputs: int
  aliased: int
  temp: int
  compile_s: float
  largest_batch: int | None = None  # set when the step does not fit
  smallest_total: int | None = None  # total at the smallest batch, when it does not fit
  resident: int = 0  # other arrays alive while it runs (a replica pass's starting model)
  # The compiler's own refusal (XLA:TPU checks a program against the device's HBM as it
  # compiles): the step does not fit, and `temp` is what the message says it needed, if it says.
  out_of_memory: str | None = None
  # Set when the step does not fit at its batch: the fewest gradient-accumulation micro-batches
  # that keep the batch and fit, as compiled and checked (train steps only; 0: none found).
  accum_that_fits: int | None = None

  @property
  def total(self) -> int:
    return self.arguments + self.outputs - self.aliased + self.temp + self.resident

  def fits(self, limit: float) -> bool:
    return self.out_of_memory is None and self.total <= limit


def shard_bytes(tree: Any) -> int:
  """Bytes of one device's shards of a tree of ShapeDtypeStructs with shardings (the largest
  shard where uneven)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
  return total


def device_memory_gib(devices: Sequence[Any]) -> float | None:
  """What the first device reports as its memory limit (GPU/TPU), else None (CPU)."""
  try:
    stats = devices[0].memory_stats()
  except Exception:  # noqa: BLE001 - CPU and some runtimes have no memory stats
    return None
  limit = (stats or {}).get("bytes_limit")
  return limit / GIB if limit else None


def stacking_pays(platform: str) -> bool:
  """Whether K stacked replicas train faster than K passes of one. On a CPU one replica already
  keeps every core busy: two stacked ran at the same work per second with twice the memory."""
  return platform != "cpu"


def _abstract_batch(runtime: ModelRuntime, batch: int, seq_len: int,
                    replicas: int | None = None) -> dict[str, Any]:
  parallel.check_batch_rows(batch, runtime.mesh, runtime.rules)
  shardings = parallel.batch_shardings(runtime.mesh, runtime.rules, stacked=replicas is not None)
  lead = () if replicas is None else (replicas,)
  shapes = {key: (*lead, *(batch, seq_len)[:rank]) for key, rank in parallel.BATCH_RANKS.items()}
  return {key: jax.ShapeDtypeStruct(shapes[key], jnp.int32, sharding=shardings[key])
          for key in shardings}


# How XLA:TPU words a program that does not fit its device, e.g. "Ran out of memory on HBM, the
# total memory required for HLO temporaries (17.08G) exceeds available HBM (15.25G)" or "Used
# 40.52G of 15.48G hbm".
_NEEDED = re.compile(r"(?:temporaries \(|Used )([0-9.]+)([KMGT])")
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


@dataclasses.dataclass(frozen=True)
class Compiled:
  """What compiling one step ahead of time told: its memory analysis (argument, output, alias,
  temporary bytes), or the compiler's out-of-memory refusal and the bytes it names."""

  sizes: tuple[int, int, int, int]
  seconds: float
  out_of_memory: str | None = None


def _compile(fn, *args) -> Compiled:
  start = time.perf_counter()
  try:
    analysis = fn.lower(*args).compile().memory_analysis()
  except Exception as err:  # noqa: BLE001 - only the compiler's out-of-memory refusal is ours
    message = str(err)
    if "RESOURCE_EXHAUSTED" not in message:
      raise
    found = _NEEDED.search(message)
    temp = int(float(found.group(1)) * _UNITS[found.group(2)]) if found else 0
    line = message.strip().splitlines()[0][:300]
    return Compiled((0, 0, 0, temp), time.perf_counter() - start, line)
  return Compiled(_analysis_bytes(analysis), time.perf_counter() - start)


def _analysis_bytes(analysis: Any) -> tuple[int, int, int, int]:
  if analysis is None:
    return 0, 0, 0, 0
  return (int(analysis.argument_size_in_bytes), int(analysis.output_size_in_bytes),
          int(analysis.alias_size_in_bytes), int(analysis.temp_size_in_bytes))


class Planner:
  """Compiles a run's steps for its mesh without allocating. Programs of one shape are compiled
  once (the learning rate changes no buffer; gradient accumulation does)."""

  def __init__(self, runtime: ModelRuntime):
    self.runtime = runtime
    self.params = runtime.abstract_with_shardings()
    self.param_bytes = shard_bytes(self.params)
    self.min_batch = math.prod(runtime.mesh.shape[a]
                               for a in parallel.data_axes(runtime.mesh, runtime.rules))
    self._compiled: dict[tuple, StepPlan] = {}

  def train_step(self, name: str, optim: OptimConfig, batch: int, seq_len: int,
                 replicas: int | None = None) -> StepPlan:
    """The train step of one model, or of `replicas` stacked ones ([K, B, T] batches)."""
    key = ("train", batch, seq_len, replicas, optim.grad_accum_steps)
    if key not in self._compiled:
      trainer = Trainer(self.runtime, optim, total_steps=1, replicas=replicas)
      state = trainer.abstract_state()
      data = _abstract_batch(self.runtime, batch, seq_len, replicas)
      compiled = _compile(trainer.step, state, data)
      self._compiled[key] = StepPlan(
          name, batch, seq_len, shard_bytes(state["params"]), shard_bytes(state["opt_state"]),
          shard_bytes(data), *compiled.sizes, compiled.seconds,
          out_of_memory=compiled.out_of_memory)
    return dataclasses.replace(self._compiled[key], name=name)

  def score_step(self, batch: int, seq_len: int, replicas: int | None = None,
                 name: str = "score") -> StepPlan:
    """The score step of one model, or the stacked one scoring `replicas` models' parameters
    on one batch."""
    key = ("score", batch, seq_len, replicas)
    if key not in self._compiled:
      scorer = Scorer(self.runtime)
      data = _abstract_batch(self.runtime, batch, seq_len)
      if replicas is None:
        params, step = self.params, scorer.step
      else:
        params, step = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct((replicas, *a.shape), a.dtype, sharding=s),
            self.runtime.abstract_params, scorer.stacked_param_shardings), scorer.stacked_step
      compiled = _compile(step, params, data)
      self._compiled[key] = StepPlan(name, batch, seq_len, shard_bytes(params), 0,
                                     shard_bytes(data), *compiled.sizes, compiled.seconds,
                                     out_of_memory=compiled.out_of_memory)
    return dataclasses.replace(self._compiled[key], name=name)

  def largest_batch(self, plan: StepPlan, limit: float, recompile,
                    tries: int = 6) -> tuple[int, StepPlan | None]:
    """(the largest batch found to fit `limit`, 0 when not even the smallest batch the mesh
    allows fits; the plan at that smallest batch, None when the state alone does not fit).

    Temporaries are roughly linear in the batch, but XLA changes strategy at some sizes (and an
    out-of-memory refusal names the temporaries alone), so every candidate is compiled and
    checked: a secant step, aimed 10% under the limit, from the largest batch known to fit
    towards the smallest known not to; after a miss, no further than their geometric mean, so a
    wide bracket still closes. At most `tries` compiles beyond the smallest batch.
    """
    step = self.min_batch
    state = self.param_bytes + plan.optimizer
    if plan.out_of_memory is None and plan.total - plan.temp > limit or state > limit:
      return 0, None  # the state alone does not fit: no batch will
    small = recompile(step)
    if not small.fits(limit):
      return 0, small
    fits, fails, missed = small, plan, False
    for _ in range(tries):
      if fails.batch - fits.batch <= step or fits.total >= 0.9 * limit:
        break
      guess = math.sqrt(fits.batch * fails.batch)
      if fails.total > fits.total:
        per_row = (fails.total - fits.total) / (fails.batch - fits.batch)
        secant = fits.batch + (0.9 * limit - fits.total) / per_row
        guess = min(secant, guess) if missed else secant
      guess = min(max(int(guess) // step * step, fits.batch + step), fails.batch - step)
      candidate = recompile(guess)
      missed = not candidate.fits(limit)
      fits, fails = (fits, candidate) if missed else (candidate, fails)
    return fits.batch, small

  def accumulation_that_fits(self, plan: StepPlan, limit: float, largest: int,
                             recompile, most: int = 64) -> int:
    """The fewest gradient-accumulation micro-batches (a divisor of the batch whose micro-batch
    the mesh can split and is at most `largest` rows) with which the batch fits, compiled and
    checked; 0 when none of the first two candidates does, or it would take more than `most`
    (a batch that far from fitting is better lowered)."""
    tried = 0
    for micro in range(2, min(plan.batch, most) + 1):
      rows = plan.batch // micro
      if plan.batch % micro or rows % self.min_batch or rows > max(largest, self.min_batch):
        continue
      if recompile(micro).fits(limit):
        return micro
      tried += 1
      if tried == 2:
        break
    return 0


@dataclasses.dataclass(frozen=True)
class PassFinetune:
  """One finetune of a replica pass: its optimizer and batch, and whether it starts from K
  models (the M1s of a noisy pass) rather than one."""

  name: str
  optim: OptimConfig
  batch_size: int
  stacked_init: bool = False


class PassPlan:
  """The programs of a pass of K replicas: each finetune's train step and the score step, with
  what the pass keeps alive beside each (`StepPlan.resident`). K = 1 is the ordinary steps."""

  def __init__(self, planner: Planner, finetunes: Sequence[PassFinetune], score_batch: int,
               seq_len: int):
    self.planner, self.finetunes = planner, list(finetunes)
    self.score_batch, self.seq_len = score_batch, seq_len

  def steps(self, k: int) -> list[StepPlan]:
    planner, stack = self.planner, None if k == 1 else k
    label = "" if k == 1 else f" x{k} stacked"
    steps, moments, starts = [], 0, 0
    for finetune in self.finetunes:
      start = planner.param_bytes * (k if finetune.stacked_init else 1)
      step = planner.train_step(f"train ({finetune.name}){label}", finetune.optim,
                                finetune.batch_size, self.seq_len, stack)
      steps.append(dataclasses.replace(step, resident=start))
      moments, starts = max(moments, step.optimizer), max(starts, start)
    # Scoring runs inside the training loop: the replicas' moments and the start stay alive.
    score = planner.score_step(self.score_batch, self.seq_len, stack, name=f"score{label}")
    return [*steps, dataclasses.replace(score, resident=moments + starts)]

  def peak(self, k: int) -> int:
    return max(step.total for step in self.steps(k))

  def largest_fitting(self, most: int, limit_bytes: float) -> int:
    """The largest pass of at most `most` replicas that fits, 0 when not even one does."""
    return largest_stack(most, lambda k: self.peak(k) <= limit_bytes)


def largest_stack(most: int, fits: Callable[[int], bool]) -> int:
  """The largest K in 1..most with `fits(K)`, 0 when not even one fits: memory grows with K, so
  a bisection between the largest K known to fit and the smallest known not to, every candidate
  compiled and checked."""
  if fits(most):
    return most
  if most == 1 or not fits(1):
    return 0
  good, bad = 1, most
  while bad - good > 1:
    middle = (good + bad) // 2
    good, bad = (middle, bad) if fits(middle) else (good, middle)
  return good


def pass_size(setting: int | str, extra: int, platform: str, limit_bytes: float | None,
              plan: PassPlan | None) -> tuple[int, str]:
  """(replicas one pass stacks, why) for `extra` replicas under `scoring.replicas_per_pass`:
  an explicit count is honoured (0: all); `auto` stacks only where stacking pays
  (`stacking_pays`) and the device's memory is known, as many as fit by the compiled programs'
  memory analysis (`plan`), else one at a time."""
  if extra <= 1:
    return 1, "one replica to train"
  if setting != "auto":
    return min(setting or extra, extra), f"scoring.replicas_per_pass={setting}"
  if not stacking_pays(platform):
    return 1, f"{platform}: one replica already keeps the cores busy, stacking does not pay"
  if limit_bytes is None or plan is None:
    return 1, "device memory unknown: one at a time"
  fit = plan.largest_fitting(extra, limit_bytes)
  why = f"the largest stack that fits {limit_bytes / GIB:.2f} GiB per device"
  if fit < extra:
    why = f"{extra} stacked need {plan.peak(extra) / GIB:.2f} GiB per device; {why}"
  return max(fit, 1), why
