"""What one step checkpoint save costs in a bucket against a local folder, and what the gcsfuse
mount ff_jax used before would have added.

The train state of a finetune (parameters, AdamW's two moments, the step) of the demo model
(`configs/demo.yaml`, or `--config`) is saved with the training loop's own `PhaseCheckpoints`, as
consecutive steps, into a local folder and into `gs://BUCKET/...` on a `gcp-storage-emulator`
server started on 127.0.0.1 (the emulator is a pure-Python server: its absolute times are a
floor for nothing, the object counts hold on Cloud Storage). In a bucket Orbax writes the step
folder in place and commits it with one marker object; on a gcsfuse mount it wrote a temp folder
and renamed it, which Cloud Storage does as a copy and a delete of every object: that move is
measured here too, on the emulator, as a recursive copy and delete of a committed step folder.

  python scripts/bench_checkpoint_storage.py [--saves 5] [--config configs/demo.yaml]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fsspec  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from etils import epath  # noqa: E402

from ff_jax.atomic_io import files_under  # noqa: E402
from ff_jax.config import load_config  # noqa: E402
from ff_jax.models import ModelConfig, init_params  # noqa: E402
from ff_jax.training.checkpoints import PhaseCheckpoints  # noqa: E402
from tests.helpers.gcs_emulator import BUCKET, pointed_at, running_emulator  # noqa: E402


def train_state(config: str | None, vocab: int):
  """The state a finetune checkpoints, of the config's `model.config` shape with `vocab` tokens
  (the demo's vocabulary is trained per run; its word-level tokenizer has about a thousand)."""
  cfg = load_config(config, [])
  params = init_params(ModelConfig.from_dict({**cfg.model.config, "vocab_size": vocab}), seed=0)
  return {"params": params, "opt": optax.adamw(1e-4).init(params), "step": jnp.int32(0)}


def timed_saves(directory, state, saves: int) -> list[float]:
  ckpt = PhaseCheckpoints(directory)
  seconds = []
  for step in range(1, saves + 1):
    start = time.perf_counter()
    ckpt.save(step, state, {"step": step})
    ckpt.wait_until_finished()
    seconds.append(time.perf_counter() - start)
  ckpt.close()
  return seconds


def objects(folder) -> tuple[int, int]:
  """(objects, bytes) under `folder`, a local Path or an epath.Path."""
  files = list(files_under(folder))
  return len(files), sum(len(path.read_bytes()) for path in files)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--saves", type=int, default=5)
  parser.add_argument("--config", default=None, help="a run config (default: the demo's)")
  parser.add_argument("--vocab", type=int, default=1024)
  args = parser.parse_args()
  state = train_state(args.config, args.vocab)
  n_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  print(f"train state: {len(jax.tree.leaves(state))} arrays, {n_bytes / 2**20:.1f} MiB")
  with tempfile.TemporaryDirectory() as tmp:
    local = Path(tmp) / "ckpt"
    local_s = timed_saves(local, state, args.saves)
    local_objects = objects(local / str(args.saves))
    with running_emulator(Path(tmp) / "objects") as url, pointed_at(url):
      remote = epath.Path(f"gs://{BUCKET}/bench/ckpt")
      remote_s = timed_saves(remote, state, args.saves)
      step = remote / str(args.saves)
      remote_objects = objects(step)
      start = time.perf_counter()
      # What gcsfuse does for a folder rename in a bucket without folders: each object
      # rewritten (a server-side copy) to the new name, then the old one deleted.
      gcs = fsspec.filesystem("gs")
      gcs.copy(str(step), f"{BUCKET}/bench/moved", recursive=True)
      gcs.rm(str(step), recursive=True)
      move_s = time.perf_counter() - start
  print(f"{'where':<34} {'save (median s)':>15} {'objects':>8} {'MiB':>7}")
  print(f"{'local folder':<34} {statistics.median(local_s):>15.3f} {local_objects[0]:>8} "
        f"{local_objects[1] / 2**20:>7.1f}")
  print(f"{'bucket (emulator), in place':<34} {statistics.median(remote_s):>15.3f} "
        f"{remote_objects[0]:>8} {remote_objects[1] / 2**20:>7.1f}")
  print(f"{'+ a gcsfuse rename of that folder':<34} {move_s:>15.3f} "
        f"{remote_objects[0]:>8} {remote_objects[1] / 2**20:>7.1f}  (each object copied, then "
        "deleted)")


if __name__ == "__main__":
  main()
