"""One process of `test_hf_export_multihost`: load parity fixtures onto a mesh that spans both
processes (fsdp across them, tensor within each) and export each with `save_hf`.

Usage: `python -m tests.helpers.hf_export_worker FOLDER MAX_SHARD_SIZE NAME...`. FOLDER is taken
relative to the process's working directory, so the test can run each process in a directory of
its own and see which of them wrote anything. Prints `exported NAME FOLDER` or `failed NAME ERROR`
for each export.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax

from ff_jax import parallel
from ff_jax.models import hf
from ff_jax.parallel import MeshConfig, make_mesh
from tests.helpers.paths import FIXTURES


def main(folder: str, max_shard_size: int, names: list[str]) -> None:
  assert parallel.initialize_distributed()
  assert jax.process_count() == 2 and jax.device_count() == 4
  mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=2))
  for name in names:
    cfg, params = hf.load_hf(FIXTURES / "parity" / name, mesh=mesh)
    leaves = jax.tree.leaves(params)
    # The export must gather: some parameters have no complete copy on this process.
    split = [x for x in leaves if not x.is_fully_addressable and not x.is_fully_replicated]
    assert split and any("fsdp" in x.sharding.spec for x in split), name
    try:
      out = hf.save_hf(Path(folder) / name, cfg, params, hf.hf_model_type(cfg),
                       max_shard_size=max_shard_size)
    except Exception as e:  # the test checks which error each process saw
      print("failed", name, f"{type(e).__name__}: {e}", flush=True)
    else:
      print("exported", name, out, flush=True)


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
