"""Device meshes, logical-axis sharding rules, sharded initialisation and global batches.

One rules table maps the model's logical axis names to mesh axes. Parameters are planned from an
abstract model and created by a jitted init whose `out_shardings` place each shard directly on its
device, so a model too big for one device is never materialised whole. Meshes use `AxisType.Auto`
(jax>=0.9 defaults to Explicit, which would make every op demand sharding annotations).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ff_jax.errors import ConfigError, MeshError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Weights are sharded FSDP-style on `embed` and Megatron-style on
# heads/mlp/vocab; the batch is split over both data-parallel axes. Norm scales and biases over the
# hidden size are tiny and stay replicated. A dimension whose size the mesh axes do not divide is
# replicated instead (see `spec_for`), so e.g. 3 KV heads on a 2-way tensor axis still works.
DEFAULT_RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": None,
    "norm": None,
    "position": None,
    # The stacked blocks' leading axis: each device holds every layer's shard of a weight, which
    # the scan over layers then slices locally (sharding it would be pipeline parallelism).
    "layers": None,
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh shape; one axis may be -1 to take all remaining devices."""

  data: int = 1
  fsdp: int = -1
  tensor: int = 1

  def shape(self) -> tuple[int, int, int]:
    return (self.data, self.fsdp, self.tensor)


def resolve_mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, ...]:
  """Fill a -1 axis and check that the product equals the device count."""
  shape = list(cfg.shape())
  for name, size in zip(MESH_AXES, shape):
    if size == 0 or size < -1:
      raise MeshError(f"mesh.{name}={size}: axis sizes must be positive or -1")
  free = [i for i, s in enumerate(shape) if s == -1]
  if len(free) > 1:
    raise MeshError(f"mesh {dict(zip(MESH_AXES, shape))}: at most one axis may be -1")
  fixed = math.prod(s for s in shape if s != -1)
  if free:
    if num_devices % fixed:
      raise MeshError(f"mesh {dict(zip(MESH_AXES, shape))}: the fixed axes ({fixed} devices) do "
                      f"not divide the {num_devices} available devices")
    shape[free[0]] = num_devices // fixed
  if math.prod(shape) != num_devices:
    raise MeshError(f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, but "
                    f"{num_devices} are available; set one axis to -1 to fill the rest")
  return tuple(shape)


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: Sequence[Any] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh with Auto axis types over `devices` (default: all)."""
  devices = list(devices) if devices is not None else jax.devices()
  shape = resolve_mesh_shape(cfg, len(devices))
  if len(devices) == len(jax.devices()):
    # make_mesh picks a topology-aware device order (ICI rings on TPU).
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
              axis_types=(AxisType.Auto,) * len(MESH_AXES))


def spec_for(logical: PartitionSpec, shape: Sequence[int], mesh: Mesh,
             rules: Mapping[str, tuple[str, ...] | None] = DEFAULT_RULES) -> PartitionSpec:
  """Mesh PartitionSpec for one array from its logical axis names.

  Unknown logical names are an error (a silently replicated weight is how big models OOM); a mesh
  axis already used by an earlier dimension, or one that does not divide the dimension, is dropped.
  """
  used: set[str] = set()
  out = []
  for dim, name in zip(shape, logical):
    if name is None:
      out.append(None)
      continue
    if name not in rules:
      raise ConfigError(f"sharding rules: no rule for logical axis {name!r}; "
                        f"known axes are {sorted(rules)}")
    axes = tuple(a for a in (rules[name] or ()) if a in mesh.shape and a not in used)
    axes = tuple(a for a in axes if mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in axes)
    if not axes or dim % size:
      out.append(None)
      continue
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*out)


def tree_shardings(abstract: Any, logical: Any, mesh: Mesh,
                   rules: Mapping[str, tuple[str, ...] | None] = DEFAULT_RULES) -> Any:
  """NamedSharding for every leaf of `abstract`, from the matching logical PartitionSpec tree."""
  return jax.tree.map(lambda a, spec: NamedSharding(mesh, spec_for(spec, a.shape, mesh, rules)),
                      abstract, logical)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


# The batch contract of `ff_jax.data.batching`: each key's rank ([B, T] tokens and masks, [B] ids).
BATCH_RANKS = {"tokens": 2, "mask": 2, "loss_mask": 2, "example_id": 1}
# A packed batch (several examples per row) adds per-token segment ids and positions, and names
# the example of each of a row's segments: example_id [B, S].
PACKED_BATCH_RANKS = {**BATCH_RANKS, "segment_ids": 2, "positions": 2, "example_id": 2}

# Mesh axis that K stacked replicas (parameters, optimizer states, batches) are sharded over.
REPLICA_AXIS = "replica"


def data_axes(mesh: Mesh, rules: Mapping[str, tuple[str, ...] | None] = DEFAULT_RULES
              ) -> tuple[str, ...]:
  """The mesh axes that batch rows are split over."""
  return tuple(a for a in (rules.get("batch") or ()) if a in mesh.shape)


def check_batch_rows(rows: int, mesh: Mesh,
                     rules: Mapping[str, tuple[str, ...] | None] = DEFAULT_RULES) -> None:
  """Refuse a global batch of `rows` that the data-parallel shards do not divide."""
  ways = math.prod(mesh.shape[a] for a in data_axes(mesh, rules))
  if rows % ways:
    raise ConfigError(f"batch_size {rows} is not divisible by the {ways} data-parallel shards of "
                      f"mesh {dict(mesh.shape)}; use a multiple of {ways}")


def stack_sharding(sharding: NamedSharding) -> NamedSharding:
  """The sharding of a [K, ...] stack whose slices are sharded like `sharding`: K over the
  mesh's `replica` axis where it has one, else unsharded (e.g. parameter snapshots)."""
  lead = REPLICA_AXIS if REPLICA_AXIS in sharding.mesh.shape else None
  return NamedSharding(sharding.mesh, PartitionSpec(lead, *sharding.spec))


