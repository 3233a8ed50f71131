"""The ForgetFilter job as a chain of resumable phases, and the driver that runs them.

  release -> noisy -> score_before -> safety -> safety_replicas -> noisy_replicas
          -> score_after -> filter -> clean -> evaluate

`release` trains the demo's aligned model M0 (for a user's model it only records the import);
`noisy` finetunes M0 on D (M1); `safety` finetunes M1 on S (M2); the ensemble phases train more
of them when the filter's signal averages over replicas; the score phases measure every example of
D under M1 (and M0) and M2; `filter` computes the forgetting signals and drops the examples whose
signal exceeds the threshold; `clean` finetunes M0 (never M1/M2) on what is left; `evaluate`
compares the models. Each phase is a function of the run's context (ff_jax.pipeline.context) that
ends in an Orbax checkpoint or an atomically written file (ff_jax.run_files names them) and
is then marked complete in the manifest; a rerun skips complete phases and resumes a training phase
from its newest step checkpoint.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ff_jax.atomic_io import barrier, is_primary
from ff_jax.config import RunConfig, auto_noisy_replicas
from ff_jax.pipeline import ensembles, evaluate, filter, finetune, score
from ff_jax.pipeline.context import RunContext, open_run
from ff_jax.pipeline.rundir import RunDir
from ff_jax.progress import log
from ff_jax.report.markdown import write_report
from ff_jax.run_files import PHASES

PHASE_RUNNERS: dict[str, Callable[[RunContext], dict[str, Any]]] = {
    "release": finetune.release,
    "noisy": finetune.noisy,
    "score_before": score.score_before,
    "safety": finetune.safety,
    "safety_replicas": ensembles.safety_replicas,
    "noisy_replicas": ensembles.noisy_replicas,
    "score_after": score.score_after,
    "filter": filter.run,
    "clean": finetune.clean,
    "evaluate": evaluate.run,
}
assert tuple(PHASE_RUNNERS) == PHASES, "every phase of the layout has one runner, in order"


def execute(ctx: RunContext, until: str | None = None) -> dict[str, Any]:
  """Run every incomplete phase in order (up to and including `until`); returns the manifest."""
  phases = PHASES[:PHASES.index(until) + 1] if until else PHASES
  total = time.perf_counter()
  for name in phases:
    if ctx.run.is_complete(ctx.manifest, name):
      log(f"== {name}: complete, skipped")
      continue
    log(f"== {name}")
    start = time.perf_counter()
    info = dict(PHASE_RUNNERS[name](ctx) or {})
    seconds = time.perf_counter() - start
    # The phase's manifest entry: {"complete", "seconds", the runner's own keys, and for a phase
    # that trained, "finetunes": {finetune name: LoopStats.as_dict() (training.loop), plus
    # "output_save_seconds" where the finetune saved its output model}}, as the runner returned
    # them (`finetunes.Costs`). A resumed phase counts what its last invocation trained; a
    # finetune restored whole is absent.
    finetunes = info.pop("finetunes", None) or {}
    if finetunes:
      info["finetunes"] = finetunes
    ctx.run.mark_complete(ctx.manifest, name, seconds, **info)
    log(f"== {name}: done in {seconds:.1f}s{cost_summary(finetunes)}")
  if ctx.run.is_complete(ctx.manifest, "evaluate") and is_primary():
    # Written after the manifest is final, so the report's timing table has every phase. Only
    # process 0 renders it: the others' writes would do nothing.
    write_report(ctx.run.root)
  barrier("run finished")
  times = {p: ctx.manifest["phases"].get(p, {}).get("seconds") for p in phases}
  log("phase times (s): " + ", ".join(f"{p} {t:.1f}" for p, t in times.items() if t is not None))
  log(f"wall time this invocation: {time.perf_counter() - total:.1f}s")
  return ctx.manifest


def cost_summary(finetunes: dict[str, dict[str, Any]]) -> str:
  """What a phase's finetunes spent compiling and saving, for its `done in` line."""
  if not finetunes:
    return ""
  total = {key: sum(f.get(key, 0.0) for f in finetunes.values())
           for key in ("compile_seconds", "checkpoint_seconds", "output_save_seconds")}
  return (f" (compile {total['compile_seconds']:.1f}s, step checkpoints "
          f"{total['checkpoint_seconds']:.1f}s, output saves {total['output_save_seconds']:.1f}s)")


