"""Stacked replica batches split by host: each process builds only its block of every [K, B, T]
batch (its replicas, its rows of each), and the blocks of all processes make the one-process batch.

The fast tests split the streams as N hosts would, in one process, and put the blocks together;
the slow one trains K=2 stacked replicas on two processes with two CPU devices each and on one
process with four (`tests/helpers/stacked_replicas_worker.py`), on a mesh without a replica axis
(the pipeline's) and on one with it (a sweep's).
"""

from __future__ import annotations

import subprocess
import sys

import jax
import numpy as np
import pytest

from ff_jax import parallel
from ff_jax.errors import ConfigError
from ff_jax.models import tiny_llama
from ff_jax.training.replicas import (
  ReplicaMeshConfig,
  StackedBatches,
  make_replica_mesh,
  stacked_batch,
  variant_iterator,
)
from ff_jax.training.steps import ModelRuntime, OptimConfig, Trainer
from tests.helpers.local_pod import LocalPod, process_env
from tests.helpers.pipeline_helpers import REPO
from tests.helpers.stacked_replicas_worker import (
  BATCH,
  BUCKETS,
  DATA,
  PAD,
  SCENARIOS,
  STEPS,
  streams,
)

ROW_MULTIPLE = 4  # what a 4-shard mesh asks of packed rows, on 1, 2 or 4 processes alike
# Two processes sum gradients through gloo, one process in-process: the same batches give losses
# and parameters that differ in float rounding only. Measured: losses <= 8.6e-8 relative; params
# <= 1.04e-4 absolute after 3 AdamW steps at 1e-2 (an update of about 1e-2 per weight and step;
# AdamW's m / sqrt(v) turns rounding of a near-zero gradient into a visible step).
LOSS_RTOL, PARAM_ATOL = 1e-5, 5e-4
TIMEOUT = 600


def _streams(packing: bool, process_index: int = 0, process_count: int = 1):
  """The worker's two replica streams (short examples and long ones, so that their packed
  batches differ in rows and width and stacking pads one of them), as host `process_index` of
  `process_count` builds them."""
  return streams(parallel.StackBlock(range(2), process_index, process_count), packing,
                 ROW_MULTIPLE)


def _host_batches(packing: bool, hosts: int, steps: int):
  """Per host (one `StackedBatches` each, as on `hosts` processes): its local batch per step."""
  out = []
  for host in range(hosts):
    batches = StackedBatches(_streams(packing, host, hosts), PAD,
                             parallel.StackBlock(range(2), host, hosts))
    out.append([batches.next_batch()[0] for _ in range(steps)])
  return out


@pytest.mark.parametrize("packing", [False, True])
def test_one_host_stacks_the_batches_it_stacked_before(packing):
  """On one process, the stacked batches are those of stacking each stream's own batch (padded
  to the largest rows and width among them), step after step: results cannot change."""
  mine = StackedBatches(_streams(packing), PAD)
  alone = _streams(packing)
  grew = set()
  for _ in range(6):
    own = [it.next_batch()[0] for it in alone]
    grew.add(own[0]["tokens"].shape != own[1]["tokens"].shape)
    want = stacked_batch(own, PAD)
    got, state = mine.next_batch()
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert state == {"replicas": [it.state() for it in alone]}
  assert grew == {True}  # every step padded one replica's batch (rows or width)


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("hosts", [2, 4])
def test_host_blocks_make_the_one_host_batch(packing, hosts):
  """Each of N hosts builds 1/N of every replica's rows; their blocks, in process order, are the
  one-host batch exactly (a packed batch grows to the common row count before the split, so
  the padding rows land where one host puts them)."""
  steps = 6
  [whole] = _host_batches(packing, 1, steps)
  blocks = _host_batches(packing, hosts, steps)
  for step in range(steps):
    for key, want in whole[step].items():
      parts = [blocks[host][step][key] for host in range(hosts)]
      assert all(p.shape[1] == want.shape[1] // hosts for p in parts), key
      np.testing.assert_array_equal(np.concatenate(parts, axis=1), want, err_msg=key)


def test_a_host_builds_only_its_replicas():
  """A block of replicas (a mesh with a replica axis): the host builds those replicas' batches
  alone, yet every stream moves on, so the positions saved are all K's."""
  everyone = StackedBatches(_streams(True), PAD)
  second = StackedBatches(_streams(True), PAD, parallel.StackBlock(range(1, 2), 0, 1))
  for _ in range(4):
    want, state = everyone.next_batch()
    got, got_state = second.next_batch()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key][1:2], err_msg=key)
    assert got_state == state


