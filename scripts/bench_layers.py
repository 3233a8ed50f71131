"""Compile time and step time of the train step against depth: scanned blocks vs the same blocks
unrolled into straight-line code (what a Python loop over layers compiles to).

For each depth, a fresh model of one width is built and its train step is called: the first call
(trace + compile + one step) and then `--steps` warm steps, whose median is the step time. Both
modes run in this one process on the same batches, so their ratios are comparable on a noisy
machine; the first call minus the warm median is reported as the compile time.

  python scripts/bench_layers.py [--depths 4,16,32] [--steps 7] [--modes scan,unrolled]

On a checkout from before the scan (no `ModelConfig.scan_layers`) the only mode is "loop".
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ff_jax import parallel  # noqa: E402
from ff_jax.models import ModelConfig  # noqa: E402
from ff_jax.training.steps import ModelRuntime, OptimConfig, Trainer  # noqa: E402

HAS_SCAN = "scan_layers" in {f.name for f in dataclasses.fields(ModelConfig)}


def batch(rows: int, length: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
  """A full batch of random tokens, every row as long as the batch, loss on the second half."""
  rng = np.random.default_rng(seed)
  loss = np.zeros((rows, length), np.int32)
  loss[:, length // 2:] = 1
  return {"tokens": rng.integers(3, vocab, (rows, length)).astype(np.int32),
          "mask": np.ones((rows, length), np.int32), "loss_mask": loss,
          "example_id": np.arange(rows, dtype=np.int32)}


def measure(cfg: ModelConfig, steps: int, rows: int, length: int) -> tuple[float, float]:
  """(seconds of the first call, median seconds of a warm step)."""
  runtime = ModelRuntime.create(cfg, parallel.make_mesh(parallel.MeshConfig(1, 1, 1)))
  trainer = Trainer(runtime, OptimConfig(learning_rate=1e-4, warmup_steps=0,
                                         schedule="constant"), steps + 1)
  state = trainer.init_state(runtime.init_params(seed=0))
  batches = [trainer.put_batch(batch(rows, length, cfg.vocab_size, s)) for s in range(steps + 1)]
  start = time.perf_counter()
  state, metrics = trainer.step(state, batches[0])
  jax.block_until_ready(metrics)
  first = time.perf_counter() - start
  times = []
  for b in batches[1:]:
    start = time.perf_counter()
    state, metrics = trainer.step(state, b)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return first, statistics.median(times)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--depths", default="4,16,32")
  ap.add_argument("--steps", type=int, default=7)
  ap.add_argument("--modes", default="scan,unrolled" if HAS_SCAN else "loop")
  ap.add_argument("--hidden", type=int, default=256)
  ap.add_argument("--rows", type=int, default=8)
  ap.add_argument("--length", type=int, default=128)
  args = ap.parse_args()
  depths = [int(d) for d in args.depths.split(",")]
  modes = args.modes.split(",")
  print(f"train step, hidden {args.hidden}, batch {args.rows}x{args.length}, "
        f"{os.cpu_count()} CPUs, {jax.default_backend()}, median of {args.steps} warm steps")
  results = {}
  for depth in depths:
    for mode in modes:
      cfg = ModelConfig(vocab_size=1024, hidden_size=args.hidden, num_layers=depth, num_heads=4,
                        num_kv_heads=2, intermediate_size=3 * args.hidden,
                        max_position_embeddings=args.length)
      if HAS_SCAN:
        cfg = cfg.replace(scan_layers=mode == "scan")
      first, step = measure(cfg, args.steps, args.rows, args.length)
      results[(depth, mode)] = (first, step)
      print(f"{depth:3d} layers {mode:9s} first call {first:7.2f}s  compile ~{first - step:7.2f}s"
            f"  step {1000 * step:8.1f} ms", flush=True)
  low, high = min(depths), max(depths)
  for mode in modes:
    first_low, first_high = results[(low, mode)][0], results[(high, mode)][0]
    print(f"{mode}: first call at {high} layers / at {low} layers = {first_high / first_low:.2f}x")
  if "scan" in modes and "unrolled" in modes:
    for depth in depths:
      ratio = results[(depth, "scan")][1] / results[(depth, "unrolled")][1]
      print(f"{depth} layers: scan step / unrolled step = {ratio:.3f}")


if __name__ == "__main__":
  main()
