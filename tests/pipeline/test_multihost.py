"""Multi-controller runs: two CPU processes on localhost (`jax.distributed`, gloo collectives),
two fake devices each, one global 4-device mesh, against one process with four devices.

Both processes run the whole `noisy -> score -> safety -> score -> filter` part of the tiny demo;
each loads only its rows of every batch, scores are gathered by example id and process 0 alone
writes the artifacts. The two-process run is killed in the middle of `noisy` and restarted on
both processes: it must resume from the phase checkpoints and end with the same filtered set and
scores as the single process.
"""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.local_pod import process_env
from tests.helpers.pipeline_helpers import (
  PROGRESS,
  REPO,
  TINY_DEMO,
  ff_jax_cmd,
  progress_lines,
  read_ids,
)

# Replicas one at a time (`scoring.replicas_per_pass=1`: each host loads its rows of every batch);
# stacked replicas on several hosts are tests/pipeline/test_pods.py's. Everything else of the
# demo's scoring is on.
ARGS = [*TINY_DEMO, "scoring.replicas=2", "scoring.replicas_per_pass=1", "--until", "filter"]
TIMEOUT = 600


def _env(devices: int, process_id: int | None = None, port: int | None = None) -> dict[str, str]:
  if process_id is None:
    return process_env(devices)
  return process_env(devices, {"FF_JAX_COORDINATOR": f"127.0.0.1:{port}",
                               "FF_JAX_NUM_PROCESSES": "2",
                               "FF_JAX_PROCESS_ID": str(process_id)})


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def _start_pair(run_dir: Path, logs: Path) -> list[subprocess.Popen]:
  """Both processes of one two-process run; stderr of process i goes to logs/p{i}.log."""
  port = _free_port()
  logs.mkdir(parents=True, exist_ok=True)
  procs = []
  for pid in (0, 1):
    handle = (logs / f"p{pid}.log").open("w")
    procs.append(subprocess.Popen(ff_jax_cmd("run", f"run_dir={run_dir}", *ARGS), cwd=REPO,
                                  env=_env(2, pid, port), stdout=subprocess.DEVNULL,
                                  stderr=handle, text=True, start_new_session=True))
    handle.close()
  return procs


def _kill(procs: list[subprocess.Popen]) -> None:
  for proc in procs:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  for proc in procs:
    proc.wait(timeout=60)


def _finish(procs: list[subprocess.Popen], logs: Path) -> list[str]:
  """Wait for both processes; fail with both logs if either fails. Returns process 0's lines."""
  try:
    codes = [proc.wait(timeout=TIMEOUT) for proc in procs]
  finally:
    _kill(procs)
  text = [(logs / f"p{pid}.log").read_text() for pid in (0, 1)]
  assert codes == [0, 0], "\n".join(f"-- process {i}:\n{t[-3000:]}" for i, t in enumerate(text))
  return text[0].splitlines()


def _kill_in_noisy(procs: list[subprocess.Popen], logs: Path, at: int = 5) -> None:
  """SIGKILL both processes once process 0 reports step `at` of the noisy phase."""
  deadline = time.monotonic() + TIMEOUT
  log = logs / "p0.log"
  try:
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
      lines = log.read_text().splitlines() if log.exists() else []
      if any((m := PROGRESS.match(line)) and m["name"] == "noisy" and at <= int(m["done"])
             < int(m["total"]) for line in lines):
        break
      time.sleep(0.2)
    else:
      pytest.fail(f"never reached step {at} of noisy:\n{log.read_text()[-3000:]}")
  finally:
    _kill(procs)


def _scores(run_dir: Path) -> dict[str, list[str]]:
  with (run_dir / "scores.csv").open() as handle:
    rows = list(csv.DictReader(handle))
  return {key: [row[key] for row in rows] for key in rows[0]}


@pytest.mark.slow
def test_two_processes_match_one_and_resume_after_a_kill(tmp_path):
  single = tmp_path / "single"
  proc = subprocess.run(ff_jax_cmd("run", f"run_dir={single}", *ARGS), cwd=REPO, env=_env(4),
                        capture_output=True, text=True, timeout=TIMEOUT)
  assert proc.returncode == 0, proc.stderr[-3000:]

  pair = tmp_path / "pair"
  _kill_in_noisy(_start_pair(pair, tmp_path / "logs1"), tmp_path / "logs1")
  assert not (pair / "scores.csv").exists()
  lines = _finish(_start_pair(pair, tmp_path / "logs2"), tmp_path / "logs2")
  assert "== release: complete, skipped" in lines
  # Resumed from a noisy checkpoint (step 2 or 4; saves are asynchronous), not from step 0.
  assert progress_lines(lines, "noisy")[0][0] in (2, 4), progress_lines(lines, "noisy")

  assert (pair / "filtered.jsonl").read_bytes() == (single / "filtered.jsonl").read_bytes()
  assert read_ids(pair / "flagged.jsonl") == read_ids(single / "flagged.jsonl")  # scores: below
  want, got = _scores(single), _scores(pair)
  assert got.keys() == want.keys()
  for key in want:
    try:
      a, b = np.asarray(want[key], float), np.asarray(got[key], float)
    except ValueError:  # ids, kinds, flags
      assert got[key] == want[key], key
      continue
    # Sums cross processes through gloo instead of in-process: float reassociation only.
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-3, equal_nan=True, err_msg=key)


@pytest.mark.slow
def test_overlapping_saves_of_two_managers(tmp_path):
  """A phase's async save still finalizing while a snapshot is saved (regression: both managers
  waited on Orbax's fixed barrier name from two threads, and the coordination service refused with
  "Barrier ... is already ongoing")."""
  port = _free_port()
  procs = []
  for pid in (0, 1):
    handle = (tmp_path / f"p{pid}.log").open("w")
    procs.append(subprocess.Popen(
      [sys.executable, "-m", "tests.helpers.overlapping_saves_worker", str(tmp_path / "ckpt"),
       "25"],
      cwd=REPO, env=_env(2, pid, port), stdout=handle, stderr=subprocess.STDOUT, text=True,
      start_new_session=True))
    handle.close()
  _finish(procs, tmp_path)
