"""Compile time and step time of the train step against depth: scanned blocks vs the same blocks
unrolled into straight-line code (what a Python loop over layers compiles to).

For each depth, one model of the given width is built per mode. Each mode's train step is traced,
lowered and compiled explicitly (the compile time, no persistent cache), and then the modes take
turns, one warm step each, for `--steps` rounds on the same batches: the step time is each mode's
median, and interleaving keeps a noisy machine's slow spells from landing on one mode only.

  python scripts/bench_layers.py [--depths 4,16,32] [--steps 11] [--modes scan,unrolled]

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


class Timed:
  """One mode's train step: compiled explicitly, then stepped one warm step at a time."""

  def __init__(self, cfg: ModelConfig, steps: int, rows: int, length: int):
    runtime = ModelRuntime.create(cfg, parallel.make_mesh(parallel.MeshConfig(1, 1, 1)))
    self.trainer = Trainer(runtime, OptimConfig(learning_rate=1e-4, warmup_steps=0,
                                                schedule="constant"), steps + 1)
    self.state = self.trainer.init_state(runtime.init_params(seed=0))
    self.batches = [self.trainer.put_batch(batch(rows, length, cfg.vocab_size, s))
                    for s in range(steps + 1)]
    start = time.perf_counter()
    self.trainer.step.lower(self.state, self.batches[0]).compile()
    self.compile_seconds = time.perf_counter() - start
    jax.clear_caches()  # the first call traces and compiles again
    self.first_call = self.step(0)
    self.times: list[float] = []

  def step(self, index: int) -> float:
    start = time.perf_counter()
    self.state, metrics = self.trainer.step(self.state, self.batches[index])
    jax.block_until_ready(metrics)
    return time.perf_counter() - start


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--depths", default="4,16,32")
  ap.add_argument("--steps", type=int, default=11)
  ap.add_argument("--modes", default="scan,unrolled" if HAS_SCAN else "loop")
  ap.add_argument("--hidden", type=int, default=512)
  ap.add_argument("--rows", type=int, default=8)
  ap.add_argument("--length", type=int, default=128)
  args = ap.parse_args()
  depths = [int(d) for d in args.depths.split(",")]
  modes = args.modes.split(",")
  print(f"train step, hidden {args.hidden}, batch {args.rows}x{args.length}, "
        f"{os.cpu_count()} CPUs, {jax.default_backend()}, median of {args.steps} warm steps "
        f"(modes interleaved)")
  results = {}
  for depth in depths:
    timed = {}
    for mode in modes:
      cfg = ModelConfig(vocab_size=1024, hidden_size=args.hidden, num_layers=depth, num_heads=4,
                        num_kv_heads=2, intermediate_size=3 * args.hidden,
                        max_position_embeddings=args.length)
      if HAS_SCAN:
        cfg = cfg.replace(scan_layers=mode == "scan")
      timed[mode] = Timed(cfg, args.steps, args.rows, args.length)
    for index in range(1, args.steps + 1):
      for mode in modes:
        timed[mode].times.append(timed[mode].step(index))
    for mode, t in timed.items():
      results[(depth, mode)] = (t.compile_seconds, t.first_call, statistics.median(t.times))
      print(f"{depth:3d} layers {mode:9s} compile {t.compile_seconds:6.2f}s  first call "
            f"{t.first_call:6.2f}s  step {1000 * results[(depth, mode)][2]:8.1f} ms", flush=True)
    del timed
  low, high = min(depths), max(depths)
  for mode in modes:
    (c_low, f_low, _), (c_high, f_high, _) = results[(low, mode)], results[(high, mode)]
    print(f"{mode}: at {high} layers / at {low} layers: compile {c_high / c_low:.2f}x, first "
          f"call {f_high / f_low:.2f}x")
  if "scan" in modes and "unrolled" in modes:
    for depth in depths:
      ratio = results[(depth, "scan")][2] / results[(depth, "unrolled")][2]
      print(f"{depth} layers: scan step / unrolled step = {ratio:.3f}")


if __name__ == "__main__":
  main()
