"""The ensemble phases: more finetunes whose forgetting is averaged with the main run's.

`safety_replicas` trains K − 1 more safety finetunes of M1 (`scoring.replicas`; other seeds, so
other safe-set orders) for the `*_ens` signals. `noisy_replicas` trains K − 1 more noisy finetunes
of M0, each followed by its own safety finetune (`scoring.noisy_replicas`) for the `*_nens`
signals: averaging over M1s removes the luck of one noisy run, which safety replicas of one M1
cannot (docs/fidelity.md). Passes of `scoring.replicas_per_pass` replicas train stacked (one
vmapped step for the pass, `Finetunes.replica_pass`); a pass of one trains with the ordinary steps.

Resume: each finetune of a pass resumes from its own step checkpoints (`ckpt/<phase>/<finetune>/`,
the one resume mechanism of every finetune). Per replica only the noisy set's NLL is kept (under
its M1 and its M2): once a pass is trained, its rows are written atomically to
`ckpt/<phase>/<pass>.json` (with their seeds, so a pass of other replicas is not taken for it) and
its step checkpoints dropped, so a phase killed between passes resumes at the next one. The
phase's scores file is written at its end and `ckpt/<phase>/` dropped; the manifest then marks the
phase complete. What each finetune cost goes into the phase's manifest entry: one per pass of
`safety_replicas` (`pass_<start>`, scoring included as `hook_seconds`), one per noisy and safety
finetune of `noisy_replicas` (named as their progress lines).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ff_jax.atomic_io import remove, write_json_atomic
from ff_jax.errors import RunDirError
from ff_jax.pipeline.context import RunContext
from ff_jax.pipeline.finetunes import Costs, Finetunes
from ff_jax.pipeline.rundir import RunDir
from ff_jax.progress import log
from ff_jax.run_files import (
  OLD_REPLICA_PASSES,
  SCORES_NOISY_REPLICAS,
  SCORES_REPLICAS,
  finetune_seed,
)
from ff_jax.training.loop import PhaseSpec
from ff_jax.training.memory import (
  GIB,
  PassFinetune,
  PassPlan,
  Planner,
  device_memory_gib,
  pass_size,
)

# What `scores_noisy_replicas.json` keeps per noisy replica: its seeds, and the noisy set's
# per-token means (`per_token_means`) under its M1 and its M2.
REPLICA_COLUMNS = ("seeds", "nll_before", "nll_after", "nll_tail_before", "nll_tail_after")


def replicas_per_pass(ctx: RunContext, extra: int, finetunes: list[PassFinetune]) -> int:
  """How many of `extra` replicas one stacked pass of `finetunes` trains
  (`scoring.replicas_per_pass`; `auto` is decided as `ff-jax plan` decides, `pass_size`).

  Memory grows with the stack (copies of params, moments and activations); passes bound it and
  give the same replicas, each with its own batch stream. LoRA trains one at a time: the stacked
  step trains every parameter, not just the adapters. On several processes (a pod) a stacked
  pass reads whole [K, B, T] batches on every host (`Finetunes.batches`).
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


def refuse_old_pass_files(run: RunDir) -> None:
  """Older ff_jax kept each pass's scores in `replicas/`, beside the manifest; this one resumes
  a pass from its step checkpoints and would not read them, so such a run directory is refused
  rather than silently trained again."""
  old = sorted(run.file(OLD_REPLICA_PASSES).glob("*.json"))
  if old:
    raise RunDirError(f"run directory {run.root} was written by an older ff_jax "
                      f"({OLD_REPLICA_PASSES}/{old[0].name}); rerun with --restart")


def _label(replicas: list[int]) -> str:
  """A pass's replicas as its progress lines name them: `3`, or `1-2`."""
  return str(replicas[0]) if len(replicas) == 1 else f"{replicas[0]}-{replicas[-1]}"


def _saved_pass(path: Path, seeds: list[Any]) -> list[Any] | None:
  """The rows a pass saved at `path`, if it trained these `seeds`; else None (not trained, or
  another pass of the same name under other settings)."""
  if not path.exists():
    return None
  saved = json.loads(path.read_text())
  return saved["rows"] if saved["seeds"] == seeds else None


def _save_pass(path: Path, seeds: list[Any], rows: list[Any], step_checkpoints: list[Path]) -> None:
  """Keep a trained pass's rows (atomically, once), then drop its step checkpoints."""
  write_json_atomic(path, {"seeds": seeds, "rows": rows})
  for folder in step_checkpoints:
    remove(folder)


