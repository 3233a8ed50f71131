"""Programs compiled ahead of time for a Cloud TPU slice (libtpu, no TPU), in a process of their
own: `python -m tests.helpers.tpu_programs WHAT [ARG ...]` prints one JSON line.

libtpu carries its own copy of XLA; the test process that loaded it to compile for a TPU later
crashed (segfaults) compiling and deserialising CPU programs, so `tests/perf/test_tpu_compile.py`
never loads it itself.

  steps SLICE      a small model's train, stacked train, score and stacked score steps on SLICE:
                   per program whether it holds the splash kernel, its largest float32 array
                   (elements) and XLA's temporaries; the per-device size of the old logits
  programs         the TINY config's noisy train and score steps at batch 16 on v5e-8, built as a
                   run builds them: XLA's argument and temporary bytes
  fits BATCH GIB   whether the TINY config's noisy train step at BATCH fits GIB per device
  accumulation     the accumulation search on the TINY config: (micro-batches found, whether
                   it and 2 fit the limit between batch 64 and 256's totals)
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

from ff_jax import parallel
from ff_jax.config import load_config
from ff_jax.models import tiny_llama
from ff_jax.perf.plan import topology_devices
from ff_jax.pipeline.inputs import planned_model_config
from ff_jax.training.memory import GIB, Planner
from ff_jax.training.steps import ModelRuntime, OptimConfig, Scorer, Trainer

# Gemma-3-like: a sliding-window layer and a global one (the kernel choice is data in the scan),
# grouped-query heads; rows of 256 slots, every device holding 4 of them. A vocabulary of 64k
# makes the head's tiles 256 positions (ff_jax.models.layout.TILE_BYTES) of a device's 1020.
MODEL = tiny_llama(hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
                   intermediate_size=512, vocab_size=65536, dtype="bfloat16", qk_norm=True,
                   layer_types=("sliding_attention", "full_attention"), sliding_window=64)
LENGTH = 256

TINY = ["model.config.hidden_size=128", "model.config.num_layers=2",
        "model.config.num_heads=2", "model.config.num_kv_heads=1",
        "model.config.intermediate_size=256", "scoring.noisy_replicas=1", "scoring.replicas=1",
        "filter.signal=nll", "noisy.batch_size=16", "safety.batch_size=8",
        "scoring.batch_size=16"]


def _batch(runtime, rows, length, replicas=None):
  shardings = parallel.batch_shardings(runtime.mesh, runtime.rules, stacked=replicas is not None)
  lead = () if replicas is None else (replicas,)
  return {key: jax.ShapeDtypeStruct((*lead, rows, length)[:len(lead) + rank], jnp.int32,
                                    sharding=shardings[key])
          for key, rank in parallel.BATCH_RANKS.items()}


def _largest_f32(hlo: str) -> int:
  return max(int(np.prod([int(d) for d in dims.split(",") if d]))
             for dims in re.findall(r"f32\[([\d,]*)\]", hlo))


def steps(slice_name: str) -> dict:
  devices, hbm = topology_devices(slice_name)
  runtime = ModelRuntime.create(MODEL, parallel.make_mesh(parallel.MeshConfig(1, -1, 1), devices))
  layout = runtime.step_layout()
  rows = 4 * len(devices)
  trainer = Trainer(runtime, OptimConfig(), 10)
  stacked = Trainer(runtime, OptimConfig(), 10, replicas=2)
  scorer = Scorer(runtime)
  params = runtime.abstract_with_shardings()
  snapshots = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
      (2, *a.shape), a.dtype, sharding=parallel.stack_sharding(a.sharding)), params)
  lowered = {
      "train": trainer.step.lower(trainer.abstract_state(), _batch(runtime, rows, LENGTH)),
      "stacked train": stacked.step.lower(stacked.abstract_state(),
                                          _batch(runtime, rows, LENGTH, 2)),
      "score": scorer.step.lower(params, _batch(runtime, rows, LENGTH)),
      "stacked score": scorer.stacked_step.lower(snapshots, _batch(runtime, rows, LENGTH)),
  }
  programs = {}
  for name, program in lowered.items():
    compiled = program.compile()
    hlo = compiled.as_text()
    programs[name] = {"splash": "tpu_custom_call" in hlo, "largest_f32": _largest_f32(hlo),
                      "temp": compiled.memory_analysis().temp_size_in_bytes}
  return {"devices": len(devices), "platform": devices[0].platform, "hbm_gib": hbm,
          "layout_platform": layout.platform, "groups": layout.groups,
          "logits_per_device": 4 * (LENGTH - 1) * MODEL.vocab_size, "programs": programs}


def _tiny_runtime(*overrides):
  cfg = load_config(None, [*TINY, *overrides])
  devices, _ = topology_devices("v5e-8")
  return cfg, ModelRuntime.create(planned_model_config(cfg), parallel.make_mesh(cfg.mesh, devices))


def programs() -> dict:
  cfg, runtime = _tiny_runtime()
  trainer = Trainer(runtime, cfg.noisy.optim, 1)
  train = trainer.step.lower(trainer.abstract_state(),
                             _batch(runtime, 16, cfg.data.max_len)).compile().memory_analysis()
  score = Scorer(runtime).step.lower(runtime.abstract_with_shardings(),
                                     _batch(runtime, 16, cfg.data.max_len)
                                     ).compile().memory_analysis()
  return {name: {"temp": a.temp_size_in_bytes, "arguments": a.argument_size_in_bytes}
          for name, a in (("train (noisy, clean)", train), ("score", score))}


def fits(batch: int, gib: float) -> dict:
  cfg, runtime = _tiny_runtime()
  step = Planner(runtime).train_step("t", cfg.noisy.optim, batch, cfg.data.max_len)
  return {"fits": step.fits(gib * GIB), "total": step.total}


def accumulation() -> dict:
  cfg, runtime = _tiny_runtime()
  planner = Planner(runtime)

  def at(batch, accum=1):
    optim = dataclasses.replace(cfg.noisy.optim, grad_accum_steps=accum)
    return planner.train_step("t", optim, batch, cfg.data.max_len)

  big, small = at(256), at(64)
  limit = (small.total + big.total) / 2
  accum = planner.accumulation_that_fits(big, limit, 128, lambda k: at(256, k))
  return {"big_fits": big.fits(limit), "small_fits": small.fits(limit), "accum": accum,
          "accum_fits": bool(accum) and at(256, accum).fits(limit),
          "two_fits": at(256, 2).fits(limit)}


if __name__ == "__main__":
  what, args = sys.argv[1], sys.argv[2:]
  result = {"steps": lambda: steps(args[0]), "programs": programs,
            "fits": lambda: fits(int(args[0]), float(args[1])),
            "accumulation": accumulation}[what]()
  print(json.dumps(result))
