"""Run directories and data sources in a Cloud Storage bucket, on a real Cloud Storage API.

A `gcp-storage-emulator` server on 127.0.0.1 (tests/helpers/gcs_emulator.py) stands in for Google's:
the run reaches it through the same clients it uses on a pod (TensorStore for Orbax's arrays,
gcsfs under etils.epath for every other file), with nothing mounted. `ff-jax filter` into
`gs://BUCKET/...` must give the kept rows, the scores and the filter summary a local run gives,
byte for byte: uninterrupted, SIGKILLed in the middle of the noisy finetune and rerun, and on two
processes started by the launcher (there within the 4-host test's tolerance: sums across hosts
round in another order). The tiny demo also runs every phase into the bucket, and its report.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from etils import epath

from ff_jax.atomic_io import COMMIT_MARKER, WRITE_LOG_ENV, folder_complete, write_folder
from tests.helpers.gcs_emulator import BUCKET, pointed_at, running_emulator
from tests.helpers.local_pod import LocalPod
from tests.helpers.pipeline_helpers import (
  NOISY,
  REPO,
  SAFE,
  TINY_DEMO,
  TINY_FILTER,
  cli_env,
  ff_jax_cmd,
  make_tiny_hf_model,
  progress_lines,
  run_ok,
  write_jsonl,
)
from tests.pipeline.test_pods import _differences

pytestmark = pytest.mark.slow

# What the filter hands the user; each must equal the local run's.
OUTPUTS = ("filtered.jsonl", "scores.csv", "filter.json", "flagged.jsonl")
# The tiny filter, with a noisy finetune long enough to be killed after a step checkpoint is
# committed in the bucket and before it ends (checkpoints every 2 steps).
FILTER = [*TINY_FILTER, "noisy.steps=8"]


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
  """The emulator's URL, this process and its children pointed at it."""
  data = tmp_path_factory.mktemp("gcs") / "objects"
  data.mkdir()
  with running_emulator(data) as url, pointed_at(url):
    yield url


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
  folder = tmp_path_factory.mktemp("inputs")
  texts = [r["prompt"] + " " + r["response"] for r in NOISY + SAFE]
  return {"model": make_tiny_hf_model(folder / "tiny-llama", texts),
          "noisy": write_jsonl(folder / "noisy.jsonl", NOISY),
          "safe": write_jsonl(folder / "safe.jsonl", SAFE)}


def _filter_args(inputs: dict[str, Path], run_dir: str, noisy: str | None = None,
                 safe: str | None = None) -> list[str]:
  return ["filter", "--model", str(inputs["model"]), "--noisy", noisy or str(inputs["noisy"]),
          "--safe", safe or str(inputs["safe"]), "--run-dir", run_dir, "--until", "filter",
          *FILTER]


@pytest.fixture(scope="module")
def local_run(inputs, tmp_path_factory) -> Path:
  run_dir = tmp_path_factory.mktemp("local") / "run"
  run_ok(*_filter_args(inputs, str(run_dir)))
  return run_dir


def _bucket_outputs(url: str) -> dict[str, bytes]:
  return {name: epath.Path(f"{url}/{name}").read_bytes() for name in OUTPUTS}


def _local_outputs(run_dir: Path) -> dict[str, bytes]:
  return {name: (run_dir / name).read_bytes() for name in OUTPUTS}


def test_a_filter_run_into_a_bucket_gives_what_a_local_run_gives(bucket, inputs, local_run):
  run_dir = f"gs://{BUCKET}/whole"
  proc = run_ok(*_filter_args(inputs, run_dir))
  assert f"kept rows:      {run_dir}/filtered.jsonl" in proc.stdout
  assert _bucket_outputs(run_dir) == _local_outputs(local_run)
  # Orbax committed its models in the bucket itself (its marker; no renamed temp folder left).
  models = epath.Path(run_dir) / "models"
  assert sorted(p.name for p in models.iterdir()) == ["M1", "M2"]
  for model in models.iterdir():
    (step,) = [p for p in model.iterdir() if p.is_dir()]
    assert (step / "commit_success.txt").exists()
  assert not [p for p in epath.Path(run_dir).iterdir() if ".orbax-checkpoint-tmp" in p.name]
  assert folder_complete(f"{run_dir}/tokenizer")