def safety_replicas(ctx: RunContext) -> dict[str, Any]:
  """K − 1 more safety finetunings of M1; the noisy set's NLL under each (`scores_replicas.json`)
  gives, with the safety phase's own M2, the replica-ensemble signals."""
  k = ctx.cfg.scoring.replicas
  if k == 1:
    return {"replicas": 1}
  refuse_old_pass_files(ctx.run)
  spec = _specs(ctx)[1]
  train, folder = Finetunes(ctx), ctx.run.ckpt("safety_replicas")
  replicas = list(range(1, k))  # replica i of the phase (1 ... k - 1), whichever pass trains it
  per_pass = replicas_per_pass(ctx, len(replicas), [
      PassFinetune("safety", spec.optim, spec.batching.batch_size)])
  rows: list[Any] = []
  costs: Costs = {}
  for start in range(0, len(replicas), per_pass):
    chunk = replicas[start:start + per_pass]
    seeds = [train.seed("safety", i) for i in chunk]
    done, ckpt = folder / f"replicas_{_label(chunk)}.json", folder / f"replicas_{_label(chunk)}"
    saved = _saved_pass(done, seeds)
    if saved is None:
      means, _, spent = train.replica_pass(f"safety_replicas/pass_{start}", spec, "safety", chunk,
                                           ctx.params("M1"), ctx.safe, ckpt,
                                           record=f"pass_{start}")
      saved = means["nll"].tolist()
      _save_pass(done, seeds, saved, [ckpt])
      costs.update(spent)
    rows += saved
    log(f"safety replicas: {start + len(chunk)}/{len(replicas)} trained")
  write_json_atomic(ctx.run.file(SCORES_REPLICAS),
                    {"seeds": [train.seed("safety", i) for i in replicas], "steps": spec.steps,
                     "nll": rows})
  remove(folder)
  return {"replicas": k, "replicas_per_pass": per_pass, "finetunes": costs}


def noisy_replicas(ctx: RunContext) -> dict[str, Any]:
  """K − 1 more noisy finetunes of M0, each with its own safety finetune
  (`scores_noisy_replicas.json`: the noisy set's NLL under each replica's M1 and M2)."""
  k = ctx.cfg.scoring.noisy_replicas
  if k == 1:
    return {"noisy_replicas": 1}
  refuse_old_pass_files(ctx.run)
  noisy, safety = _specs(ctx)
  train, folder = Finetunes(ctx), ctx.run.ckpt("noisy_replicas")
  per_pass = replicas_per_pass(ctx, k - 1, [
      PassFinetune("noisy", noisy.optim, noisy.batching.batch_size),
      PassFinetune("safety", safety.optim, safety.batching.batch_size, stacked_init=True)])
  rows: list[dict[str, Any]] = []
  costs: Costs = {}
  for start in range(1, k, per_pass):
    chunk = list(range(start, min(k, start + per_pass)))
    seeds = [[train.seed("noisy", i), train.seed("safety", i)] for i in chunk]
    label = _label(chunk)
    saved = _saved_pass(folder / f"pass_{label}.json", seeds)
    if saved is None:
      saved, spent = _noisy_pass(ctx, train, chunk, (noisy, safety), folder)
      _save_pass(folder / f"pass_{label}.json", seeds, saved,
                 [folder / f"noisy_{label}", folder / f"safety_{label}"])
      costs.update(spent)
    rows += saved
    log(f"noisy replicas: {chunk[-1]}/{k - 1} trained")
  write_json_atomic(ctx.run.file(SCORES_NOISY_REPLICAS),
                    {key: [row.get(key) for row in rows] for key in REPLICA_COLUMNS})
  remove(folder)
  return {"noisy_replicas": k, "replicas_per_pass": per_pass, "finetunes": costs}


def _noisy_pass(ctx: RunContext, train: Finetunes, replicas: list[int],
                specs: tuple[PhaseSpec, PhaseSpec], folder: Path) -> tuple[list[dict], Costs]:
  """Noisy replicas `replicas` trained together: a noisy finetune of M0 per replica, then a
  safety finetune of each M1 (one vmapped step per finetune for several replicas). If killed in
  the safety finetune, the rerun trains the noisy one again from its last step checkpoint (kept
  until the pass is saved) to get the M1s and their scores back."""
  label = _label(replicas)
  noisy, safety = specs
  before, m1s, spent = train.replica_pass(f"noisy_{label}", noisy, "noisy", replicas,
                                          ctx.params("M0"), ctx.noisy, folder / f"noisy_{label}")
  after, _, more = train.replica_pass(f"safety_{label}", safety, "safety", replicas, m1s,
                                      ctx.safe, folder / f"safety_{label}",
                                      stacked_init=len(replicas) > 1)
  rows = [{"seeds": [train.seed("noisy", i), train.seed("safety", i)],
           **{f"{key}_before": value[j].tolist() for key, value in before.items()},
           **{f"{key}_after": value[j].tolist() for key, value in after.items()}}
          for j, i in enumerate(replicas)]
  return rows, {**spent, **more}
