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

Replica passes (`scoring.replicas` > 1 or `scoring.noisy_replicas` > 1): the stacked train steps
and the stacked score step of a pass of K replicas (`Trainer(..., replicas=K)`) are compiled the
same way, with what the pass keeps alive beside them (the model it starts from; its moments
while it scores; ff_jax.training.memory.PassPlan). The plan sets how many replicas a pass stacks
as the run will (`pass_size`: `scoring.replicas_per_pass: auto` stacks on an accelerator only,
as many as fit) and never more than fit the device memory: a stack that does not fit is lowered,
down to one at a time, and the plan is refused only when even one replica per pass does not fit.

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
import os
from typing import Any

import jax
from jax.experimental import topologies

from ff_jax import parallel
from ff_jax.config import RunConfig
from ff_jax.data.widths import AUTO
from ff_jax.errors import ConfigError
from ff_jax.pipeline.inputs import planned_model_config
from ff_jax.training.memory import (
  GIB,
  PassFinetune,
  PassPlan,
  Planner,
  StepPlan,
  device_memory_gib,
  pass_size,
)
from ff_jax.training.steps import ModelRuntime


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  """A Cloud TPU slice as JAX sees it on the slice: `chips` devices with `hbm_gib` each for a
  program (what libtpu makes available: its out-of-memory message names it; a v4 chip's 32 GiB
  leave 30.75). v4 and v5p chips have two TensorCores that JAX runs as one device (megacore), so
  the compile-only topology is asked for in that configuration too; libtpu's default for v4 would
  be one device per core with half the chip's memory, a machine a run does not use."""

  topology: str  # for jax.experimental.topologies.get_topology_desc
  chips: int
  hbm_gib: float
  megacore: bool = False


# Cloud TPU slices by name; the number in a v4/v5p name counts TensorCores, two per chip.
TPU_SLICES = {
    "v4-8": TpuSlice("v4:2x2x1", 4, 30.75, True), "v4-16": TpuSlice("v4:2x2x2", 8, 30.75, True),
    "v4-32": TpuSlice("v4:2x2x4", 16, 30.75, True),
    "v4-64": TpuSlice("v4:2x4x4", 32, 30.75, True),
    "v4-128": TpuSlice("v4:4x4x4", 64, 30.75, True),
    "v5e-8": TpuSlice("v5e:2x4", 8, 15.75), "v5e-16": TpuSlice("v5e:4x4", 16, 15.75),
    "v5e-32": TpuSlice("v5e:4x8", 32, 15.75),
    "v5p-8": TpuSlice("v5p:2x2x1", 4, 95.74, True),
    "v5p-32": TpuSlice("v5p:2x2x4", 16, 95.74, True),
    "v6e-8": TpuSlice("v6e:2x4", 8, 31.25), "v6e-16": TpuSlice("v6e:4x4", 16, 31.25),
}


def topology_devices(name: str) -> tuple[list[Any], float]:
  """(devices of a TPU slice described without hardware, HBM GiB per device)."""
  if name not in TPU_SLICES:
    raise ConfigError(f"--topology {name}: unknown slice; known: {', '.join(TPU_SLICES)}")
  spec = TPU_SLICES[name]
  extra = {"chip_config_name": "megacore"} if spec.megacore else {}
  # libtpu takes a machine-wide lock file when it loads, for the TPU it would drive; compiling
  # for a described slice drives none, and a second process (a plan beside a test, or two plans)
  # would be refused.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    desc = topologies.get_topology_desc(topology_name=spec.topology, platform="tpu", **extra)
  except Exception as err:  # noqa: BLE001 - no libtpu is the usual cause; say so with the error
    raise ConfigError(f"--topology {name}: compiling for TPU without hardware needs libtpu "
                      f"(pip install 'ff-jax[tpu]'): {type(err).__name__}: {err}") from None
  devices = list(desc.devices)
  if len(devices) != spec.chips:  # a libtpu that lays the slice out otherwise: say so, not plan
    raise ConfigError(f"--topology {name}: libtpu describes {len(devices)} devices, but the "
                      f"slice runs as {spec.chips}")
  return devices, float(spec.hbm_gib)


