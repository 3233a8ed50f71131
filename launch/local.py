"""`launch/tpu.py local`: the workers of a pod as processes on this machine.

Each process runs the worker command of `launch.worker` with the local environment (a coordinator
on a free localhost port, JAX on CPU with its own fake devices), so what runs on a pod can be run
and debugged here first. One log file per process; process 0's output is also streamed. The launch
waits for every process and fails, killing the others, as soon as one fails.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

from ff_jax.errors import ConfigError
from launch.worker import local_env, worker_argv

POLL_S = 0.2
# How long a process killed with SIGTERM gets to exit before SIGKILL.
GRACE_S = 10.0
TAIL_LINES = 30


class Stopped(Exception):
  """This launcher was interrupted (Ctrl-C) or terminated: every process is stopped."""

  def __init__(self, signum: int):
    super().__init__(signum)
    self.status = 128 + signum


def _raise_stopped(signum: int, frame: object) -> None:
  raise Stopped(signum)


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


def run_local(command: list[str], processes: int, devices: int, log_dir: Path,
              dry_run: bool = False) -> int:
  """Run `command` as `processes` local workers; the exit status of the launch (0: all ok)."""
  if processes < 1 or devices < 1:
    raise ConfigError(f"--processes {processes} --devices-per-process {devices}: both must be "
                      "at least 1")
  port = free_port()
  argvs = [worker_argv(command, local_env(port, processes, pid, devices))
           for pid in range(processes)]
  logs = [log_dir / f"process-{pid}.log" for pid in range(processes)]
  for argv, log in zip(argvs, logs):
    print(f"+ {shlex.join(argv)} > {log} 2>&1", flush=True)
  if dry_run:
    return 0
  if shutil.which(command[0]) is None:
    raise ConfigError(f"{command[0]}: not found on PATH; install ff-jax here "
                      "(`python -m pip install -e .` in the checkout) or activate its venv")
  log_dir.mkdir(parents=True, exist_ok=True)
  procs: list[subprocess.Popen] = []
  streams: list[threading.Thread] = []
  # Ctrl-C and SIGTERM both end in the `finally` below, which stops every process: none is left
  # running after the launcher (the processes have sessions of their own and get no Ctrl-C).
  handlers = {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGINT, signal.SIGTERM)}
  try:
    for pid, (argv, log) in enumerate(zip(argvs, logs)):
      procs.append(_start(argv, log, streams if pid == 0 else None))
    failed = _wait(procs)
  except Stopped as stop:
    print(f"launch/tpu.py local: stopped by signal {stop.status - 128}; stopping every process",
          file=sys.stderr)
    return stop.status
  finally:
    _stop(procs)
    for stream in streams:
      stream.join(timeout=GRACE_S)
    for sig, handler in handlers.items():
      signal.signal(sig, handler)
  return 0 if failed is None else _failure(*failed, logs)


def _start(argv: list[str], log: Path, streams: list[threading.Thread] | None) -> subprocess.Popen:
  """One process, its output in `log`; with `streams`, also streamed here by a thread added to
  it (its output then goes through a pipe)."""
  with log.open("w") as handle:
    proc = subprocess.Popen(argv, stdout=handle if streams is None else subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
  if streams is not None:
    streams.append(threading.Thread(target=_tee, args=(proc.stdout, log), daemon=True))
    streams[-1].start()
  return proc


def _failure(pid: int, code: int, logs: list[Path]) -> int:
  """Say which process failed (with its log's tail unless it was streamed); the launch's status."""
  if pid != 0:
    tail = logs[pid].read_text(errors="replace").splitlines()[-TAIL_LINES:]
    print("\n".join(f"[process {pid}] {line}" for line in tail), file=sys.stderr)
  reason = f"signal {-code}" if code < 0 else f"status {code}"
  print(f"launch/tpu.py local: process {pid} of {len(logs)} failed ({reason}); the others were "
        f"stopped. Logs: {logs[0].parent}/process-*.log", file=sys.stderr)
  return code if code > 0 else 128 - code


def _tee(stream: IO[bytes], log: Path) -> None:
  """Copy process 0's output to its log file and to this process's stdout, line by line."""
  with log.open("ab") as handle:
    for line in iter(stream.readline, b""):
      handle.write(line)
      handle.flush()
      sys.stdout.buffer.write(line)
      sys.stdout.buffer.flush()


def _wait(procs: list[subprocess.Popen]) -> tuple[int, int] | None:
  """Wait until every process has exited 0 (None) or one has failed: (its index, its code)."""
  while True:
    codes = [proc.poll() for proc in procs]
    for pid, code in enumerate(codes):
      if code is not None and code != 0:
        return pid, code
    if all(code == 0 for code in codes):
      return None
    time.sleep(POLL_S)


def _stop(procs: list[subprocess.Popen]) -> None:
  """SIGTERM the process group of every process still running, SIGKILL after the grace period."""
  running = [proc for proc in procs if proc.poll() is None]
  for proc in running:
    _signal_group(proc, signal.SIGTERM)
  deadline = time.monotonic() + GRACE_S
  for proc in running:
    try:
      proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      _signal_group(proc, signal.SIGKILL)
      proc.wait()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
  try:
    os.killpg(proc.pid, sig)
  except ProcessLookupError:  # exited between the poll and the signal
    pass
