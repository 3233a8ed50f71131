"""What every phase of a run works with: the config, the run directory, the mesh, the inputs
(encoded once), the model runtimes, a model restored by name, a finetune's loop settings and the
batches the run scores in. It is fixed for the run; phases train through
`ff_jax.pipeline.finetunes.Finetunes` and return what their finetunes cost to the driver.

`open_run` builds it: the inputs are loaded and encoded before the run directory is touched, so a
bad input never leaves a manifest that blocks the rerun on fixed data.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax

from ff_jax import parallel
from ff_jax.atomic_io import is_remote
from ff_jax.config import PhaseConfig, RunConfig
from ff_jax.data.batching import Batching
from ff_jax.data.templates import EncodedExample, PromptTemplate, encode_examples
from ff_jax.data.widths import AUTO, resolve_widths
from ff_jax.errors import ConfigError
from ff_jax.eval.toxicity import ToxicityScorer, make_toxicity_scorer
from ff_jax.models import lora
from ff_jax.pipeline.inputs import JobInputs, load_inputs, save_tokenizer
from ff_jax.pipeline.rundir import RunDir
from ff_jax.progress import TrainingLog, WandbSpec
from ff_jax.run_files import TENSORBOARD, TRAINING_LOG
from ff_jax.training.checkpoints import restore_params
from ff_jax.training.loop import PhaseSpec, phase_steps
from ff_jax.training.scoring import per_token_means, score_examples
from ff_jax.training.steps import ModelRuntime, Scorer


@dataclasses.dataclass(frozen=True)
class RunContext:
  """One run's state shared by its phases (see the module docstring)."""

  cfg: RunConfig
  run: RunDir
  mesh: jax.sharding.Mesh
  inputs: JobInputs
  template: PromptTemplate
  noisy: list[EncodedExample]  # D, encoded
  safe: list[EncodedExample]  # S, encoded
  manifest: dict[str, Any]  # the run directory's (`RunDir.mark_complete` updates it in place)
  runtime: ModelRuntime  # the model the run finetunes (with LoRA adapters when configured)
  base_runtime: ModelRuntime  # the released model's architecture (no adapters)
  training_log: TrainingLog  # where and how often every finetune records its metrics

  # Built on first use: a frozen dataclass still has an instance __dict__, where these cache.
  @functools.cached_property
  def scorer(self) -> Scorer:
    return Scorer(self.runtime)

  @functools.cached_property
  def toxicity_scorer(self) -> ToxicityScorer:
    return make_toxicity_scorer(self.cfg.evaluate.toxicity)

  @property
  def pad_id(self) -> int:
    return self.inputs.tokenizer.pad_id

  def batching(self, batch_size: int) -> Batching:
    """Batches of `batch_size` rows cut as the run cuts every set (`data.buckets`, its pad id,
    `data.packing`)."""
    return Batching(batch_size, self.cfg.data.buckets, self.pad_id, self.cfg.data.packing)

  @property
  def scoring(self) -> Batching:
    """The batches every set is scored in (`scoring.batch_size`)."""
    return self.batching(self.cfg.scoring.batch_size)

  def encode(self, records: Sequence) -> list[EncodedExample]:
    """Records encoded as the run encodes D (template, max_len, overflow rule)."""
    return encode_examples(self.inputs.tokenizer, records, self.template, self.cfg.data.max_len,
                           self.cfg.data.overflow)

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

  def spec(self, name: str, phase: PhaseConfig, num_examples: int, seed: int,
           snapshot_every: int = 0) -> PhaseSpec:
    """The training loop's settings for finetune `name` of `num_examples` examples."""
    steps = phase_steps(phase.steps, phase.epochs, num_examples, phase.batch_size, name)
    return PhaseSpec(name=name, steps=steps, batching=self.batching(phase.batch_size),
                     optim=phase.optim, seed=seed, checkpoint_minutes=phase.checkpoint_minutes,
                     checkpoint_every=phase.checkpoint_every, snapshot_every=snapshot_every,
                     adapter_checkpoints=self.cfg.lora.adapter_checkpoints)

  def mean_nll(self, params: Any, examples: Sequence[EncodedExample], name: str) -> float:
    """Mean per-token response NLL of `examples` (NaN for none): one number per set."""
    if not examples:
      return float("nan")
    stats = score_examples(self.scorer, params, examples, self.scoring, name)
    return float(stats["nll_sum"].sum() / max(stats["tokens"].sum(), 1.0))

  def noisy_means(self, params: Any, name: str,
                  examples: Sequence[EncodedExample] | None = None) -> dict[str, list[float]]:
    """{nll, nll_tail}: per-token means of every noisy example (or of `examples`, encoded from
    them), as `per_token_means` computes them."""
    stats = score_examples(self.scorer, params, self.noisy if examples is None else examples,
                           self.scoring, name)
    return {key: value.tolist() for key, value in per_token_means(stats).items()}


