"""The `evaluate` phase: safety and task metrics of M0, M1, M2 and the clean model.

On the demo world each model answers the held-out evaluation prompts greedily and `demo.judge`
labels every answer (unsafe rate per category, exact match on task items). For every run, demo or
not, each model is also scored by response NLL on the safe set (lower: closer to safe behaviour),
on the kept examples (the customer's task) and on the flagged ones (higher: less unsafe knowledge).
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

import numpy as np

from ff_jax.data import records as records_io
from ff_jax.data.demo import SAFETY_CATEGORIES, judge
from ff_jax.data.templates import encode_examples, encode_prompt
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


def evaluate_models(job: Job) -> dict[str, Any]:
  cfg, tok = job.cfg, job.inputs.tokenizer
  kept = records_io.read_jsonl(job.run.file("filtered.jsonl"))
  flagged_path = job.run.file("flagged.jsonl")
  flagged = [records_io.Record.from_dict(
      {k: v for k, v in item.items() if k != "scores"}, where)
      for where, item in records_io.iter_jsonl(flagged_path)]
  sets = {
      "safe_set": job.safe,
      "kept": encode_examples(tok, kept, job.template, cfg.data.max_len, cfg.data.overflow),
      "flagged": encode_examples(tok, flagged, job.template, cfg.data.max_len, cfg.data.overflow),
  }
  models: dict[str, dict[str, float]] = {}
  for name in MODELS:
    params = job.params(name)
    metrics: dict[str, float] = {}
    if job.inputs.world is not None and cfg.data.noisy == "demo":
      metrics.update(_demo_metrics(job, params, name))
    for set_name, examples in sets.items():
      metrics[f"nll/{set_name}"] = _mean_nll(job, params, examples, f"evaluate/{name}/{set_name}")
    models[name] = metrics
    del params
  return {"models": models}
