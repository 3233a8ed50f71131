"""`ff-jax plan CONFIG`: the memory a run needs per device, known before a pod is spent.

  ff-jax plan [CONFIG.yaml] [key=value ...] [--hbm-gib G] [--topology v4-32] [--json FILE]

Nothing is allocated: the model is planned from its config (the source's files, or a preset's
`model.config` when the weights are elsewhere), the train state and batches are
ShapeDtypeStructs with the run's shardings, and the train steps of the noisy and safety phases
and the score step are lowered and compiled ahead of time for the configured mesh. For each step
it prints parameter, optimizer and batch memory per device from the shardings, and XLA's own
memory analysis of the compiled program (arguments, outputs, temporaries such as activations).

A step fits when arguments + outputs - donated aliases + temporaries stay under the device
memory (`--hbm-gib`, else what the device reports, else the TPU generation's HBM). A plan that
does not fit is refused with the largest batch found to fit: compiled at the smallest batch the
mesh allows, then a few candidates between, each compiled and checked (see `largest_batch`).

On CPU the analysis is an upper bound for accelerators: XLA:CPU gathers FSDP-sharded weights
without a memory-aware schedule, so its temporaries hold whole gathered layers at once; plan
for TPU with `--topology` (libtpu) or on the GPU itself.

`--topology` compiles for a Cloud TPU slice without TPU hardware (needs `libtpu`, i.e.
`pip install 'ff-jax[tpu]'`); without it the mesh is built over this machine's devices (use
`XLA_FLAGS=--xla_force_host_platform_device_count=N` for N fake CPU devices).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import topologies

from ff_jax import parallel
from ff_jax.config import RunConfig
from ff_jax.errors import ConfigError
from ff_jax.pipeline.inputs import planned_model_config
from ff_jax.training.steps import ModelRuntime, OptimConfig, Scorer, Trainer

GIB = 2.0**30

# Cloud TPU slices by name -> (topology for jax.experimental.topologies, HBM per chip in GiB).
TPU_SLICES = {
    "v4-8": ("v4:2x2x1", 32), "v4-16": ("v4:2x2x2", 32), "v4-32": ("v4:2x2x4", 32),
    "v4-64": ("v4:2x4x4", 32), "v4-128": ("v4:4x4x4", 32),
    "v5e-8": ("v5e:2x4", 16), "v5e-16": ("v5e:4x4", 16), "v5e-32": ("v5e:4x8", 16),
    "v5p-8": ("v5p:2x2x1", 95), "v5p-32": ("v5p:2x2x4", 95),
    "v6e-8": ("v6e:2x4", 32), "v6e-16": ("v6e:4x4", 32),
}


@dataclasses.dataclass
class StepPlan:
  """Per-device memory of one compiled step (bytes)."""

  name: str
  batch: int
  seq_len: int
  params: int
  optimizer: int
  batch_bytes: int
  arguments: int
  outputs: int
  aliased: int
  temp: int
  compile_s: float
  largest_batch: int | None = None  # set when the step does not fit
  smallest_total: int | None = None  # total at the smallest batch, when it does not fit

  @property
  def total(self) -> int:
    return self.arguments + self.outputs - self.aliased + self.temp


def shard_bytes(tree: Any) -> int:
  """Bytes of one device's shards of a tree of ShapeDtypeStructs with shardings (the largest
  shard where uneven)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
  return total


def topology_devices(name: str) -> tuple[list[Any], float]:
  """(devices of a TPU slice described without hardware, HBM GiB per chip)."""
  if name not in TPU_SLICES:
    raise ConfigError(f"--topology {name}: unknown slice; known: {', '.join(TPU_SLICES)}")
  topology, hbm = TPU_SLICES[name]
  try:
    desc = topologies.get_topology_desc(topology_name=topology, platform="tpu")
  except Exception as err:  # noqa: BLE001 - no libtpu is the usual cause; say so with the error
    raise ConfigError(f"--topology {name}: compiling for TPU without hardware needs libtpu "
                      f"(pip install 'ff-jax[tpu]'): {type(err).__name__}: {err}") from None
  return list(desc.devices), float(hbm)


def device_memory_gib(devices: list[Any]) -> float | None:
  """What the first device reports as its memory limit (GPU/TPU), else None (CPU)."""
  try:
    stats = devices[0].memory_stats()
  except Exception:  # noqa: BLE001 - CPU and some runtimes have no memory stats
    return None
  limit = (stats or {}).get("bytes_limit")
  return limit / GIB if limit else None


