#!/usr/bin/env python3
"""Run ff-jax on a Cloud TPU slice, or as the same workers on this machine.

Pod steps are `gcloud` commands; `--dry-run` prints them instead of running them (a wheel is still
built: it is local).

  launch/tpu.py [--dry-run] create   --name N --zone Z [--type v4-32] [--queued] [--spot]
  launch/tpu.py [--dry-run] install  --name N --zone Z [--wheel FILE.whl]
  launch/tpu.py [--dry-run] exec     --name N --zone Z -- hf download ORG/NAME ...
  launch/tpu.py [--dry-run] run      --name N --zone Z -- ff-jax run CONFIG ...
  launch/tpu.py [--dry-run] logs     --name N --zone Z [--worker 0]
  launch/tpu.py [--dry-run] teardown --name N --zone Z [--queued]
  launch/tpu.py [--dry-run] up       --name N --zone Z ... -- ff-jax run CONFIG ...
                                     (create, install, run, logs)
  launch/tpu.py [--dry-run] local    --processes N [--devices-per-process D] -- ff-jax run ...

`install` builds a wheel of this checkout (offline, into dist/), copies it to every worker and
installs it with its `tpu` and `gcs` extras into ~/ff-jax-venv, a Python 3.11 environment it makes
with uv. A pod is many hosts running one JAX program: `run` starts the same command on every
worker (`--worker=all`), detached, as `env FF_JAX_DISTRIBUTED=1 ... COMMAND`, so ff-jax calls
`jax.distributed.initialize()` (Cloud TPU names the coordinator). `local` runs that same worker
command as N processes here, on CPU, coordinated on a free localhost port. The workers must share
the run directory: on a pod it is `--run-dir gs://BUCKET/...`, which ff-jax reads and writes
itself (Orbax writes the checkpoints to the bucket directly), so the command's arguments reach
every worker as they are and nothing is mounted. See launch/README.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# The launcher runs from a checkout, before (or without) ff-jax being installed here.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ff_jax.errors import ConfigError, FFJaxError  # noqa: E402
from launch.local import run_local  # noqa: E402
from launch.pod import Slice  # noqa: E402
from launch.wheel import REPO  # noqa: E402

POD_STEPS = {
    "create": "create the slice, or reuse it if it exists",
    "install": "install ff-jax (a wheel of this checkout) in a Python 3.11 venv on every worker",
    "exec": "run a command on every worker in the foreground, the venv first on PATH",
    "run": "start the command on every worker, detached, as one multi-host JAX program",
    "logs": "follow a worker's log",
    "teardown": "delete the slice",
    "up": "create, install, run and logs in one go",
}
WITH_COMMAND = ("exec", "run", "up")


def _parser() -> argparse.ArgumentParser:
  # No abbreviations: a command written down (README, presets) must name options in full.
  parser = argparse.ArgumentParser(prog="launch/tpu.py", description=__doc__.split("\n")[0],
                                   allow_abbrev=False)
  parser.add_argument("--dry-run", action="store_true",
                      help="print the gcloud commands and the local processes, run none of them")
  sub = parser.add_subparsers(dest="step", required=True)
  for step, help_text in POD_STEPS.items():
    p = sub.add_parser(step, help=help_text, description=help_text, allow_abbrev=False)
    p.add_argument("--name", required=True, help="TPU VM (node) name")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", help="GCP project (default: gcloud's)")
    if step in ("create", "up"):
      p.add_argument("--type", default="v4-32", help="accelerator type, e.g. v4-32, v5p-64")
      p.add_argument("--version", help="TPU software version (default: per generation)")
      p.add_argument("--spot", action="store_true", help="preemptible capacity")
      p.add_argument("--poll-s", type=float, default=60.0,
                     help="--queued: seconds between checks of the queued resource")
    if step in ("create", "teardown", "up"):
      p.add_argument("--queued", action="store_true", help="through a queued resource")
    if step in ("install", "up"):
      p.add_argument("--wheel", help="install this prebuilt ff-jax wheel instead of building one")
      p.add_argument("--dist", default=str(REPO / "dist"),
                     help="where the wheel of this checkout is built (default: dist/)")
    if step in ("install", "exec", "run", "up"):
      # Gone (see _launch), kept out of the help only to tell a user who still passes it why.
      p.add_argument("--bucket", help=argparse.SUPPRESS)
    if step in ("logs", "up"):
      p.add_argument("--worker", default="0", help="which worker to follow (default: 0)")
    if step in WITH_COMMAND:
      p.add_argument("command", nargs=argparse.REMAINDER, help="-- the command to run")
  local = sub.add_parser("local", allow_abbrev=False,
                         help="the workers of a pod as processes on this machine (CPU)",
                         description="run the command as N local worker processes, exactly as "
                                     "`run` does on a pod, on CPU")
  local.add_argument("--processes", type=int, required=True, help="how many worker processes")
  local.add_argument("--devices-per-process", type=int, default=1,
                     help="fake CPU devices of each process (default: 1)")
  local.add_argument("--log-dir", default="runs/launch-local",
                     help="process-I.log of each process (default: runs/launch-local)")
  local.add_argument("command", nargs=argparse.REMAINDER, help="-- the command to run")
  return parser


def _launch(args: argparse.Namespace) -> int:
  if getattr(args, "bucket", None) is not None:
    raise ConfigError(f"--bucket {args.bucket}: no longer needed, nothing is mounted; gs:// "
                      "arguments reach ff-jax as they are and it reads and writes the bucket "
                      "itself: drop --bucket")
  if args.step == "local":
    return run_local(args.command, args.processes, args.devices_per_process,
                     Path(args.log_dir), args.dry_run)
  slice_ = Slice(args)
  for step in ["create", "install", "run", "logs"] if args.step == "up" else [args.step]:
    getattr(slice_, step)()
  return 0


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  if "command" in args and args.command[:1] == ["--"]:
    args.command = args.command[1:]
  try:
    return _launch(args)
  except FFJaxError as err:
    print(f"launch/tpu.py: error: {err}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("launch/tpu.py: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
