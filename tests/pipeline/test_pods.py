"""A pod of four hosts on localhost against one host: every phase and command, each artifact
written once.

Four CPU processes with two fake devices each (one 8-device mesh, `jax.distributed` over gloo)
run the tiny demo through every phase to `evaluate`, then `ff-jax baseline random`, `ff-jax
rounds --rounds 1` and a small `ff-jax sweep`, each started as users start a pod here
(`launch/tpu.py local`); one process of the first run is SIGKILLed in the middle of `noisy` (the
launcher then stops the others) and the whole pod restarted. Every artifact must equal, byte for
byte, the one a single process with eight devices writes, except the numbers that cross hosts
(`NUMERIC`, within `RTOL`/`ATOL`) and wall times (`TIMED`); every Orbax model must restore to the
same weights (`MODELS`), and TensorBoard must read the same records from one event file per folder;
the write logs (`FF_JAX_WRITE_LOG`) must show that process 0 alone wrote each artifact.
"""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ff_jax import atomic_io
from ff_jax.atomic_io import WRITE_LOG_ENV
from ff_jax.training.checkpoints import PhaseCheckpoints
from tests.helpers.local_pod import LocalPod, process_env, writes_by_path
from tests.helpers.pipeline_helpers import PROGRESS, REPO, TINY_DEMO, ff_jax_cmd, progress_lines

PROCESSES, DEVICES = 4, 2
# The tiny demo; every batch a multiple of the 8 data-parallel shards; two more safety and two
# more noisy replicas, each pair trained stacked (one pass); a record of every step, so the kill
# leaves records past the checkpoint the run resumes from.
ARGS = [*TINY_DEMO, "safety.batch_size=8", "scoring.batch_size=16",
        "scoring.gradient_batch_size=8", "evaluate.batch_size=8", "scoring.noisy_replicas=3",
        "scoring.replicas_per_pass=2", "logging.every=1"]
SWEEP = ["safe_sizes=[4,8]", "steps=[2]", "seeds=[0]", "batch_size=8", "chunk_size=2",
         "score_batch_size=16"]
TIMEOUT = 1200

# Not compared as files: step checkpoints (a finished phase leaves none, a killed one resumes from
# them) and event files (tensorboardX names them by host and time: `_scalars` compares what
# TensorBoard reads from them instead).
SKIPPED = ("ckpt/", "tensorboard/")
# Orbax trees (every process writes its shards): each model a phase saved (models/<name>, the
# safety snapshots) restored and compared leaf by leaf, within `RTOL`/`ATOL` (`_models`).
MODELS = ("models/", "snapshots/")
# What records wall time, left out of the comparison: the manifest's creation time and its
# seconds, each training record's throughput, the reports' timing sections.
TIMED_KEYS = ("created", "seconds")  # and every key ending in _seconds
RECORD_TIMES = ("tokens_per_s", "examples_per_s")
TIMING_SECTIONS = ("## Phase timing", "## Time")
# The finetune the kill interrupts: its manifest entry counts what the resumed invocation trained
# (`training.loop.LoopStats`), checked apart against the step the pod resumed from.
RESUMED, RESUMED_STEPS = "noisy", 8
LOOP_COUNTS = ("steps", "checkpoints", "token_slots", "padded_tokens")
# Appended a line at a time by process 0 (`progress.MetricsLog`), not written whole through
# atomic_io: no write log counts them.
STREAMED = ("metrics.jsonl", "sweep/metrics.jsonl")
# Artifacts whose numbers cannot be byte-identical: sums across hosts run through gloo, in
# another order than one process's in-process collectives, so float32 results differ in their
# last bits (measured: per-example NLL and forgetting by <= 1.3e-6, metrics' mean NLLs by
# <= 2e-7). Their structure, ids, kinds, flags, counts and texts must still be identical; every
# float within `RTOL`/`ATOL` of one host's. filter.json also holds the mixture fit of the scores:
# log-likelihoods summed over every example, and differences of them (delta_bic) that cancel
# most digits, measured <= 7e-5 apart: `FIT_ATOL` there.
NUMERIC = ("scores_before.json", "scores_after.json", "scores_replicas.json",
           "scores_noisy_replicas.json", "scores.csv", "flagged.jsonl",
           "filter.json", "metrics.json", "baselines/", "rounds.json", "sweep/chunks/",
           "sweep/results.csv", "sweep/results.json", "manifest.json", "metrics.jsonl",
           "sweep/metrics.jsonl")
