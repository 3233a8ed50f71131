"""The baselines of the paper's comparison, each one command on a ForgetFilter run directory.

  ff-jax baseline NAME --run-dir DIR

A run's own `evaluate` phase already gives these rows: M0 (the aligned model), M1 (no safety
measure), M2 (sequential safety finetuning), clean (ForgetFilter) and, with held-out data and
`evaluate.self_correction`, M1+SC (moral self-correction) and clean+SC (ForgetFilter + SC).
The baselines here finetune M0 with the clean phase's recipe on another training set:

  random   drop as many examples as ForgetFilter flagged, chosen uniformly (seeded by the run)
  oracle   drop exactly the unsafe examples (needs `kind` labels): the best any filter can do
  replay   drop nothing and mix the safe set into the finetune

Each writes `models/baseline_<name>` and `baselines/<name>.json` (training set size and the same
metrics as the evaluate phase) and rewrites the report, whose comparison table gets a row per
method. A killed baseline resumes from its step checkpoints; a finished one is not retrained.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ff_jax.atomic_io import barrier, is_primary, write_json_atomic
from ff_jax.data.records import Record
from ff_jax.errors import ConfigError, DataError
from ff_jax.pipeline.context import open_run
from ff_jax.pipeline.evaluate import model_metrics, nll_sets
from ff_jax.pipeline.finetunes import Finetunes
from ff_jax.pipeline.rundir import RunDir
from ff_jax.progress import log
from ff_jax.report.markdown import write_report
from ff_jax.run_files import BASELINE_NAMES, BASELINES_DIR, FILTER_SUMMARY, finetune_seed
from ff_jax.training.checkpoints import restore_params

# The random baseline's draw: its own stream of the run's seed, apart from every finetune's.
RANDOM_DROP_STREAM = 104729


def training_set(name: str, noisy: list[Record], safe: list[Record], n_flagged: int,
                 seed: int) -> list[Record]:
  """The records baseline `name` finetunes M0 on (see the module docstring)."""
  if name == "random":
    drop = set(np.random.default_rng([seed, RANDOM_DROP_STREAM]).choice(
        len(noisy), n_flagged, replace=False).tolist())
    return [r for i, r in enumerate(noisy) if i not in drop]
  if name == "oracle":
    unlabelled = [r.id for r in noisy if r.kind is None]
    if unlabelled:
      raise DataError(f"baseline oracle needs a `kind` on every noisy record; {len(unlabelled)} "
                      f"have none (e.g. {unlabelled[0]!r})")
    return [r for r in noisy if r.kind != "unsafe"]
  if name == "replay":
    return [*noisy, *safe]
  raise ConfigError(f"unknown baseline {name!r}; baselines: {', '.join(BASELINE_NAMES)}")


def run_baseline(run_dir: str | Path, name: str) -> Path:
  """Train (or restore) and evaluate one baseline; returns its `baselines/<name>.json`."""
  if name not in BASELINE_NAMES:
    raise ConfigError(f"unknown baseline {name!r}; baselines: {', '.join(BASELINE_NAMES)} (M1, M2, "
                      "self-correction and ForgetFilter + SC are rows of every run's report)")
  run = RunDir(run_dir)
  ctx = open_run(run.read_config(require="filter"))
  n_flagged = json.loads(run.file(FILTER_SUMMARY).read_text())["counts"]["flagged"]
  records = training_set(name, ctx.inputs.noisy, ctx.inputs.safe, n_flagged, ctx.cfg.seed)
  output = f"baseline_{name}"
  if run.model(output).exists():
    log(f"== baseline {name}: model exists, evaluating it")
    params = restore_params(run.model(output), ctx.runtime.abstract_with_shardings())
  else:
    log(f"== baseline {name}: finetuning M0 on {len(records)} examples")
    # Not a phase of the run: no manifest entry takes what the finetune cost.
    params, _ = Finetunes(ctx).single(output, ctx.cfg.clean_phase, lambda: ctx.params("M0"),
                                      ctx.encode(records), output,
                                      finetune_seed(ctx.cfg.seed, output))
  metrics = model_metrics(ctx, params, name, nll_sets=nll_sets(ctx))
  metrics["train/examples"] = len(records)
  path = run.file(BASELINES_DIR) / f"{name}.json"
  write_json_atomic(path, {"name": name, "examples": len(records), "metrics": metrics})
  if RunDir.is_complete(ctx.manifest, "evaluate") and is_primary():  # the others' would not write
    write_report(run.root)
  barrier(f"baseline {name} finished")
  return path
