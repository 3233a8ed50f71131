"""Where a train or score step's activations live on the mesh, as one static value.

Parameters carry logical axes and get their shardings from `ff_jax.parallel`; activations have
none, and left alone XLA's partitioner may keep an FSDP-sharded weight in place and move the
activations instead: gather the whole batch onto every device and reduce-scatter partial sums of
each matmul, which on Llama-3-8B put the full batch's MLP activations (and the whole
vocabulary's partial logits) on every device. MaxText and Levanter pin activations with sharding
constraints for this reason; `StepLayout` carries the ones ff_jax needs, built from the mesh by
`ff_jax.training.steps.ModelRuntime.step_layout`:

- `activations`: the residual stream [B, T, D], rows over the data-parallel axes;
- `heads`: q [B, T, H, D] as the attention kernels place it (rows as above, heads over the
  tensor axis): splash attention runs per device under `shard_map` on that mesh, and its
  platform decides the kernel (`ff_jax.models.kernels`), so a step compiled ahead of time for a
  TPU slice from a CPU host gets the TPU's kernel;
- the LM head's tiles (`ff_jax.models.head`): `groups` row groups (one per data-parallel shard),
  `tile` positions per tile, `logits` for a [groups, tile, V] tile (rows like the batch, the
  vocabulary like the head) and `head_grad` for the head's float32 gradient accumulator [V, D].
"""

from __future__ import annotations

import dataclasses

from jax.sharding import NamedSharding

# Bytes of one [tile, V] float32 logits tile per device: the backward pass holds about three
# (logits, probabilities, their gradient). 64 MiB keeps the head under ~200 MiB per device for
# any vocabulary while a tile keeps enough rows (>= 64 at a 256k vocabulary) for a TPU's matrix
# unit.
TILE_BYTES = 64 * 2**20
MIN_TILE = 64


def tile_positions(vocab_per_device: int) -> int:
  """Positions per head tile (a power of two, at least MIN_TILE) whose float32 logits fit
  TILE_BYTES on a device that holds `vocab_per_device` columns of the head. Not capped: a small
  vocabulary gets a tile that holds a whole batch, and the head then takes its one-tile path."""
  rows = TILE_BYTES // (4 * max(vocab_per_device, 1))
  return max(MIN_TILE, 1 << max(int(rows).bit_length() - 1, 0))


@dataclasses.dataclass(frozen=True)
class StepLayout:
  """Sharding constraints and head tiling of one step (see the module docstring). A batch whose
  rows do not divide into `groups` (a single row under vmap, as in per-example gradients) is
  laid out as `UNSHARDED`."""

  groups: int = 1
  tile: int = 256
  activations: NamedSharding | None = None
  heads: NamedSharding | None = None
  logits: NamedSharding | None = None
  head_grad: NamedSharding | None = None

  @property
  def platform(self) -> str | None:
    """The platform of the mesh this layout is for ('cpu', 'gpu', 'tpu'), None without one."""
    if self.activations is None:
      return None
    return self.activations.mesh.devices.flat[0].platform

  def for_rows(self, rows: int) -> StepLayout:
    """This layout, or `UNSHARDED` (same tile) where `rows` do not split into the groups."""
    return self if rows % self.groups == 0 else dataclasses.replace(UNSHARDED, tile=self.tile)


# One device, or an unsharded use such as per-example gradients under vmap: no constraints.
UNSHARDED = StepLayout()
# Not a layout: the reference that every position's [B, T, V] logits give (the steps as they were
# before `ff_jax.models.head`); `ff_jax.training.steps.token_nll` takes it for tests and
# benchmarks only.
FULL_LOGITS = StepLayout(tile=0)
