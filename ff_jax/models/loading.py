"""Filling a planned parameter tree from checkpoint tensors, one tensor at a time.

Importers (HF safetensors, GGUF) translate file names to parameter paths and yield
`(path, numpy array)` pairs; `assemble_params` puts each array straight onto its target sharding
(so only one tensor is ever on the host) and then checks that every parameter was filled exactly
once with the planned shape. A weight that no rule covered must never reach a model as its random
init value: that is a silent, common conversion bug.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import numpy as np

from ff_jax.errors import CheckpointError

Path = tuple[Any, ...]


def flatten(tree: dict) -> dict[Path, Any]:
  """{('layers', 0, 'attn', 'q'): leaf, ...} for a nested pure dict."""
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


def assemble_params(abstract: dict, shardings: dict | None,
                    tensors: Iterable[tuple[Path, np.ndarray, str]], origin: str) -> dict:
  """Place `(path, array, source_key)` tensors onto their shardings; check full coverage.

  `abstract` is the planned tree of ShapeDtypeStructs; `shardings` the matching NamedShardings
  (None: default device). Raises CheckpointError naming the file and key on a shape mismatch, a
  duplicate, an unknown target, or any parameter left unfilled.
  """
  planned = flatten(abstract)
  placements = flatten(shardings) if shardings is not None else {}
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
  return unflatten(filled)
