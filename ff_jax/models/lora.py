"""LoRA adapters as parameter-tree operations: split, combine, initialise, merge.

The factors live in the model's own parameter tree, next to the weight they adapt
(`layers/attn/q_lora_a`, `q_lora_b`, stacked over layers like the weight; see
`transformer._add_adapter`), so sharding, checkpoints
and the pure forward pass treat them like any other parameter. Training differentiates the
adapter subtree only (`split`/`combine`), a released base model gets fresh adapters with
`add_adapters`, and `merge` folds W + (alpha / r) · A B back into plain weights for an export
that any loader reads.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ff_jax.models.config import ModelConfig
from ff_jax.models.loading import LAYERS, flatten, unflatten

Params = dict


def is_adapter(path: tuple[Any, ...]) -> bool:
  return str(path[-1]).endswith(("_lora_a", "_lora_b"))


def split(params: Params) -> tuple[Params, Params]:
  """(adapters, base): two nested dicts that partition `params`' leaves."""
  flat = flatten(params)
  return (unflatten({p: v for p, v in flat.items() if is_adapter(p)}),
          unflatten({p: v for p, v in flat.items() if not is_adapter(p)}))


def combine(adapters: Params, base: Params) -> Params:
  """The inverse of `split`."""
  return unflatten({**flatten(base), **flatten(adapters)})


def add_adapters(base: Params, abstract: Params, shardings: Params | None, seed: int) -> Params:
  """`base` (a model without adapters) plus fresh adapters planned in `abstract`: A ~ N(0, 1/fan_in)
  and B = 0, so the adapted model computes exactly what the base model does. Each factor is
  created on its own sharding; nothing of the base is copied."""
  planned = {p: a for p, a in flatten(abstract).items() if is_adapter(p)}
  placements = flatten(shardings) if shardings is not None else {}
  key = jax.random.key(seed)
  out = flatten(base)
  for index, (path, leaf) in enumerate(sorted(planned.items(), key=lambda kv: str(kv[0]))):
    if str(path[-1]).endswith("_lora_b"):
      make = lambda key, leaf=leaf: jnp.zeros(leaf.shape, leaf.dtype)  # noqa: E731
    else:
      layers = leaf.shape[0] if path[0] == LAYERS else 1  # a stacked factor: per layer's fan-in
      fan_in = leaf.size // (layers * leaf.shape[-1])
      make = lambda key, leaf=leaf, fan_in=fan_in: (  # noqa: E731
          jax.random.normal(key, leaf.shape, jnp.float32) / jnp.sqrt(fan_in)).astype(leaf.dtype)
    out[path] = jax.jit(make, out_shardings=placements.get(path))(jax.random.fold_in(key, index))
  return unflatten(out)


def merge(params: Params, cfg: ModelConfig) -> Params:
  """Plain weights W + (alpha / r) · A B for every adapted projection, adapters dropped."""
  flat = flatten(params)
  out = {p: v for p, v in flat.items() if not is_adapter(p)}
  for path in [p for p in flat if str(p[-1]).endswith("_lora_a")]:
    name = str(path[-1]).removesuffix("_lora_a")
    a, b = flat[path], flat[path[:-1] + (f"{name}_lora_b",)]
    weight = path[:-1] + (name,)
    product = lambda a, b: jnp.tensordot(a, b, axes=1)  # noqa: E731  [*in, r] x [r, *out]
    if path[0] == LAYERS:  # stacked over layers: one product per layer
      product = jax.vmap(product)
    delta = product(a.astype(jnp.float32), b.astype(jnp.float32)) * cfg.lora.scale
    out[weight] = (out[weight].astype(jnp.float32) + delta).astype(out[weight].dtype)
  return unflatten(out)
