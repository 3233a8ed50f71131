"""A pod on localhost for the multi-host tests, started the way users start one:
`launch/tpu.py local --processes N --devices-per-process D -- CMD` (N CPU processes with D fake
devices each, one `jax.distributed` cluster over gloo, the worker command and environment of a
pod, one log file per process, a non-zero exit status when any process fails).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ff_jax.cpu_devices import cpu_device_flags
from tests.helpers.paths import REPO
from tests.helpers.pipeline_helpers import cli_env


def process_env(devices: int, extra: dict[str, str] | None = None) -> dict[str, str]:
  """The environment of one process alone with `devices` fake CPU devices."""
  env = cli_env()
  env["XLA_FLAGS"] = cpu_device_flags(devices)
  env.update(extra or {})
  return env


class LocalPod:
  """One command on a local pod (`launch/tpu.py local`); `logs/process-<i>.log` holds process
  i's output, `logs/launch.log` the launcher's."""

  def __init__(self, cmd: Sequence[str], processes: int, devices: int, logs: Path,
               extra_env: dict[str, str] | None = None):
    self.logs, self.processes = Path(logs), processes
    self.logs.mkdir(parents=True, exist_ok=True)
    env = cli_env()
    env.update(extra_env or {})
    launcher = [sys.executable, "launch/tpu.py", "local", "--processes", str(processes),
                "--devices-per-process", str(devices), "--log-dir", str(self.logs), "--",
                *map(str, cmd)]
    with (self.logs / "launch.log").open("w") as handle:
      self.launcher = subprocess.Popen(launcher, cwd=REPO, env=env, stdout=handle,
                                       stderr=subprocess.STDOUT, start_new_session=True)

  def log(self, pid: int) -> Path:
    return self.logs / f"process-{pid}.log"

  def lines(self, pid: int = 0) -> list[str]:
    path = self.log(pid)
    return path.read_text(errors="replace").splitlines() if path.exists() else []

  def status(self, timeout: float) -> int:
    """Wait for the launch; its exit status (non-zero: a process failed)."""
    try:
      return self.launcher.wait(timeout=timeout)
    finally:
      self.stop()

  def wait(self, timeout: float) -> list[str]:
    """Wait for the launch; raise with its output and every process's log tail if it fails.
    Returns process 0's lines."""
    code = self.status(timeout)
    if code:
      tails = "\n".join(f"-- process {pid}:\n" + "\n".join(self.lines(pid)[-40:])
                        for pid in range(self.processes))
      launch = (self.logs / "launch.log").read_text(errors="replace")[-2000:]
      raise AssertionError(f"launch/tpu.py local: exit status {code}\n{launch}\n{tails}")
    return self.lines(0)

  def stop(self) -> None:
    """SIGTERM the launcher, which stops every process it started, and reap it."""
    if self.launcher.poll() is None:
      self.launcher.terminate()
    self.launcher.wait(timeout=120)

  def kill_worker_when(self, seen: Callable[[list[str]], bool], victim: int,
                       timeout: float) -> None:
    """Once `seen(process 0's lines)` holds, SIGKILL process `victim` alone (a host lost in the
    middle of a phase); the launcher then stops the others and fails. Raises if the launch ends
    before."""
    deadline = time.monotonic() + timeout
    try:
      while time.monotonic() < deadline and self.launcher.poll() is None:
        if seen(self.lines(0)):
          os.kill(self._worker_pid(victim), signal.SIGKILL)
          code = self.launcher.wait(timeout=120)
          assert code != 0, "the launch succeeded although a process was killed"
          return
        time.sleep(0.2)
      raise AssertionError("the launch ended (or timed out) before the kill point:\n"
                           + "\n".join(self.lines(0)[-40:]))
    finally:
      self.stop()

  def _worker_pid(self, pid: int) -> int:
    """The process id of worker `pid` of this launch: the launcher's child whose environment
    says FF_JAX_PROCESS_ID=`pid`."""
    want = f"FF_JAX_PROCESS_ID={pid}".encode()
    for proc in Path("/proc").iterdir():
      if not proc.name.isdigit():
        continue
      try:
        environ = (proc / "environ").read_bytes().split(b"\0")
        parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
      except (OSError, ValueError, IndexError):
        continue
      if want in environ and parent == self.launcher.pid:
        return int(proc.name)
    raise AssertionError(f"no worker with FF_JAX_PROCESS_ID={pid} under launcher "
                         f"{self.launcher.pid}")


def writes_by_path(folder: Path) -> dict[str, list[int]]:
  """Path -> the processes that wrote it, once per write, from every `writes.<i>.log` that
  `FF_JAX_WRITE_LOG=folder` made (ff_jax.atomic_io)."""
  out: dict[str, list[int]] = {}
  for log in sorted(Path(folder).glob("writes.*.log")):
    for line in log.read_text().splitlines():
      pid, path = line.split(" ", 1)
      out.setdefault(path, []).append(int(pid))
  return out
