"""Per-example statistics and forgetting.

For every example of the noisy set and a model (or a stack of parameter snapshots): the summed
response NLL, that of its first target alone, the number of target tokens and the number of
correctly predicted tokens (one forward pass), and optionally the greedy generation scored by
ROUGE-1 F against the target response (the paper's signal, one decode).
`ff_jax.forgetting.signals` turns such tables into forgetting signals.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from ff_jax import parallel
from ff_jax.data.batching import Batching
from ff_jax.data.host_rows import building, host_block
from ff_jax.data.templates import EncodedExample
from ff_jax.errors import ConfigError
from ff_jax.eval.text import rouge1_f_batch
from ff_jax.models.decoding import SamplingConfig, cut_rows, decode_batch, left_pad
from ff_jax.models.tokenizer import TextTokenizer
from ff_jax.progress import Progress
from ff_jax.training.steps import ModelRuntime, Scorer

log = logging.getLogger(__name__)


def per_example(step: Callable[[Any, dict[str, Any]], dict[str, Any]], runtime: ModelRuntime,
                params: Any, examples: Sequence[EncodedExample], batching: Batching,
                name: str) -> dict[str, np.ndarray]:
  """`step(params, global_batch)` over every example: each output key as a float array [N, ...]
  in dataset order (rows first), gathered by example id on every host (each loads only its own
  rows). With `batching.packing`, batches are packed, their outputs are per segment
  ([B, S, ...]) and gathered by the segments' example ids."""
  n = len(examples)
  out: dict[str, np.ndarray] = {}
  with building(name):
    batches = batching.eval_batches(examples, process_index=jax.process_index(),
                                    process_count=jax.process_count(),
                                    row_multiple=runtime.row_multiple())
  progress = Progress(name, n, unit="examples")
  done = 0
  for local in batches:
    batch = parallel.global_batch(local, runtime.mesh, runtime.rules)
    stats = multihost_utils.process_allgather(step(params, batch), tiled=True)
    ids = np.asarray(multihost_utils.process_allgather(batch["example_id"], tiled=True))
    real = ids >= 0
    for key, value in stats.items():
      value = np.asarray(value)
      out.setdefault(key, np.full((n, *value.shape[ids.ndim:]), np.nan))[ids[real]] = value[real]
    done += int(real.sum())
    progress.update(done)
  return out


def score_examples(scorer: Scorer, params: Any, examples: Sequence[EncodedExample],
                   batching: Batching, name: str = "score") -> dict[str, np.ndarray]:
  """{nll_sum, tokens, correct, first_nll}: float arrays [N] in dataset order (packed batches
  give the same values up to float summation order)."""
  return per_example(scorer.step, scorer.runtime, params, examples, batching, name)


def score_snapshots(scorer: Scorer, stacked_params: Any, examples: Sequence[EncodedExample],
                    batching: Batching, name: str = "score_snapshots") -> dict[str, np.ndarray]:
  """Like `score_examples` for K parameter trees stacked on a leading axis (snapshots of one
  finetune, or stacked replicas): arrays [K, N], one pass.

  The stacked axis is vmapped, so K models cost one compiled program and one sweep over the data.
  `scorer.stacked_step(stacked, global_batch)` gives [K, B] (packed: [K, B, S]) arrays; rows go
  first for the gather by example id.
  """
  # The stacked step's in_shardings must match its argument exactly; a stack built elsewhere
  # (jnp.stack of restored snapshots) is moved onto them, a no-op when it is there already.
  stacked_params = jax.device_put(stacked_params, scorer.stacked_param_shardings)

  def rows_first(params, batch):
    return {key: jnp.moveaxis(value, 0, -1)
            for key, value in scorer.stacked_step(params, batch).items()}

  stats = per_example(rows_first, scorer.runtime, stacked_params, examples, batching, name)
  return {key: value.T for key, value in stats.items()}