def test_streams_built_for_another_block_are_refused():
  with pytest.raises(ConfigError, match="build stacked streams with process_index=block"):
    StackedBatches(_streams(False), PAD, parallel.StackBlock(range(2), 1, 2))
  with pytest.raises(ConfigError, match="give every stacked stream the same batch_size"):
    _streams(False)[0].make(list(range(BATCH)), (2 * BATCH, 32))


def test_stack_block_on_one_process():
  """One process holds all of a stacked batch, on either mesh, and `put_batch` places it with
  the stacked shardings; a batch of the wrong number of replicas is refused."""
  devices = jax.devices()[:4]
  meshes = [parallel.make_mesh(parallel.MeshConfig(1, -1, 1), devices),
            make_replica_mesh(ReplicaMeshConfig(replica=2, data=1, fsdp=-1, tensor=1), devices)]
  for mesh in meshes:
    assert parallel.stacked_batch_block(mesh, parallel.DEFAULT_RULES, 4) == parallel.StackBlock(
        range(4), 0, 1)
    trainer = Trainer(ModelRuntime.create(tiny_llama(), mesh), OptimConfig(), 1,
                      replicas=2)
    block = trainer.stack_block
    its = [variant_iterator(DATA[0], 8 + k, k, 8, BUCKETS, PAD, block.row_block,
                            block.row_blocks) for k in range(2)]
    local = StackedBatches(its, PAD, block).next_batch()[0]
    batch = trainer.put_batch(local)
    for key, value in local.items():
      assert batch[key].sharding == parallel.batch_shardings(mesh, stacked=True)[key]
      np.testing.assert_array_equal(np.asarray(batch[key]), value)
    with pytest.raises(ConfigError, match="a stacked batch of 1 replicas"):
      trainer.put_batch({key: value[:1] for key, value in local.items()})


@pytest.mark.slow
def test_stacked_replicas_on_two_processes_match_one(tmp_path):
  """K=2 stacked replicas, 3 steps, each scenario of the worker: two processes of two devices
  each against one process of four. The global batches are identical, each process built only
  its block (half the rows of both replicas without a replica axis, all rows of its own replica
  with one), and the losses and final parameters match one process's (sums across processes run
  through gloo: float reassociation only)."""
  worker = [sys.executable, "-m", "tests.helpers.stacked_replicas_worker"]
  one = subprocess.run([*worker, tmp_path / "one.npz"], cwd=REPO, env=process_env(4),
                       capture_output=True, text=True, timeout=TIMEOUT)
  assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
  LocalPod([*worker, tmp_path / "two.npz"], processes=2, devices=2,
           logs=tmp_path / "logs").wait(timeout=TIMEOUT)
  want, got = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
  assert sorted(got.files) == sorted(want.files)
  for name, (kind, _, _) in SCENARIOS.items():
    blocks, rows = got[f"{name}/block"], got[f"{name}/rows_built"]  # [process, ...]
    whole_rows = want[f"{name}/rows_built"][0]
    if kind == "fsdp":  # both replicas on each process, half the rows of each
      assert blocks.tolist() == [[0, 2, 0, 2], [0, 2, 1, 2]]
      np.testing.assert_array_equal(rows, [whole_rows // 2, whole_rows // 2])
    else:  # replica axis: process p holds replica p, every row of it
      assert blocks.tolist() == [[0, 1, 0, 1], [1, 2, 0, 1]]
      np.testing.assert_array_equal(rows, [[whole_rows[0], 0], [0, whole_rows[1]]])
    for step in range(STEPS):
      for key in [f for f in want.files if f.startswith(f"{name}/batch{step}/")]:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    for key in [f for f in want.files if f.startswith(f"{name}/loss")]:
      np.testing.assert_allclose(got[key], want[key], rtol=LOSS_RTOL, err_msg=key)
    for key in [f for f in want.files if f.startswith(f"{name}/params")]:
      np.testing.assert_allclose(got[key], want[key], rtol=0, atol=PARAM_ATOL, err_msg=key)
