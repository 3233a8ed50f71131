"""One process of `test_multihost.test_overlapping_saves_of_two_managers`.

Saves a phase checkpoint asynchronously and, while it may still be finalizing, a snapshot through a
second manager, many times over: the pattern of `loop.train_phase` with `snapshot_every`. Random
pauses (different on each process) move the snapshot's start across the phase save's finalize.
"""

from __future__ import annotations

import random
import sys
import time

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from ff_jax import parallel
from ff_jax.training.checkpoints import PhaseCheckpoints, restore_params, save_params


def main(root: str, saves: int) -> None:
  assert parallel.initialize_distributed()
  mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
  sharding = NamedSharding(mesh, P("data"))
  rng = random.Random(jax.process_index())
  phase = PhaseCheckpoints(f"{root}/phase")
  for step in range(1, saves + 1):
    tree = {"w": jax.device_put(np.full((jax.device_count() * 512, 512), step, np.float32),
                                sharding)}
    phase.save(step, tree, {"step": step})
    time.sleep(rng.random() * 0.03)
    save_params(f"{root}/snapshots/step_{step}", tree)
  phase.close()
  target = {"w": jax.ShapeDtypeStruct((jax.device_count() * 512, 512), np.float32,
                                      sharding=sharding)}
  last = restore_params(f"{root}/snapshots/step_{saves}", target)
  assert float(last["w"].addressable_data(0)[0, 0]) == saves
  print("done", jax.process_index())


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]))
