"""Progress lines with rate and ETA, and the run's `metrics.jsonl` stream.

Progress lines are printed at most every 5 s; the environment variable `FF_JAX_PROGRESS_INTERVAL`
(seconds, e.g. `0` for a line per update) changes that default, for logs and tests.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax


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
    if jax.process_index() == 0:
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
  """Appends one JSON object per line; process 0 only."""

  def __init__(self, path: str | Path | None):
    self.path = Path(path) if path else None

  def write(self, **record: Any) -> None:
    if self.path is None or jax.process_index() != 0:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    with self.path.open("a") as handle:
      handle.write(json.dumps(record, sort_keys=True) + "\n")


def log(message: str) -> None:
  """A line on stderr from process 0 (the other hosts would repeat it)."""
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)
