"""The phases that finetune one model: `release` (the demo's aligned M0), `noisy` (M0 on D → M1),
`safety` (M1 on S → M2, with snapshots for the forgetting curves) and `clean` (M0 on what the
filter kept → the deliverable, exported as an HF folder in the source's dtype with a model card,
and for a LoRA run also as a PEFT adapter folder).

The clean model is finetuned from M0, never from M1 or M2: it must not have seen the flagged
examples at all.
"""

from __future__ import annotations

import functools
from typing import Any

from ff_jax.atomic_io import remove
from ff_jax.data.templates import encode_examples
from ff_jax.errors import CheckpointError, DataError
from ff_jax.models import lora
from ff_jax.models.hf import peft_target_modules
from ff_jax.models.hf_config import hf_model_type
from ff_jax.pipeline.card import model_card, read_filter_summary
from ff_jax.pipeline.context import RunContext
from ff_jax.pipeline.filter import kept_and_flagged
from ff_jax.pipeline.finetunes import Finetunes
from ff_jax.progress import log
from ff_jax.run_files import CLEAN_ADAPTER, CLEAN_HF, SCORES_CSV, finetune_seed


def release(ctx: RunContext) -> dict[str, Any]:
  """Demo only: pretrain a tiny model on the demo world and align it (M0). A user's model is M0
  as given; the phase only records its source."""
  if not ctx.inputs.is_demo_model:
    return {"source": ctx.cfg.model.source}
  world, demo, seed = ctx.inputs.world, ctx.cfg.demo, ctx.cfg.seed
  tok, max_len = ctx.inputs.tokenizer, ctx.cfg.data.max_len
  corpus = encode_examples(tok, world.corpus, ctx.template, max_len)
  align = encode_examples(tok, world.alignment, ctx.template, max_len)
  # The released model is trained in full, without adapters, whatever the run finetunes.
  base, train = ctx.base_runtime, Finetunes(ctx)
  # A release phase killed while aligning reruns from its start: the pretrained model is then
  # restored from models/base, not trained again (demo.* is fixed for the run directory).
  _, pretrain = train.single("release_pretrain", demo.pretrain, lambda: base.init_params(seed),
                             corpus, "base", train.seed("release_pretrain"), runtime=base,
                             reuse_output=True)
  _, align_cost = train.single("release_align", demo.align, lambda: ctx.params("base"), align,
                               "M0", train.seed("release_align"), runtime=base)
  return {"pretrain_examples": len(corpus), "align_examples": len(align),
          "finetunes": {**pretrain, **align_cost}}


def noisy(ctx: RunContext) -> dict[str, Any]:
  _, costs = Finetunes(ctx).single("noisy", ctx.cfg.noisy, lambda: ctx.params("M0"), ctx.noisy,
                                   "M1", finetune_seed(ctx.cfg.seed, "noisy"))
  return {"examples": len(ctx.noisy), "finetunes": costs}


def safety(ctx: RunContext) -> dict[str, Any]:
  if not ctx.safe:
    raise DataError("the safe set is empty: safety finetuning needs at least one example")
  _, costs = Finetunes(ctx).single("safety", ctx.cfg.safety, lambda: ctx.params("M1"), ctx.safe,
                                   "M2", finetune_seed(ctx.cfg.seed, "safety"),
                                   snapshot_every=ctx.cfg.scoring.snapshot_every)
  return {"examples": len(ctx.safe), "finetunes": costs}


def clean(ctx: RunContext) -> dict[str, Any]:
  kept, _ = kept_and_flagged(ctx.run, ctx.inputs.noisy)
  if not kept:
    raise DataError(f"{ctx.run.file(SCORES_CSV)}: the filter flagged every example of data.noisy, "
                    "so nothing is left to finetune the clean model on (see filter.json; raise "
                    "filter.threshold)")
  examples = ctx.encode(kept)
  params, costs = Finetunes(ctx).single("clean", ctx.cfg.clean_phase, lambda: ctx.params("M0"),
                                        examples, "clean", finetune_seed(ctx.cfg.seed, "clean"))
  dtype = ctx.inputs.export_dtype(ctx.cfg.export.dtype)
  no_adapter = _no_adapter_reason(ctx)
  card = functools.partial(model_card, ctx.cfg, ctx.inputs.fingerprints,
                           read_filter_summary(ctx.run.root), ctx.inputs.base_model, dtype,
                           len(examples), adapter_folder=bool(ctx.cfg.lora.rank) and not no_adapter)
  out: dict[str, Any] = {"examples": len(examples)}
  if ctx.cfg.lora.rank:
    folder = ctx.run.file(CLEAN_ADAPTER)
    if no_adapter:
      log(f"clean: no {CLEAN_ADAPTER}/ ({no_adapter}); {CLEAN_HF}/ holds the merged model")
      remove(folder)  # an older export's adapters are not this model's
      out["adapter"] = f"none: {no_adapter}"
    else:
      out["adapter"] = str(ctx.inputs.export_adapter(folder, ctx.runtime.cfg, params,
                                                     card(adapter=True)))
    params = lora.merge(params, ctx.runtime.cfg)  # clean_hf is a plain model: adapters folded in
  export = ctx.inputs.export_hf(ctx.run.file(CLEAN_HF), params, dtype, card())
  return {**out, "hf_export": str(export), "export_dtype": dtype, "finetunes": costs}


def _no_adapter_reason(ctx: RunContext) -> str | None:
  """Why a LoRA run's adapters cannot be a PEFT folder (a family whose targets are not separate
  nn.Linear layers in HF: GPT-2's fused q/k/v), or None. It reads the config only, so every
  process takes the same branch."""
  if not ctx.cfg.lora.rank:
    return None
  try:
    peft_target_modules(ctx.runtime.cfg, hf_model_type(ctx.inputs.model_config))
  except CheckpointError as err:
    return str(err)
  return None