def open_run(cfg: RunConfig, restart: bool = False, redo_from: str | None = None) -> RunContext:
  """Load and encode the inputs, then open (or create) the run directory's manifest."""
  run = RunDir(cfg.run_dir)
  mesh = parallel.make_mesh(cfg.mesh)
  inputs = load_inputs(cfg, run)
  template = PromptTemplate(mode=cfg.data.template)
  cfg, noisy, safe = encode_inputs(cfg, inputs, template)
  manifest = run.open(cfg.to_dict(), inputs.fingerprints, restart=restart,
                      defaults=RunConfig().to_dict(), redo_from=redo_from)
  save_tokenizer(inputs.tokenizer, run)
  # With LoRA the run's model is M0's architecture plus adapters; the released model itself
  # (demo release phase, M0's files) has none.
  base_cfg = inputs.model_config
  runtime = ModelRuntime.create(base_cfg.replace(lora=cfg.lora), mesh)
  base_runtime = ModelRuntime.create(base_cfg, mesh) if cfg.lora.rank else runtime
  return RunContext(cfg=cfg, run=run, mesh=mesh, inputs=inputs, template=template, noisy=noisy,
                    safe=safe, manifest=manifest, runtime=runtime, base_runtime=base_runtime,
                    training_log=training_log(cfg, run))


def encode_inputs(cfg: RunConfig, inputs: JobInputs, template: PromptTemplate,
                  ) -> tuple[RunConfig, list[EncodedExample], list[EncodedExample]]:
  """D and S encoded, and `cfg` with `data.max_len` and `data.buckets` resolved to numbers
  (ff_jax.data.widths): with `auto` the rows are encoded at the model's context, so the longest
  one decides the width and no row is cut short of it."""
  context = inputs.model_config.max_position_embeddings
  width = context if cfg.data.max_len == AUTO else cfg.data.max_len
  encode = lambda records: encode_examples(inputs.tokenizer, records, template,  # noqa: E731
                                           width, cfg.data.overflow)
  noisy, safe = encode(inputs.noisy), encode(inputs.safe)
  longest = 0
  if cfg.data.max_len == AUTO:
    # The demo's release phase also trains on its world's corpus and alignment rows.
    world = [] if inputs.world is None else [*inputs.world.corpus, *inputs.world.alignment]
    longest = max(len(e.tokens) for e in [*noisy, *safe, *encode(world)])
  max_len, buckets = resolve_widths(cfg.data.max_len, cfg.data.buckets, longest, context)
  data = dataclasses.replace(cfg.data, max_len=max_len, buckets=buckets)
  return dataclasses.replace(cfg, data=data), noisy, safe


def training_log(cfg: RunConfig, run: RunDir) -> TrainingLog:
  """The run's finetunes record to `metrics.jsonl`, with `logging.tensorboard` to event files
  under `<run_dir>/tensorboard/<finetune>/`, with `logging.wandb` to the run directory's W&B run
  (files under `<run_dir>/wandb/`), every `logging.every` steps."""
  folder = run.file(TENSORBOARD) if cfg.logging.tensorboard else None
  wandb = None
  if cfg.logging.wandb != "off":
    if is_remote(run.root):
      # Refused before any training rather than at the first loop's first record.
      raise ConfigError(f"logging.wandb={cfg.logging.wandb}: run_dir {run.root} is in a bucket, "
                        "and W&B writes local files; use a local run_dir or logging.wandb=off")
    wandb = WandbSpec(cfg.logging.wandb, run.root, cfg.logging.wandb_project, cfg.to_dict())
  return TrainingLog(run.file(TRAINING_LOG), folder, cfg.logging.every, wandb)
