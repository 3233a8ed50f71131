"""The steps of one Cloud TPU slice's life as `gcloud` commands: create (or reuse), install, exec,
run, logs, teardown. Each command is printed before it runs; with --dry-run it is only printed.

`install` gives every worker Python >= 3.11 (TPU VM images ship Ubuntu 22.04's 3.10): a virtual
environment at ~/ff-jax-venv made by uv with a uv-managed CPython 3.11, and installs the ff-jax
wheel there with its `tpu` and `gcs` extras (the latter so that ff-jax on the workers reads and
writes `gs://` run directories and data itself). `exec` and `run` put that environment first on
PATH, so `ff-jax` and `hf` are the ones installed with the wheel. Nothing is mounted: commands
reach the workers with their `gs://` arguments as they are.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import time
from pathlib import Path

from ff_jax.errors import ConfigError
from launch.wheel import build_wheel
from launch.worker import VENV, pod_env, worker_argv

# Software versions of TPU VMs per generation (cloud.google.com/tpu/docs/runtimes).
RUNTIME_VERSIONS = {"v4": "tpu-ubuntu2204-base", "v5e": "v2-alpha-tpuv5-lite",
                    "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
LOG = "~/ff-jax.log"
PYTHON = "3.11"  # what CI runs; the jax/flax pins of pyproject.toml need >= 3.11
VENV_PYTHON = f"$HOME/{VENV}/bin/python"
UV = "$HOME/.local/bin/uv"
ON_PATH = f'export PATH="$HOME/{VENV}/bin:$PATH"'


def runtime_version(accelerator: str) -> str:
  generation = accelerator.split("-")[0]
  if generation not in RUNTIME_VERSIONS:
    raise ConfigError(f"--type {accelerator}: unknown TPU generation {generation!r}; give one of "
                      f"{', '.join(RUNTIME_VERSIONS)}, or the software version with --version")
  return RUNTIME_VERSIONS[generation]


class Slice:
  """Builds the gcloud commands of one slice; runs them, or prints them with --dry-run."""

  def __init__(self, args: argparse.Namespace):
    self.args = args
    self.where = ["--zone", args.zone] + (["--project", args.project] if args.project else [])

  def execute(self, cmd: list[str], check: bool = True) -> int:
    print("+ " + shlex.join(cmd), flush=True)
    if self.args.dry_run:
      return 0
    code = subprocess.run(cmd).returncode
    if check and code != 0:
      raise ConfigError(f"`{shlex.join(cmd[:5])} ...` failed with status {code}; see its output "
                        "above, fix that and run the same launch/tpu.py command again")
    return code

  def output(self, cmd: list[str]) -> str:
    if self.args.dry_run:
      print("+ " + shlex.join(cmd), flush=True)
      return ""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else ""

  def ssh(self, command: str, worker: str = "all") -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", self.args.name, *self.where,
            f"--worker={worker}", "--command", command]

  # -- steps -------------------------------------------------------------------------------------

  def create(self) -> None:
    a = self.args
    version = a.version or runtime_version(a.type)
    spot = ["--spot"] if a.spot else []
    if a.queued:
      qr = ["gcloud", "compute", "tpus", "queued-resources"]
      describe = [*qr, "describe", f"{a.name}-qr", *self.where, "--format=value(state.state)"]
      if self.output(describe):
        print(f"queued resource {a.name}-qr exists: reused")
      else:
        self.execute([*qr, "create", f"{a.name}-qr", "--node-id", a.name, *self.where,
                      "--accelerator-type", a.type, "--runtime-version", version, *spot])
      # A queued resource is granted when capacity frees up: wait for ACTIVE.
      while not a.dry_run and (state := self.output(describe)) != "ACTIVE":
        print(f"queued resource {a.name}-qr: {state or 'unknown'}; waiting", flush=True)
        time.sleep(a.poll_s)
      return
    vm = ["gcloud", "compute", "tpus", "tpu-vm"]
    if self.output([*vm, "describe", a.name, *self.where, "--format=value(state)"]):
      print(f"TPU VM {a.name} exists: reused")
      return
    self.execute([*vm, "create", a.name, *self.where, "--accelerator-type", a.type,
                  "--version", version, *spot])

  def install(self) -> None:
    a = self.args
    if a.wheel:
      wheel = Path(a.wheel)
      if not wheel.is_file() or wheel.suffix != ".whl":
        raise ConfigError(f"--wheel {a.wheel}: no such wheel file; leave --wheel out to build "
                          "one from this checkout")
    else:
      wheel = build_wheel(Path(a.dist))
    self.execute(["gcloud", "compute", "tpus", "tpu-vm", "scp", str(wheel), f"{a.name}:~/",
                  *self.where, "--worker=all"])
    self.execute(self.ssh(" && ".join([python_venv(), install_wheel(wheel.name)])))

  def exec(self) -> None:
    """A command on every worker in the foreground (downloads, checks), with the venv on PATH."""
    a = self.args
    if not a.command:
      raise ConfigError("exec: give the command after --, e.g. -- hf download "
                        "openai-community/gpt2-xl --local-dir models/gpt2-xl")
    self.execute(self.ssh(f"{ON_PATH} && {shlex.join(a.command)}"))

  def run(self) -> None:
    a = self.args
    argv = worker_argv(a.command, pod_env())
    # Detached (nohup, no terminal): the run outlives this SSH session; `logs` follows it.
    start = f"(nohup {shlex.join(argv)} > {LOG} 2>&1 < /dev/null &)"
    self.execute(self.ssh(f"{ON_PATH} && {start}"))

  def logs(self) -> None:
    self.execute(self.ssh(f"tail -n +1 -F {LOG}", worker=str(self.args.worker)), check=False)

  def teardown(self) -> None:
    a = self.args
    if a.queued:
      self.execute(["gcloud", "compute", "tpus", "queued-resources", "delete", f"{a.name}-qr",
                    *self.where, "--force", "--quiet"])
    else:
      self.execute(["gcloud", "compute", "tpus", "tpu-vm", "delete", a.name, *self.where,
                    "--quiet"])


def python_venv() -> str:
  """Make ~/ff-jax-venv with CPython 3.11 unless it holds Python >= 3.11 already. uv (installed
  with the image's pip) fetches a standalone CPython, so no apt repository or sudo is needed."""
  return (f"({VENV_PYTHON} -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || "
          f"((test -x {UV} || python3 -m pip install --user --quiet uv) && "
          f"{UV} venv --clear --seed --python {PYTHON} $HOME/{VENV}))")


def install_wheel(wheel: str) -> str:
  """Install the copied wheel with its `tpu` extra (libtpu) and `gcs` extra (gcsfs,
  google-cloud-storage: the workers read and write `gs://` paths themselves) into the venv. The
  old ff-jax is removed first: a rebuilt wheel keeps its version number, and pip would keep the
  installed one."""
  pip = f"{VENV_PYTHON} -m pip"
  return (f"{pip} uninstall --yes --quiet ff_jax && {pip} install --quiet "
          f"\"$HOME/{wheel}[tpu,gcs]\" && $HOME/{VENV}/bin/ff-jax --version")

