"""The `evaluate` phase: safety and task metrics of M0, M1, M2 and the clean model.

With held-out records (`data.eval`) each model answers them greedily and `ff_jax.heldout` scores
bias, toxicity, harmfulness and the task; with `evaluate.self_correction` M1 and the clean model
are evaluated once more with the moral self-correction cue (rows `M1+SC`, `clean+SC`: the SC and
FF+SC baselines). On the demo world `demo.judge` labels every answer to the demo's own evaluation
prompts (unsafe rate per category, exact match on task items). For every run each model is also
scored by response NLL on the safe set (lower: closer to safe behaviour), on the kept examples (the
customer's task) and on the flagged ones (higher: less unsafe knowledge).
`model_metrics` is shared with the baselines of `ff_jax.baselines`.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

import numpy as np

from ff_jax.data import records as records_io
from ff_jax.data.demo import SAFETY_CATEGORIES, judge
from ff_jax.data.templates import encode_examples, encode_prompt
from ff_jax.heldout import eval_prompt, heldout_metrics
from ff_jax.scoring import generate_texts, score_examples

if TYPE_CHECKING:
  from ff_jax.pipeline import Job

MODELS = ("M0", "M1", "M2", "clean")


def _mean_nll(job: Job, params: Any, examples, name: str) -> float:
  if not examples:
    return float("nan")
  stats = score_examples(job.scorer, params, examples, job.cfg.scoring.batch_size,
                         job.cfg.data.buckets, job.inputs.tokenizer.pad_id, name)
  return float(np.sum(stats["nll_sum"]) / max(np.sum(stats["tokens"]), 1.0))


def _demo_metrics(job: Job, params: Any, name: str) -> dict[str, float]:
  cfg, tok = job.cfg, job.inputs.tokenizer
  records = job.inputs.world.eval_prompts
  prompts = [encode_prompt(tok, r, job.template, cfg.data.max_len) for r in records]
  texts = generate_texts(job.runtime, params, tok, prompts, cfg.evaluate.max_new_tokens,
                         cfg.evaluate.batch_size, f"evaluate/{name}")
  unsafe, exact = defaultdict(list), defaultdict(list)
  for record, text in zip(records, texts):
    verdict = judge(record.meta, text)
    if record.category in SAFETY_CATEGORIES and record.meta.get("variant") != "disambig":
      unsafe[record.category].append(verdict["unsafe"])
    elif verdict["exact_match"] is not None:
      key = "bias_disambig" if record.category == "bias" else record.category
      exact[key].append(verdict["exact_match"])
  out = {f"unsafe_rate/{k}": float(np.mean(v)) for k, v in sorted(unsafe.items())}
  out.update({f"task/{k}_exact_match": float(np.mean(v)) for k, v in sorted(exact.items())})
  return out


def _heldout_metrics(job: Job, params: Any, name: str, self_correction: bool) -> dict[str, Any]:
  cfg, tok = job.cfg, job.inputs.tokenizer
  records = job.inputs.eval
  prompts = [encode_prompt(tok, eval_prompt(r, self_correction), job.template, cfg.data.max_len)
             for r in records]
  texts = generate_texts(job.runtime, params, tok, prompts, cfg.evaluate.max_new_tokens,
                         cfg.evaluate.batch_size, f"evaluate/{name}/heldout")
  return heldout_metrics(records, texts, job.toxicity_scorer)


def _nll_sets(job: Job) -> dict[str, Any]:
  cfg, tok = job.cfg, job.inputs.tokenizer
  kept = records_io.read_jsonl(job.run.file("filtered.jsonl"))
  flagged = [records_io.Record.from_dict(
      {k: v for k, v in item.items() if k != "scores"}, where)
      for where, item in records_io.iter_jsonl(job.run.file("flagged.jsonl"))]
  return {
      "safe_set": job.safe,
      "kept": encode_examples(tok, kept, job.template, cfg.data.max_len, cfg.data.overflow),
      "flagged": encode_examples(tok, flagged, job.template, cfg.data.max_len, cfg.data.overflow),
  }


def model_metrics(job: Job, params: Any, name: str, self_correction: bool = False,
                  nll_sets: dict[str, Any] | None = None) -> dict[str, Any]:
  """Every metric of one model: held-out generations (with the SC cue if asked), the demo judge
  and the NLL on `nll_sets`."""
  metrics: dict[str, Any] = {}
  if job.inputs.world is not None and job.cfg.data.noisy == "demo" and not self_correction:
    metrics.update(_demo_metrics(job, params, name))
  if job.inputs.eval:
    metrics.update(_heldout_metrics(job, params, name, self_correction))
  for set_name, examples in (nll_sets or {}).items():
    metrics[f"nll/{set_name}"] = _mean_nll(job, params, examples, f"evaluate/{name}/{set_name}")
  return metrics


def evaluate_models(job: Job) -> dict[str, Any]:
  sets = _nll_sets(job)
  # How many examples each model was finetuned on after M0 (the comparison's "kept" column).
  trained = {"M1": len(job.noisy), "M2": len(job.noisy), "clean": len(sets["kept"])}
  models: dict[str, dict[str, Any]] = {}
  for name in MODELS:
    params = job.params(name)
    models[name] = model_metrics(job, params, name, nll_sets=sets)
    if name in trained:
      models[name]["train/examples"] = trained[name]
    if job.cfg.evaluate.self_correction and job.inputs.eval and name in ("M1", "clean"):
      sc = model_metrics(job, params, f"{name}+SC", self_correction=True)
      models[f"{name}+SC"] = {**sc, "train/examples": trained[name]}
    del params
  return {"models": models}
