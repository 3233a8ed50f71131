"""The score phases: per-example statistics of D under M1 (`score_before`, and under M0 for the
learning-normalized signals; gradient alignment with S) and under M2 (`score_after`, and under
every safety snapshot in one vmapped pass for the forgetting curves).

Each writes one JSON table of per-example columns, in D's order; the filter phase turns the two
into forgetting signals.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ff_jax.atomic_io import write_json_atomic
from ff_jax.data.batching import Batching
from ff_jax.data.templates import encode_prompt, encode_responses_alone
from ff_jax.forgetting.gradients import GradientAlignment
from ff_jax.pipeline.context import RunContext
from ff_jax.progress import log
from ff_jax.run_files import SCORES_AFTER, SCORES_BEFORE
from ff_jax.training.checkpoints import restore_params
from ff_jax.training.loop import snapshot_steps
from ff_jax.training.scoring import (
  generate_texts,
  per_example_table,
  score_examples,
  score_snapshots,
)


def _score(ctx: RunContext, model: str, name: str, pmi: bool = False) -> dict[str, Any]:
  """Per-example statistics of the noisy set under `model`; with `pmi`, also the NLL of each
  response after an empty prompt (`nll_alone`, for the nll_pmi signal)."""
  cfg, tok = ctx.cfg, ctx.inputs.tokenizer
  params = ctx.params(model)
  stats = score_examples(ctx.scorer, params, ctx.noisy, ctx.scoring, name)
  generations = None
  if cfg.scoring.rouge:
    prompts = [encode_prompt(tok, r, ctx.template, cfg.data.max_len) for r in ctx.inputs.noisy]
    generations = generate_texts(ctx.runtime, params, tok, prompts, cfg.scoring.max_new_tokens,
                                 cfg.scoring.batch_size, f"{name}/generate")
  table = per_example_table(stats, generations, [r.response for r in ctx.inputs.noisy])
  out = {key: np.asarray(value).tolist() for key, value in table.items()}
  if pmi:
    alone = encode_responses_alone(tok, ctx.inputs.noisy, ctx.template, cfg.data.max_len)
    out["nll_alone"] = ctx.noisy_means(params, f"{name}/alone", alone)["nll"]
  if generations is not None:
    out["generations"] = generations
  return out


def score_before(ctx: RunContext) -> dict[str, Any]:
  scores = _score(ctx, "M1", "score_before", pmi=ctx.cfg.scoring.pmi)
  if ctx.cfg.scoring.m0:
    # The noisy set under M0 too: what the noisy phase taught each example (nll_lnf).
    m0 = _score(ctx, "M0", "score_m0")
    scores["m0"] = {k: m0[k] for k in ("nll", "acc", "tokens")}
  if ctx.cfg.scoring.gradient_blocks:
    scores["grad"] = _gradient_alignment(ctx)
  write_json_atomic(ctx.run.file(SCORES_BEFORE), scores)
  return {}


def _gradient_alignment(ctx: RunContext) -> dict[str, Any]:
  cfg = ctx.cfg.scoring
  aligner = GradientAlignment(ctx.runtime, cfg.gradient_blocks, cfg.gradient_batch_size,
                              cfg.gradient_max_gib)
  log(f"gradient alignment: last {cfg.gradient_blocks} blocks, "
      f"{aligner.bound_bytes / 2**20:.0f} MiB of per-example gradients per pass")
  params = ctx.params("M1")
  buckets = ctx.cfg.data.buckets
  safe_grad = aligner.safe_gradient(params, ctx.safe, Batching(cfg.batch_size, buckets, ctx.pad_id))
  out = aligner.align(params, safe_grad, ctx.noisy, buckets, ctx.pad_id)
  return {"grad": out["grad"].tolist(), "grad_cos": out["grad_cos"].tolist(),
          "safe_grad_norm": out["safe_grad_norm"], "blocks": cfg.gradient_blocks}


def score_after(ctx: RunContext) -> dict[str, Any]:
  scores = _score(ctx, "M2", "score_after", pmi=ctx.cfg.scoring.pmi)
  snapshots = ctx.run.snapshots("safety")
  steps = snapshot_steps(snapshots)
  if steps:
    # Forgetting curves: every snapshot scored in one vmapped pass over the data.
    target = ctx.runtime.abstract_with_shardings()
    # Stacked on device (never fetched to one host: on a pod no host holds every shard).
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[
        restore_params(snapshots / f"step_{s}", target) for s in steps])
    stats = score_snapshots(ctx.scorer, stacked, ctx.noisy, ctx.scoring)
    tokens = np.maximum(stats["tokens"], 1.0)
    scores["curve"] = {"steps": steps, "nll": (stats["nll_sum"] / tokens).tolist()}
  write_json_atomic(ctx.run.file(SCORES_AFTER), scores)
  return {"snapshots": len(steps)}
