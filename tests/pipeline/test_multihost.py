"""Multi-controller runs: two CPU processes started as users start a pod here (`launch/tpu.py
local`), two fake devices each, one global 4-device mesh, against one process with four devices.

Both processes run the tiny demo from `release` to `evaluate`: single finetunes, the safety and
noisy replicas trained and scored stacked, scoring with greedy decodes and per-example gradients,
the filter, the clean finetune and the evaluation's decodes. Process 0 is SIGKILLed in the middle
of `noisy` (the launcher then stops process 1) and the pair restarted: it must resume from the
phase checkpoints and end with the same filtered set, and scores within the four-host test's
tolerance, as the single process.

Rows: no score shows a host that built rows other than its own (a mean loss over duplicated rows
is the same mean; scores are gathered by example id), so each host logs the rows it built
(`FF_JAX_ROW_LOG`, ff_jax.data.host_rows). The single process builds every row of every global
batch; each host of the pair must have built exactly its block of each of those batches (block p
of 2 on process p), for every purpose (every training phase, stacked stream, scoring pass and
decode), so the hosts' rows are disjoint and together are every row the run needs.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ff_jax.data.host_rows import ROW_LOG_ENV
from tests.helpers.local_pod import LocalPod, process_env
from tests.helpers.pipeline_helpers import (
  PROGRESS,
  REPO,
  TINY_DEMO,
  ff_jax_cmd,
  progress_lines,
  read_ids,
)
from tests.pipeline.test_pods import ATOL, RTOL  # the four-host test's tolerance

PROCESSES, DEVICES = 2, 2
# Two more noisy replicas (and TINY_DEMO's two more safety replicas): each pair trains stacked.
ARGS = [*TINY_DEMO, "scoring.noisy_replicas=3"]
NOISY_SIZE = 36  # TINY_DEMO's demo.noisy_size: the rows every scoring pass of D needs
TIMEOUT = 900


def _in_noisy(lines: list[str], at: int = 5) -> bool:
  return any((m := PROGRESS.match(line)) and m["name"] == "noisy"
             and at <= int(m["done"]) < int(m["total"]) for line in lines)


def _scores(run_dir: Path) -> dict[str, list[str]]:
  with (run_dir / "scores.csv").open() as handle:
    rows = list(csv.DictReader(handle))
  return {key: [row[key] for row in rows] for key in rows[0]}


def _rows(folder: Path, pid: int) -> dict[str, list[list[str]]]:
  """Purpose -> the rows of every block process `pid` built for it, in order (its row log)."""
  out: dict[str, list[list[str]]] = {}
  path = folder / f"rows.{pid}.log"
  for line in path.read_text().splitlines() if path.exists() else []:
    index, purpose, *rows = line.split(" ")
    assert int(index) == pid, f"{path}: a line of process {index}"
    out.setdefault(purpose, []).append(rows)
  return out


def _block(rows: list[str], pid: int) -> list[str]:
  """Block `pid` of PROCESSES of a global batch's rows: the documented rule (host_rows)."""
  assert len(rows) % PROCESSES == 0, rows
  per_host = len(rows) // PROCESSES
  return rows[pid * per_host:(pid + 1) * per_host]


def _ids(batches: list[list[str]]) -> list[int]:
  """The example ids in `batches`' rows (`i`, `i+j` packed, `-` none)."""
  return [int(i) for rows in batches for row in rows if row != "-" for i in row.split("+")]


def _check_own_rows(whole: dict[str, list[list[str]]], killed: Path, resumed: Path) -> None:
  """Each process of the pair built its block of every batch `whole` (one process's) holds: the
  killed launch from the first batch of a purpose on, the resumed one up to its last (noisy
  replays the steps after its checkpoint, release was done before the kill)."""
  for pid in range(PROCESSES):
    before, after = _rows(killed, pid), _rows(resumed, pid)
    assert set(before) | set(after) == set(whole), f"process {pid}: other purposes"
    for purpose, batches in whole.items():
      want = [_block(rows, pid) for rows in batches]
      head, tail = before.get(purpose, []), after.get(purpose, [])
      assert head == want[:len(head)], f"process {pid}, {purpose}: not its rows before the kill"
      assert tail == want[len(want) - len(tail):], f"process {pid}, {purpose}: not its rows"
      assert len(head) + len(tail) >= len(want), f"process {pid}, {purpose}: batches missing"