def replica_phases(cfg: RunConfig) -> list[tuple[str, int, list[PassFinetune]]]:
  """(phase, extra replicas, the finetunes of one pass) of each ensemble phase the run trains,
  as ff_jax.pipeline.ensembles trains them."""
  phases = []
  if cfg.scoring.replicas > 1:
    phases.append(("safety_replicas", cfg.scoring.replicas - 1,
                   [PassFinetune("safety", cfg.safety.optim, cfg.safety.batch_size)]))
  if cfg.scoring.noisy_replicas > 1:
    phases.append(("noisy_replicas", cfg.scoring.noisy_replicas - 1, [
        PassFinetune("noisy", cfg.noisy.optim, cfg.noisy.batch_size),
        PassFinetune("safety", cfg.safety.optim, cfg.safety.batch_size, stacked_init=True)]))
  return phases


def plan_passes(cfg: RunConfig, planner: Planner, platform: str,
                limit_gib: float | None) -> list[dict[str, Any]]:
  """Each ensemble phase's replica passes: the stacked steps compiled at the stack the config
  asks for, and the stack the run uses, lowered to what fits `limit_gib`."""
  limit = limit_gib * GIB if limit_gib else None
  entries = []
  for phase, extra, finetunes in replica_phases(cfg):
    plan = PassPlan(planner, finetunes, cfg.scoring.batch_size, cfg.data.max_len)
    # LoRA trains one replica at a time (the stacked step would train every parameter).
    setting = 1 if cfg.lora.rank else cfg.scoring.replicas_per_pass
    most = extra if setting in ("auto", 0) else min(setting, extra)
    print(f"[plan] compiling {phase}: a pass of {most} of {extra} replicas ...", flush=True)
    plan.peak(most)  # what the configured stack needs, reported even where it is not used
    fit = most if limit is None else plan.largest_fitting(most, limit)
    wanted, why = pass_size(setting, extra, platform, limit, plan)
    per_pass = min(wanted, fit)
    if 0 < per_pass < wanted:
      why = (f"{wanted} per pass needs {plan.peak(wanted) / GIB:.2f} GiB: lowered to "
             f"{per_pass}, the largest stack that fits"
             + ("" if setting == "auto" else f" (set scoring.replicas_per_pass={per_pass})"))
    # The stack asked for, the one used, and one replica (the ordinary steps) to compare.
    shown = sorted({most, max(per_pass, 1), 1}, reverse=True)
    entries.append({
        "phase": phase, "replicas": extra, "setting": setting, "per_pass": per_pass,
        "fits": fit if limit is not None else None, "why": why,
        "stacks": [{"k": k, "peak": plan.peak(k),
                    "steps": [_step_dict(step) for step in plan.steps(k)]} for k in shown]})
  return entries


def _reported(compile_at, limit_gib: float):
  """`compile_at` that prints each candidate batch of a search as it is compiled and checked."""

  def compiled(batch: int) -> StepPlan:
    step = compile_at(batch)
    verdict = "fits" if step.fits(limit_gib * GIB) else "does not fit"
    print(f"[plan]   batch {batch}: {step.total / GIB:.3f} GiB, {verdict} "
          f"({step.compile_s:.1f} s)", flush=True)
    return step

  return compiled


def _step_dict(step: StepPlan) -> dict[str, Any]:
  return {**dataclasses.asdict(step), "total": step.total}


def plan_run(cfg: RunConfig, hbm_gib: float | None = None,
             topology: str | None = None) -> dict[str, Any]:
  """Compile and measure every step of `cfg`'s run, and its replica passes; `refusal` says
  whether it fits."""
  if cfg.data.max_len == AUTO:
    # A run resolves it from its rows (ff_jax.data.widths); plan reads no data.
    raise ConfigError("ff-jax plan: data.max_len=auto is the width of the longest row of the "
                      "data, which plan does not read; set the width to compile for, e.g. "
                      "data.max_len=512")
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
  steps = []
  for name, phase, compile_at in specs:
    print(f"[plan] compiling {name} at batch {phase.batch_size} x {seq} ...", flush=True)
    step = compile_at(phase.batch_size)  # a program of one shape is compiled once (Planner)
    if limit_gib is not None and not step.fits(limit_gib * GIB):
      print(f"[plan] {name} does not fit {limit_gib:g} GiB: looking for a batch that does ...",
            flush=True)
      step.largest_batch, smallest = planner.largest_batch(step, limit_gib * GIB,
                                                           _reported(compile_at, limit_gib))
      step.smallest_total = smallest.total if smallest is not None else None
      if step.largest_batch and name.startswith("train"):
        step.accum_that_fits = planner.accumulation_that_fits(
            step, limit_gib * GIB, step.largest_batch,
            lambda k, name=name, optim=phase.optim, batch=step.batch: planner.train_step(
                name, dataclasses.replace(optim, grad_accum_steps=k), batch, seq))
    steps.append(step)
  n_params = sum(math.prod(a.shape) for a in jax.tree.leaves(runtime.abstract_params))
  return {
      "model": {"source": cfg.model.source, "params_B": n_params / 1e9,
                "dtype": model_cfg.dtype, "param_dtype": model_cfg.param_dtype,
                "layers": model_cfg.num_layers, "hidden": model_cfg.hidden_size},
      "mesh": dict(mesh.shape), "devices": len(devices),
      "platform": devices[0].platform, "topology": topology,
      "device_memory_gib": limit_gib,
      "steps": [_step_dict(s) for s in steps],
      "replica_passes": plan_passes(cfg, planner, devices[0].platform, limit_gib),
  }


