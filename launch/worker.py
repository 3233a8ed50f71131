"""The command every worker process runs, built in one place for a pod's workers
(`launch/tpu.py run`) and for local processes (`launch/tpu.py local`): `env K=V ... COMMAND`.

Only the variables that tell a process how to find the others differ: on a pod Cloud TPU names the
coordinator and JAX discovers it (FF_JAX_DISTRIBUTED=1); locally the launcher names it and makes
each process a CPU host with its own fake devices. `ff_jax.parallel.initialize_distributed` reads
both.
"""

from __future__ import annotations

import os

from ff_jax.cpu_devices import cpu_device_flags
from ff_jax.errors import ConfigError

# The workers' virtual environment, under their home directory: Python >= 3.11 and ff-jax.
VENV = "ff-jax-venv"


def common_env() -> dict[str, str]:
  """What every worker gets: unbuffered output, as worker logs are files followed while they
  grow, and a progress line every 30 s (or every FF_JAX_PROGRESS_INTERVAL seconds of the
  launcher's own environment, e.g. 0 for every update)."""
  return {"FF_JAX_PROGRESS_INTERVAL": os.environ.get("FF_JAX_PROGRESS_INTERVAL", "30"),
          "PYTHONUNBUFFERED": "1"}


def pod_env() -> dict[str, str]:
  """The environment of a pod's worker: Cloud TPU tells JAX the coordinator and process count."""
  return {**common_env(), "FF_JAX_DISTRIBUTED": "1"}


def local_env(port: int, processes: int, process_id: int, devices: int) -> dict[str, str]:
  """The environment of local process `process_id` of `processes`, a CPU host with `devices`
  fake devices, coordinated on localhost:`port`."""
  return {**common_env(), "FF_JAX_COORDINATOR": f"localhost:{port}",
          "FF_JAX_NUM_PROCESSES": str(processes), "FF_JAX_PROCESS_ID": str(process_id),
          "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": cpu_device_flags(devices)}


def worker_argv(command: list[str], env: dict[str, str]) -> list[str]:
  """`env K=V ... COMMAND`. The command's arguments are passed as they are: ff-jax reads and
  writes `gs://` run directories and data itself, so nothing is mounted or rewritten."""
  if not command:
    raise ConfigError("no command to run: give it after --, e.g. -- ff-jax run "
                      "configs/llama2-7b.yaml")
  return ["env", *(f"{key}={value}" for key, value in env.items()), *command]
