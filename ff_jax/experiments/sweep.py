"""`ff-jax sweep`: ablations over safe-set size × safety steps t × seeds, as stacked replicas.

A sweep reads a completed run directory (M1, scores_before.json, the tokenizer and the run's config)
and finetunes M1 once per variant (safe size n, seed) on its own seeded size-n subset of the safe
set, with the run's safety optimizer and batch size unless the sweep config sets its own (said at
start, and in results and report). Variants are trained together, `chunk_size` at a time, as
vmapped replicas (`ff_jax.training.replicas`); the noisy set is scored under every replica at every
t in `steps`.
Forgetting r_nll = NLL(after) - NLL(before, under M1) feeds the filter at each fixed ϕ in `phis` and
at the auto threshold; with labels, precision/recall/F1/AUROC of every (n, seed, t, threshold) go to
`<out_dir>/results.csv|json`, plots and `report.md`.

Resume: each finished chunk's per-example NLL is written atomically under `<out_dir>/chunks/`; a
rerun skips chunks already there (a chunk saved by another sweep config is refused).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from ff_jax.atomic_io import (
  barrier,
  is_primary,
  remove,
  run_path,
  write_atomic,
  write_json_atomic,
)
from ff_jax.config import LoggingConfig
from ff_jax.data.batching import Batching
from ff_jax.data.templates import EncodedExample, PromptTemplate, encode_examples
from ff_jax.errors import ConfigError, RunDirError
from ff_jax.eval.classification import auroc, filter_metrics
from ff_jax.forgetting.thresholds import Threshold
from ff_jax.pipeline.inputs import load_inputs
from ff_jax.pipeline.rundir import RunDir
from ff_jax.progress import TrainingLog, log
from ff_jax.report.sweep import sweep_plots, write_sweep_report
from ff_jax.run_files import SCORES_BEFORE
from ff_jax.training.checkpoints import restore_params
from ff_jax.training.loop import train_and_score
from ff_jax.training.replicas import ReplicaMeshConfig, make_replica_mesh, variant_iterator
from ff_jax.training.steps import ModelRuntime, OptimConfig, Scorer, Trainer


@dataclasses.dataclass(frozen=True)
class SweepConfig:
  """The grid, the safety finetune every variant runs, and how replicas are chunked/placed."""

  run_dir: str = ""
  out_dir: str = ""  # default: <run_dir>/sweep
  safe_sizes: tuple[int, ...] = (8, 16, 32, 48, 72)
  steps: tuple[int, ...] = (5, 10, 20)  # train to max(steps), score at each
  seeds: tuple[int, ...] = (0, 1, 2)
  # The safety finetune of every variant: None takes the run's (its manifest config's
  # safety.batch_size and safety.optim), so an ablation ablates the run; set them to override.
  batch_size: int | None = None
  optim: OptimConfig | None = None
  chunk_size: int = 8  # replicas trained at once; a multiple of mesh.replica
  score_batch_size: int = 48
  phis: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
  threshold: str = "auto"  # the data-driven threshold reported beside the fixed ϕ
  mesh: ReplicaMeshConfig = dataclasses.field(default_factory=ReplicaMeshConfig)
  # Every chunk's training records: `<out_dir>/metrics.jsonl` and `<out_dir>/tensorboard/`.
  logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)

  def __post_init__(self):
    for name in ("safe_sizes", "steps", "seeds"):
      if not getattr(self, name):
        raise ConfigError(f"sweep.{name}: must not be empty")
    if min(self.steps) < 1:
      raise ConfigError(f"sweep.steps: every t must be >= 1, got {self.steps}")
    if self.chunk_size < 1 or self.chunk_size % self.mesh.replica:
      raise ConfigError(f"sweep.chunk_size={self.chunk_size} must be a positive multiple of "
                        f"mesh.replica={self.mesh.replica}")

  def variants(self) -> list[tuple[int, int]]:
    return [(int(n), int(s)) for n in self.safe_sizes for s in self.seeds]

  def key(self) -> dict[str, Any]:
    """What a saved chunk depends on (not the thresholds: those are recomputed every run)."""
    return {"steps": sorted(set(self.steps)), "batch_size": self.batch_size,
            "optim": dataclasses.asdict(self.optim), "chunk_size": self.chunk_size}


@dataclasses.dataclass
class SweepInputs:
  """What a sweep needs from a run: model, M1, encoded safe and noisy sets, scores under M1."""

  runtime: ModelRuntime
  m1: Any
  safe: list[EncodedExample]
  noisy: list[EncodedExample]
  nll_before: np.ndarray  # [N]
  is_unsafe: np.ndarray | None  # [N] bool, None without labels
  buckets: tuple[int, ...]
  pad_id: int
  # The run's safety finetune, what a variant trains with unless the sweep config overrides it.
  safety_optim: OptimConfig | None = None
  safety_batch_size: int | None = None


@dataclasses.dataclass(frozen=True)
class SweepTraining:
  """The optimizer and batch size every variant trains with, and where they come from."""

  optim: OptimConfig
  batch_size: int
  source: str  # "the run's safety optimizer", "sweep override", or which part is overridden

  def describe(self) -> str:
    return f"{self.source} (lr {self.optim.learning_rate:g}, batch {self.batch_size})"


def sweep_training(cfg: SweepConfig, inputs: SweepInputs) -> SweepTraining:
  """The run's safety optimizer and batch size, each unless `cfg` sets its own."""
  optim = cfg.optim if cfg.optim is not None else inputs.safety_optim
  batch_size = cfg.batch_size if cfg.batch_size is not None else inputs.safety_batch_size
  if optim is None or batch_size is None:
    raise ConfigError("sweep.optim and sweep.batch_size: not set, and no run's safety finetune "
                      "to take them from; set both")
  source = {(False, False): "the run's safety optimizer",
            (True, True): "sweep override",
            (True, False): "sweep override of the optimizer, the run's batch size",
            (False, True): "the run's safety optimizer, sweep override of the batch size",
            }[(cfg.optim is not None, cfg.batch_size is not None)]
  return SweepTraining(optim, batch_size, source)