def refusal(result: dict[str, Any]) -> str | None:
  """The message refusing a plan whose steps do not fit, or None."""
  limit = result["device_memory_gib"]
  if limit is None:
    return None
  lines: list[str] = []
  reported: set[tuple[int, int]] = set()
  for step in result["steps"]:
    program = (step["batch"], step["total"])  # noisy and safety steps of one shape: one program
    fits = step["total"] <= limit * GIB and not step.get("out_of_memory")
    if fits or program in reported:
      continue
    reported.add(program)
    need = f"{step['name']} at batch {step['batch']} needs {step['total'] / GIB:.2f} GiB per device"
    if step.get("out_of_memory"):
      need += f" (the compiler: {step['out_of_memory']})"
    if step["largest_batch"]:
      accum = step.get("accum_that_fits")
      keep = (f"keep the batch with optim.grad_accum_steps={accum} (compiled and checked)"
              if accum else "keep the batch and raise optim.grad_accum_steps")
      advice = (f"the largest batch found to fit (compiled and checked) is "
                f"{step['largest_batch']}, or {keep}")
    elif step["smallest_total"] is None:
      state = (step["total"] - step["temp"]) / GIB
      advice = (f"parameters, optimizer state and gradients alone need {state:.2f} GiB, so no "
                "batch fits (shard over more devices with mesh.fsdp, or use LoRA)")
    else:
      advice = (f"{step['smallest_total'] / GIB:.2f} GiB at the smallest batch the mesh allows: "
                "no batch fits (shard over more devices with mesh.fsdp, model.remat, LoRA)")
    lines.append(f"{need}; {advice}")
  for entry in result.get("replica_passes", []):
    if entry["per_pass"] == 0 and not lines:  # a step that does not fit is the cause: said above
      one = next(s for s in entry["stacks"] if s["k"] == 1)
      lines.append(f"{entry['phase']}: even one replica per pass needs {one['peak'] / GIB:.2f} "
                   "GiB per device with the model it starts from (shard over more devices with "
                   "mesh.fsdp, lower scoring.batch_size, or use LoRA)")
  if not lines:
    return None
  return f"plan does not fit {limit:g} GiB per device: " + "; ".join(lines)


def table(result: dict[str, Any]) -> str:
  """A readable summary: one row per step and per stacked pass's step, GiB per device, and
  how many replicas each ensemble phase's pass stacks."""
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
          "donated", "XLA temp", "held", "total", "compile s")
  passes = result.get("replica_passes", [])
  named = [("", s) for s in result["steps"]]
  named += [(f"{e['phase']}: ", s) for e in passes for stack in e["stacks"]
            for s in stack["steps"]]
  rows = [cols]
  refused = []
  for prefix, s in named:
    gib = [f"{s[k] / GIB:.3f}" for k in ("params", "optimizer", "batch_bytes", "arguments",
                                           "outputs", "aliased", "temp", "resident", "total")]
    if s.get("out_of_memory"):  # the compiler's refusal names its temporaries only
      gib[3:7] = ["-", "-", "-", f">{gib[6]}*"]
      gib[8] = f">{gib[8]}*"
      refused.append(f"* {prefix}{s['name']} at batch {s['batch']}: {s['out_of_memory']}")
    rows.append((prefix + s["name"], f"{s['batch']} x {s['seq_len']}", *gib,
                 f"{s['compile_s']:.1f}"))
  widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows] + refused
  lines += [f"{e['phase']}: {e['replicas']} more replicas, "
            + (f"{e['per_pass']} per pass ({e['why']})" if e["per_pass"] else
               "not even one per pass fits")
            + "; peak per device: " + ", ".join(f"{s['peak'] / GIB:.3f} GiB at {s['k']} stacked"
                                                 for s in e["stacks"])
            for e in passes]
  return "\n".join([head, "GiB per device (held: what a replica pass keeps alive beside the "
                           "step):", *lines])