def _check_disjoint_and_whole(whole: dict[str, list[list[str]]], resumed: Path) -> None:
  """For each purpose the resumed launch built whole: the hosts' example ids are disjoint in
  every batch (and over a one-pass purpose: scoring, decoding), and together they are one
  process's."""
  hosts = [_rows(resumed, pid) for pid in range(PROCESSES)]
  for purpose, batches in whole.items():
    built = [host.get(purpose, []) for host in hosts]
    if any(len(b) != len(batches) for b in built):
      continue  # release, noisy: in part before the kill (`_check_own_rows`)
    for n, rows in enumerate(batches):
      per_host = [set(_ids([b[n]])) for b in built]
      assert not set.intersection(*per_host), f"{purpose}: batch {n} built twice"
      assert set.union(*per_host) == set(_ids([rows])), f"{purpose}: batch {n} incomplete"
    if len(set(_ids(batches))) == len(_ids(batches)):
      sets = [set(_ids(b)) for b in built]
      assert sum(map(len, sets)) == len(set.union(*sets)), f"{purpose}: a row on two hosts"


@pytest.mark.slow
def test_two_hosts_match_one_resume_after_a_kill_and_build_only_their_rows(tmp_path):
  single, pair = tmp_path / "single", tmp_path / "pair"
  env = process_env(PROCESSES * DEVICES, {ROW_LOG_ENV: str(tmp_path / "rows_single")})
  proc = subprocess.run(ff_jax_cmd("run", f"run_dir={single}", *ARGS), cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=TIMEOUT)
  assert proc.returncode == 0, proc.stderr[-3000:]

  cmd = ff_jax_cmd("run", f"run_dir={pair}", *ARGS)
  killed, resumed = tmp_path / "rows_killed", tmp_path / "rows_resumed"
  LocalPod(cmd, PROCESSES, DEVICES, tmp_path / "logs_killed", {ROW_LOG_ENV: str(killed)}
           ).kill_worker_when(_in_noisy, victim=0, timeout=TIMEOUT)
  assert not (pair / "scores.csv").exists()
  lines = LocalPod(cmd, PROCESSES, DEVICES, tmp_path / "logs_run",
                   {ROW_LOG_ENV: str(resumed)}).wait(TIMEOUT)
  assert "== release: complete, skipped" in lines
  # Resumed from a noisy checkpoint (step 2 or 4; saves are asynchronous), not from step 0.
  assert progress_lines(lines, "noisy")[0][0] in (2, 4), progress_lines(lines, "noisy")
  for stacked in ("safety_replicas/pass_0 x2", "noisy_1-2 x2", "safety_1-2 x2"):
    assert progress_lines(lines, stacked), f"{stacked}: not trained stacked"

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
    np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL, equal_nan=True, err_msg=key)

  whole = _rows(tmp_path / "rows_single", 0)
  assert not list((tmp_path / "rows_single").glob("rows.[1-9]*.log"))
  assert "-" not in whole, "rows built for no named purpose (host_rows.building)"
  for purpose in ("score_before", "score_after", "score_after/generate", "score_snapshots"):
    assert sorted(_ids(whole[purpose])) == list(range(NOISY_SIZE)), purpose
  for purpose in ("safety_replicas/pass_0/stream_1", "noisy_1-2/stream_1", "evaluate/clean"):
    assert whole.get(purpose), f"no rows built for {purpose}"
  _check_own_rows(whole, killed, resumed)
  _check_disjoint_and_whole(whole, resumed)


@pytest.mark.slow
def test_overlapping_saves_of_two_managers(tmp_path):
  """A phase's async save still finalizing while a snapshot is saved (regression: both managers
  waited on Orbax's fixed barrier name from two threads, and the coordination service refused with
  "Barrier ... is already ongoing")."""
  LocalPod([sys.executable, "-m", "tests.helpers.overlapping_saves_worker", tmp_path / "ckpt",
            "25"], PROCESSES, DEVICES, tmp_path / "logs").wait(TIMEOUT)
