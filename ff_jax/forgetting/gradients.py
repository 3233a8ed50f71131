"""Gradient alignment: a first-order prediction of forgetting that needs no safety finetuning.

One safety step moves the parameters by −η·g_S, where g_S is the safe set's mean loss gradient.
To first order it changes example i's loss by −η·⟨g_i, g_S⟩, so an example whose gradient points
against the safe set's (⟨g_i, g_S⟩ < 0) is one that safety finetuning will push the model away
from. Two columns, both oriented like forgetting (larger = more forgotten), under M1:

  grad      −⟨g_i, g_S⟩ / ‖g_S‖      the rise of example i's loss per unit step along the safe
                                      descent direction (nats/token per unit of parameter norm)
  grad_cos  −⟨g_i, g_S⟩ / (‖g_i‖‖g_S‖)  the same, blind to how large the example's gradient is

Memory. Per-example gradients are materialised for one micro-batch at a time (vmap of `grad` over
its rows) and reduced to two scalars per example inside the compiled step, so the bound is

  gradient_batch_size × (parameters in the last `gradient_blocks` blocks) × bytes per parameter

plus one copy of the subset for g_S. Only the last blocks are differentiated (the backward pass
stops at the lowest of them); `GradientAlignment` refuses a configuration whose bound exceeds
`max_gib` before compiling anything. SmolLM2-135M, 2 of its 30 blocks: 7.08 M parameters, 27 MiB per
example in fp32, so 4 examples per pass need 108 MiB.

g_i is the gradient of example i's per-token mean response NLL; g_S is the gradient of the safe
set's token-weighted mean NLL (the loss a safety step descends), accumulated over its batches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ff_jax import parallel
from ff_jax.data.batching import Batching
from ff_jax.data.host_rows import building
from ff_jax.data.templates import EncodedExample
from ff_jax.errors import ConfigError
from ff_jax.models.layout import UNSHARDED
from ff_jax.training.scoring import per_example
from ff_jax.training.steps import ModelRuntime, token_nll

GIB = 2**30


def split_blocks(params: dict[str, Any], n_blocks: int) -> tuple[dict[str, Any], dict[str, Any]]:
  """(the last `n_blocks` layers, everything else), each block parameter sliced along its stacked
  'layers' axis; `merge_blocks` undoes it."""
  layers = params["layers"]
  first = jax.tree.leaves(layers)[0].shape[0] - n_blocks
  rest = {**params, "layers": jax.tree.map(lambda a: a[:first], layers)}
  return jax.tree.map(lambda a: a[first:], layers), rest


def merge_blocks(subset: dict[str, Any], rest: dict[str, Any]) -> dict[str, Any]:
  return {**rest, "layers": jax.tree.map(lambda head, tail: jnp.concatenate([head, tail]),
                                         rest["layers"], subset)}


def subset_bytes(abstract_params: dict[str, Any], n_blocks: int) -> int:
  """Bytes of one gradient of the last `n_blocks` blocks (gradients have the params' dtypes)."""
  return sum(n_blocks * math.prod(a.shape[1:]) * np.dtype(a.dtype).itemsize
             for a in jax.tree.leaves(abstract_params["layers"]))


def _dot(a: Any, b: Any) -> jax.Array:
  return sum(jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


class GradientAlignment:
  """Jitted safe-gradient accumulation and per-example alignment over the last blocks."""

  def __init__(self, runtime: ModelRuntime, n_blocks: int, batch_size: int, max_gib: float):
    num_layers = runtime.cfg.num_layers
    if not 1 <= n_blocks <= num_layers:
      raise ConfigError(f"scoring.gradient_blocks={n_blocks}: must be in [1, {num_layers}] (the "
                        "model's blocks), or 0 to switch gradient alignment off")
    if batch_size < 1:
      raise ConfigError(f"scoring.gradient_batch_size={batch_size}: must be positive")
    per_example = subset_bytes(runtime.abstract_params, n_blocks)
    need = batch_size * per_example
    if need > max_gib * GIB:
      raise ConfigError(
          f"gradient alignment needs {need / GIB:.2f} GiB of per-example gradients "
          f"(scoring.gradient_batch_size={batch_size} x {per_example / 2**20:.1f} MiB for the "
          f"last {n_blocks} blocks) but scoring.gradient_max_gib={max_gib}; lower "
          "gradient_batch_size or gradient_blocks, or raise gradient_max_gib if the device has "
          "the memory")
    self.runtime, self.n_blocks, self.batch_size = runtime, n_blocks, batch_size
    self.bytes_per_example, self.bound_bytes = per_example, need
    graphdef = runtime.graphdef

    layout = runtime.step_layout()

    def nll_sum(subset, rest, batch, layout=UNSHARDED):
      nll, _, weights = token_nll(graphdef, merge_blocks(subset, rest), batch, layout=layout)
      return nll.sum(), weights.sum()

    def safe_step(params, batch):
      subset, rest = split_blocks(params, n_blocks)
      grads, tokens = jax.grad(nll_sum, has_aux=True)(subset, rest, batch, layout)
      return grads, tokens

    def example_loss(subset, rest, row):  # under vmap over rows: one unsharded row
      total, tokens = nll_sum(subset, rest, jax.tree.map(lambda x: x[None], row))
      return total / jnp.maximum(tokens, 1.0)

    def align_step(params, safe_grad, batch):
      subset, rest = split_blocks(params, n_blocks)
      rows = {k: batch[k] for k in ("tokens", "mask", "loss_mask")}
      grads = jax.vmap(jax.grad(example_loss), in_axes=(None, None, 0))(subset, rest, rows)
      dots = jax.vmap(lambda g: _dot(g, safe_grad))(grads)
      norms = jnp.sqrt(jax.vmap(lambda g: _dot(g, g))(grads))
      return {"dot": dots, "norm": norms}

    batch_shardings = parallel.batch_shardings(runtime.mesh, runtime.rules)
    rows = batch_shardings["example_id"]
    # A slice along the unsharded 'layers' axis keeps its parameter's sharding.
    subset_sh = runtime.param_shardings["layers"]
    repl = parallel.replicated(runtime.mesh)
    self._safe_step = jax.jit(safe_step, in_shardings=(runtime.param_shardings, batch_shardings),
                              out_shardings=(subset_sh, repl))
    self._align_step = jax.jit(align_step,
                               in_shardings=(runtime.param_shardings, subset_sh, batch_shardings),
                               out_shardings={"dot": rows, "norm": rows})

  def safe_gradient(self, params: Any, safe: Sequence[EncodedExample],
                    batching: Batching) -> Any:
    """g_S: the gradient of the safe set's token-weighted mean NLL over the last blocks, in
    `batching`'s batches (unpacked: the step reads one example per row)."""
    total, tokens = None, 0.0
    with building("safe_gradient"):
      batches = batching.eval_batches(safe, process_index=jax.process_index(),
                                      process_count=jax.process_count())
    for local in batches:
      batch = parallel.global_batch(local, self.runtime.mesh, self.runtime.rules)
      grads, count = self._safe_step(params, batch)
      total = grads if total is None else jax.tree.map(jnp.add, total, grads)
      tokens += float(count)
    if total is None:
      raise ConfigError("gradient alignment needs a non-empty safe set")
    return jax.tree.map(lambda g: g / max(tokens, 1.0), total)

  def align(self, params: Any, safe_grad: Any, examples: Sequence[EncodedExample],
            buckets: Sequence[int], pad_id: int) -> dict[str, np.ndarray]:
    """{grad, grad_cos}: float arrays [N] in dataset order (see the module docstring)."""
    safe_norm = float(jnp.sqrt(_dot(safe_grad, safe_grad)))
    out = per_example(lambda p, batch: self._align_step(p, safe_grad, batch), self.runtime,
                      params, examples, Batching(self.batch_size, buckets, pad_id),
                      "gradient_alignment")
    dots, norms = out["dot"], out["norm"]
    scale = max(safe_norm, 1e-30)
    with np.errstate(invalid="ignore", divide="ignore"):
      cos = np.where(norms > 0, -dots / (norms * scale), 0.0)
    return {"grad": -dots / scale, "grad_cos": cos, "safe_grad_norm": safe_norm}
