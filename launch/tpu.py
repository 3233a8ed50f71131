#!/usr/bin/env python3
"""Run ff-jax on a Cloud TPU slice: create (or reuse) it, install, run on every worker, stream
logs, tear down. Every step is a `gcloud` command; `--dry-run` prints them instead of running.

  launch/tpu.py [--dry-run] create   --name N --zone Z --type v4-32 [--queued] [--spot]
  launch/tpu.py [--dry-run] install  --name N --zone Z [--wheel dist/ff_jax-*.whl] [--bucket B]
  launch/tpu.py [--dry-run] run      --name N --zone Z [--bucket B] -- ff-jax run CONFIG ...
  launch/tpu.py [--dry-run] logs     --name N --zone Z [--worker 0]
  launch/tpu.py [--dry-run] teardown --name N --zone Z [--queued]
  launch/tpu.py [--dry-run] up       ... -- ff-jax run CONFIG ...   (create, install, run, logs)

A pod is many hosts running one JAX program: `run` starts the same command on every worker
(`--worker=all`), detached so a dropped SSH session does not kill it, with FF_JAX_DISTRIBUTED=1 so
ff-jax calls `jax.distributed.initialize()` (Cloud TPU discovers the coordinator itself). The
workers must share the run directory: `--bucket` mounts a GCS bucket with gcsfuse at
/gcs/BUCKET on every worker, and any `gs://BUCKET/...` argument of the command is rewritten to
that mount, so Orbax checkpoints and run artifacts land in the bucket. See launch/README.md.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time

# Software versions of TPU VMs per generation (cloud.google.com/tpu/docs/runtimes).
RUNTIME_VERSIONS = {"v4": "tpu-ubuntu2204-base", "v5e": "v2-alpha-tpuv5-lite",
                    "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
LOG = "~/ff-jax.log"
MOUNT = "/gcs"


def runtime_version(accelerator: str) -> str:
  generation = accelerator.split("-")[0]
  if generation not in RUNTIME_VERSIONS:
    raise SystemExit(f"--type {accelerator}: unknown TPU generation {generation!r}; known: "
                     f"{', '.join(RUNTIME_VERSIONS)} (or pass --version)")
  return RUNTIME_VERSIONS[generation]


class Gcloud:
  """Builds the gcloud commands of one slice; runs them, or prints them with --dry-run."""

  def __init__(self, args: argparse.Namespace):
    self.args = args
    self.where = ["--zone", args.zone] + (["--project", args.project] if args.project else [])

  def execute(self, cmd: list[str], check: bool = True) -> int:
    print("+ " + shlex.join(cmd), flush=True)
    if self.args.dry_run:
      return 0
    return subprocess.run(cmd, check=check).returncode

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
      if self.output([*qr, "describe", f"{a.name}-qr", *self.where,
                      "--format=value(state.state)"]):
        print(f"queued resource {a.name}-qr exists: reused")
      else:
        self.execute([*qr, "create", f"{a.name}-qr", "--node-id", a.name, *self.where,
                      "--accelerator-type", a.type, "--runtime-version", version, *spot])
      # A queued resource is granted when capacity frees up: wait for ACTIVE.
      describe = [*qr, "describe", f"{a.name}-qr", *self.where, "--format=value(state.state)"]
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
    steps = []
    if a.wheel:
      wheel = a.wheel.rsplit("/", 1)[-1]
      self.execute(["gcloud", "compute", "tpus", "tpu-vm", "scp", a.wheel, f"{a.name}:~/",
                    *self.where, "--worker=all"])
      steps.append(f'python3 -m pip install -U "$HOME/{wheel}[tpu]"')
    else:
      steps.append(f"python3 -m pip install -U {shlex.quote(a.package)}")
    if a.bucket:
      steps.append(_gcsfuse_install())
    self.execute(self.ssh(" && ".join(steps)))

  def run(self) -> None:
    a = self.args
    if not a.command:
      raise SystemExit("run: give the command after --, e.g. -- ff-jax run configs/llama2-7b.yaml")
    command = [_on_mount(arg, a.bucket) for arg in a.command]
    env = "FF_JAX_DISTRIBUTED=1 FF_JAX_PROGRESS_INTERVAL=30"
    script = f"{env} {shlex.join(command)}"
    prefix = _mount_command(a.bucket) + " && " if a.bucket else ""
    # Detached: the run outlives this SSH session; `logs` follows it.
    self.execute(self.ssh(f"{prefix}nohup sh -c {shlex.quote(script)} > {LOG} 2>&1 &"))

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


def _gcsfuse_install() -> str:
  return ("(command -v gcsfuse >/dev/null || (export GCSFUSE_REPO=gcsfuse-$(lsb_release -c -s) "
          "&& echo \"deb https://packages.cloud.google.com/apt $GCSFUSE_REPO main\" | sudo tee "
          "/etc/apt/sources.list.d/gcsfuse.list && curl -fsSL "
          "https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add - && sudo "
          "apt-get update -q && sudo apt-get install -yq gcsfuse))")


def _mount_command(bucket: str) -> str:
  path = f"{MOUNT}/{bucket}"
  return (f"sudo mkdir -p {path} && sudo chown $USER {path} && (mountpoint -q {path} || "
          f"gcsfuse --implicit-dirs --rename-dir-limit=200000 {bucket} {path})")


def _on_mount(arg: str, bucket: str | None) -> str:
  """`gs://BUCKET/x` in an argument (`--run-dir gs://BUCKET/x`) -> `/gcs/BUCKET/x` where BUCKET
  is the mounted bucket."""
  if bucket and f"gs://{bucket}/" in arg:
    return arg.replace(f"gs://{bucket}/", f"{MOUNT}/{bucket}/")
  if "gs://" in arg:
    raise SystemExit(f"{arg}: a gs:// path needs --bucket so that every worker mounts it")
  return arg


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="launch/tpu.py", description=__doc__.split("\n")[0])
  parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  sub = parser.add_subparsers(dest="step", required=True)
  for step in ("create", "install", "run", "logs", "teardown", "up"):
    p = sub.add_parser(step)
    p.add_argument("--name", required=True, help="TPU VM (node) name")
    p.add_argument("--zone", required=True)
    p.add_argument("--project")
    p.add_argument("--type", default="v4-32", help="accelerator type, e.g. v4-32, v5p-64")
    p.add_argument("--version", help="TPU software version (default: per generation)")
    p.add_argument("--queued", action="store_true", help="through a queued resource")
    p.add_argument("--spot", action="store_true")
    p.add_argument("--poll-s", type=float, default=60.0)
    p.add_argument("--package", default="ff-jax[tpu]", help="pip requirement to install")
    p.add_argument("--wheel", help="a local ff-jax wheel to copy to the workers and install")
    p.add_argument("--bucket", help="GCS bucket (no gs://) mounted at /gcs/BUCKET on workers")
    p.add_argument("--worker", default="0", help="logs: which worker to follow")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- the command to run")
  return parser


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  if args.command[:1] == ["--"]:
    args.command = args.command[1:]
  if args.bucket and args.bucket.startswith("gs://"):
    args.bucket = args.bucket.removeprefix("gs://").rstrip("/")
  gcloud = Gcloud(args)
  steps = ["create", "install", "run", "logs"] if args.step == "up" else [args.step]
  for step in steps:
    getattr(gcloud, step)()
  return 0


if __name__ == "__main__":
  sys.exit(main())
