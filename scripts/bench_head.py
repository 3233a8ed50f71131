"""The LM head at target positions only (ff_jax.models.head) against every position's logits
(the steps as they were), on the same batches in the same run.

Rows are shaped like the bias mixtures: packed examples whose prompts are about nine tokens in
ten (`--prompt`/`--response` ranges), packed as `ff-jax filter` packs them. The model is a
randomly initialised one of the given shape (default SmolLM2-135M's). Each path's train and
score steps are compiled, then the paths take turns, one warm call each, for `--steps` rounds:
the figures are medians, and interleaving keeps a noisy machine's slow spells from landing on one
path only. The matmul peaks of XLA (and of PyTorch where it is installed) are measured in the same
run and printed beside the ratios.

  python scripts/bench_head.py [--steps 7] [--train-batch 8] [--score-batch 16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ff_jax import parallel  # noqa: E402
from ff_jax.data.batching import pack_batch  # noqa: E402
from ff_jax.data.templates import EncodedExample  # noqa: E402
from ff_jax.models import ModelConfig  # noqa: E402
from ff_jax.models.layout import FULL_LOGITS  # noqa: E402
from ff_jax.perf.bench import flops_per_token, matmul_peak  # noqa: E402
from ff_jax.training.steps import ModelRuntime, OptimConfig, Scorer, Trainer  # noqa: E402

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                    intermediate_size=1536, max_position_embeddings=8192, rope_theta=100000.0,
                    tie_embeddings=True, norm_eps=1e-5)


def examples(count: int, prompt: tuple[int, int], response: tuple[int, int], vocab: int,
             seed: int) -> list[EncodedExample]:
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    p, r = int(rng.integers(*prompt)), int(rng.integers(*response))
    tokens = rng.integers(3, vocab, p + r).astype(np.int32)
    loss = np.zeros(p + r, np.int32)
    loss[p:] = 1
    out.append(EncodedExample(tokens, loss, p, False))
  return out


def packed(exs: list[EncodedExample], per_batch: int, buckets: list[int]) -> list[dict]:
  return [pack_batch(exs, list(range(i, i + per_batch)), buckets, pad_id=0)
          for i in range(0, len(exs) - per_batch + 1, per_batch)]


def torch_peak(n: int, repeats: int) -> float | None:
  try:
    import torch
  except ImportError:
    return None
  a, b = torch.randn(n, n), torch.randn(n, n)
  a @ b
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    a @ b
    times.append(time.perf_counter() - start)
  return 2.0 * n ** 3 / statistics.median(times)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=7)
  ap.add_argument("--train-batch", type=int, default=8, help="examples per train batch")
  ap.add_argument("--score-batch", type=int, default=16, help="examples per score batch")
  ap.add_argument("--prompt", type=int, nargs=2, default=[60, 220])
  ap.add_argument("--response", type=int, nargs=2, default=[3, 30])
  ap.add_argument("--max-len", type=int, default=256)
  args = ap.parse_args()

  cfg = ModelConfig(**SMOLLM2_135M)
  runtime = ModelRuntime.create(cfg, parallel.make_mesh(parallel.MeshConfig(1, 1, 1),
                                                        jax.devices()[:1]))
  params = runtime.init_params(0)
  buckets = [args.max_len]
  exs = examples((args.steps + 1) * max(args.train_batch, args.score_batch), tuple(args.prompt),
                 tuple(args.response), cfg.vocab_size, 0)
  train_batches = packed(exs, args.train_batch, buckets)[:args.steps + 1]
  score_batches = packed(exs, args.score_batch, buckets)[:args.steps + 1]
  targets = sum(int(b["loss_mask"].sum()) for b in train_batches)
  slots = sum(b["loss_mask"].size for b in train_batches)
  print(f"{jax.devices()[0].device_kind}; SmolLM2-135M shape, float32; packed rows "
        f"{train_batches[0]['tokens'].shape} (train) and {score_batches[0]['tokens'].shape} "
        f"(score); {targets / slots:.3f} of the positions are targets")

  paths = {}
  for name, layout in (("full logits", FULL_LOGITS), ("targets only", None)):
    trainer = Trainer(runtime, OptimConfig(learning_rate=1e-5), total_steps=100, layout=layout)
    scorer = Scorer(runtime, layout)
    state = trainer.init_state(jax.tree.map(jnp.copy, params))
    start = time.perf_counter()
    state, _ = trainer.step(state, trainer.put_batch(train_batches[0]))
    jax.block_until_ready(state)
    compile_train = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(scorer.step(params, runtime_batch(runtime, score_batches[0])))
    compile_score = time.perf_counter() - start
    paths[name] = {"trainer": trainer, "scorer": scorer, "state": state, "train": [],
                   "score": [], "compile": (compile_train, compile_score)}

  for step in range(1, args.steps + 1):
    for path in paths.values():
      batch = path["trainer"].put_batch(train_batches[step])
      start = time.perf_counter()
      path["state"], metrics = path["trainer"].step(path["state"], batch)
      jax.block_until_ready(metrics)
      path["train"].append(time.perf_counter() - start)
      batch = runtime_batch(runtime, score_batches[step])
      start = time.perf_counter()
      jax.block_until_ready(path["scorer"].step(params, batch))
      path["score"].append(time.perf_counter() - start)

  xla_peak, _ = matmul_peak(2048, jnp.float32, 5)
  pt_peak = torch_peak(2048, 5)
  print(f"matmul peak (2048^3, float32): XLA {xla_peak / 1e9:.0f} GFLOP/s"
        + (f", PyTorch {pt_peak / 1e9:.0f} GFLOP/s" if pt_peak else ", PyTorch not installed"))
  print(f"{'path':<14}{'train s (min-max)':>26}{'score s (min-max)':>26}{'compile s':>16}")
  for name, path in paths.items():
    cells = [f"{statistics.median(path[k]):.3f} ({min(path[k]):.3f}-{max(path[k]):.3f})"
             for k in ("train", "score")]
    print(f"{name:<14}{cells[0]:>26}{cells[1]:>26}"
          f"{path['compile'][0]:>8.1f}{path['compile'][1]:>8.1f}")
  full, tiled = paths["full logits"], paths["targets only"]
  # FLOPs hold on every machine: the head runs on whole tiles up to the last one with a target.
  tile = runtime.step_layout().tile
  rows, length = train_batches[0]["tokens"].shape
  tiled_share = statistics.mean(
      -(-int(b["loss_mask"].sum()) // tile) * tile / b["loss_mask"].size for b in train_batches)
  for name, share in (("full logits", 1.0), ("targets only", min(tiled_share, 1.0))):
    flops = flops_per_token(cfg, length, train=True, target_share=share) * rows * length
    print(f"{name}: head on {100 * share:.1f}% of positions, {flops / 1e9:.1f} GFLOP per train "
          f"step, {flops / statistics.median(paths[name]['train']) / 1e9:.0f} GFLOP/s")
  print("speed-up, targets only against full logits: "
        f"train {statistics.median(full['train']) / statistics.median(tiled['train']):.3f}x, "
        f"score {statistics.median(full['score']) / statistics.median(tiled['score']):.3f}x")


def runtime_batch(runtime: ModelRuntime, local: dict) -> dict:
  return parallel.global_batch(local, runtime.mesh, runtime.rules)


if __name__ == "__main__":
  main()
