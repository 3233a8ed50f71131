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
# Where `--bucket` mounts a GCS bucket on every worker (gcsfuse): /gcs/BUCKET.
MOUNT = "/gcs"


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


def worker_argv(command: list[str], env: dict[str, str], bucket: str | None = None) -> list[str]:
  """`env K=V ... COMMAND`, with `gs://BUCKET/...` arguments moved onto the bucket's mount."""
  if not command:
    raise ConfigError("no command to run: give it after --, e.g. -- ff-jax run "
                      "configs/llama2-7b.yaml")
  return ["env", *(f"{key}={value}" for key, value in env.items()),
          *(on_mount(arg, bucket) for arg in command)]


def on_mount(arg: str, bucket: str | None) -> str:
  """`gs://BUCKET/x` in an argument (`--run-dir gs://BUCKET/x`, `data.noisy=gs://BUCKET/x`) ->
  `/gcs/BUCKET/x`, where BUCKET is the bucket every worker mounts."""
  if bucket and f"gs://{bucket}/" in arg:
    return arg.replace(f"gs://{bucket}/", f"{MOUNT}/{bucket}/")
  if "gs://" in arg:
    mounted = f"only --bucket {bucket} is mounted" if bucket else "no bucket is mounted"
    raise ConfigError(f"{arg}: {mounted}; on a pod pass --bucket with this path's bucket (every "
                      "worker mounts it), locally give a local path")
  return arg
