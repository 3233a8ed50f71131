"""Accelerator check: compile, sharded train/score steps and batched decoding of a real-size model.

Prints, for a SmolLM2-135M-shaped Llama (random weights; shapes are what matter here), the compile
time and steady-state throughput of the train step, the score step and greedy decoding, and the
model-FLOPs utilisation of the train step against a bf16 matmul peak measured in the same run.

  python scripts/device_check.py [--small] [--batch 16] [--seq 512]

`--small` shrinks everything so the script runs on a CPU in seconds (a smoke test of the script).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from ff_jax import parallel
from ff_jax.models import ModelConfig, count_params
from ff_jax.models.decoding import SamplingConfig, generate
from ff_jax.train import ModelRuntime, OptimConfig, Scorer, Trainer


def smollm2_shape(small: bool) -> ModelConfig:
  if small:
    return ModelConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, intermediate_size=128, tie_embeddings=True,
                       dtype="bfloat16")
  return ModelConfig(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9,
                     num_kv_heads=3, intermediate_size=1536, max_position_embeddings=8192,
                     rope_theta=100000.0, tie_embeddings=True, dtype="bfloat16")


class Report(dict):
  """Prints every figure as soon as it is measured, so a run cut short still reports."""

  def __setitem__(self, key, value):
    super().__setitem__(key, value)
    print(f"{key}: {value}", flush=True)


def timed(fn, repeats: int) -> float:
  """Seconds per call after one warm-up call (which includes compilation)."""
  jax.block_until_ready(fn())
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeats


def matmul_peak(n: int) -> float:
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
  f = jax.jit(lambda x, y: x @ y)
  seconds = timed(lambda: f(a, b), 20)
  return 2 * n ** 3 / seconds


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--small", action="store_true")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--seq", type=int, default=512)
  args = parser.parse_args()
  batch, seq = (4, 64) if args.small else (args.batch, args.seq)
  report = Report({"devices": [str(d) for d in jax.devices()], "jax": jax.__version__})

  cfg = smollm2_shape(args.small)
  mesh = parallel.make_mesh(parallel.MeshConfig())
  runtime = ModelRuntime.create(cfg, mesh)
  n_params = count_params(runtime.abstract_params)
  start = time.perf_counter()
  params = jax.block_until_ready(runtime.init_params(0))
  report["init_s"] = round(time.perf_counter() - start, 2)
  report["params_M"] = round(n_params / 1e6, 1)

  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, (batch, seq)).astype(np.int32)
  mask = np.ones((batch, seq), np.int32)
  loss_mask = np.zeros((batch, seq), np.int32)
  loss_mask[:, seq // 4:] = 1
  local = {"tokens": tokens, "mask": mask, "loss_mask": loss_mask,
           "example_id": np.arange(batch, dtype=np.int32)}
  batch_arrays = parallel.global_batch(local, mesh)

  trainer = Trainer(runtime, OptimConfig(learning_rate=1e-4), total_steps=100)
  state = {"s": trainer.init_state(params)}

  def train_once():
    state["s"], metrics, _ = trainer.step(state["s"], batch_arrays)
    return metrics["loss"]

  start = time.perf_counter()
  jax.block_until_ready(train_once())
  report["train_compile_s"] = round(time.perf_counter() - start, 2)
  step_s = timed(train_once, 3 if args.small else 10)
  train_tokens = batch * seq
  # 6 FLOPs per parameter per token (forward + backward) plus causal attention (Q·K and P·V,
  # half the square on average, times 3 for forward + backward).
  attn = 6 * cfg.num_layers * seq * cfg.num_heads * cfg.resolved_head_dim
  flops_per_token = 6 * n_params + attn
  report["train_step_s"] = round(step_s, 4)
  report["train_tokens_per_s"] = round(train_tokens / step_s)
  report["traces"] = trainer.trace_count

  scorer = Scorer(runtime)
  params_now = state["s"]["params"]
  start = time.perf_counter()
  jax.block_until_ready(scorer.step(params_now, batch_arrays))
  report["score_compile_s"] = round(time.perf_counter() - start, 2)
  score_s = timed(lambda: scorer.step(params_now, batch_arrays), 3 if args.small else 10)
  report["score_examples_per_s"] = round(batch / score_s, 1)

  prompts = [list(rng.integers(4, cfg.vocab_size, 20 + i % 30)) for i in range(batch * 2)]
  sampling = SamplingConfig(max_new_tokens=16 if args.small else 64)
  # eos_id = -1: no row stops early, so every row decodes the whole budget.
  run = lambda: generate(runtime.graphdef, params_now, prompts, eos_id=-1, pad_id=0,
                         sampling=sampling)
  start = time.perf_counter()
  run()
  report["decode_first_call_s"] = round(time.perf_counter() - start, 2)
  start = time.perf_counter()
  run()
  decode_s = time.perf_counter() - start
  report["decode_tokens_per_s"] = round(len(prompts) * sampling.max_new_tokens / decode_s)

  peak = matmul_peak(512 if args.small else 8192)
  report["bf16_matmul_peak_tflops"] = round(peak / 1e12, 1)
  report["train_mfu"] = round(flops_per_token * train_tokens / step_s / peak, 3)
  print(json.dumps(report, indent=2), flush=True)


if __name__ == "__main__":
  main()