def method_cost(cfg: RunConfig, until: str | None = None) -> str:
  """What the configured method trains and scores, against the paper's single run (one noisy and
  one safety finetune, the noisy set scored under M1 and M2), and what to set for the paper's.

  Counts the method's finetunes (noisy: M1 and the noisy replicas' M1s; safety: M2, the noisy
  replicas' M2s and the safety replicas) and its passes over the noisy set (forward passes under
  every model scored; greedy decodes and per-example gradients on top), not the demo's release
  phase nor the clean finetune, which every method shares.
  """
  scoring, signal = cfg.scoring, cfg.filter.signal
  noisy = scoring.noisy_replicas
  safety = noisy + scoring.replicas - 1
  # M1 and M2 of the run and of each noisy replica, each extra safety replica's M2, M0, and the
  # responses alone under M1 and M2 (nll_pmi).
  passes = 2 * noisy + scoring.replicas - 1 + int(scoring.m0) + 2 * int(scoring.pmi)
  extras = []
  if scoring.snapshot_every:
    extras.append(f"a safety snapshot every {scoring.snapshot_every} steps")
  if scoring.rouge:
    extras.append("2 greedy decodes (rouge)")
  if scoring.gradient_blocks:
    extras.append("per-example gradients under M1")
  scored = f"scores the noisy set {passes} times" + (f" (+ {', '.join(extras)})" if extras else "")
  clean = until is None or PHASES.index(until) >= PHASES.index("clean")
  head = (f"cost: filter.signal={signal} trains {noisy} noisy + {safety} safety finetunes "
          f"(scoring.noisy_replicas={noisy}, scoring.replicas={scoring.replicas}) and {scored}"
          + ("; then 1 clean finetune." if clean else "."))
  to_set = []
  if signal != "nll":
    to_set.append("filter.signal=nll")
  if noisy > auto_noisy_replicas(signal):  # set explicitly: auto would not change with the signal
    to_set.append("scoring.noisy_replicas=1")
  if scoring.replicas > 1:
    to_set.append("scoring.replicas=1")
  if not to_set:
    return f"{head} This is the paper's single-run method (1 noisy + 1 safety finetune)."
  note = (" (scoring.noisy_replicas: auto then trains one M1)"
          if noisy > 1 and "scoring.noisy_replicas=1" not in to_set else "")
  return (f"{head} That is {(noisy + safety) / 2:g}x the finetunes of the paper's single-run "
          "method (1 noisy + 1 safety finetune, the noisy set scored under M1 and M2); for it "
          f"set {' '.join(to_set)}{note}.")


def keep_trained_noisy_replicas(cfg: RunConfig, redo_from: str | None = None) -> RunConfig:
  """`cfg`, or `cfg` with the noisy replicas its run directory already trained, when its signal
  does not use them (not *_nens) and asks for fewer: e.g. `--from filter filter.signal=nll` on a
  run of the default nll_tail_nens, where `scoring.noisy_replicas: auto` now means 1. Keeping them
  changes nothing the filter computes (their columns stay in scores.csv), where the run directory
  would otherwise refuse the changed count of a finished phase."""
  manifest = RunDir(cfg.run_dir).read_manifest()
  if manifest is None or not RunDir.is_complete(manifest, "noisy_replicas") or (
      redo_from in PHASES and PHASES.index(redo_from) <= PHASES.index("noisy_replicas")):
    return cfg
  trained = manifest.get("config", {}).get("scoring", {}).get("noisy_replicas")
  wanted = cfg.scoring.noisy_replicas
  if not isinstance(trained, int) or trained <= wanted or auto_noisy_replicas(
      cfg.filter.signal) > 1:
    return cfg
  log(f"scoring.noisy_replicas={wanted}: this run directory trained {trained} noisy replicas "
      f"already; kept (filter.signal={cfg.filter.signal} does not use them)")
  return dataclasses.replace(cfg, scoring=dataclasses.replace(cfg.scoring,
                                                              noisy_replicas=trained))


def run_job(cfg: RunConfig, restart: bool = False, until: str | None = None,
            redo_from: str | None = None) -> Path:
  """Open the run directory of `cfg` and run its phases; returns the run directory. Says first
  what the configured method costs (`method_cost`), on stderr."""
  log(method_cost(cfg, until))
  if not restart:
    cfg = keep_trained_noisy_replicas(cfg, redo_from)
  ctx = open_run(cfg, restart=restart, redo_from=redo_from)
  execute(ctx, until)
  return ctx.run.root
