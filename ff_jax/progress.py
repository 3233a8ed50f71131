"""Progress lines with rate and ETA, the run's `metrics.jsonl` stream, and the training loops'
records (`TrainingLog`): every N steps, to `metrics.jsonl` and TensorBoard event files.

Progress lines are printed at most every 5 s; the environment variable `FF_JAX_PROGRESS_INTERVAL`
(seconds, e.g. `0` for a line per update) changes that default, for logs and tests.

TensorBoard layout (`TrainingLog.open`): one run folder per training loop,
`<tensorboard_dir>/<loop name>/`, with the scalars `train/loss`, `train/grad_norm`, `train/lr`,
`train/tokens_per_s` and `train/examples_per_s` at each recorded step. A loop of K stacked replicas
adds one run folder per replica, `<loop name>/<replica name>/` with its own `train/loss` and
`train/grad_norm`, and writes their mean under the loop's folder: TensorBoard overlays runs that
share a tag in one chart, so the K replicas and their mean are compared at a glance (tags
`train/loss/replica_<k>` would give K separate charts instead).

`metrics.jsonl` is the record; the event files mirror it. A loop killed and resumed from its newest
step checkpoint records the steps after it again (the loop writes every record up to a checkpoint's
step before it saves the checkpoint). On resume (`TrainingLog.open`) `metrics.jsonl` loses the
loop's records past that step and any line a kill cut short, and so ends as an uninterrupted run's
would (wall-time fields aside); the loop's event files, which a kill may have left without their
last records (tensorboardX writes them from a queue), are replaced by one new file per folder that
starts with the loop's records kept in `metrics.jsonl`. Every folder thus holds one event file
however often its loop was resumed, with each step once (tensorboardX names the files by host and
time, so their bytes differ from run to run; a replayed record bears the time it was replayed, and
a non-finite value that `metrics.jsonl` keeps as null is replayed as NaN in a replica's list and
left out as a single value, like a value not measured).

Weights & Biases layout (`TrainingLog.wandb`): one W&B run per run directory, its files under
`<run_dir>/wandb/`, with the same scalars as TensorBoard keyed `<loop name>/train/loss`,
`<loop name>/<replica name>/train/loss`, ..., each loop's plotted against its own step,
`<loop name>/step` (a W&B run has one global step; every loop starts again from 0). W&B cannot
take records back: a resumed loop's steps after its checkpoint appear twice there (metrics.jsonl and
TensorBoard keep the later ones only).
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import math
import os
import secrets
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ff_jax.atomic_io import is_remote, json_text, remove, run_path, write_atomic
from ff_jax.errors import ConfigError

# Default steps between a training loop's records (`config.LoggingConfig` takes its default here).
LOG_EVERY = 10
# `logging.wandb`: no W&B run; local files, synced later (`wandb sync`); uploading as it runs.
WANDB_MODES = ("off", "offline", "online")
# The W&B run id of a run directory, kept beside W&B's files so a resumed run continues that run.
WANDB_ID_FILE = "ff_jax_run_id"
# Seconds between the event files' flushes while a loop runs (each loop flushes at its end too).
TENSORBOARD_FLUSH_SECONDS = 30


def default_interval() -> float:
  """Seconds between progress lines: `FF_JAX_PROGRESS_INTERVAL`, else 5."""
  raw = os.environ.get("FF_JAX_PROGRESS_INTERVAL", "").strip()
  try:
    return max(0.0, float(raw)) if raw else 5.0
  except ValueError:
    return 5.0


class Progress:
  """Prints `name: done/total unit (rate/s, ETA)` at most every `interval` seconds (process 0).

  `interval=None` uses `default_interval()`.
  """

  def __init__(self, name: str, total: int, unit: str = "steps", interval: float | None = None,
               stream=None):
    interval = default_interval() if interval is None else interval
    self.name, self.total, self.unit, self.interval = name, max(int(total), 1), unit, interval
    self.stream = stream or sys.stderr
    self.start = time.perf_counter()
    self.last_print = 0.0
    self.done = 0
    self.first = None  # (time, done) after the first update: excludes compile time from rates

  def update(self, done: int, extra: str = "", force: bool = False) -> None:
    now = time.perf_counter()
    self.done = done
    if self.first is None:
      self.first = (now, done)
    if not force and now - self.last_print < self.interval and done < self.total:
      return
    self.last_print = now
    t0, d0 = self.first
    rate = (done - d0) / (now - t0) if now > t0 and done > d0 else 0.0
    eta = (self.total - done) / rate if rate > 0 else float("nan")
    eta_text = f"ETA {eta:.0f}s" if eta == eta else "ETA ?"
    if writes_logs():
      print(f"[{self.name}] {done}/{self.total} {self.unit} ({rate:.2f} {self.unit}/s, {eta_text})"
            f"{' ' + extra if extra else ''}", file=self.stream, flush=True)

  def due(self, done: int) -> bool:
    """Whether `update(done)` would print. A loop that dispatches device work asynchronously
    waits for the device only then, so the printed rate is the device's, not the dispatcher's."""
    return (self.first is None or done >= self.total
            or time.perf_counter() - self.last_print >= self.interval)

  def elapsed(self) -> float:
    return time.perf_counter() - self.start


class MetricsLog:
  """Appends one strict JSON object per line (non-finite numbers as null); process 0 only.

  A bucket's objects cannot be appended to: there the whole log is rewritten with each record
  (one small object; a record comes every `logging.every` steps)."""

  def __init__(self, path: str | Path | None):
    self.path = run_path(path) if path else None
    self._remote_text: str | None = None  # a bucket's log as last written

  def write(self, **record: Any) -> None:
    if self.path is None or not writes_logs():
      return
    line = json_text(record, indent=None) + "\n"
    if is_remote(self.path):
      if self._remote_text is None:
        self._remote_text = self.path.read_text() if self.path.exists() else ""
      self._remote_text += line
      write_atomic(self.path, self._remote_text)
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    with self.path.open("a") as handle:
      handle.write(line)

  def drop_after(self, phase: str, step: int) -> list[dict[str, Any]]:
    """Remove `phase`'s records of steps after `step` (and lines a kill left half-written): a
    loop resumed from step `step` records the steps after it again. Rewritten atomically, and
    only when something is removed or the last line lacks its newline (a kill between a record
    and its newline: the next record would go on the same line). Returns `phase`'s records that
    are kept, in order."""
    if self.path is None or not self.path.exists():
      return []
    text = self.path.read_text()
    lines = text.splitlines()
    kept = [line for line in lines if not _stale(line, phase, step)]
    unended = bool(text) and not text.endswith("\n")
    if len(kept) != len(lines) or unended:
      write_atomic(self.path, "".join(line + "\n" for line in kept))
    return [record for record in map(json.loads, kept) if record.get("phase") == phase]


def _stale(line: str, phase: str, step: int) -> bool:
  try:
    record = json.loads(line)
  except json.JSONDecodeError:
    return True
  if not isinstance(record, dict):
    return True
  return record.get("phase") == phase and record.get("step", 0) > step


def writes_logs(process_index: int | None = None) -> bool:
  """Whether a process (default: this one) writes the run's logs: process 0 only, since every
  process trains the same steps and would write the same records again."""
  return (jax.process_index() if process_index is None else process_index) == 0


@dataclasses.dataclass(frozen=True)
class WandbSpec:
  """A Weights & Biases run for a run directory's training loops (`TrainingLog.wandb`): `mode`
  offline or online, files under `<run_dir>/wandb/` (a local directory), the run's `config`."""

  mode: str
  run_dir: Path
  project: str = "ff_jax"
  config: dict[str, Any] | None = dataclasses.field(default=None, compare=False)


