"""The baselines of the paper's comparison, each one command on a ForgetFilter run directory.

  ff-jax baseline NAME RUN_DIR

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
from typing import Any

import numpy as np

from ff_jax.checkpoints import restore_params, write_json_atomic
from ff_jax.config import RunConfig, config_from_dict
from ff_jax.data.records import Record
from ff_jax.data.templates import encode_examples
from ff_jax.errors import ConfigError, DataError, RunDirError
from ff_jax.rundir import RunDir

BASELINES = ("random", "oracle", "replay")


def training_set(name: str, noisy: list[Record], safe: list[Record], n_flagged: int,
                 seed: int) -> list[Record]:
  """The records baseline `name` finetunes M0 on (see the module docstring)."""
  if name == "random":
    drop = set(np.random.default_rng([seed, 104729]).choice(len(noisy), n_flagged,
                                                            replace=False).tolist())
    return [r for i, r in enumerate(noisy) if i not in drop]
  if name == "oracle":
    unlabelled = [r.id for r in noisy if r.kind is None]
    if unlabelled:
      raise DataError(f"baseline oracle needs a `kind` on every noisy record; {len(unlabelled)} "
                      f"have none (e.g. {unlabelled[0]!r})")
    return [r for r in noisy if r.kind != "unsafe"]
  if name == "replay":
    return [*noisy, *safe]
  raise ConfigError(f"unknown baseline {name!r}; baselines: {', '.join(BASELINES)}")


def _run_config(run: RunDir) -> RunConfig:
  manifest = run.read_manifest()
  if manifest is None:
    raise RunDirError(f"{run.root}: no manifest.json; run `ff-jax run` (at least up to the filter "
                      "phase) first")
  if not RunDir.is_complete(manifest, "filter"):
    raise RunDirError(f"{run.root}: the filter phase is not complete; finish the run first")
  return config_from_dict({**manifest["config"], "run_dir": str(run.root)},
                          f"{run.manifest_path} (config)")


def run_baseline(run_dir: str | Path, name: str) -> Path:
  """Train (or restore) and evaluate one baseline; returns its `baselines/<name>.json`."""
  from ff_jax.evaluate_phase import _nll_sets, model_metrics
  from ff_jax.pipeline import Job, log

  if name not in BASELINES:
    raise ConfigError(f"unknown baseline {name!r}; baselines: {', '.join(BASELINES)} (M1, M2, "
                      "self-correction and ForgetFilter + SC are rows of every run's report)")
  run = RunDir(run_dir)
  cfg = _run_config(run)
  job = Job(cfg)
  n_flagged = json.loads(run.file("filter.json").read_text())["counts"]["flagged"]
  records = training_set(name, job.inputs.noisy, job.inputs.safe, n_flagged, cfg.seed)
  output = f"baseline_{name}"
  if run.model(output).exists():
    log(f"== baseline {name}: model exists, evaluating it")
    params = restore_params(run.model(output), job.runtime.abstract_with_shardings())
  else:
    log(f"== baseline {name}: finetuning M0 on {len(records)} examples")
    examples = encode_examples(job.inputs.tokenizer, records, job.template, cfg.data.max_len,
                               cfg.data.overflow)
    params = job.train(output, cfg.clean_phase, lambda: job.params("M0"), examples,
                       6 + BASELINES.index(name), output)
    job.drop_step_checkpoints(output)
  metrics = model_metrics(job, params, name, nll_sets=_nll_sets(job))
  metrics["train/examples"] = len(records)
  path = run.file("baselines") / f"{name}.json"
  write_json_atomic(path, {"name": name, "examples": len(records), "metrics": metrics})
  if RunDir.is_complete(job.manifest, "evaluate"):
    from ff_jax.report import write_report

    write_report(run.root)
  return path


def read_baselines(run_dir: str | Path) -> dict[str, dict[str, Any]]:
  """{name: metrics} of the baselines run so far, in `BASELINES` order."""
  folder = Path(run_dir) / "baselines"
  out = {}
  for name in BASELINES:
    path = folder / f"{name}.json"
    if path.is_file():
      out[name] = json.loads(path.read_text())["metrics"]
  return out
