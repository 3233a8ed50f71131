"""K independent finetunes of one model trained together as stacked replicas: their mesh, their
batches, and the seeded safe-set subsets of sweep variants.

`Trainer(..., replicas=K)` (ff_jax.training.steps) stacks K replicas' parameters and optimizer
states on a leading axis and vmaps ONE train step over it, so K small finetunes cost one compiled
program and one dispatch per step instead of K. Each replica reads its own batch stream; the K
batches of a step are padded to one common bucket length ([K, B, T], `StackedBatches`) so shapes
stay fixed. On a mesh with a `replica` axis the leading axis is sharded over it: each replica's
params, moments and batches live on their own slice of devices, and inside a slice the usual
rules (fsdp/tensor/data) apply. On several hosts each process builds only its block of every
stacked batch, the replicas and rows its devices hold (`parallel.stacked_batch_block`), and
`Trainer.put_batch` assembles the global array from every process's block.

The mesh here has axes ('replica', 'data', 'fsdp', 'tensor'); a `ModelRuntime` built on it plans
the per-replica shardings (its rules never name 'replica', so they are replicated over it) and the
stacked trainer prefixes every spec with 'replica' (`parallel.stack_sharding`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from ff_jax import parallel
from ff_jax.data.batching import TrainIterator
from ff_jax.data.host_rows import building
from ff_jax.data.templates import EncodedExample
from ff_jax.errors import ConfigError, DataError, MeshError

REPLICA_AXES = (parallel.REPLICA_AXIS, *parallel.MESH_AXES)


@dataclasses.dataclass(frozen=True)
class ReplicaMeshConfig:
  """Mesh for stacked replicas: `replica` ways, each replica on a (data, fsdp, tensor) slice."""

  replica: int = 1
  data: int = 1
  fsdp: int = -1
  tensor: int = 1


def make_replica_mesh(cfg: ReplicaMeshConfig = ReplicaMeshConfig(),
                      devices: Sequence[Any] | None = None) -> Mesh:
  """A ('replica', 'data', 'fsdp', 'tensor') mesh; replica slices are contiguous device groups."""
  devices = list(devices) if devices is not None else jax.devices()
  if cfg.replica < 1 or len(devices) % cfg.replica:
    raise MeshError(f"mesh.replica={cfg.replica} must be positive and divide the "
                    f"{len(devices)} devices")
  inner = parallel.resolve_mesh_shape(parallel.MeshConfig(cfg.data, cfg.fsdp, cfg.tensor),
                                      len(devices) // cfg.replica)
  return Mesh(np.asarray(devices).reshape(cfg.replica, *inner), REPLICA_AXES,
              axis_types=(AxisType.Auto,) * len(REPLICA_AXES))


def stacked_batch(locals_: Sequence[dict[str, np.ndarray]], pad_id: int) -> dict[str, np.ndarray]:
  """Stack K batches to [K, B, T], each key padded to its largest shape among them.

  Batches of K streams differ in width (their longest row's bucket) and, packed, in rows and in
  segments per row. Padding changes no result: pad tokens are masked out of attention and loss,
  and padded segments belong to no example (id -1).
  """
  out = {}
  for key in locals_[0]:
    values = [b[key] for b in locals_]
    shape = np.max([v.shape for v in values], axis=0)
    fill = pad_id if key == "tokens" else -1 if key == "example_id" else 0
    out[key] = np.stack([np.pad(v, [(0, s - d) for s, d in zip(shape, v.shape)],
                                constant_values=fill) for v in values])
  return out


class StackedBatches:
  """K batch streams read in lockstep as one: this host's block of every [K, B, T] batch
  (`stacked_batch`) and one resumable state holding every stream's position.

  `block` (`Trainer.stack_block`; default: all of it) is the part of the stacked batch this
  process holds: its replicas, and the row block that each stream must have been built to give
  (`process_index`/`process_count`). Every stream moves on at each step and every host works out
  the common global shape of the K batches from their indices alone; only this host's rows of its
  replicas are built. Packed batches grow to the common row count before they are split over the
  hosts, so the global batch is the same on any number of processes.
  """

  def __init__(self, iterators: Sequence[TrainIterator], pad_id: int,
               block: parallel.StackBlock | None = None):
    self.iterators, self.pad_id = list(iterators), pad_id
    self.block = (parallel.StackBlock(range(len(self.iterators)), 0, 1) if block is None
                  else block)
    if self.block.replicas.stop > len(self.iterators):
      raise ConfigError(f"{len(self.iterators)} batch streams, but this process holds replicas "
                        f"{list(self.block.replicas)}")
    for k in self.block.replicas:
      it = self.iterators[k]
      if (it.process_index, it.process_count) != (self.block.row_block, self.block.row_blocks):
        raise ConfigError(
            f"batch stream {k} builds row block {it.process_index} of {it.process_count}, but "
            f"this process holds block {self.block.row_block} of {self.block.row_blocks} of the "
            "stacked batch: build stacked streams with process_index=block.row_block and "
            "process_count=block.row_blocks (Trainer.stack_block)")

  def next_batch(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    indices = [it.next_indices() for it in self.iterators]
    shape = tuple(int(n) for n in np.max(
        [it.batch_shape(idx) for it, idx in zip(self.iterators, indices)], axis=0))
    batch = stacked_batch([self._make(k, indices[k], shape) for k in self.block.replicas],
                          self.pad_id)
    return batch, self.state()

  def _make(self, k: int, indices: list[int], shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """This host's rows of stream `k`'s batch of `indices`, padded to the common `shape`."""
    with building(f"stream_{k}"):
      return self.iterators[k].make(indices, shape)

  def state(self) -> dict[str, Any]:
    return {"replicas": [it.state() for it in self.iterators]}

  def restore(self, state: dict[str, Any]) -> None:
    saved = state.get("replicas")
    if not isinstance(saved, list) or len(saved) != len(self.iterators):
      raise DataError(f"iterator state: expected the positions of {len(self.iterators)} replica "
                      "streams (saved with another number of replicas?)")
    for it, one in zip(self.iterators, saved):
      it.restore(one)


def variant_subset(num_safe: int, n: int, seed: int) -> np.ndarray:
  """Indices of a seeded size-n subset of the safe set.

  Subsets of one seed are nested (the first n of one permutation), so growing n only adds data.
  """
  if not 1 <= n <= num_safe:
    raise ConfigError(f"safe size {n} is not in [1, {num_safe}] (the safe set has {num_safe})")
  return np.random.default_rng([7919, seed]).permutation(num_safe)[:n]


def variant_iterator(safe: Sequence[EncodedExample], n: int, seed: int, batch_size: int,
                     buckets: Sequence[int], pad_id: int, process_index: int = 0,
                     process_count: int = 1) -> TrainIterator:
  """The batch stream of variant (n, seed): its subset, in an order seeded by `seed`.

  A subset smaller than the batch gets filler rows; a small subset just cycles its epochs. Each
  host builds row block `process_index` of `process_count` of every batch: the stacked trainer's
  `stack_block` (`StackedBatches` checks it).
  """
  subset = [safe[i] for i in variant_subset(len(safe), n, seed)]
  return TrainIterator(subset, batch_size, seed, buckets, pad_id=pad_id,
                       process_index=process_index, process_count=process_count)