@dataclasses.dataclass(frozen=True)
class TrainingLog:
  """Where and how often training loops record loss, learning rate, grad norm and throughput:
  a line of `metrics_path` per record (every loop's records, told apart by `phase`) and, with
  `tensorboard_dir`, TensorBoard event files, with `wandb` a Weights & Biases run (layouts: the
  module docstring). No paths: records for the progress line only."""

  metrics_path: Path | None = None
  tensorboard_dir: Path | None = None
  every: int = LOG_EVERY
  wandb: WandbSpec | None = None

  def __post_init__(self):
    if self.tensorboard_dir is not None and self.metrics_path is None:
      # On resume the event files are rebuilt from metrics.jsonl (the module docstring).
      raise ValueError("TrainingLog: tensorboard_dir needs a metrics_path")

  def open(self, name: str, first_step: int = 0, replica_names: Sequence[str] | None = None,
           process_index: int | None = None) -> LoopLog:
    """The log of loop `name`, which starts at `first_step` (a resumed loop: its checkpoint's
    step) with `replica_names` (K stacked replicas) or none (one model).

    Records of `name` after `first_step` are dropped from `metrics_path`, and the loop's event
    files are written anew from the records kept (the module docstring): the loop records the
    later steps again. Files are written, and event files created, on process 0 only
    (`writes_logs(process_index)`).
    """
    if not writes_logs(process_index):
      return LoopLog(name, self.every, None, {})
    metrics = MetricsLog(self.metrics_path)
    kept = metrics.drop_after(name, first_step)
    writers = {}
    if self.tensorboard_dir is not None:
      # Deferred: tensorboardX imports torch where torch is installed (about a second).
      from tensorboardX import SummaryWriter

      folder = run_path(self.tensorboard_dir) / name
      for key, sub in [(None, folder), *((r, folder / r) for r in replica_names or ())]:
        for old in sub.glob("events.out.tfevents.*"):  # rewritten from `kept` below
          remove(old)
        # A nanosecond suffix: tensorboardX names files by the second, and a second writer of a
        # folder in the same second would overwrite the first one's file.
        writers[key] = SummaryWriter(str(sub), flush_secs=TENSORBOARD_FLUSH_SECONDS,
                                     filename_suffix=f".{time.time_ns()}")
    tracker = None
    if self.wandb is not None:
      tracker = wandb_run(self.wandb)
      # Each loop's scalars against its own step (W&B's documented way to give a run several
      # x axes): the global step only grows, and every loop counts from 0.
      tracker.define_metric(f"{name}/step")
      tracker.define_metric(f"{name}/*", step_metric=f"{name}/step")
    log = LoopLog(name, self.every, metrics, writers, tracker, list(replica_names or ()))
    log.replay(kept)
    return log


