"""One process of `test_stacked_replicas_multihost`: K=2 stacked replicas trained a few steps on a
4-device mesh, by one process or by each process of a local pod, with every host building only
its block of each stacked batch (`Trainer.stack_block`, `StackedBatches`).

Usage: `python -m tests.helpers.stacked_replicas_worker OUT_FILE`. Runs every `SCENARIOS` entry;
process 0 writes OUT_FILE (npz): per scenario, each process's block and the rows each replica's
stream built on each process ([processes, ...]), the global batches and per-replica losses of
every step, and the final parameters.
"""

from __future__ import annotations

import io
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from ff_jax import parallel
from ff_jax.atomic_io import write_atomic
from ff_jax.data.batching import TrainIterator
from ff_jax.models import tiny_llama
from ff_jax.training.replicas import ReplicaMeshConfig, StackedBatches, make_replica_mesh
from ff_jax.training.steps import ModelRuntime, OptimConfig, Trainer
from tests.helpers.encoded import random_examples

BUCKETS = (16, 32, 64)
PAD = 0
STEPS = 3
BATCH = 16
# Two replicas' data: short examples and long ones.
DATA = (random_examples(40, 1, lo=6, hi=14), random_examples(40, 2, lo=30, hi=62))
# name -> (mesh, packing, gradient-accumulation steps). `fsdp`: the pipeline's mesh (no replica
# axis: every host holds both replicas, half the rows of each); `replica`: a sweep's mesh with a
# replica axis (each host holds one replica, all its rows).
SCENARIOS = {
    "fsdp_packed": ("fsdp", True, 1),
    "fsdp_accum": ("fsdp", False, 2),
    "replica": ("replica", False, 1),
}


class CountingIterator(TrainIterator):
  """A `TrainIterator` that counts the rows it builds (`make`): on several hosts, only this
  host's of its batches, and none for a replica this host does not hold."""

  rows_built = 0

  def make(self, indices, shape=None):
    batch = super().make(indices, shape)
    self.rows_built += batch["tokens"].shape[0]
    return batch


def _mesh(kind: str):
  if kind == "replica":
    return make_replica_mesh(ReplicaMeshConfig(replica=2, data=1, fsdp=-1, tensor=1))
  return parallel.make_mesh(parallel.MeshConfig(data=1, fsdp=-1, tensor=1))


def streams(block: parallel.StackBlock, packing: bool, row_multiple: int):
  """Two replicas' streams: short examples and long ones, so that their packed batches differ in
  rows and width and the stacked batch pads one of them."""
  return [CountingIterator(examples, BATCH, 10 + k, BUCKETS, pad_id=PAD, packing=packing,
                           row_multiple=row_multiple, process_index=block.row_block,
                           process_count=block.row_blocks)
          for k, examples in enumerate(DATA)]


def _gather(tree):
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def run(kind: str, packing: bool, accum: int) -> dict[str, np.ndarray]:
  runtime = ModelRuntime.create(tiny_llama(), _mesh(kind))
  trainer = Trainer(runtime, OptimConfig(learning_rate=1e-2, grad_accum_steps=accum), STEPS,
                    replicas=2)
  block = trainer.stack_block
  replica_streams = streams(block, packing, trainer.row_multiple)
  batches = StackedBatches(replica_streams, PAD, block)
  state = trainer.init_state(runtime.init_params(0))
  out = {"block": multihost_utils.process_allgather(np.asarray(
      [block.replicas.start, block.replicas.stop, block.row_block, block.row_blocks]))}
  for step in range(STEPS):
    local, _ = batches.next_batch()
    batch = trainer.put_batch(local)
    for key, value in _gather(batch).items():
      out[f"batch{step}/{key}"] = value
    state, metrics = trainer.step(state, batch)
    out[f"loss{step}"] = jax.device_get(metrics["loss"])  # as the loop reads it, on any host
  out["rows_built"] = multihost_utils.process_allgather(np.asarray([s.rows_built
                                                                    for s in replica_streams]))
  for path, leaf in jax.tree_util.tree_leaves_with_path(_gather(state["params"])):
    out["params" + jax.tree_util.keystr(path)] = leaf
  return out


def main(out_file: str) -> None:
  parallel.initialize_distributed()
  assert jax.device_count() == 4, jax.devices()
  arrays = {}
  for name, (kind, packing, accum) in SCENARIOS.items():
    arrays.update({f"{name}/{key}": value for key, value in run(kind, packing, accum).items()})
    print("done", name, flush=True)
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  write_atomic(out_file, buffer.getvalue())  # process 0 only


if __name__ == "__main__":
  main(sys.argv[1])
