"""Wall time of K sweep variants trained as stacked (vmapped) replicas vs one after another.

Both sides do the same work: each variant finetunes the same model on its own seeded safe subset
for max(steps) steps and scores the noisy set at every t. The sequential side uses the ordinary
`Trainer`/`Scorer`, one instance reused for all variants (so it compiles once too). Times are
reported cold (first pass, compiles included) and warm (a second pass on the compiled programs).

  python scripts/bench_sweep.py [--k 8] [--steps 5,10,20] [--vocab 1024]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from ff_jax import parallel  # noqa: E402
from ff_jax.data.batching import Batching, eval_batches  # noqa: E402
from ff_jax.data.templates import EncodedExample  # noqa: E402
from ff_jax.models import ModelConfig  # noqa: E402
from ff_jax.perf.bench import flops_per_token, matmul_peak  # noqa: E402
from ff_jax.training.loop import train_and_score  # noqa: E402
from ff_jax.training.replicas import (  # noqa: E402
  ReplicaMeshConfig,
  make_replica_mesh,
  variant_iterator,
)
from ff_jax.training.steps import ModelRuntime, OptimConfig, Scorer, Trainer  # noqa: E402

BUCKETS = (32, 64, 96)


def examples(n: int, seed: int, vocab: int) -> list[EncodedExample]:
  """Random sequences with demo-like lengths (prompt + response up to 96 tokens)."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    length = int(rng.integers(16, 90))
    prompt = int(rng.integers(4, length // 2))
    mask = np.zeros(length, np.int32)
    mask[prompt:] = 1
    out.append(EncodedExample(tokens=rng.integers(3, vocab, length).astype(np.int32),
                              loss_mask=mask, prompt_len=prompt, truncated=False, id=str(i)))
  return out


def executed_flops(cfg: ModelConfig, iterators, train_steps: int, score_times: int,
                   noisy: list[EncodedExample], score_batch: int) -> float:
  """FLOPs the sequential sweep executes (padded batch shapes, as run): every variant's train
  batches, and `score_times` passes over the noisy set per variant."""
  total = 0.0
  for it in iterators:
    for _ in range(train_steps):
      rows, length = it.next_batch()[0]["tokens"].shape
      total += rows * length * flops_per_token(cfg, length, train=True)
  for batch in eval_batches(noisy, score_batch, BUCKETS, pad_id=0):
    rows, length = batch["tokens"].shape
    total += len(iterators) * score_times * rows * length * flops_per_token(cfg, length, False)
  return total


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--k", type=int, default=8)
  ap.add_argument("--steps", default="5,10,20")
  ap.add_argument("--vocab", type=int, default=1024)
  ap.add_argument("--batch", type=int, default=16)
  args = ap.parse_args()
  steps = [int(s) for s in args.steps.split(",")]
  # The demo model's shape (configs/demo.yaml), random init: the timing does not depend on weights.
  cfg = ModelConfig(vocab_size=args.vocab, hidden_size=128, num_layers=4, num_heads=4,
                    num_kv_heads=2, intermediate_size=384, max_position_embeddings=128)
  optim = OptimConfig(learning_rate=1e-3, warmup_steps=2, schedule="constant")
  safe, noisy = examples(72, 1, args.vocab), examples(240, 2, args.vocab)
  sizes = [8, 16, 32, 48, 72, 8, 16, 32]
  variants = [(sizes[i % len(sizes)], i // len(sizes)) for i in range(args.k)]
  its = lambda: [variant_iterator(safe, n, s, args.batch, BUCKETS, 0)  # noqa: E731
                 for n, s in variants]

  runtime = ModelRuntime.create(cfg, parallel.make_mesh(parallel.MeshConfig(1, 1, 1)))
  params = runtime.init_params(seed=0)
  trainer, scorer = Trainer(runtime, optim, max(steps)), Scorer(runtime)

  def sequential():
    return np.concatenate([train_and_score(trainer, scorer, params, [it], steps, noisy,
                                           Batching(48, BUCKETS, 0))[0]["nll"] for it in its()])

  rruntime = ModelRuntime.create(cfg, make_replica_mesh(ReplicaMeshConfig(1, 1, 1, 1)))
  rtrainer = Trainer(rruntime, optim, max(steps), replicas=args.k)
  rscorer = Scorer(rruntime)

  def vmapped():
    return train_and_score(rtrainer, rscorer, params, its(), steps, noisy,
                           Batching(48, BUCKETS, 0))[0]["nll"]

  times = {}
  for name, fn in (("sequential", sequential), ("vmapped", vmapped)):
    for phase in ("cold", "warm"):
      start = time.perf_counter()
      out = fn()
      times[(name, phase)] = time.perf_counter() - start
      results = out
    times[name + "_out"] = results
  diff = np.max(np.abs(times["vmapped_out"] - times["sequential_out"])
                / np.abs(times["sequential_out"]))
  print(f"K={args.k} variants, steps {steps}, batch {args.batch}, demo shape (hidden 128, 4 "
        f"layers), vocab {args.vocab}, {os.cpu_count()} CPUs")
  for phase in ("cold", "warm"):
    seq, vm = times[("sequential", phase)], times[("vmapped", phase)]
    print(f"{phase:5s} (compile {'incl.' if phase == 'cold' else 'excl.'}): sequential "
          f"{seq:7.2f}s  vmapped {vm:7.2f}s  ratio {vm / seq:.3f}")
  print(f"max relative difference of the per-example NLLs: {diff:.2e}")
  # Both sides execute at least the sequential side's FLOPs, so the measured matmul peak bounds
  # how fast any schedule of this work can be.
  peak, _ = matmul_peak(2048, np.float32, 5)
  at_peak = executed_flops(cfg, its(), max(steps), len(steps), noisy, 48) / peak
  seq = times[("sequential", "warm")]
  print(f"at the fp32 matmul peak ({peak / 1e9:.0f} GFLOP/s, measured now) this work takes "
        f"{at_peak:.2f}s: the warm sequential sweep runs at {100 * at_peak / seq:.0f}% of it, and "
        f"a vmapped sweep at 0.5x would need {200 * at_peak / seq:.0f}%")


if __name__ == "__main__":
  main()