RTOL, ATOL = 1e-4, 1e-5
FIT_ATOL = 1e-3
FIT = ("filter.json", "manifest.json")  # the manifest's filter entry repeats the fit's threshold
# Reports print their numbers rounded, those of the fit too: one unit of the last digit printed
# plus FIT_ATOL apart at most.
REPORTS = (".md",)
DECIMAL = re.compile(r"-?\d+\.\d+")
# Rendered from those numbers: compared as present, not byte for byte. The clean model's weights
# (safetensors) are compared as arrays, with the same tolerance.
RENDERED = (".png",)
WEIGHTS = (".safetensors",)


def _commands(run_dir: Path) -> list[list[str]]:
  return [ff_jax_cmd("run", f"run_dir={run_dir}", *ARGS),
          ff_jax_cmd("baseline", "random", "--run-dir", run_dir),
          ff_jax_cmd("rounds", "--run-dir", run_dir, "--rounds", "1"),
          ff_jax_cmd("sweep", "--run-dir", run_dir, *SWEEP)]


def _artifacts(run_dir: Path) -> dict[str, Path]:
  out = {}
  for path in sorted(run_dir.rglob("*")):
    rel = path.relative_to(run_dir).as_posix()
    if path.is_file() and not any(rel == v or rel.startswith(v) or f"/{v}" in f"/{rel}"
                                  for v in (*SKIPPED, *MODELS)):
      out[rel] = path
  return out


def _text(path: Path, root: Path) -> str:
  """The file's text, its run directory's path (the manifest's run_dir, the HF export's path, the
  sweep report's run) written as RUN_DIR: the one host's and the pod's differ there only."""
  return path.read_text(encoding="utf-8").replace(str(root), "RUN_DIR")


def _parsed(rel: str, path: Path, root: Path) -> Any:
  text = _text(path, root)
  if rel.endswith(".csv"):
    return [[_number(cell) for cell in row] for row in csv.reader(io.StringIO(text))]
  if rel.endswith(".jsonl"):
    return [{k: v for k, v in json.loads(line).items() if k not in RECORD_TIMES}
            for line in text.splitlines()]
  value = json.loads(text)
  if rel.startswith("sweep/chunks/"):
    value.pop("seconds")  # the chunk's training time
  if rel == "manifest.json":
    for key in LOOP_COUNTS:
      value["phases"][RESUMED]["finetunes"][RESUMED].pop(key)
    value = _timeless(value)
  return value


def _timeless(value: Any) -> Any:
  """`value` without the keys that hold wall time (`TIMED_KEYS`, any key ending in _seconds)."""
  if isinstance(value, dict):
    return {k: _timeless(v) for k, v in value.items()
            if k not in TIMED_KEYS and not k.endswith("_seconds")}
  if isinstance(value, list):
    return [_timeless(item) for item in value]
  return value


def _report_parts(text: str) -> tuple[str, list[str]]:
  """A report without its timing sections, as (its text with every decimal number as #, those
  numbers as printed)."""
  sections = re.split(r"(?m)^(?=## )", text)
  text = "".join(s for s in sections if not s.startswith(TIMING_SECTIONS))
  return DECIMAL.sub("#", text), DECIMAL.findall(text)


def _report_differences(rel: str, want: str, got: str) -> list[str]:
  (want_text, want_numbers), (got_text, got_numbers) = _report_parts(want), _report_parts(got)
  if want_text != got_text:
    lines = [(a, b) for a, b in zip(want_text.splitlines(), got_text.splitlines()) if a != b]
    return [f"{rel}: text differs, first at {lines[:1]}"]
  out = []
  for x, y in zip(want_numbers, got_numbers):
    last_digit = 10.0 ** -len(x.split(".")[1])
    if abs(float(y) - float(x)) > last_digit + FIT_ATOL:
      out.append(f"{rel}: {y} != {x}")
  return out


def _number(cell: str) -> Any:
  try:
    return float(cell)
  except ValueError:
    return cell


def _leaves(value: Any, at: str = "") -> list[tuple[str, Any]]:
  if isinstance(value, dict):
    return [leaf for key in sorted(value) for leaf in _leaves(value[key], f"{at}.{key}")]
  if isinstance(value, list):
    return [leaf for i, item in enumerate(value) for leaf in _leaves(item, f"{at}[{i}]")]
  return [(at, value)]


