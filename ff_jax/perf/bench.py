"""`ff-jax bench`: throughput and model-FLOPs utilisation of the train, score and decode paths.

Every figure is measured against the device's own matrix-multiply peak, measured in the same run
and dtype, so the ratios hold on a shared, noisy machine. Each measurement excludes the warm-up
call (compilation, timed separately), repeats the call several times, and reports the median and
the spread (min and max).

FLOPs per token follow PaLM's accounting (Chowdhury et al. 2022, appendix B): 6·N for a training
step (2·N forward), N the parameters that take part in matrix multiplies (embedding lookups not),
plus 12·L·H·d_head·T for attention scores and values (4·L·H·d_head·T forward); the LM head counts
only at the positions that have a target, the only ones the steps apply it to
(`ff_jax.models.head`; three in four positions of the bench's rows). The attention term counts
the full T×T square, which the einsum path computes; the causal fused kernels (cuDNN, splash;
`model.attention`) skip the upper half, so their MFU is overstated by half the attention term's
share (about 3 points for a 1B model at T = 1024).

Decoding is measured the same way (`decode_flops`), which bounds what batching can buy: both sides
do the same model FLOPs, so batched decoding can be at most (one-at-a-time time) / (FLOPs / peak)
times faster, printed beside the measured speed-up.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ff_jax import parallel
from ff_jax.atomic_io import write_json_atomic
from ff_jax.errors import ConfigError
from ff_jax.models import ModelConfig
from ff_jax.models.decoding import SamplingConfig, generate
from ff_jax.training.steps import ModelRuntime, OptimConfig, Scorer, Trainer


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """What to measure; `model` holds ModelConfig fields."""

  model: dict = dataclasses.field(default_factory=dict)
  batch_size: int = 8
  seq_len: int = 256
  repeats: int = 5
  decode_batch: int = 32
  decode_prompt_len: int = 32
  decode_new_tokens: int = 32
  peak_matmul_size: int = 2048  # n of the n×n×n matmul that measures the peak
  mesh: parallel.MeshConfig = dataclasses.field(default_factory=parallel.MeshConfig)
  seed: int = 0


def matmul_params(cfg: ModelConfig) -> int:
  """Parameters that take part in matrix multiplies for every token."""
  d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.resolved_head_dim
  attn = d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  mlp = d * f * (3 if cfg.mlp in ("swiglu", "geglu") else 2)  # gated MLPs have three matrices
  return cfg.num_layers * (attn + mlp) + d * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int, train: bool,
                    target_share: float = 1.0) -> float:
  """Model FLOPs per token, the LM head counted at the `target_share` of positions that have a
  target."""
  head = cfg.hidden_size * cfg.vocab_size
  params = matmul_params(cfg) - head + target_share * head
  attn = cfg.num_layers * cfg.num_heads * cfg.resolved_head_dim * seq_len
  if train:
    return 6.0 * params + 12.0 * attn
  return 2.0 * params + 4.0 * attn


def decode_flops(cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int) -> float:
  """Model FLOPs of greedy decoding: one pass over each prompt (the LM head on its last position
  only) and new_tokens − 1 one-token steps, every position attending over the whole cache of
  prompt_len + new_tokens slots (what the cached attention computes)."""
  head = 2.0 * cfg.hidden_size * cfg.vocab_size
  slots = prompt_len + new_tokens
  body = (2.0 * matmul_params(cfg) - head
          + 4.0 * cfg.num_layers * cfg.num_heads * cfg.resolved_head_dim * slots)
  return batch * ((prompt_len + new_tokens - 1) * body + new_tokens * head)


@dataclasses.dataclass
class Timing:
  compile_s: float
  seconds: list[float]

  @property
  def median(self) -> float:
    return statistics.median(self.seconds)

  def summary(self) -> dict[str, float]:
    return {"compile_s": round(self.compile_s, 3), "median_s": self.median,
            "min_s": min(self.seconds), "max_s": max(self.seconds)}


def measure(fn: Callable[[], Any], repeats: int) -> Timing:
  """Time the first call (compile + run) apart from `repeats` steady-state calls."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  compile_s = time.perf_counter() - start
  seconds = []
  for _ in range(max(repeats, 1)):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    seconds.append(time.perf_counter() - start)
  return Timing(compile_s, seconds)


