"""The ForgetFilter job as a chain of resumable phases.

  release -> noisy -> score_before -> safety -> safety_replicas -> noisy_replicas
          -> score_after -> filter -> clean -> evaluate

`release` trains the demo's aligned model M0 (for a user's model it only records the import).
`noisy` finetunes M0 on D (M1); `safety` finetunes M1 on S (M2) and `safety_replicas` K − 1 more
copies of it (other seeds, stacked; only when scoring.replicas > 1); `noisy_replicas` repeats
noisy + safety with other seeds (only when scoring.noisy_replicas > 1); the two score phases measure
every example of D under M1 (and M0) and M2; `filter` computes the forgetting signals
(ff_jax.signals) and drops the examples whose signal exceeds the threshold; `clean` finetunes M0
(never M1/M2) on what is left; `evaluate` compares M0, M1, M2 and the clean
model and writes the report. Each phase ends in an Orbax checkpoint or an atomically written file
and is marked complete in the manifest; a rerun skips complete phases and resumes a training phase
from its newest step checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ff_jax import parallel
from ff_jax.checkpoints import restore_params, save_params, write_json_atomic
from ff_jax.config import PhaseConfig, RunConfig
from ff_jax.data import records as records_io
from ff_jax.data.templates import (
  PromptTemplate,
  encode_examples,
  encode_prompt,
  encode_responses_alone,
)
from ff_jax.errors import DataError
from ff_jax.inputs import JobInputs, load_inputs, save_tokenizer
from ff_jax.loop import PhaseSpec, phase_steps, snapshot_steps, train_phase
from ff_jax.models import lora
from ff_jax.progress import MetricsLog
from ff_jax.rundir import PHASES, RunDir
from ff_jax.scoring import (
  generate_texts,
  per_example_table,
  score_examples,
  score_snapshots,
)
from ff_jax.train import ModelRuntime, Scorer, Trainer


def log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


class Job:
  """One run of the pipeline over a run directory."""

  def __init__(self, cfg: RunConfig, restart: bool = False, redo_from: str | None = None):
    self.cfg = cfg
    self.run = RunDir(cfg.run_dir)
    self.mesh = parallel.make_mesh(cfg.mesh)
    self.inputs: JobInputs = load_inputs(cfg, self.run)
    # Encode (and so refuse overlong records under data.overflow=error) before the run directory
    # is touched: a bad input must not leave a manifest that blocks the rerun on fixed data.
    self.template = PromptTemplate(mode=cfg.data.template)
    tok = self.inputs.tokenizer
    self.noisy = encode_examples(tok, self.inputs.noisy, self.template, cfg.data.max_len,
                                 cfg.data.overflow)
    self.safe = encode_examples(tok, self.inputs.safe, self.template, cfg.data.max_len,
                                cfg.data.overflow)
    self.manifest = self.run.open(cfg.to_dict(), self.inputs.fingerprints, restart=restart,
                                  defaults=RunConfig().to_dict(), redo_from=redo_from)
    if jax.process_index() == 0:
      save_tokenizer(self.inputs.tokenizer, self.run)
    # With LoRA the run's model is M0's architecture plus adapters; the released model itself
    # (demo release phase, M0's files) has none.
    base_cfg = self.inputs.model_config
    self.runtime = ModelRuntime.create(base_cfg.replace(lora=cfg.lora), self.mesh)
    self.base_runtime = (ModelRuntime.create(base_cfg, self.mesh) if cfg.lora.rank
                         else self.runtime)
    self.metrics = MetricsLog(self.run.file("metrics.jsonl"))
    self._scorer: Scorer | None = None

  # -- helpers --------------------------------------------------------------------------------

  @functools.cached_property
  def toxicity_scorer(self):
    from ff_jax.toxicity import make_toxicity_scorer

    return make_toxicity_scorer(self.cfg.evaluate.toxicity)

  @property
  def scorer(self) -> Scorer:
    if self._scorer is None:
      self._scorer = Scorer(self.runtime)
    return self._scorer

  def params(self, name: str) -> Any:
    """A phase's output model, restored onto this mesh (M0 of a user model: from its files).

    With LoRA, M0 gets fresh adapters (seeded by the run, so every finetune of M0 starts from
    the same ones) and every later model carries its trained adapters.
    """
    if name not in ("base", "M0"):
      return restore_params(self.run.model(name), self.runtime.abstract_with_shardings())
    if name == "M0" and not self.inputs.is_demo_model:
      params = self.inputs.load_m0(self.mesh, self.runtime.rules)
    else:
      params = restore_params(self.run.model(name), self.base_runtime.abstract_with_shardings())
    if name == "base" or not self.cfg.lora.rank:
      return params
    return lora.add_adapters(params, self.runtime.abstract_params, self.runtime.param_shardings,
                             self.cfg.seed)

  def spec(self, name: str, phase: PhaseConfig, num_examples: int, seed_offset: int,
           snapshot_every: int = 0) -> PhaseSpec:
    steps = phase_steps(phase.steps, phase.epochs, num_examples, phase.batch_size, name)
    return PhaseSpec(name=name, steps=steps, batch_size=phase.batch_size, optim=phase.optim,
                     seed=self.cfg.seed * 1000 + seed_offset, buckets=self.cfg.data.buckets,
                     checkpoint_every=phase.checkpoint_every, snapshot_every=snapshot_every,
                     adapter_checkpoints=self.cfg.lora.adapter_checkpoints)

  def train(self, name: str, phase: PhaseConfig, init, examples, seed_offset: int,
            output: str, snapshot_every: int = 0, runtime: ModelRuntime | None = None) -> Any:
    if not examples:
      raise DataError(f"phase {name}: no examples to train on")
    spec = self.spec(name, phase, len(examples), seed_offset, snapshot_every)
    snapshot_dir = self.run.snapshots(name) if snapshot_every else None
    params = train_phase(spec, runtime or self.runtime, init, examples,
                         self.inputs.tokenizer.pad_id, self.run.ckpt(name), self.metrics,
                         snapshot_dir)
    save_params(self.run.model(output), params)
    return params

  def drop_step_checkpoints(self, name: str) -> None:
    # The phase output is saved on its own; step checkpoints only serve a resume of that phase.
    if jax.process_index() == 0:
      shutil.rmtree(self.run.ckpt(name), ignore_errors=True)

  # -- phases ---------------------------------------------------------------------------------

  def phase_release(self) -> dict[str, Any]:
    if not self.inputs.is_demo_model:
      return {"source": self.cfg.model.source}
    world, demo = self.inputs.world, self.cfg.demo
    tok = self.inputs.tokenizer
    corpus = encode_examples(tok, world.corpus, self.template, self.cfg.data.max_len)
    align = encode_examples(tok, world.alignment, self.template, self.cfg.data.max_len)
    seed = self.cfg.seed
    # The released model is trained in full, without adapters, whatever the run finetunes.
    base = self.base_runtime
    self.train("release_pretrain", demo.pretrain, lambda: base.init_params(seed), corpus, 1,
               "base", runtime=base)
    self.train("release_align", demo.align, lambda: self.params("base"), align, 2, "M0",
               runtime=base)
    for name in ("release_pretrain", "release_align"):
      self.drop_step_checkpoints(name)
    return {"pretrain_examples": len(corpus), "align_examples": len(align)}

  def phase_noisy(self) -> dict[str, Any]:
    self.train("noisy", self.cfg.noisy, lambda: self.params("M0"), self.noisy, 3, "M1")
    self.drop_step_checkpoints("noisy")
    return {"examples": len(self.noisy)}

  def phase_safety(self) -> dict[str, Any]:
    if not self.safe:
      raise DataError("the safe set is empty: safety finetuning needs at least one example")
    self.train("safety", self.cfg.safety, lambda: self.params("M1"), self.safe, 4, "M2",
               snapshot_every=self.cfg.scoring.snapshot_every)
    self.drop_step_checkpoints("safety")
    return {"examples": len(self.safe)}

  def replicas_per_pass(self, extra: int) -> int:
    """How many of `extra` replicas one stacked pass trains (`scoring.replicas_per_pass`).

    Memory grows with the stack (copies of params, moments and activations); passes bound it
    and give the same replicas, each with its own batch stream. LoRA trains one at a time: the
    stacked step trains every parameter, not just the adapters; so do several processes (a
    pod): stacked batches are built whole on one host.
    """
    if self.cfg.lora.rank or jax.process_count() > 1:
      return 1
    return self.cfg.scoring.replicas_per_pass or extra

  def phase_safety_replicas(self) -> dict[str, Any]:
    """K − 1 more safety finetunings of M1 (other seeds and safe-set orders), trained stacked.

    Only the noisy set's NLL under each is kept (`scores_replicas.json`); with the safety
    phase's own M2 they give the replica-ensemble signals. Each pass's scores are kept, so a
    killed phase resumes at the next pass.
    """
    from ff_jax.data.batching import TrainIterator
    from ff_jax.replicas import ReplicaTrainer, train_replicas, train_single

    k = self.cfg.scoring.replicas
    if k == 1:
      return {"replicas": 1}
    spec = self.spec("safety", self.cfg.safety, len(self.safe), 4)
    seeds = [spec.seed + 1_000_003 * i for i in range(1, k)]
    pad_id = self.inputs.tokenizer.pad_id
    per_pass = self.replicas_per_pass(len(seeds))
    single = None
    rows = []
    for start in range(0, len(seeds), per_pass):
      chunk = seeds[start:start + per_pass]
      done = self.run.file("replicas") / f"pass_{start}.json"
      if done.exists() and json.loads(done.read_text())["seeds"] == chunk:
        rows += json.loads(done.read_text())["nll"]
        continue
      iterators = [TrainIterator(self.safe, spec.batch_size, seed, spec.buckets, pad_id=pad_id)
                   for seed in chunk]
      if len(chunk) == 1:
        # One replica: the ordinary (unvmapped) steps, compiled once for every pass.
        single = single or (Trainer(self.runtime, spec.optim, spec.steps), self.scorer)
        nll = train_single(self.runtime, spec.optim, self.params("M1"), iterators[0],
                           [spec.steps], self.noisy, self.cfg.scoring.batch_size, spec.buckets,
                           pad_id, trainer=single[0], scorer=single[1])[None]
      else:
        trainer = ReplicaTrainer(self.runtime, spec.optim, spec.steps, len(chunk))
        nll, _ = train_replicas(trainer, self.params("M1"), iterators, [spec.steps], self.noisy,
                                self.cfg.scoring.batch_size, spec.buckets, pad_id,
                                name="safety_replicas")
      write_json_atomic(done, {"seeds": chunk, "nll": nll[:, -1].tolist()})
      rows += nll[:, -1].tolist()
      log(f"safety replicas: {start + len(chunk)}/{len(seeds)} trained")
    write_json_atomic(self.run.file("scores_replicas.json"),
                      {"seeds": seeds, "steps": spec.steps, "nll": rows})
    return {"replicas": k}

  def phase_noisy_replicas(self) -> dict[str, Any]:
    """K − 1 more noisy finetunes of M0 (other seeds, so other data orders), each followed by its
    own safety finetune: the `*_nens` signals average forgetting over K M1s, which removes the
    luck of one noisy run that safety replicas of a single M1 cannot (docs/signals.md).

    Passes of `scoring.replicas_per_pass` replicas train stacked (one vmapped noisy finetune of
    M0, then one vmapped safety finetune of the M1s it made), like the safety replicas; a pass
    of one trains with the ordinary steps and step checkpoints. Per replica only the noisy set's
    NLL under its M1 and its M2 is kept (`replicas/noisy_<i>.json`), so a killed phase resumes at
    the next pass (a one-replica pass: from its step checkpoints). The cost is K − 1 more noisy
    and safety finetunes.
    """
    k = self.cfg.scoring.noisy_replicas
    if k == 1:
      return {"noisy_replicas": 1}
    noisy = self.spec("noisy", self.cfg.noisy, len(self.noisy), 3)
    safety = self.spec("safety", self.cfg.safety, len(self.safe), 4)
    seeds = {i: [noisy.seed + 1_000_003 * i, safety.seed + 1_000_003 * i] for i in range(1, k)}
    per_pass = self.replicas_per_pass(k - 1)
    rows = {}
    for start in range(1, k, per_pass):
      chunk = list(range(start, min(k, start + per_pass)))
      files = {i: self.run.file("replicas") / f"noisy_{i}.json" for i in chunk}
      saved = {i: json.loads(f.read_text()) for i, f in files.items() if f.exists()}
      if all(i in saved and saved[i]["seeds"] == seeds[i] for i in chunk):
        rows.update(saved)
        continue
      if len(chunk) == 1:
        trained = {chunk[0]: self.noisy_replica_alone(chunk[0], seeds[chunk[0]], noisy, safety)}
      else:
        trained = self.noisy_replicas_stacked({i: seeds[i] for i in chunk}, noisy, safety)
      for i, row in trained.items():
        write_json_atomic(files[i], row)
        for name in (f"noisy_{i}", f"safety_{i}"):
          self.drop_step_checkpoints(name)  # a one-replica pass's; its scores are saved now
      rows.update(trained)
      log(f"noisy replicas: {chunk[-1]}/{k - 1} trained")
    ordered = [rows[i] for i in range(1, k)]
    write_json_atomic(self.run.file("scores_noisy_replicas.json"),
                      {"seeds": [row["seeds"] for row in ordered],
                       "nll_before": [row["nll_before"] for row in ordered],
                       "nll_after": [row["nll_after"] for row in ordered]})
    return {"noisy_replicas": k}

  def noisy_replica_alone(self, i: int, seeds: list[int], noisy: PhaseSpec,
                          safety: PhaseSpec) -> dict[str, Any]:
    """Noisy replica i with the ordinary steps, resumable from its step checkpoints."""
    pad_id = self.inputs.tokenizer.pad_id
    names = (f"noisy_{i}", f"safety_{i}")
    m1 = train_phase(dataclasses.replace(noisy, name=names[0], seed=seeds[0]), self.runtime,
                     lambda: self.params("M0"), self.noisy, pad_id, self.run.ckpt(names[0]),
                     self.metrics)
    nll_before = self.noisy_nll(m1, f"{names[0]}/score")
    m2 = train_phase(dataclasses.replace(safety, name=names[1], seed=seeds[1]), self.runtime,
                     lambda: m1, self.safe, pad_id, self.run.ckpt(names[1]), self.metrics)
    return {"seeds": seeds, "nll_before": nll_before,
            "nll_after": self.noisy_nll(m2, f"{names[1]}/score")}

  def noisy_replicas_stacked(self, seeds: dict[int, list[int]], noisy: PhaseSpec,
                             safety: PhaseSpec) -> dict[int, dict[str, Any]]:
    """Noisy replicas `seeds` (index: [noisy seed, safety seed]) trained together: the same
    batch streams as `noisy_replica_alone`, one vmapped step per phase."""
    from ff_jax.data.batching import TrainIterator
    from ff_jax.replicas import ReplicaTrainer, train_replicas

    pad_id, batch_size = self.inputs.tokenizer.pad_id, self.cfg.scoring.batch_size
    label = f"{min(seeds)}-{max(seeds)}"

    def streams(spec: PhaseSpec, examples, column: int) -> list[TrainIterator]:
      return [TrainIterator(examples, spec.batch_size, pair[column], spec.buckets, pad_id=pad_id)
              for pair in seeds.values()]

    nll_before, m1s = train_replicas(
        ReplicaTrainer(self.runtime, noisy.optim, noisy.steps, len(seeds)), self.params("M0"),
        streams(noisy, self.noisy, 0), [noisy.steps], self.noisy, batch_size, noisy.buckets,
        pad_id, name=f"noisy_{label}")
    nll_after, _ = train_replicas(
        ReplicaTrainer(self.runtime, safety.optim, safety.steps, len(seeds)), m1s,
        streams(safety, self.safe, 1), [safety.steps], self.noisy, batch_size, safety.buckets,
        pad_id, stacked_init=True, name=f"safety_{label}")
    return {i: {"seeds": pair, "nll_before": nll_before[j, -1].tolist(),
                "nll_after": nll_after[j, -1].tolist()}
            for j, (i, pair) in enumerate(seeds.items())}

  def noisy_nll(self, params: Any, name: str, examples: list | None = None) -> list[float]:
    """Per-token NLL of every noisy example (or of `examples`, encoded from them) under
    `params`."""
    stats = score_examples(self.scorer, params, self.noisy if examples is None else examples,
                           self.cfg.scoring.batch_size, self.cfg.data.buckets,
                           self.inputs.tokenizer.pad_id, name)
    return per_example_table(stats, None, ())["nll"].tolist()

  @functools.cached_property
  def noisy_responses_alone(self) -> list:
    return encode_responses_alone(self.inputs.tokenizer, self.inputs.noisy, self.template,
                                  self.cfg.data.max_len)

  def score(self, model: str, name: str, pmi: bool = False) -> dict[str, Any]:
    """Per-example statistics of the noisy set under `model`; with `pmi`, also the NLL of each
    response after an empty prompt (`nll_alone`, for the nll_pmi signal)."""
    cfg = self.cfg
    params = self.params(model)
    stats = score_examples(self.scorer, params, self.noisy, cfg.scoring.batch_size,
                           cfg.data.buckets, self.inputs.tokenizer.pad_id, name)
    generations = None
    if cfg.scoring.rouge:
      prompts = [encode_prompt(self.inputs.tokenizer, r, self.template, cfg.data.max_len)
                 for r in self.inputs.noisy]
      generations = generate_texts(self.runtime, params, self.inputs.tokenizer, prompts,
                                   cfg.scoring.max_new_tokens, cfg.scoring.batch_size,
                                   f"{name}/generate")
    table = per_example_table(stats, generations, [r.response for r in self.inputs.noisy])
    out = {key: np.asarray(value).tolist() for key, value in table.items()}
    if pmi:
      out["nll_alone"] = self.noisy_nll(params, f"{name}/alone", self.noisy_responses_alone)
    if generations is not None:
      out["generations"] = generations
    return out

  def phase_score_before(self) -> dict[str, Any]:
    scores = self.score("M1", "score_before", pmi=self.cfg.scoring.pmi)
    if self.cfg.scoring.m0:
      # The noisy set under M0 too: what the noisy phase taught each example (nll_lnf).
      m0 = self.score("M0", "score_m0")
      scores["m0"] = {k: m0[k] for k in ("nll", "acc", "tokens")}
    if self.cfg.scoring.gradient_blocks:
      scores["grad"] = self.gradient_alignment()
    write_json_atomic(self.run.file("scores_before.json"), scores)
    return {}

  def gradient_alignment(self) -> dict[str, Any]:
    from ff_jax.gradients import GradientAlignment

    cfg = self.cfg.scoring
    aligner = GradientAlignment(self.runtime, cfg.gradient_blocks, cfg.gradient_batch_size,
                                cfg.gradient_max_gib)
    log(f"gradient alignment: last {cfg.gradient_blocks} blocks, "
        f"{aligner.bound_bytes / 2**20:.0f} MiB of per-example gradients per pass")
    params = self.params("M1")
    pad_id, buckets = self.inputs.tokenizer.pad_id, self.cfg.data.buckets
    safe_grad = aligner.safe_gradient(params, self.safe, buckets, pad_id, cfg.batch_size)
    out = aligner.align(params, safe_grad, self.noisy, buckets, pad_id)
    return {"grad": out["grad"].tolist(), "grad_cos": out["grad_cos"].tolist(),
            "safe_grad_norm": out["safe_grad_norm"], "blocks": cfg.gradient_blocks}

  def phase_score_after(self) -> dict[str, Any]:
    scores = self.score("M2", "score_after", pmi=self.cfg.scoring.pmi)
    steps = snapshot_steps(self.run.snapshots("safety"))
    if steps:
      # Forgetting curves: every snapshot scored in one vmapped pass over the data.
      target = self.runtime.abstract_with_shardings()
      # Stacked on device (never fetched to one host: on a pod no host holds every shard).
      stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[
          restore_params(self.run.snapshots("safety") / f"step_{s}", target) for s in steps])
      stats = score_snapshots(self.scorer, stacked, self.noisy, self.cfg.scoring.batch_size,
                              self.cfg.data.buckets, self.inputs.tokenizer.pad_id)
      tokens = np.maximum(stats["tokens"], 1.0)
      scores["curve"] = {"steps": steps, "nll": (stats["nll_sum"] / tokens).tolist()}
    write_json_atomic(self.run.file("scores_after.json"), scores)
    return {"snapshots": len(steps)}

  def phase_filter(self) -> dict[str, Any]:
    from ff_jax.filter_phase import run_filter
    from ff_jax.report import separation_warning

    info = run_filter(self.cfg, self.run, self.inputs.noisy,
                      truncated=sum(e.truncated for e in self.noisy))
    warning = separation_warning(self.run.root)
    if warning:
      log(warning)
    return info

  def phase_clean(self) -> dict[str, Any]:
    path = self.run.file("filtered.jsonl")
    if not path.read_text(encoding="utf-8").strip():
      raise DataError(f"{path}: the filter flagged every example of data.noisy, so nothing is left "
                      "to finetune the clean model on (see filter.json; raise filter.threshold)")
    kept = records_io.read_jsonl(path)
    examples = encode_examples(self.inputs.tokenizer, kept, self.template, self.cfg.data.max_len,
                               self.cfg.data.overflow)
    params = self.train("clean", self.cfg.clean_phase, lambda: self.params("M0"), examples, 5,
                        "clean")
    self.drop_step_checkpoints("clean")
    if self.cfg.lora.rank:  # the export is a plain model: adapters folded into the weights
      params = lora.merge(params, self.runtime.cfg)
    export = self.inputs.export_hf(self.run.file("clean_hf"), self.runtime, params)
    return {"examples": len(examples), "hf_export": str(export) if export else None}

  def phase_evaluate(self) -> dict[str, Any]:
    from ff_jax.evaluate_phase import evaluate_models

    metrics = evaluate_models(self)
    write_json_atomic(self.run.file("metrics.json"), metrics)
    return {}

  # -- driver ---------------------------------------------------------------------------------

  def execute(self, until: str | None = None) -> dict[str, Any]:
    """Run every incomplete phase in order (up to and including `until`)."""
    phases = PHASES[:PHASES.index(until) + 1] if until else PHASES
    total = time.perf_counter()
    for name in phases:
      if self.run.is_complete(self.manifest, name):
        log(f"== {name}: complete, skipped")
        continue
      log(f"== {name}")
      start = time.perf_counter()
      info = getattr(self, f"phase_{name}")()
      seconds = time.perf_counter() - start
      self.run.mark_complete(self.manifest, name, seconds, **(info or {}))
      log(f"== {name}: done in {seconds:.1f}s")
    if self.run.is_complete(self.manifest, "evaluate") and jax.process_index() == 0:
      from ff_jax.report import write_report

      # Written after the manifest is final, so the report's timing table has every phase.
      write_report(self.run.root)
    times = {p: self.manifest["phases"].get(p, {}).get("seconds") for p in phases}
    log("phase times (s): " + ", ".join(f"{p} {t:.1f}" for p, t in times.items()
                                        if t is not None))
    log(f"wall time this invocation: {time.perf_counter() - total:.1f}s")
    return self.manifest


def run_job(cfg: RunConfig, restart: bool = False, until: str | None = None,
            redo_from: str | None = None) -> Path:
  job = Job(cfg, restart=restart, redo_from=redo_from)
  job.execute(until)
  return job.run.root