def load_run(run_dir: str | Path, mesh) -> SweepInputs:
  """The sweep's inputs from a run directory that finished `score_before`."""
  run = RunDir(run_dir)
  # The sweep needs M1 and scores_before.json: `ff-jax run <config> --until score_before`.
  cfg = run.read_config(require="score_before")
  inputs = load_inputs(cfg, run)
  template = PromptTemplate(mode=cfg.data.template)
  tok = inputs.tokenizer
  noisy = encode_examples(tok, inputs.noisy, template, cfg.data.max_len, cfg.data.overflow)
  safe = encode_examples(tok, inputs.safe, template, cfg.data.max_len, cfg.data.overflow)
  runtime = ModelRuntime.create(inputs.model_config, mesh)
  m1 = restore_params(run.model("M1"), runtime.abstract_with_shardings())
  before = json.loads(run.file(SCORES_BEFORE).read_text())
  labelled = all(r.kind is not None for r in inputs.noisy)
  is_unsafe = np.asarray([r.kind == "unsafe" for r in inputs.noisy]) if labelled else None
  return SweepInputs(runtime, m1, safe, noisy, np.asarray(before["nll"], np.float64), is_unsafe,
                     tuple(cfg.data.buckets), tok.pad_id, safety_optim=cfg.safety.optim,
                     safety_batch_size=cfg.safety.batch_size)


def _chunks(variants: list[tuple[int, int]], size: int) -> list[list[tuple[int, int]]]:
  return [variants[i:i + size] for i in range(0, len(variants), size)]


def run_chunks(cfg: SweepConfig, inputs: SweepInputs, out_dir: Path) -> dict[tuple[int, int],
                                                                             np.ndarray]:
  """Train and score every variant (skipping saved chunks): (n, seed) -> NLL [len(steps), N]."""
  steps = sorted(set(cfg.steps))
  folder = out_dir / "chunks"
  key = cfg.key()
  for n in cfg.safe_sizes:  # fail before any training, not in the middle of the sweep
    if not 1 <= n <= len(inputs.safe):
      raise ConfigError(f"sweep.safe_sizes: {n} is not in [1, {len(inputs.safe)}] (the run's "
                        "safe set size)")
  trainer = scorer = None
  training_log = TrainingLog(out_dir / "metrics.jsonl",
                             out_dir / "tensorboard" if cfg.logging.tensorboard else None,
                             cfg.logging.every)
  results: dict[tuple[int, int], np.ndarray] = {}
  chunks = _chunks(cfg.variants(), cfg.chunk_size)
  for i, chunk in enumerate(chunks):
    path = folder / f"chunk_{i:03d}.json"
    if path.exists():
      saved = json.loads(path.read_text())
      if saved["key"] != key or [tuple(v) for v in saved["variants"]] != chunk:
        raise RunDirError(f"{path}: saved by a sweep with another config; use another out_dir "
                          "or pass --restart")
      log(f"== sweep chunk {i + 1}/{len(chunks)}: complete, skipped")
    else:
      log(f"== sweep chunk {i + 1}/{len(chunks)}: {len(chunk)} variants {chunk}")
      start = time.perf_counter()
      if trainer is None:  # one compile serves every chunk: the last one is padded to size
        trainer = Trainer(inputs.runtime, cfg.optim, max(steps), replicas=cfg.chunk_size)
        scorer = Scorer(inputs.runtime)
      # Padding replicas repeat the last variant; their results are dropped.
      padded = chunk + [chunk[-1]] * (cfg.chunk_size - len(chunk))
      # Each host builds its block of every stacked batch (its replicas' rows, `stack_block`).
      block = trainer.stack_block
      its = [variant_iterator(inputs.safe, n, s, cfg.batch_size, inputs.buckets, inputs.pad_id,
                              block.row_block, block.row_blocks)
             for n, s in padded]
      # TensorBoard: a run folder per variant, and one per padding replica (`padding_<k>`).
      names = [f"n{n}_s{s}" for n, s in chunk]
      names += [f"padding_{k}" for k in range(cfg.chunk_size - len(chunk))]
      means, _ = train_and_score(trainer, scorer, inputs.m1, its, steps, inputs.noisy,
                                 Batching(cfg.score_batch_size, inputs.buckets, inputs.pad_id),
                                 name=f"sweep/chunk_{i:03d}", log=training_log,
                                 replica_names=names)
      saved = {"key": key, "variants": [list(v) for v in chunk],
               "nll": means["nll"][:len(chunk)].tolist(), "seconds": time.perf_counter() - start}
      write_json_atomic(path, saved)
      log(f"== sweep chunk {i + 1}/{len(chunks)}: done in {saved['seconds']:.1f}s")
    for v, arr in zip(chunk, saved["nll"]):
      results[v] = np.asarray(arr, np.float64)
  return results


