"""Filling a planned parameter tree from checkpoint tensors, one tensor at a time.

Importers (HF safetensors, GGUF) translate file names to parameter paths and yield
`(path, numpy array)` pairs; `assemble_params` puts each array straight onto its target sharding
(so only one tensor is ever on the host) and then checks that every parameter was filled exactly
once with the planned shape. A weight that no rule covered must never reach a model as its random
init value: that is a silent, common conversion bug.

Checkpoint files name each layer's tensors separately while the model stacks them over layers
(`('layers', 'attn', 'q')` of shape [L, ...]). Importers and exporters speak in per-layer paths,
`('layers', i, 'attn', 'q')`: `assemble_params` stacks what it is given, and `layer_slices` lets an
exporter read layer i of a stacked parameter as if it were its own tensor.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ff_jax.errors import CheckpointError

Path = tuple[Any, ...]

# First key of the stacked blocks' parameters (`Transformer.layers`).
LAYERS = "layers"


def flatten(tree: dict) -> dict[Path, Any]:
  """{('layers', 'attn', 'q'): leaf, ...} for a nested pure dict."""
  out: dict[Path, Any] = {}

  def walk(node, prefix):
    if isinstance(node, dict):
      for key, value in node.items():
        walk(value, prefix + (key,))
    else:
      out[prefix] = node

  walk(tree, ())
  return out


def unflatten(flat: dict[Path, Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def path_str(path: Path) -> str:
  return "/".join(str(p) for p in path)


def _layer_path(path: Path, layer: int) -> Path:
  return (LAYERS, layer, *path[1:])


def _is_stacked(path: Path) -> bool:
  return path[0] == LAYERS


class LayerSlice:
  """Layer `layer` of a stacked parameter, standing in for that layer's own tensor: the shape
  and dtype without the work, `value()` the slice (a jitted slice of a sharded array, which every
  process computes alike)."""

  def __init__(self, stacked: Any, layer: int):
    self.stacked, self.layer = stacked, layer
    self.shape, self.dtype = tuple(stacked.shape[1:]), stacked.dtype

  def value(self) -> Any:
    return self.stacked[self.layer]


def layer_slices(flat: dict[Path, Any]) -> dict[Path, Any]:
  """`flat` with each stacked parameter replaced by its per-layer paths, as `LayerSlice`s."""
  out: dict[Path, Any] = {}
  for path, leaf in flat.items():
    if _is_stacked(path):
      out.update({_layer_path(path, i): LayerSlice(leaf, i) for i in range(leaf.shape[0])})
    else:
      out[path] = leaf
  return out


def unstack_layers(params: dict) -> dict:
  """`params` with the stacked blocks as {layer: subtree} (each slice materialised): how a
  checkpoint file sees them; for tests and tools, not for training."""
  flat = {p: (v.value() if isinstance(v, LayerSlice) else v)
          for p, v in layer_slices(flatten(params)).items()}
  return unflatten(flat)


def _layer_plan(planned: dict[Path, Any]) -> dict[Path, jax.ShapeDtypeStruct]:
  """Per-layer planned shapes: what each checkpoint tensor must fill."""
  out = {}
  for path, leaf in planned.items():
    if _is_stacked(path):
      for i in range(leaf.shape[0]):
        out[_layer_path(path, i)] = jax.ShapeDtypeStruct(tuple(leaf.shape[1:]), leaf.dtype)
    else:
      out[path] = leaf
  return out


def _layer_sharding(stacked: NamedSharding | None) -> NamedSharding | None:
  """The sharding of one layer of a stacked parameter: its spec without the 'layers' axis."""
  if stacked is None:
    return None
  return NamedSharding(stacked.mesh, PartitionSpec(*tuple(stacked.spec)[1:]))


def _stack(slices: list[Any], sharding: NamedSharding | None) -> jax.Array:
  """One stacked parameter from its per-layer arrays, placed on its sharding."""
  return jax.jit(lambda *xs: jnp.stack(xs), out_shardings=sharding)(*slices)


def assemble_params(abstract: dict, shardings: dict | None,
                    tensors: Iterable[tuple[Path, np.ndarray, str]], origin: str) -> dict:
  """Place `(path, array, source_key)` tensors onto their shardings; check full coverage.

  `abstract` is the planned tree of ShapeDtypeStructs; `shardings` the matching NamedShardings
  (None: default device). Paths of the stacked blocks come per layer, `('layers', i, ...)`: each
  layer lands on its slice's sharding, and a stacked parameter is assembled on device once all
  its layers are in (so device memory briefly holds one parameter twice). Raises
  CheckpointError naming the file and key on a shape mismatch, a duplicate, an unknown target, or
  any parameter left unfilled.
  """
  stacked_plan = flatten(abstract)
  stacked_placements = flatten(shardings) if shardings is not None else {}
  planned = _layer_plan(stacked_plan)
  placements = {p: _layer_sharding(stacked_placements.get((LAYERS, *p[2:])))
                if _is_stacked(p) else stacked_placements.get(p) for p in planned}
  filled: dict[Path, Any] = {}
  sources: dict[Path, str] = {}
  for path, array, key in tensors:
    if path not in planned:
      raise CheckpointError(f"{origin}: tensor {key!r} maps to {path_str(path)}, which this "
                            f"model config does not have")
    if path in filled:
      raise CheckpointError(f"{origin}: {path_str(path)} is filled twice ({sources[path]!r} and "
                            f"{key!r})")
    want = planned[path]
    if tuple(array.shape) != tuple(want.shape):
      raise CheckpointError(f"{origin}: tensor {key!r} has shape {tuple(array.shape)}, expected "
                            f"{tuple(want.shape)} for {path_str(path)}")
    array = np.asarray(array).astype(want.dtype, copy=False)
    sharding = placements.get(path)
    filled[path] = jax.device_put(array, sharding) if sharding is not None else jax.device_put(
        array)
    sources[path] = key
  missing = sorted(path_str(p) for p in planned if p not in filled)
  if missing:
    shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
    raise CheckpointError(f"{origin}: checkpoint is missing tensors for {shown}")
  out: dict[Path, Any] = {}
  for path, leaf in stacked_plan.items():
    if _is_stacked(path):
      layers = [filled.pop(_layer_path(path, i)) for i in range(leaf.shape[0])]
      out[path] = _stack(layers, stacked_placements.get(path))
      del layers  # each layer's own array is freed as soon as its stack exists
    else:
      out[path] = filled.pop(path)
  return unflatten(out)
