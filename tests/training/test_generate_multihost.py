"""Greedy generation on a local pod: two CPU processes (`launch/tpu.py local`, gloo collectives),
two fake devices each, one mesh whose fsdp axis spans the processes (weights and batch rows split
across them, heads within each). Each process builds and decodes only its half of every batch, and
both end with the texts that one process with the four devices generates, in prompt order.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.helpers.local_pod import LocalPod, process_env
from tests.helpers.paths import REPO

MESH = ["1", "2", "2"]  # data, fsdp, tensor
BATCH_SIZE = 8  # 13 prompts: two batches, the second with three filler rows
TIMEOUT = 300
WORKER = [sys.executable, "-m", "tests.helpers.generate_worker", *MESH, str(BATCH_SIZE)]
SHARE = re.compile(r"generate: process (\d+) of (\d+) decodes (\d+) of the (\d+) rows of each "
                   r"of (\d+) batches")


def _texts(lines: list[str]) -> list[str]:
  found = [json.loads(line.split(" ", 1)[1]) for line in lines if line.startswith("texts ")]
  assert len(found) == 1, lines[-40:]
  return found[0]


def _shares(lines: list[str]) -> list[tuple[int, ...]]:
  return [tuple(map(int, m.groups())) for line in lines if (m := SHARE.search(line))]


@pytest.mark.slow
def test_two_processes_each_decode_their_rows_and_all_get_the_one_process_texts(tmp_path):
  single = subprocess.run(WORKER, cwd=REPO, env=process_env(4), capture_output=True, text=True,
                          timeout=TIMEOUT)
  assert single.returncode == 0, single.stderr[-3000:]
  want = _texts(single.stdout.splitlines())
  assert _shares(single.stderr.splitlines()) == [(0, 1, 8, 8, 2)]
  assert len(want) == 13 and len(set(want)) == 13, want

  pod = LocalPod(WORKER, processes=2, devices=2, logs=tmp_path / "logs")
  pod.wait(TIMEOUT)
  for pid in (0, 1):
    lines = pod.lines(pid)
    assert _texts(lines) == want, f"process {pid}"
    assert _shares(lines) == [(pid, 2, 4, 8, 2)], f"process {pid}: {lines[-20:]}"
