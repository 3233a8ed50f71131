"""The ensemble phases: more finetunes whose forgetting is averaged with the main run's.

`safety_replicas` trains K − 1 more safety finetunes of M1 (`scoring.replicas`; other seeds, so
other safe-set orders) for the `*_ens` signals. `noisy_replicas` trains K − 1 more noisy finetunes
of M0, each followed by its own safety finetune (`scoring.noisy_replicas`) for the `*_nens`
signals: averaging over M1s removes the luck of one noisy run, which safety replicas of one M1
cannot (docs/fidelity.md). Passes of `scoring.replicas_per_pass` replicas train stacked (one
vmapped step for the pass, `Trainer(replicas=K)`); a pass of one trains with the ordinary steps.
Per replica only the noisy set's NLL is kept (under its M1 and its M2), one file per pass, so a
killed phase resumes at the next pass. What each finetune cost goes into the phase's manifest
entry (`RunContext.record`): one per pass of `safety_replicas` (`pass_<start>`, scoring included
as `hook_seconds`), one per noisy and safety finetune of `noisy_replicas` (named as their
progress lines).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ff_jax.atomic_io import write_json_atomic
from ff_jax.data.batching import TrainIterator
from ff_jax.pipeline.context import RunContext
from ff_jax.pipeline.layout import (
  REPLICA_PASSES,
  REPLICA_SEED_STRIDE,
  SCORES_NOISY_REPLICAS,
  SCORES_REPLICAS,
  finetune_seed,
)
from ff_jax.progress import log
from ff_jax.training.loop import LoopStats, PhaseSpec, train_and_score, train_phase
from ff_jax.training.memory import (
  GIB,
  PassFinetune,
  PassPlan,
  Planner,
  device_memory_gib,
  pass_size,
)
from ff_jax.training.steps import Trainer

# What `scores_noisy_replicas.json` keeps per noisy replica: its seeds, and the noisy set's
# per-token means (`per_token_means`) under its M1 and its M2.
REPLICA_COLUMNS = ("seeds", "nll_before", "nll_after", "nll_tail_before", "nll_tail_after")


def replicas_per_pass(ctx: RunContext, extra: int, finetunes: list[PassFinetune]) -> int:
  """How many of `extra` replicas one stacked pass of `finetunes` trains
  (`scoring.replicas_per_pass`; `auto` is decided as `ff-jax plan` decides, `pass_size`).

  Memory grows with the stack (copies of params, moments and activations); passes bound it and
  give the same replicas, each with its own batch stream. LoRA trains one at a time: the stacked
  step trains every parameter, not just the adapters. On several processes (a pod) a stacked
  pass reads whole [K, B, T] batches on every host (`RunContext.train_batches`).
  """
  if ctx.cfg.lora.rank:
    return 1
  devices = list(ctx.mesh.devices.flat)
  limit = device_memory_gib(devices)
  plan = PassPlan(Planner(ctx.runtime), finetunes, ctx.cfg.scoring.batch_size,
                  ctx.cfg.data.max_len)
  size, why = pass_size(ctx.cfg.scoring.replicas_per_pass, extra, devices[0].platform,
                        limit * GIB if limit else None, plan)
  log(f"{extra} more replicas, {size} per pass ({why})")
  return size


def _specs(ctx: RunContext) -> tuple[PhaseSpec, PhaseSpec]:
  """The noisy and safety finetunes' loop settings, as the main run trains them."""
  cfg = ctx.cfg
  return (ctx.spec("noisy", cfg.noisy, len(ctx.noisy), finetune_seed(cfg.seed, "noisy")),
          ctx.spec("safety", cfg.safety, len(ctx.safe), finetune_seed(cfg.seed, "safety")))


def safety_replicas(ctx: RunContext) -> dict[str, Any]:
  """K − 1 more safety finetunings of M1; the noisy set's NLL under each (`scores_replicas.json`)
  gives, with the safety phase's own M2, the replica-ensemble signals."""
  k = ctx.cfg.scoring.replicas
  if k == 1:
    return {"replicas": 1}
  spec = _specs(ctx)[1]
  seeds = [spec.seed + REPLICA_SEED_STRIDE * i for i in range(1, k)]
  per_pass = replicas_per_pass(ctx, len(seeds), [PassFinetune("safety", spec.optim,
                                                                spec.batching.batch_size)])
  single = None
  rows = []
  for start in range(0, len(seeds), per_pass):
    chunk = seeds[start:start + per_pass]
    done = ctx.run.file(REPLICA_PASSES) / f"pass_{start}.json"
    if done.exists() and json.loads(done.read_text())["seeds"] == chunk:
      rows += json.loads(done.read_text())["nll"]
      continue
    iterators = [ctx.train_batches(ctx.safe, spec, seed) for seed in chunk]
    if len(chunk) == 1:
      # One replica: the ordinary (unvmapped) step, compiled once for every pass.
      trainer = single = single or Trainer(ctx.runtime, spec.optim, spec.steps)
    else:
      trainer = Trainer(ctx.runtime, spec.optim, spec.steps, replicas=len(chunk))
    stats = LoopStats()
    means, _ = train_and_score(trainer, ctx.scorer, ctx.params("M1"), iterators,
                               [spec.steps], ctx.noisy, ctx.scoring,
                               name=f"safety_replicas/pass_{start}", stats=stats,
                               log=ctx.training_log,
                               # replica i of the phase (1 ... k - 1), whichever pass trains it
                               replica_names=[f"replica_{start + j + 1}"
                                              for j in range(len(chunk))])
    ctx.record(f"pass_{start}", stats)
    write_json_atomic(done, {"seeds": chunk, "nll": means["nll"][:, -1].tolist()})
    rows += means["nll"][:, -1].tolist()
    log(f"safety replicas: {start + len(chunk)}/{len(seeds)} trained")
  write_json_atomic(ctx.run.file(SCORES_REPLICAS),
                    {"seeds": seeds, "steps": spec.steps, "nll": rows})
  return {"replicas": k, "replicas_per_pass": per_pass}