def _abstract_batch(runtime: ModelRuntime, batch: int, seq_len: int) -> dict[str, Any]:
  parallel.check_batch_rows(batch, runtime.mesh, runtime.rules)
  shardings = parallel.batch_shardings(runtime.mesh, runtime.rules)
  shapes = {key: (batch, seq_len)[:rank] for key, rank in parallel.BATCH_RANKS.items()}
  return {key: jax.ShapeDtypeStruct(shapes[key], jnp.int32, sharding=shardings[key])
          for key in shardings}


def _compile(fn, *args) -> tuple[Any, float]:
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  return compiled.memory_analysis(), time.perf_counter() - start


def _analysis_bytes(analysis: Any) -> tuple[int, int, int, int]:
  if analysis is None:
    return 0, 0, 0, 0
  return (int(analysis.argument_size_in_bytes), int(analysis.output_size_in_bytes),
          int(analysis.alias_size_in_bytes), int(analysis.temp_size_in_bytes))


class Planner:
  """Compiles a run's steps for its mesh without allocating; see the module docstring."""

  def __init__(self, runtime: ModelRuntime):
    self.runtime = runtime
    self.params = runtime.abstract_with_shardings()
    self.param_bytes = shard_bytes(self.params)
    self.min_batch = math.prod(runtime.mesh.shape[a]
                               for a in parallel.data_axes(runtime.mesh, runtime.rules))

  def train_step(self, name: str, optim: OptimConfig, batch: int, seq_len: int) -> StepPlan:
    trainer = Trainer(self.runtime, optim, total_steps=1)
    state = trainer.abstract_state()
    data = _abstract_batch(self.runtime, batch, seq_len)
    analysis, seconds = _compile(trainer.step, state, data)
    return StepPlan(name, batch, seq_len, self.param_bytes, shard_bytes(state["opt_state"]),
                    shard_bytes(data), *_analysis_bytes(analysis), seconds)

  def score_step(self, batch: int, seq_len: int) -> StepPlan:
    scorer = Scorer(self.runtime)
    data = _abstract_batch(self.runtime, batch, seq_len)
    analysis, seconds = _compile(scorer.step, self.params, data)
    return StepPlan("score", batch, seq_len, self.param_bytes, 0, shard_bytes(data),
                    *_analysis_bytes(analysis), seconds)

  def largest_batch(self, plan: StepPlan, limit: float, recompile,
                    tries: int = 4) -> tuple[int, StepPlan | None]:
    """(the largest batch found to fit `limit`, 0 when not even the smallest batch the mesh
    allows fits; the plan at that smallest batch, None when the state alone does not fit).

    Temporaries are roughly linear in the batch, but XLA changes strategy at some sizes, so every
    candidate is compiled and checked: a secant search between the largest batch known to fit
    and the smallest known not to, at most `tries` compiles beyond the smallest batch.
    """
    step = self.min_batch
    if plan.total - plan.temp > limit:  # the state alone does not fit: no batch will
      return 0, None
    small = recompile(step)
    if small.total > limit:
      return 0, small
    fits, fails = small, plan
    for _ in range(tries):
      if fails.batch - fits.batch <= step:
        break
      per_row = max((fails.total - fits.total) / (fails.batch - fits.batch), 1.0)
      guess = fits.batch + int((limit - fits.total) // per_row) // step * step
      guess = min(max(guess, fits.batch + step), fails.batch - step)
      candidate = recompile(guess)
      if candidate.total <= limit:
        fits = candidate
      else:
        fails = candidate
    return fits.batch, small


def plan_run(cfg: RunConfig, hbm_gib: float | None = None,
             topology: str | None = None) -> dict[str, Any]:
  """Compile and measure every step of `cfg`'s run; raises ConfigError when one does not fit."""
  model_cfg = planned_model_config(cfg).replace(lora=cfg.lora)
  devices, slice_hbm = topology_devices(topology) if topology else (jax.devices(), None)
  limit_gib = hbm_gib or device_memory_gib(devices) or slice_hbm
  mesh = parallel.make_mesh(cfg.mesh, devices)
  runtime = ModelRuntime.create(model_cfg, mesh)
  planner = Planner(runtime)
  seq = cfg.data.max_len
  specs = [
      ("train (noisy, clean)", cfg.noisy, lambda b: planner.train_step(
          "train (noisy, clean)", cfg.noisy.optim, b, seq)),
      ("train (safety)", cfg.safety, lambda b: planner.train_step(
          "train (safety)", cfg.safety.optim, b, seq)),
      ("score", cfg.scoring, lambda b: planner.score_step(b, seq)),
  ]
  steps, compiled = [], {}
  for name, phase, compile_at in specs:
    key = (name.split()[0], phase.batch_size)
    if key in compiled:  # noisy and safety steps of one shape: the same program
      steps.append(dataclasses.replace(compiled[key], name=name))
      continue
    print(f"[plan] compiling {name} at batch {phase.batch_size} x {seq} ...", flush=True)
    step = compiled[key] = compile_at(phase.batch_size)
    if limit_gib is not None and step.total > limit_gib * GIB:
      step.largest_batch, smallest = planner.largest_batch(step, limit_gib * GIB, compile_at)
      step.smallest_total = smallest.total if smallest is not None else None
    steps.append(step)
  n_params = sum(math.prod(a.shape) for a in jax.tree.leaves(runtime.abstract_params))
  result = {
      "model": {"source": cfg.model.source, "params_B": n_params / 1e9,
                "dtype": model_cfg.dtype, "param_dtype": model_cfg.param_dtype,
                "layers": model_cfg.num_layers, "hidden": model_cfg.hidden_size},
      "mesh": dict(mesh.shape), "devices": len(devices),
      "platform": devices[0].platform, "topology": topology,
      "device_memory_gib": limit_gib,
      "steps": [{**dataclasses.asdict(s), "total": s.total} for s in steps],
  }
  return result


def refusal(result: dict[str, Any]) -> str | None:
  """The message refusing a plan whose steps do not fit, or None."""
  limit = result["device_memory_gib"]
  if limit is None:
    return None
  lines: list[str] = []
  reported: set[tuple[int, int]] = set()
  for step in result["steps"]:
    program = (step["batch"], step["total"])  # noisy and safety steps of one shape: one program
    if step["total"] <= limit * GIB or program in reported:
      continue
    reported.add(program)
    need = f"{step['name']} at batch {step['batch']} needs {step['total'] / GIB:.2f} GiB per device"
    if step["largest_batch"]:
      advice = (f"the largest batch found to fit (compiled and checked) is "
                f"{step['largest_batch']}, or keep the batch and raise optim.grad_accum_steps")
    elif step["smallest_total"] is None:
      state = (step["total"] - step["temp"]) / GIB
      advice = (f"parameters, optimizer state and gradients alone need {state:.2f} GiB, so no "
                "batch fits (shard over more devices with mesh.fsdp, or use LoRA)")
    else:
      advice = (f"{step['smallest_total'] / GIB:.2f} GiB at the smallest batch the mesh allows: "
                "no batch fits (shard over more devices with mesh.fsdp, model.remat, LoRA)")
    lines.append(f"{need}; {advice}")
  if not lines:
    return None
  return f"plan does not fit {limit:g} GiB per device: " + "; ".join(lines)


def table(result: dict[str, Any]) -> str:
  """A readable summary: one row per step, GiB per device."""
  model = result["model"]
  size = (f"{model['params_B']:.2f}B" if model["params_B"] >= 1 else
          f"{model['params_B'] * 1e3:.1f}M")
  head = (f"model {model['source']}: {size} parameters, {model['layers']} "
          f"layers x {model['hidden']}, compute {model['dtype']}, params {model['param_dtype']}\n"
          f"mesh {result['mesh']} on {result['devices']} {result['platform']} devices"
          + (f" (topology {result['topology']})" if result["topology"] else "")
          + (f", {result['device_memory_gib']:g} GiB each" if result["device_memory_gib"]
             else ", device memory unknown (pass --hbm-gib)"))
  cols = ("step", "batch x seq", "params", "optimizer", "batch", "XLA args", "XLA out",
          "donated", "XLA temp", "total", "compile s")
  rows = [cols]
  for s in result["steps"]:
    gib = [f"{s[k] / GIB:.3f}" for k in ("params", "optimizer", "batch_bytes", "arguments",
                                           "outputs", "aliased", "temp", "total")]
    rows.append((s["name"], f"{s['batch']} x {s['seq_len']}", *gib, f"{s['compile_s']:.1f}"))
  widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
  return "\n".join([head, "GiB per device:", *lines])
