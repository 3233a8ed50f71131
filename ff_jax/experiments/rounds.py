"""Long-term safety: interleaved rounds of downstream and safety finetuning (the paper's Fig. 5).

  ff-jax rounds --run-dir DIR [--rounds R] [--heldout]

On a run whose filter phase is complete, two methods alternate a downstream finetune on the noisy
data D with a safety finetune on the safe set S, R times:

  sequential    downstream on all of D (the `noisy` recipe), then safety (the `safety` recipe)
  forgetfilter  downstream on D without the examples the run's filter flagged (`clean` recipe),
                then safety

Round 1 reuses the run's own models (M1 and M2 for sequential, the clean model for ForgetFilter).
After every finetune the mean per-token NLL of D's unsafe examples is measured (the flagged ones
when D has no labels): a sharp drop after a downstream finetune is unsafe behaviour relearned,
which safety finetuning alone does not prevent. The NLL of D's other examples tracks the task;
with `--heldout` the run's held-out metrics are added (one generation pass per model). Every
model is saved (`models/rounds/<method>_r<k>_<stage>`), so a killed run resumes at the model it
was training; results go to `rounds.json` and `rounds.md`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ff_jax.atomic_io import barrier, write_atomic, write_json_atomic
from ff_jax.errors import ConfigError, DataError
from ff_jax.pipeline.context import open_run
from ff_jax.pipeline.evaluate import model_metrics
from ff_jax.pipeline.filter import kept_and_flagged
from ff_jax.pipeline.finetunes import Finetunes
from ff_jax.pipeline.rundir import RunDir
from ff_jax.progress import log
from ff_jax.report.rounds import rounds_markdown
from ff_jax.run_files import ROUNDS, ROUNDS_REPORT, rounds_seed
from ff_jax.training.checkpoints import restore_params

METHODS = ("sequential", "forgetfilter")


def _unsafe_ids(noisy, flagged) -> tuple[set[str], str]:
  if all(r.kind is not None for r in noisy):
    return {r.id for r in noisy if r.kind == "unsafe"}, "unsafe (labels)"
  return {r.id for r in flagged}, "flagged by the filter (no labels)"


def run_rounds(run_dir: str | Path, rounds: int, heldout: bool = False) -> Path:
  """Run (or resume) both methods for `rounds` rounds; returns the path of rounds.json."""
  if rounds < 1:
    raise ConfigError(f"--rounds {rounds}: must be at least 1")
  run = RunDir(run_dir)
  ctx = open_run(run.read_config(require="clean"))
  cfg, noisy = ctx.cfg, ctx.inputs.noisy
  kept, flagged = kept_and_flagged(run, noisy)
  unsafe, unsafe_rule = _unsafe_ids(noisy, flagged)
  if not unsafe or len(unsafe) == len(noisy):
    raise DataError("rounds need some unsafe (or flagged) examples and some others in data.noisy")
  probe = {"unsafe": ctx.encode([r for r in noisy if r.id in unsafe]),
           "other": ctx.encode([r for r in noisy if r.id not in unsafe])}
  downstream = {"sequential": (cfg.noisy, ctx.noisy),
                "forgetfilter": (cfg.clean_phase, ctx.encode(kept))}
  own = {("sequential", 1, "downstream"): "M1", ("sequential", 1, "safety"): "M2",
         ("forgetfilter", 1, "downstream"): "clean"}
  results: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
  for method in METHODS:
    params = None
    for k in range(1, rounds + 1):
      for stage in ("downstream", "safety"):
        name = f"{method}_r{k}_{stage}"
        path = run.model(f"rounds/{name}")
        if (method, k, stage) in own:
          params = ctx.params(own[(method, k, stage)])
        elif path.exists():
          params = restore_params(path, ctx.runtime.abstract_with_shardings())
        else:
          phase, examples = downstream[method] if stage == "downstream" else (cfg.safety,
                                                                               ctx.safe)
          start = params
          log(f"== rounds: {name} ({len(examples)} examples)")
          # Seeds differ per method, round and stage, so every finetune sees its own order.
          seed = rounds_seed(cfg.seed, k, METHODS.index(method), stage == "safety")
          # Not a phase of the run: no manifest entry takes what the finetune cost.
          params, _ = Finetunes(ctx).single(f"rounds_{name}", phase, lambda start=start: start,
                                            examples, f"rounds/{name}", seed)
        row: dict[str, Any] = {"round": k, "stage": stage}
        row.update({f"nll/{key}": ctx.mean_nll(params, ex, f"rounds/{name}/{key}")
                    for key, ex in probe.items()})
        if heldout:
          row.update(model_metrics(ctx, params, name))
        results[method].append(row)
  out = {"rounds": rounds, "unsafe_examples": unsafe_rule, "n_unsafe": len(probe["unsafe"]),
         "methods": results}
  path = run.file(ROUNDS)
  write_json_atomic(path, out)
  write_atomic(run.file(ROUNDS_REPORT), rounds_markdown(out))
  barrier("rounds finished")
  return path