def noisy_replicas(ctx: RunContext) -> dict[str, Any]:
  """K − 1 more noisy finetunes of M0, each with its own safety finetune
  (`scores_noisy_replicas.json`: the noisy set's NLL under each replica's M1 and M2)."""
  k = ctx.cfg.scoring.noisy_replicas
  if k == 1:
    return {"noisy_replicas": 1}
  noisy, safety = _specs(ctx)
  seeds = {i: [noisy.seed + REPLICA_SEED_STRIDE * i, safety.seed + REPLICA_SEED_STRIDE * i]
           for i in range(1, k)}
  per_pass = replicas_per_pass(ctx, k - 1, [
      PassFinetune("noisy", noisy.optim, noisy.batching.batch_size),
      PassFinetune("safety", safety.optim, safety.batching.batch_size, stacked_init=True)])
  rows = {}
  for start in range(1, k, per_pass):
    chunk = list(range(start, min(k, start + per_pass)))
    files = {i: ctx.run.file(REPLICA_PASSES) / f"noisy_{i}.json" for i in chunk}
    saved = {i: json.loads(f.read_text()) for i, f in files.items() if f.exists()}
    if all(i in saved and saved[i]["seeds"] == seeds[i] for i in chunk):
      rows.update(saved)
      continue
    if len(chunk) == 1:
      trained = {chunk[0]: _noisy_replica_alone(ctx, chunk[0], seeds[chunk[0]], noisy, safety)}
    else:
      trained = _noisy_replicas_stacked(ctx, {i: seeds[i] for i in chunk}, noisy, safety)
    for i, row in trained.items():
      write_json_atomic(files[i], row)
      for name in (f"noisy_{i}", f"safety_{i}"):
        ctx.drop_step_checkpoints(name)  # a one-replica pass's; its scores are saved now
    rows.update(trained)
    log(f"noisy replicas: {chunk[-1]}/{k - 1} trained")
  ordered = [rows[i] for i in range(1, k)]
  write_json_atomic(ctx.run.file(SCORES_NOISY_REPLICAS),
                    {key: [row.get(key) for row in ordered] for key in REPLICA_COLUMNS})
  return {"noisy_replicas": k, "replicas_per_pass": per_pass}


def _noisy_replica_alone(ctx: RunContext, i: int, seeds: list[int], noisy: PhaseSpec,
                         safety: PhaseSpec) -> dict[str, Any]:
  """Noisy replica i with the ordinary steps, resumable from its step checkpoints."""
  names = (f"noisy_{i}", f"safety_{i}")
  stats = LoopStats(), LoopStats()
  m1 = train_phase(dataclasses.replace(noisy, name=names[0], seed=seeds[0]), ctx.runtime,
                   lambda: ctx.params("M0"), ctx.noisy, ctx.run.ckpt(names[0]),
                   ctx.training_log, stats=stats[0])
  ctx.record(names[0], stats[0])
  before = ctx.noisy_means(m1, f"{names[0]}/score")
  m2 = train_phase(dataclasses.replace(safety, name=names[1], seed=seeds[1]), ctx.runtime,
                   lambda: m1, ctx.safe, ctx.run.ckpt(names[1]), ctx.training_log,
                   stats=stats[1])
  ctx.record(names[1], stats[1])
  after = ctx.noisy_means(m2, f"{names[1]}/score")
  return {"seeds": seeds, **{f"{key}_before": value for key, value in before.items()},
          **{f"{key}_after": value for key, value in after.items()}}


def _noisy_replicas_stacked(ctx: RunContext, seeds: dict[int, list[int]], noisy: PhaseSpec,
                            safety: PhaseSpec) -> dict[int, dict[str, Any]]:
  """Noisy replicas `seeds` (index: [noisy seed, safety seed]) trained together: the same batch
  streams as `_noisy_replica_alone`, one vmapped step per phase."""
  label = f"{min(seeds)}-{max(seeds)}"

  def streams(spec: PhaseSpec, examples, column: int) -> list[TrainIterator]:
    return [ctx.train_batches(examples, spec, pair[column]) for pair in seeds.values()]

  names = (f"noisy_{label}", f"safety_{label}")
  replicas = [f"replica_{i}" for i in seeds]
  stats = LoopStats(), LoopStats()
  before, m1s = train_and_score(
      Trainer(ctx.runtime, noisy.optim, noisy.steps, replicas=len(seeds)), ctx.scorer,
      ctx.params("M0"), streams(noisy, ctx.noisy, 0), [noisy.steps], ctx.noisy, ctx.scoring,
      name=names[0], stats=stats[0], log=ctx.training_log, replica_names=replicas)
  after, _ = train_and_score(
      Trainer(ctx.runtime, safety.optim, safety.steps, replicas=len(seeds)), ctx.scorer, m1s,
      streams(safety, ctx.safe, 1), [safety.steps], ctx.noisy, ctx.scoring, stacked_init=True,
      name=names[1], stats=stats[1], log=ctx.training_log, replica_names=replicas)
  for name, stat in zip(names, stats):
    ctx.record(name, stat)
  return {i: {"seeds": pair,
              **{f"{key}_before": value[j, -1].tolist() for key, value in before.items()},
              **{f"{key}_after": value[j, -1].tolist() for key, value in after.items()}}
          for j, (i, pair) in enumerate(seeds.items())}