# The W&B run of this process, and the run directory it belongs to: W&B has one active run per
# process, shared by the run's loops and finished at exit (or when another run directory logs).
_WANDB: dict[str, Any] = {}


def wandb_run(spec: WandbSpec) -> Any:
  """The W&B run of `spec.run_dir`, started (or resumed: same id) on first use in this process."""
  if is_remote(spec.run_dir):
    raise ConfigError(f"logging.wandb={spec.mode}: run_dir {spec.run_dir} is in a bucket, and "
                      "W&B writes local files; use a local run_dir or logging.wandb=off")
  folder = Path(run_path(spec.run_dir))
  if _WANDB.get("dir") == folder:
    return _WANDB["run"]
  finish_wandb()
  try:
    # Deferred: an optional package (`ff_jax[wandb]`), about a second to import.
    import wandb
  except ImportError:
    raise ConfigError(f"logging.wandb={spec.mode} needs the wandb package: "
                      "pip install 'ff_jax[wandb]' (or set logging.wandb=off)") from None
  files = folder / "wandb"
  files.mkdir(parents=True, exist_ok=True)
  # The id is kept in the run directory, not derived from its path: a run directory deleted and
  # started again is a new W&B run, while a resumed one (the file is there) continues its run.
  id_file = files / WANDB_ID_FILE
  run_id = id_file.read_text().strip() if id_file.is_file() else ""
  if not run_id:
    run_id = secrets.token_hex(8)
    write_atomic(id_file, run_id + "\n")
  run = wandb.init(project=spec.project, id=run_id, resume="allow", mode=spec.mode,
                   dir=str(folder), name=folder.name, config=spec.config,
                   # ff_jax prints its own progress; W&B capturing stdout/stderr would copy it.
                   settings=wandb.Settings(console="off", silent=True))
  _WANDB.update(dir=folder, run=run)
  atexit.register(finish_wandb)
  return run


def finish_wandb() -> None:
  """Finishes this process's W&B run, if any (flushes its files); registered at exit."""
  run = _WANDB.pop("run", None)
  _WANDB.pop("dir", None)
  if run is not None:
    run.finish()


class LoopLog:
  """One training loop's records (`TrainingLog.open`); `close()` flushes and closes its event
  files (the W&B run stays open for the run's next loop)."""

  def __init__(self, name: str, every: int, metrics: MetricsLog | None,
               writers: dict[str | None, Any], tracker: Any = None,
               replica_names: list[str] | None = None):
    self.name, self.every, self.metrics, self.writers = name, every, metrics, writers
    self.tracker, self.replica_names = tracker, replica_names or []

  def record(self, step: int, **values: float | list[float] | None) -> None:
    """One record of `step`: a scalar per value, or a list of one per replica (TensorBoard and
    W&B get each replica's under its folder and their mean under the loop's). None: not
    measured."""
    if self.metrics is not None:
      self.metrics.write(phase=self.name, step=step, **values)
    self._scalars(step, values, track=True)

  def replay(self, records: Sequence[dict[str, Any]]) -> None:
    """Write `records` (this loop's, as `metrics.jsonl` holds them) to the event files again; not
    to W&B, which keeps what it was sent."""
    for record in records:
      values = {key: [math.nan if one is None else one for one in value]
                if isinstance(value, list) else value
                for key, value in record.items() if key not in ("phase", "step")}
      self._scalars(record["step"], values, track=False)

  def _scalars(self, step: int, values: dict[str, float | list[float] | None],
               track: bool) -> None:
    scalars = {}
    for key, value in values.items():
      if value is None:
        continue
      tag = f"train/{key}"
      if isinstance(value, list):
        for replica, one in zip(self.replica_names, value):
          if replica in self.writers:
            self.writers[replica].add_scalar(tag, one, step)
          scalars[f"{self.name}/{replica}/{tag}"] = float(one)
        value = float(np.mean(value))
      if None in self.writers:
        self.writers[None].add_scalar(tag, value, step)
      scalars[f"{self.name}/{tag}"] = float(value)
    if track and self.tracker is not None and scalars:
      self.tracker.log({f"{self.name}/step": step, **scalars})

  def close(self) -> None:
    for writer in self.writers.values():
      writer.close()
    self.writers = {}


def log(message: str) -> None:
  """A line on stderr from process 0 (the other hosts would repeat it)."""
  if writes_logs():
    print(message, file=sys.stderr, flush=True)