def batch_shardings(mesh: Mesh, rules: Mapping[str, tuple[str, ...] | None] = DEFAULT_RULES,
                    stacked: bool = False, packed: bool = False) -> dict[str, NamedSharding]:
  """Shardings of a batch (`BATCH_RANKS`, or `PACKED_BATCH_RANKS` when `packed`): rows over the
  data-parallel axes, the rest replicated.

  `stacked`: K replicas' batches stacked on a leading axis ([K, B, T]), see `stack_sharding`.
  Per-example outputs of a step are sharded like the unpacked `example_id`.
  """
  rows = data_axes(mesh, rules) or None
  ranks = PACKED_BATCH_RANKS if packed else BATCH_RANKS
  shardings = {key: NamedSharding(mesh, PartitionSpec(rows, *([None] * (rank - 1))))
               for key, rank in ranks.items()}
  if stacked:
    return {key: stack_sharding(sharding) for key, sharding in shardings.items()}
  return shardings


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh,
                 rules: Mapping[str, tuple[str, ...] | None] = DEFAULT_RULES) -> dict[str, Any]:
  """Assemble each host's rows into global arrays sharded over the batch axes.

  Every process passes only the rows it loaded; on one host this is a plain sharded device_put.
  """
  check_batch_rows(next(iter(local_batch.values())).shape[0] * jax.process_count(), mesh, rules)
  # A packed batch (`ff_jax.data.batching.is_packed`, a layer above) carries segment ids.
  shardings = batch_shardings(mesh, rules, packed="segment_ids" in local_batch)
  return {key: jax.make_array_from_process_local_data(shardings[key], value)
          for key, value in local_batch.items()}


@dataclasses.dataclass(frozen=True)
class StackBlock:
  """The part of a stacked [K, B, ...] batch that one process holds: the replicas `replicas`, and
  of each of them block `row_block` of its rows cut into `row_blocks` equal blocks (what a
  `TrainIterator` builds as `process_index`/`process_count`)."""

  replicas: range
  row_block: int
  row_blocks: int


def stacked_batch_block(mesh: Mesh, rules: Mapping[str, tuple[str, ...] | None] = DEFAULT_RULES,
                        replicas: int = 1) -> StackBlock:
  """The block of a stacked batch of `replicas` streams that this process holds under
  `batch_shardings(stacked=True)`: K over the `replica` axis where the mesh has one, rows over the
  data-parallel axes. On a mesh without a `replica` axis that is every replica and the rows
  `global_batch` takes (block `process_index` of `process_count`); with one, only the replicas
  whose slice has devices of this process, and their rows split over the processes of a slice.
  A process whose devices do not hold one contiguous block is refused."""
  process_index = jax.process_index()
  sharding = batch_shardings(mesh, rules, stacked=True)["example_id"]
  row_units = math.prod(mesh.shape[a] for a in data_axes(mesh, rules))  # one unit per shard
  held_k: set[int] = set()
  held_rows: set[int] = set()
  for device, index in sharding.devices_indices_map((replicas, row_units)).items():
    if device.process_index == process_index:
      held_k.update(range(*index[0].indices(replicas)))
      held_rows.update(range(*index[1].indices(row_units)))
  ks, rows = sorted(held_k), sorted(held_rows)
  contiguous = (ks and rows and ks == list(range(ks[0], ks[-1] + 1))
                and rows == list(range(rows[0], rows[-1] + 1)) and rows[0] % len(rows) == 0)
  if not contiguous:
    raise MeshError(f"process {process_index} holds replicas {ks} and row shards {rows} of a "
                    f"stacked batch on mesh {dict(mesh.shape)}, not one contiguous block of each; "
                    "build the mesh with parallel.make_mesh or training.replicas.make_replica_mesh")
  return StackBlock(range(ks[0], ks[-1] + 1), rows[0] // len(rows), row_units // len(rows))


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """Start JAX's multi-controller runtime when running on several hosts.

  Must run before anything queries devices. On Cloud TPU every argument is discovered from the
  environment (or with FF_JAX_DISTRIBUTED=1, as launch/tpu.py sets); elsewhere pass them or set
  FF_JAX_COORDINATOR / FF_JAX_NUM_PROCESSES / FF_JAX_PROCESS_ID. Returns whether distributed mode
  was started.
  """
  coordinator_address = coordinator_address or os.environ.get("FF_JAX_COORDINATOR")
  if num_processes is None and "FF_JAX_NUM_PROCESSES" in os.environ:
    num_processes = int(os.environ["FF_JAX_NUM_PROCESSES"])
  if process_id is None and "FF_JAX_PROCESS_ID" in os.environ:
    process_id = int(os.environ["FF_JAX_PROCESS_ID"])
  on_tpu_pod = "TPU_WORKER_HOSTNAMES" in os.environ or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ
  # FF_JAX_DISTRIBUTED=1 (set by launch/tpu.py on every worker): let JAX discover the cluster.
  asked = os.environ.get("FF_JAX_DISTRIBUTED") == "1"
  if coordinator_address is None and not on_tpu_pod and not asked:
    return False
  if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
    # CPU processes need a cross-process collectives backend (multi-host tests, CPU clusters);
    # gloo ships with jaxlib.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
  return True


def refuse_several_processes(what: str, why: str) -> None:
  """Refuse, with one line, to run `what` (which works on one process, `why`) on several."""
  if jax.process_count() > 1:
    raise ConfigError(f"{what} runs on one process, not {jax.process_count()}: {why}; start it "
                      "on one host, without launch/tpu.py")