def matmul_peak(n: int, dtype, repeats: int) -> tuple[float, Timing]:
  """FLOP/s of an n×n×n matmul in `dtype`: the practical peak the model is compared with."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  timing = measure(lambda: f(a, b), repeats)
  return 2.0 * n ** 3 / timing.median, timing


def _batch(cfg: ModelConfig, batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  loss_mask = np.zeros((batch, seq), np.int32)
  loss_mask[:, seq // 4:] = 1
  return {"tokens": rng.integers(0, cfg.vocab_size, (batch, seq)).astype(np.int32),
          "mask": np.ones((batch, seq), np.int32), "loss_mask": loss_mask,
          "example_id": np.arange(batch, dtype=np.int32)}


def run_bench(bench: BenchConfig) -> dict[str, Any]:
  try:
    cfg = ModelConfig.from_dict(bench.model)
  except TypeError as err:
    raise ConfigError(f"model: {err}") from None
  if bench.seq_len > cfg.max_position_embeddings and cfg.positions == "learned":
    raise ConfigError(f"seq_len={bench.seq_len} exceeds model.max_position_embeddings")
  mesh = parallel.make_mesh(bench.mesh)
  runtime = ModelRuntime.create(cfg, mesh)
  params = runtime.init_params(bench.seed)
  dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
  peak, peak_timing = matmul_peak(bench.peak_matmul_size, dtype, bench.repeats)
  peak *= len(mesh.devices.flat)  # the model runs on every device of the mesh
  out: dict[str, Any] = {
      "device": str(jax.devices()[0].device_kind), "devices": len(mesh.devices.flat),
      "dtype": cfg.dtype, "params_matmul_M": round(matmul_params(cfg) / 1e6, 2),
      "batch_size": bench.batch_size, "seq_len": bench.seq_len,
      "peak_tflops": peak / 1e12, "peak": peak_timing.summary()}
  tokens = bench.batch_size * bench.seq_len
  host_batch = _batch(cfg, bench.batch_size, bench.seq_len, bench.seed)
  targets = float(host_batch["loss_mask"][:, 1:].mean())  # position t-1 predicts target t
  out["target_share"] = targets
  batch = parallel.global_batch(host_batch, mesh)

  trainer = Trainer(runtime, OptimConfig(learning_rate=1e-5), total_steps=1000)
  holder = {"state": trainer.init_state(params)}

  def train_step():
    holder["state"], metrics = trainer.step(holder["state"], batch)
    return metrics["loss"]

  train = measure(train_step, bench.repeats)
  train_flops = flops_per_token(cfg, bench.seq_len, train=True, target_share=targets) * tokens
  out["train"] = {**train.summary(), "tokens_per_s": tokens / train.median,
                  "mfu": train_flops / train.median / peak, "traces": trainer.trace_count}

  scorer = Scorer(runtime)
  trained = holder["state"]["params"]
  score = measure(lambda: scorer.step(trained, batch), bench.repeats)
  score_flops = flops_per_token(cfg, bench.seq_len, train=False, target_share=targets) * tokens
  out["score"] = {**score.summary(), "examples_per_s": bench.batch_size / score.median,
                  "mfu": score_flops / score.median / peak}

  rng = np.random.default_rng(bench.seed)
  prompts = [rng.integers(4, cfg.vocab_size, bench.decode_prompt_len).tolist()
             for _ in range(bench.decode_batch)]
  sampling = SamplingConfig(max_new_tokens=bench.decode_new_tokens)
  # eos_id -1 never matches: every row decodes the whole budget, so token counts are exact.
  decode = lambda rows: generate(runtime.graphdef, trained, rows, eos_id=-1, pad_id=0,
                                 sampling=sampling)
  batched = measure(lambda: decode(prompts), max(1, bench.repeats // 2))
  single = measure(lambda: [decode([p]) for p in prompts], 1)
  new_tokens = bench.decode_batch * bench.decode_new_tokens
  # Both sides do the same model FLOPs; at the matmul peak the batch would take `at_peak`.
  at_peak = decode_flops(cfg, bench.decode_batch, bench.decode_prompt_len,
                         bench.decode_new_tokens) / peak
  out["decode"] = {"batched": {**batched.summary(), "tokens_per_s": new_tokens / batched.median,
                               "mfu": at_peak / batched.median},
                   "one_at_a_time": {**single.summary(), "tokens_per_s": new_tokens / single.median,
                                     "mfu": at_peak / single.median}}
  out["decode"]["speedup"] = single.median / batched.median
  out["decode"]["speedup_at_peak"] = single.median / at_peak
  return out


def format_table(result: dict[str, Any]) -> str:
  """A readable summary of `run_bench`'s result."""
  train, score, decode = result["train"], result["score"], result["decode"]
  rows = [
      ("matmul peak", f"{result['peak_tflops'] * 1e3:.1f} GFLOP/s", "", "",
       f"{result['peak']['compile_s']:.2f}"),
      ("train step", f"{train['tokens_per_s']:.0f} tokens/s", f"{100 * train['mfu']:.1f}%",
       _spread(train), f"{train['compile_s']:.2f}"),
      ("score step", f"{score['examples_per_s']:.1f} examples/s", f"{100 * score['mfu']:.1f}%",
       _spread(score), f"{score['compile_s']:.2f}"),
      ("decode, batch", f"{decode['batched']['tokens_per_s']:.0f} tokens/s",
       f"{100 * decode['batched']['mfu']:.1f}%", _spread(decode["batched"]),
       f"{decode['batched']['compile_s']:.2f}"),
      ("decode, one by one", f"{decode['one_at_a_time']['tokens_per_s']:.0f} tokens/s",
       f"{100 * decode['one_at_a_time']['mfu']:.1f}%", _spread(decode["one_at_a_time"]),
       f"{decode['one_at_a_time']['compile_s']:.2f}"),
  ]
  head = (f"{result['device']} x{result['devices']}, {result['dtype']}, "
          f"{result['params_matmul_M']}M matmul params, batch {result['batch_size']} x "
          f"seq {result['seq_len']}, targets at {100 * result['target_share']:.0f}% of positions")
  lines = [head, f"{'path':<20}{'throughput':>22}{'MFU':>8}{'median (min-max) s':>26}"
           f"{'first call s':>14}"]
  lines += [f"{a:<20}{b:>22}{c:>8}{d:>26}{e:>14}" for a, b, c, d, e in rows]
  lines.append(f"batched decoding is {decode['speedup']:.1f}x faster than one prompt at a time "
               f"(at most {decode['speedup_at_peak']:.1f}x: the batch's model FLOPs at the peak)")
  return "\n".join(lines)


def _spread(entry: dict[str, float]) -> str:
  return f"{entry['median_s']:.4f} ({entry['min_s']:.4f}-{entry['max_s']:.4f})"


def main(bench: BenchConfig, json_path: str | None = None) -> None:
  result = run_bench(bench)
  print(format_table(result))
  if json_path:
    write_json_atomic(json_path, result)
  if not math.isfinite(result["train"]["mfu"]):
    raise ConfigError("benchmark produced no finite timing")
