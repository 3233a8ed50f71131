"""Models: the NNX decoder, its functional boundary, and checkpoint/tokenizer import.

The rest of ff_jax holds a model as `(graphdef, params)`: a static NNX GraphDef and a pure nested
dict of arrays (`{'embed': ..., 'layers': {'attn': {'q': [L, D, H, hd]}, ...}}`: the blocks'
parameters stacked over layers, run by one scan). Pure dicts go through `jax.jit`, optax, vmap and
Orbax unchanged; `forward` merges them back into a module inside a trace. Checkpoint files name
layers one by one; `ff_jax.models.loading` stacks and unstacks them.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from jax.sharding import PartitionSpec

from ff_jax.models.config import ModelConfig, RopeScaling, tiny_llama
from ff_jax.models.layout import UNSHARDED, StepLayout
from ff_jax.models.transformer import (
  Cache,
  Transformer,
  layer_keys,
  positions_from_mask,
  stacked_blocks,
)

__all__ = [
    "Cache", "ModelConfig", "RopeScaling", "Transformer", "abstract_model", "forward",
    "forward_hidden", "init_params", "logical_axes", "positions_from_mask", "tiny_llama",
]

Params = dict[str, Any]


def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, Params, Params]:
  """(graphdef, abstract params of ShapeDtypeStructs, logical axes as PartitionSpecs) of `cfg`.

  Nothing is allocated: shapes come from `nnx.eval_shape`, so this is how a model too big for one
  device is planned before it is initialised or loaded shard by shard.
  """
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  abstract = nnx.to_pure_dict(state)
  axes = logical_axes(state)
  return graphdef, abstract, axes


def logical_axes(state: nnx.State) -> Params:
  """Pure dict of `PartitionSpec`s of *logical* names, one per parameter."""

  def spec(variable):
    return PartitionSpec(*variable.get_metadata().get("out_sharding", ()))

  return nnx.to_pure_dict(
      jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def init_params(cfg: ModelConfig, seed: int, shardings: Params | None = None) -> Params:
  """Freshly initialised parameters, each created directly on its sharding (if given).

  The embeddings/final norm and the stacked blocks are created by separate jitted programs; the
  blocks' program vmaps one block initialiser over the layers (layer i keyed by
  `fold_in(key, i)`), so its compile time does not grow with depth, and nothing is materialised
  unsharded.
  """
  key = jax.random.key(seed)
  top_shardings = block_shardings = None
  if shardings is not None:
    top_shardings = {k: v for k, v in shardings.items() if k != "layers"}
    block_shardings = shardings["layers"]

  def top(key):
    state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(key), num_layers=0))[1]
    return {k: v for k, v in nnx.to_pure_dict(state).items() if k != "layers"}

  def blocks(key):
    return nnx.to_pure_dict(nnx.split(stacked_blocks(cfg, layer_keys(key, cfg.num_layers)))[1])

  params = jax.jit(top, out_shardings=top_shardings)(jax.random.fold_in(key, cfg.num_layers))
  params["layers"] = jax.jit(blocks, out_shardings=block_shardings)(key)
  return params


def forward(graphdef: nnx.GraphDef, params: Params, tokens, positions, kv_mask,
            cache: Cache | None = None, cache_index: Any = 0, last_only: bool = False,
            dropout_rng: Any = None, segment_ids: Any = None):
  """Pure forward pass: `(logits [B,T,V] fp32, new_cache)`; see `Transformer` for the contract.

  `last_only` returns the logits of the last position alone ([B, 1, V]); `dropout_rng` turns on
  LoRA dropout (training); `segment_ids` keeps the examples of packed rows apart.
  """
  model = nnx.merge(graphdef, params)
  return model(tokens, positions, kv_mask, cache, cache_index, last_only, dropout_rng,
               segment_ids)


def forward_hidden(graphdef: nnx.GraphDef, params: Params, tokens, positions, kv_mask,
                   dropout_rng: Any = None, segment_ids: Any = None,
                   layout: StepLayout = UNSHARDED):
  """Pure uncached forward pass up to the final norm: `(hidden [B, T, D], head weight, Head)`,
  for steps that apply the LM head only where they have targets (`ff_jax.models.head`), with
  the activations pinned as `layout` says."""
  model = nnx.merge(graphdef, params)
  layout = layout.for_rows(tokens.shape[0])
  hidden, _ = model.hidden_states(tokens, positions, kv_mask, dropout_rng=dropout_rng,
                                  segment_ids=segment_ids, layout=layout)
  weight, head = model.head()
  return hidden, weight, head


def init_cache(graphdef: nnx.GraphDef, params: Params, batch: int, length: int) -> Cache:
  return nnx.merge(graphdef, params).init_cache(batch, length)