def evaluate(cfg: SweepConfig, inputs: SweepInputs, nll: dict[tuple[int, int], np.ndarray],
             training: SweepTraining) -> list[dict[str, Any]]:
  """One row per (n, seed, t, threshold): ϕ, kept, P/R/F1/AUROC when labels exist, and the
  optimizer the variants trained with."""
  steps = sorted(set(cfg.steps))
  specs = [Threshold.parse(cfg.threshold)] + [Threshold.parse(f"fixed:{p}") for p in cfg.phis]
  rows = []
  for (n, seed), table in nll.items():
    for j, t in enumerate(steps):
      r = table[j] - inputs.nll_before
      area = auroc(r, inputs.is_unsafe) if inputs.is_unsafe is not None else None
      for spec in specs:
        flags, phi, _ = spec(r)
        row = {"variant": f"n{n}_s{seed}", "n": n, "t": t, "seed": seed, "threshold": str(spec),
               "phi": float(phi), "kept": int((~flags).sum()), "flagged": int(flags.sum()),
               "precision": None, "recall": None, "f1": None, "auroc": area,
               "mean_r_nll": float(np.nanmean(r)), "optimizer": training.source,
               "learning_rate": training.optim.learning_rate,
               "batch_size": training.batch_size}
        if inputs.is_unsafe is not None:
          m = filter_metrics(flags, inputs.is_unsafe)
          row.update(precision=m["precision"], recall=m["recall"], f1=m["f1"])
        rows.append(row)
  return rows


COLUMNS = ["variant", "n", "t", "seed", "threshold", "phi", "precision", "recall", "f1", "auroc",
           "kept", "flagged", "mean_r_nll", "optimizer", "learning_rate", "batch_size"]


def write_results(rows: list[dict[str, Any]], out_dir: Path) -> None:
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, COLUMNS, lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({k: "" if row[k] is None else row[k] for k in COLUMNS})
  write_atomic(out_dir / "results.csv", buffer.getvalue())
  write_json_atomic(out_dir / "results.json", rows)


def run_sweep(cfg: SweepConfig, inputs: SweepInputs | None = None,
              restart: bool = False) -> Path:
  """The whole sweep; returns the output folder. `inputs` default: loaded from `cfg.run_dir`."""
  if not cfg.run_dir and inputs is None:
    raise ConfigError("sweep.run_dir is not set: give the run directory whose M1 to sweep, as "
                      "`ff-jax sweep --run-dir DIR`")
  out_dir = run_path(cfg.out_dir or run_path(cfg.run_dir) / "sweep")
  if restart:
    remove(out_dir)
  barrier("sweep folder cleared")  # before any process looks for saved chunks in it
  start = time.perf_counter()
  if inputs is None:
    inputs = load_run(cfg.run_dir, make_replica_mesh(cfg.mesh))
  training = sweep_training(cfg, inputs)
  log(f"optimizer: {training.describe()}")
  cfg = dataclasses.replace(cfg, optim=training.optim, batch_size=training.batch_size)
  nll = run_chunks(cfg, inputs, out_dir)
  trained = time.perf_counter() - start
  rows = evaluate(cfg, inputs, nll, training)
  write_results(rows, out_dir)
  if is_primary():  # rendering only: the others' writes would do nothing
    plots = sweep_plots(cfg, rows, out_dir)
    write_sweep_report(cfg, rows, out_dir, plots,
                       {"train + score (this invocation)": trained,
                        "total (this invocation)": time.perf_counter() - start},
                       optimizer=training.describe())
  barrier("sweep finished")
  return out_dir