def _differences(rel: str, want: Path, got: Path, roots: tuple[Path, Path]) -> list[str]:
  """What differs between one host's artifact `want` and the pod's `got` (empty: the same);
  `roots`: their run directories."""
  if rel.endswith(RENDERED):
    return []
  if rel.endswith(REPORTS):
    return _report_differences(rel, _text(want, roots[0]), _text(got, roots[1]))
  if rel.endswith(WEIGHTS):
    a, b = load_file(str(want)), load_file(str(got))
    if a.keys() != b.keys():
      return [f"{rel}: tensors {sorted(a)} != {sorted(b)}"]
    return [f"{rel}:{key}" for key in a
            if not np.allclose(b[key], a[key], rtol=RTOL, atol=ATOL)]
  if not rel.startswith(NUMERIC):
    return [] if want.read_bytes() == got.read_bytes() else [f"{rel}: bytes differ"]
  a, b = _leaves(_parsed(rel, want, roots[0])), _leaves(_parsed(rel, got, roots[1]))
  if [k for k, _ in a] != [k for k, _ in b]:
    return [f"{rel}: structure differs"]
  out = []
  atol = FIT_ATOL if rel in FIT else ATOL
  for (key, x), (_, y) in zip(a, b):
    if isinstance(x, float) and isinstance(y, float):
      if not np.isclose(y, x, rtol=RTOL, atol=atol, equal_nan=True):
        out.append(f"{rel}{key}: {y!r} != {x!r}")
    elif x != y:
      out.append(f"{rel}{key}: {y!r} != {x!r}")
  return out


def _model_folders(run_dir: Path) -> list[str]:
  """Every folder of the run that `save_params` saved a tree in (its steps hold a `state`)."""
  return sorted({state.parent.parent.relative_to(run_dir).as_posix()
                 for prefix in MODELS for state in (run_dir / prefix).rglob("state")
                 if state.is_dir() and state.parent.name.isdigit()})


def _restored(folder: Path) -> dict[str, np.ndarray]:
  """The newest tree saved in `folder`, leaf by leaf, restored onto one device: the tree's own
  metadata gives its shapes, whatever mesh saved it."""
  checkpoints = PhaseCheckpoints(folder)
  step = checkpoints.latest_step()
  checkpoints.close()
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as reader:
    path = folder / str(step) / "state"
    metadata = reader.metadata(path)
    metadata = getattr(metadata, "item_metadata", metadata)
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                          metadata)
    tree = reader.restore(path, target)
  return {jax.tree_util.keystr(key): np.asarray(leaf)
          for key, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _model_differences(rel: str, want: Path, got: Path) -> list[str]:
  a, b = _restored(want), _restored(got)
  if a.keys() != b.keys():
    return [f"{rel}: leaves {sorted(a)} != {sorted(b)}"]
  return [f"{rel}{key}" for key in a if not np.allclose(b[key], a[key], rtol=RTOL, atol=ATOL)]


def _event_folders(run_dir: Path) -> dict[str, int]:
  """Folder of event files -> how many it holds."""
  folders = [p.parent.relative_to(run_dir).as_posix()
             for p in run_dir.rglob("events.out.tfevents.*")]
  return {folder: folders.count(folder) for folder in sorted(set(folders))}


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
  """Tag -> (step, value) as TensorBoard reads them from `folder`, throughput aside."""
  events = EventAccumulator(str(folder))
  events.Reload()
  return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
          for tag in events.Tags()["scalars"] if tag.split("/")[-1] not in RECORD_TIMES}


def _scalar_differences(rel: str, want: Path, got: Path) -> list[str]:
  a, b = _scalars(want), _scalars(got)
  if {t: [s for s, _ in v] for t, v in a.items()} != {t: [s for s, _ in v] for t, v in b.items()}:
    return [f"{rel}: tags or steps differ"]
  return [f"{rel}:{tag}" for tag in a
          if not np.allclose([v for _, v in b[tag]], [v for _, v in a[tag]], rtol=RTOL, atol=ATOL,
                             equal_nan=True)]


def _in_noisy(lines: list[str], at: int = 3) -> bool:
  return any((m := PROGRESS.match(line)) and m["name"] == "noisy"
             and at <= int(m["done"]) < int(m["total"]) for line in lines)