def generate_texts(runtime: ModelRuntime, params: Any, tokenizer: TextTokenizer,
                   prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int,
                   name: str = "generate") -> list[str]:
  """Greedy continuations of token prompts, decoded, in prompt order on every host.

  Batches of `batch_size` prompts (the last one filled up with empty prompts), all left-padded to
  one width: one compile. Each host left-pads only its rows of each batch, the rows are decoded
  split over the mesh's data-parallel axes, and the new tokens are gathered by prompt index.
  """
  if not prompts:
    return []
  rows_multiple = runtime.row_multiple()
  if batch_size < 1 or batch_size % rows_multiple:
    raise ConfigError(f"{name}: batch_size {batch_size} must be a positive multiple of "
                      f"{rows_multiple}, the data-parallel shards and processes of mesh "
                      f"{dict(runtime.mesh.shape)} (each builds and decodes its own rows)")
  width = max(16, -(-max(len(p) for p in prompts) // 16) * 16)
  sampling = SamplingConfig(max_new_tokens=max_new_tokens)
  params = jax.device_put(params, runtime.param_shardings)  # a no-op where they are already
  rows = runtime.batch_sharding()
  texts: list[str | None] = [None] * len(prompts)
  progress = Progress(name, len(prompts), unit="examples")
  for start in range(0, len(prompts), batch_size):
    batch = _prompt_batch(prompts, start, batch_size, tokenizer.pad_id, width, runtime, name)
    if start == 0:
      log.info("%s: process %d of %d decodes %d of the %d rows of each of %d batches", name,
               jax.process_index(), jax.process_count(), _rows_held(batch["tokens"]), batch_size,
               -(-len(prompts) // batch_size))
    out = decode_batch(runtime.graphdef, params, batch["tokens"], batch["mask"],
                       eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, sampling=sampling,
                       row_sharding=rows)
    out, gathered = map(np.asarray, multihost_utils.process_allgather(
        (out, batch["example_id"]), tiled=True))
    real = gathered >= 0
    for i, new in zip(gathered[real], cut_rows(out[real], tokenizer.eos_id)):
      texts[i] = tokenizer.decode(new).strip()
    progress.update(min(start + batch_size, len(prompts)))
  return texts


def _prompt_batch(prompts: Sequence[Sequence[int]], start: int, batch_size: int, pad_id: int,
                  width: int, runtime: ModelRuntime, name: str) -> dict[str, jax.Array]:
  """The global batch of prompts `start`, `start + 1`, ... (empty ones past the last), `width`
  tokens left-padded, assembled from every host's block of its rows (`host_block`)."""
  ids = [i if i < len(prompts) else -1 for i in range(start, start + batch_size)]
  with building(name):
    ids = host_block(ids, jax.process_index(), jax.process_count())
  tokens, mask = left_pad([list(prompts[i]) if i >= 0 else [] for i in ids], pad_id, width)
  return parallel.global_batch({"tokens": tokens, "mask": mask,
                                "example_id": np.asarray(ids, np.int32)},
                               runtime.mesh, runtime.rules)


def _rows_held(array: jax.Array) -> int:
  """How many distinct rows of `array` this process's devices hold (and compute on)."""
  held = set()
  for shard in array.addressable_shards:
    held.update(range(*shard.index[0].indices(array.shape[0])))
  return len(held)


def per_token_means(stats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """{nll, nll_tail}: the mean response NLL per token, and the same without the first target
  (`first_nll`): the response given how it opens. A response of one target has no tail: 0."""
  tokens = np.maximum(stats["tokens"], 1.0)
  tail_tokens = np.maximum(stats["tokens"] - 1.0, 1.0)
  return {"nll": stats["nll_sum"] / tokens,
          "nll_tail": (stats["nll_sum"] - stats["first_nll"]) / tail_tokens}


def per_example_table(stats: dict[str, np.ndarray], generations: Sequence[str] | None,
                      targets: Sequence[str]) -> dict[str, np.ndarray]:
  """{nll, nll_tail, acc, rouge?, tokens}: per-token mean NLL (`per_token_means`), token
  accuracy, ROUGE-1 F of generations."""
  tokens = np.maximum(stats["tokens"], 1.0)
  table = {"tokens": stats["tokens"], **per_token_means(stats),
           "acc": stats["correct"] / tokens}
  if generations is not None:
    table["rouge"] = rouge1_f_batch(list(targets), list(generations))
  return table