def test_killed_in_the_noisy_finetune_and_rerun_on_data_in_the_bucket(bucket, inputs, local_run):
  """Data read from the bucket, the run SIGKILLed after its first step checkpoint and rerun: the
  rerun resumes and its outputs equal the uninterrupted local run's."""
  data = epath.Path(f"gs://{BUCKET}/data")
  for name in ("noisy", "safe"):
    (data / f"{name}.jsonl").write_bytes(inputs[name].read_bytes())
  run_dir = f"gs://{BUCKET}/killed"
  args = _filter_args(inputs, run_dir, f"{data}/noisy.jsonl", f"{data}/safe.jsonl")
  committed = _kill_once_committed(args, epath.Path(run_dir) / "ckpt" / "noisy")
  assert not epath.Path(f"{run_dir}/scores.csv").exists()
  lines = run_ok(*args).stderr.splitlines()
  assert "== release: complete, skipped" in lines
  assert progress_lines(lines, "noisy")[0][0] >= committed, progress_lines(lines, "noisy")
  assert _bucket_outputs(run_dir) == _local_outputs(local_run)
  # The training log holds whole records only, each step of `noisy` once.
  records = [line for line in epath.Path(f"{run_dir}/metrics.jsonl").read_text().splitlines()]
  steps = [r for r in records if '"phase":"noisy"' in r.replace(" ", "")]
  assert len(steps) == len(set(steps))


def _kill_once_committed(args: list[str], checkpoints: epath.Path, timeout: float = 600) -> int:
  """Run `ff-jax ARGS`; SIGKILL it in the noisy finetune once a step checkpoint is committed in
  the bucket (Orbax's marker object). Returns that step."""
  proc = subprocess.Popen(ff_jax_cmd(*args), cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)
  deadline, step, lines = time.monotonic() + timeout, None, []
  try:
    for line in proc.stderr:  # a line at least every step
      lines.append(line)
      if line.startswith("== noisy: done") or time.monotonic() > deadline:
        break
      steps = [int(p.parent.name) for p in checkpoints.glob("*/commit_success.txt")]
      if steps and line.startswith("[noisy]"):
        step = max(steps)
        os.killpg(proc.pid, signal.SIGKILL)
        break
  finally:
    if proc.poll() is None and step is None:
      os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()
  assert step is not None, "never killed after a committed checkpoint:\n" + "".join(lines[-30:])
  return step


def test_two_processes_write_one_run_into_the_bucket(bucket, inputs, local_run, tmp_path):
  run_dir = f"gs://{BUCKET}/pod"
  cmd = ff_jax_cmd(*_filter_args(inputs, run_dir))
  writes = tmp_path / "writes"
  # The workers inherit `bucket`'s variables from this process.
  LocalPod(cmd, 2, 1, tmp_path / "logs", {WRITE_LOG_ENV: str(writes)}).wait(600)
  assert [p.name for p in writes.iterdir()] == ["writes.0.log"]  # one writer: process 0
  written = {line.split(" ", 1)[1] for line in (writes / "writes.0.log").read_text().splitlines()}
  assert {f"{run_dir}/{name}" for name in OUTPUTS} <= written
  got = tmp_path / "pod"
  got.mkdir()
  for name, data in _bucket_outputs(run_dir).items():
    (got / name).write_bytes(data)
  differ = [d for name in OUTPUTS for d in _differences(name, local_run / name, got / name)]
  assert differ == [], differ[:20]


def test_a_folder_in_a_bucket_is_complete_only_with_its_marker(bucket):
  folder = f"gs://{BUCKET}/folders/tokenizer"

  def fill(tmp: Path) -> None:
    (tmp / "a.json").write_text("{}")
    (tmp / "sub").mkdir()
    (tmp / "sub" / "b.txt").write_text("b")

  write_folder(folder, fill)
  assert folder_complete(folder)
  names = sorted(str(p)[len(folder) + 1:] for p in epath.Path(folder).glob("*"))
  assert names == sorted([COMMIT_MARKER, "a.json", "sub"])
  # A folder whose upload stopped before its marker (a kill) is not complete, and a rewrite
  # replaces every file of the old one.
  (epath.Path(folder) / COMMIT_MARKER).unlink()
  assert not folder_complete(folder)
  write_folder(folder, lambda tmp: (tmp / "c.txt").write_text("c"))
  assert sorted(p.name for p in epath.Path(folder).iterdir()) == [COMMIT_MARKER, "c.txt"]


def test_every_phase_and_the_report_into_a_bucket(bucket):
  """The tiny demo through every phase into the bucket, then `ff-jax report` on it: the clean
  model's HF folder is committed and the report links plots written beside it."""
  run_dir = f"gs://{BUCKET}/demo"
  run_ok("run", f"run_dir={run_dir}", *TINY_DEMO, timeout=900)
  root = epath.Path(run_dir)
  phases = json.loads((root / "manifest.json").read_text())["phases"]
  assert all(info["complete"] for info in phases.values()) and "evaluate" in phases
  assert folder_complete(root / "clean_hf")
  assert (root / "clean_hf" / "config.json").exists()
  proc = run_ok("report", "--run-dir", run_dir)
  assert f"{run_dir}/report.md" in proc.stdout
  report = (root / "report.md").read_text()
  linked = [line.split("](", 1)[1].rstrip(")") for line in report.splitlines()
            if "](plots/" in line]
  assert linked and all((root / rel).exists() for rel in linked)