@pytest.mark.slow
def test_four_hosts_write_what_one_host_writes(tmp_path):
  # The same name: the report's title names the run directory.
  single, pod = tmp_path / "single" / "run", tmp_path / "pod" / "run"
  single_log, pod_log = tmp_path / "writes_single", tmp_path / "writes_pod"
  env = process_env(8, {WRITE_LOG_ENV: str(single_log)})
  for cmd in _commands(single):
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]

  env = {WRITE_LOG_ENV: str(pod_log)}
  first = LocalPod(_commands(pod)[0], PROCESSES, DEVICES, tmp_path / "logs_killed", env)
  first.kill_worker_when(_in_noisy, victim=PROCESSES - 1, timeout=TIMEOUT)
  assert not (pod / "scores.csv").exists()
  lines = LocalPod(_commands(pod)[0], PROCESSES, DEVICES, tmp_path / "logs_run", env).wait(TIMEOUT)
  assert "== release: complete, skipped" in lines
  # Resumed from a noisy checkpoint (every 2 steps; saves are asynchronous), not from step 0.
  resumed_at = progress_lines(lines, RESUMED)[0][0]
  assert resumed_at in (2, 4, 6), progress_lines(lines, RESUMED)
  for stacked in ("safety_replicas/pass_0 x2", "noisy_1-2 x2", "safety_1-2 x2"):
    assert progress_lines(lines, stacked), f"{stacked}: not trained stacked"
  for i, cmd in enumerate(_commands(pod)[1:]):
    LocalPod(cmd, PROCESSES, DEVICES, tmp_path / f"logs_{i}", env).wait(TIMEOUT)

  want, got = _artifacts(single), _artifacts(pod)
  assert sorted(got) == sorted(want)
  differ = [d for rel in want for d in _differences(rel, want[rel], got[rel], (single, pod))]
  assert differ == [], differ[:20]
  stats = json.loads((pod / "manifest.json").read_text())["phases"][RESUMED]["finetunes"][RESUMED]
  assert stats["steps"] == RESUMED_STEPS - resumed_at

  models = _model_folders(single)
  assert {"models/M0", "models/M1", "models/M2", "models/clean"} <= set(models)
  assert _model_folders(pod) == models
  differ = [d for rel in models for d in _model_differences(rel, single / rel, pod / rel)]
  assert differ == [], differ[:20]

  # One event file a folder, a resumed loop's too, and TensorBoard reads each step once.
  folders = _event_folders(single)
  assert f"tensorboard/{RESUMED}" in folders
  assert _event_folders(pod) == folders == dict.fromkeys(folders, 1)
  differ = [d for rel in folders for d in _scalar_differences(rel, single / rel, pod / rel)]
  assert differ == [], differ[:20]

  writes = writes_by_path(pod_log)
  assert {pid for pids in writes.values() for pid in pids} == {0}
  assert not list(pod_log.glob("writes.[1-9]*.log"))
  written = {Path(p).relative_to(pod).as_posix() for p in writes}
  # Each artifact as often as one process writes it: a command whose hosts did not form one
  # cluster would have four processes 0, each writing everything.
  alone = writes_by_path(single_log)
  whole = [rel for rel in want if rel not in STREAMED]
  assert {rel: len(writes.get(str(pod / rel), [])) for rel in whole} == {
    rel: len(alone.get(str(single / rel), [])) for rel in whole}
  # clean_hf/ is the HF export (ff_jax.models.hf.save_hf, its own multi-host writer).
  assert {rel for rel in whole if not rel.startswith("clean_hf/")} <= written, \
    "artifacts not written through ff_jax.atomic_io"


def test_the_guarded_writer_logs_each_file_it_writes(tmp_path, monkeypatch):
  log = tmp_path / "writes"
  monkeypatch.setenv(WRITE_LOG_ENV, str(log))
  atomic_io.write_json_atomic(tmp_path / "a" / "x.json", {"b": float("nan"), "a": 1})
  atomic_io.write_folder(tmp_path / "f", lambda tmp: (tmp / "y.txt").write_text("one"))
  atomic_io.write_folder(tmp_path / "f", lambda tmp: (tmp / "z.txt").write_text("two"))
  assert (tmp_path / "a" / "x.json").read_text() == '{\n  "a": 1,\n  "b": null\n}\n'
  assert sorted(p.name for p in (tmp_path / "f").iterdir()) == ["z.txt"]  # replaced whole
  assert not list(tmp_path.rglob(".*"))  # no temp file or folder left
  assert (log / "writes.0.log").read_text().splitlines() == [
    f"0 {tmp_path / 'a' / 'x.json'}", f"0 {tmp_path / 'f' / 'y.txt'}",
    f"0 {tmp_path / 'f' / 'z.txt'}"]
  atomic_io.remove(tmp_path / "f")
  atomic_io.remove(tmp_path / "f")  # gone already: nothing to do
  assert not (tmp_path / "f").exists()


def test_only_process_zero_writes(tmp_path, monkeypatch):
  monkeypatch.setenv(WRITE_LOG_ENV, str(tmp_path / "writes"))
  (tmp_path / "old.txt").write_text("old")
  monkeypatch.setattr(atomic_io.jax, "process_index", lambda: 1)
  atomic_io.write_atomic(tmp_path / "x.txt", "x")
  atomic_io.write_folder(tmp_path / "f", lambda tmp: (tmp / "y.txt").write_text("y"))
  atomic_io.remove(tmp_path / "old.txt")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["old.txt"]
