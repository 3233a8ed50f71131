"""Training records every N steps (`progress.TrainingLog`, `loop.train_loop`): `metrics.jsonl` lines
at steps N, 2N, ..., last; TensorBoard event files that the tensorboard package's reader reads back
with the same values, per replica for stacked passes; a resumed loop without duplicate steps; and
files written by process 0 only."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ff_jax.config import LoggingConfig, load_config
from ff_jax.data.batching import Batching, TrainIterator, token_slots
from ff_jax.errors import ConfigError
from ff_jax.pipeline.rundir import RunDir
from ff_jax.progress import MetricsLog, TrainingLog, writes_logs
from ff_jax.training.checkpoints import PhaseCheckpoints
from ff_jax.training.loop import PhaseSpec, train_and_score, train_loop, train_phase
from ff_jax.training.steps import Scorer, Trainer
from tests.training.test_loop import BUCKETS, OPTIM, PAD, SpyCheckpoints, examples, runtime

# Fields of a record that measure wall time: they differ from run to run.
TIMED = ("tokens_per_s", "examples_per_s")


def strict_lines(path) -> list[dict]:
  """The JSON lines of `path`, refusing NaN/Infinity (not JSON)."""

  def refuse(token):
    raise AssertionError(f"{path}: non-JSON number {token}")

  return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def scalars(folder, tag: str) -> list[tuple[int, float]]:
  """(step, value) of `tag` in the event files of `folder`, as TensorBoard shows them."""
  events = EventAccumulator(str(folder))
  events.Reload()
  return [(e.step, e.value) for e in events.Scalars(tag)]


def timeless(rows: list[dict]) -> list[dict]:
  return [{k: v for k, v in row.items() if k not in TIMED} for row in rows]


def test_records_every_n_steps_and_the_last_to_jsonl_and_tensorboard(tmp_path, monkeypatch,
                                                                     capsys):
  monkeypatch.setenv("FF_JAX_PROGRESS_INTERVAL", "0")  # a progress line per step
  model = runtime()
  params = model.init_params(seed=0)
  data = examples(24, 4)  # batches of both buckets: two compiles in the first run
  trainer = Trainer(model, OPTIM, 7)

  def run(every: int, folder: str):
    log = TrainingLog(tmp_path / folder / "metrics.jsonl", tmp_path / folder / "tb", every)
    train_loop(trainer, lambda: jax.tree.map(jnp.copy, params),
               TrainIterator(data, 2, 0, BUCKETS, pad_id=PAD), 7, "phase", log=log)
    return strict_lines(tmp_path / folder / "metrics.jsonl")

  rows = run(3, "every_3")
  progress_lines = capsys.readouterr().err.strip().splitlines()
  every_step = run(1, "every_step")
  assert [r["step"] for r in rows] == [3, 6, 7]
  # A record holds its own step's metrics (read one step later, never the next step's).
  by_step = {r["step"]: r for r in every_step}
  for row in rows:
    for key in ("loss", "grad_norm", "lr"):
      assert row[key] == by_step[row["step"]][key], (row["step"], key)
  assert rows[0]["lr"] == OPTIM.learning_rate

  # The progress line shows the latest record.
  assert f"loss {rows[-1]['loss']:.3f}" in progress_lines[-1] and "7/7" in progress_lines[-1]

  # Throughput: tokens per example of each record's steps (time cancels); the steps that compiled
  # count too, their compile time does not.
  stream = TrainIterator(data, 2, 0, BUCKETS, pad_id=PAD)
  per_step = []
  for _ in range(7):
    batch, _ = stream.next_batch()
    per_step.append((token_slots(batch)[0], int((batch["example_id"] >= 0).sum())))
  previous = 0
  for row in rows:
    tokens, count = np.sum(per_step[previous:row["step"]], axis=0)
    previous = row["step"]
    assert row["tokens_per_s"] > 0
    np.testing.assert_allclose(row["tokens_per_s"] / row["examples_per_s"], tokens / count,
                               rtol=1e-3)

  # TensorBoard: the event files read back with the loss of every record.
  folder = tmp_path / "every_3" / "tb" / "phase"
  got = scalars(folder, "train/loss")
  assert [step for step, _ in got] == [3, 6, 7]
  np.testing.assert_array_equal([v for _, v in got], np.float32([r["loss"] for r in rows]))
  assert [v for _, v in scalars(folder, "train/lr")] == [np.float32(OPTIM.learning_rate)] * 3
  assert len(scalars(folder, "train/grad_norm")) == 3
  assert len(scalars(folder, "train/tokens_per_s")) == sum(
      r["tokens_per_s"] is not None for r in rows)


def test_a_stacked_pass_records_each_replica_and_their_mean(tmp_path):
  model = runtime()
  params = model.init_params(seed=0)
  data = examples(16, 5)
  iterators = [TrainIterator(data, 4, seed, BUCKETS, pad_id=PAD) for seed in (1, 2)]
  log = TrainingLog(tmp_path / "metrics.jsonl", tmp_path / "tb", every=2)
  train_and_score(Trainer(model, OPTIM, 4, replicas=2), Scorer(model), params, iterators, [4],
                  data[:4], Batching(4, BUCKETS, PAD), name="pass_0", log=log,
                  replica_names=["seed_1", "seed_2"])
  rows = strict_lines(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in rows] == [2, 4]
  assert all(len(r["loss"]) == len(r["grad_norm"]) == 2 for r in rows)
  assert rows[-1]["loss"][0] != rows[-1]["loss"][1]  # two data orders, two losses

  for k, name in enumerate(("seed_1", "seed_2")):
    got = scalars(tmp_path / "tb" / "pass_0" / name, "train/loss")
    assert [step for step, _ in got] == [2, 4]
    np.testing.assert_array_equal([v for _, v in got], np.float32([r["loss"][k] for r in rows]))
  mean = scalars(tmp_path / "tb" / "pass_0", "train/loss")
  np.testing.assert_allclose([v for _, v in mean], [np.mean(r["loss"]) for r in rows], rtol=1e-6)
  assert len(scalars(tmp_path / "tb" / "pass_0", "train/lr")) == 2


def test_replica_names_must_name_every_replica_once():
  model = runtime()
  params = model.init_params(seed=0)
  iterators = [TrainIterator(examples(8, 1), 4, seed, BUCKETS, pad_id=PAD) for seed in (1, 2)]
  with pytest.raises(ConfigError, match="2 distinct names"):
    train_and_score(Trainer(model, OPTIM, 2, replicas=2), Scorer(model), params, iterators, [2],
                    examples(4, 2), Batching(4, BUCKETS, PAD), replica_names=["a", "a"])


def test_a_resumed_phase_appends_without_duplicate_steps(tmp_path):
  """Killed after its last step, before its output was saved: the rerun resumes from the step
  checkpoint at 4, records step 5 again, and step 5 is there once (the other phase untouched)."""
  model = runtime()
  data = examples(20, 2)
  spec = PhaseSpec("phase", steps=5, batching=Batching(4, BUCKETS, PAD), optim=OPTIM, seed=3,
                   checkpoint_every=2)
  log = TrainingLog(tmp_path / "metrics.jsonl", tmp_path / "tb", every=1)
  MetricsLog(log.metrics_path).write(phase="other", step=5, loss=1.0)

  def run():
    params = model.init_params(seed=0)
    return train_phase(spec, Trainer(model, OPTIM, 5), lambda: params, data, tmp_path / "ckpt",
                       log)

  run()
  straight = strict_lines(log.metrics_path)
  run()
  rows = strict_lines(log.metrics_path)
  assert [(r["phase"], r["step"]) for r in rows] == [
      ("other", 5), *(("phase", step) for step in range(1, 6))]
  for key in ("loss", "grad_norm", "lr"):  # the same values again: training is deterministic
    assert [r[key] for r in rows[1:]] == [r[key] for r in straight[1:]]

  folder = tmp_path / "tb" / "phase"
  assert len(list(folder.glob("events.out.tfevents.*"))) == 1  # rewritten by the resumed loop
  got = scalars(folder, "train/loss")
  assert [step for step, _ in got] == [1, 2, 3, 4, 5]
  np.testing.assert_array_equal([v for _, v in got], np.float32([r["loss"] for r in rows[1:]]))


class LogAtSave(SpyCheckpoints):
  """Step checkpoints that note, as each save begins, the steps `metrics.jsonl` holds."""

  def __init__(self, directory, metrics_path):
    super().__init__(directory)
    self.metrics_path, self.on_file = metrics_path, {}

  def save(self, step, state, meta):
    self.on_file[step] = [r["step"] for r in strict_lines(self.metrics_path)]
    super().save(step, state, meta)


def test_every_record_up_to_a_step_checkpoint_is_on_file_before_it_is_saved(tmp_path):
  """A rerun resumes after the checkpoint's step and records only the later steps: a record of
  the checkpoint's step still pending (read one step later) when the process is killed after the
  save would be lost for good."""
  model = runtime()
  log = TrainingLog(tmp_path / "metrics.jsonl", None, every=1)
  checkpoints = LogAtSave(tmp_path / "ckpt", log.metrics_path)
  train_loop(Trainer(model, OPTIM, 5), lambda: model.init_params(seed=0),
             TrainIterator(examples(20, 2), 4, 0, BUCKETS, pad_id=PAD), 5, "phase",
             checkpoints=checkpoints, checkpoint_every=2, log=log)
  checkpoints.close()
  assert checkpoints.on_file == {2: [1, 2], 4: [1, 2, 3, 4]}


class Killed(Exception):
  """Stands for a SIGKILL in the middle of a loop."""


def test_a_loop_killed_past_its_checkpoint_resumes_with_a_clean_log(tmp_path):
  """Killed after step 4 (its record not yet read, step 3's on file) with half a line of a record
  on file and the event file missing records it had queued, the rerun resumes from the checkpoint
  at step 2: the torn line and step 3's record go, steps 3 to 5 are recorded once, the event
  files are rebuilt, and both logs read as an uninterrupted run's."""
  model = runtime()
  data = examples(20, 2)

  def run(folder: str, kill_at: int | None = None) -> TrainingLog:
    log = TrainingLog(tmp_path / folder / "metrics.jsonl", tmp_path / folder / "tb", every=1)
    checkpoints = PhaseCheckpoints(tmp_path / folder / "ckpt")

    def kill(step, params):
      raise Killed(step)

    try:
      train_loop(Trainer(model, OPTIM, 5), lambda: model.init_params(seed=0),
                 TrainIterator(data, 4, 0, BUCKETS, pad_id=PAD), 5, "phase",
                 checkpoints=checkpoints, checkpoint_every=2, log=log, hook=kill,
                 hook_steps={kill_at} if kill_at else ())
    finally:
      checkpoints.close()
    return log

  straight = run("straight")
  with pytest.raises(Killed):
    run("killed", kill_at=4)
  log = TrainingLog(tmp_path / "killed" / "metrics.jsonl", tmp_path / "killed" / "tb", every=1)
  assert [r["step"] for r in strict_lines(log.metrics_path)] == [1, 2, 3]
  with log.metrics_path.open("a") as handle:
    handle.write('{"examples_per_s": 1.5, "grad_no')  # the record of step 4, cut short
  (events,) = (log.tensorboard_dir / "phase").glob("events.out.tfevents.*")
  events.write_bytes(b"")  # tensorboardX had not written its queue to the file
  run("killed")

  rows = strict_lines(log.metrics_path)  # fails on the torn line
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
  assert timeless(rows) == timeless(strict_lines(straight.metrics_path))
  assert len(list((log.tensorboard_dir / "phase").glob("events.out.tfevents.*"))) == 1
  for tag in ("train/loss", "train/grad_norm", "train/lr"):
    assert scalars(log.tensorboard_dir / "phase", tag) == \
        scalars(straight.tensorboard_dir / "phase", tag), tag


def test_a_resumed_stacked_loop_rebuilds_every_replicas_event_file(tmp_path):
  """Kept records go back to each replica's folder and the mean's; a replica's non-finite value
  (null in metrics.jsonl) as NaN."""
  log = TrainingLog(tmp_path / "metrics.jsonl", tmp_path / "tb", every=1)
  first = log.open("pass", replica_names=["a", "b"])
  first.record(1, loss=[1.0, math.nan], lr=0.5)
  first.record(2, loss=[2.0, 3.0], lr=0.5)  # killed after step 2, resumed from step 1
  first.close()
  again = log.open("pass", first_step=1, replica_names=["a", "b"])
  again.record(2, loss=[4.0, 6.0], lr=0.5)
  again.close()
  folder = tmp_path / "tb" / "pass"
  for sub in (folder, folder / "a", folder / "b"):
    assert len(list(sub.glob("events.out.tfevents.*"))) == 1, sub
  assert scalars(folder / "a", "train/loss") == [(1, 1.0), (2, 4.0)]
  assert [(step, math.isnan(v) or v) for step, v in scalars(folder / "b", "train/loss")] == [
      (1, True), (2, 6.0)]
  assert [step for step, _ in scalars(folder, "train/loss")] == [1, 2]
  assert scalars(folder, "train/lr") == [(1, 0.5), (2, 0.5)]


def test_only_process_zero_writes(tmp_path):
  assert writes_logs(0) and not writes_logs(1)
  log = TrainingLog(tmp_path / "metrics.jsonl", tmp_path / "tb", every=1)
  other = log.open("phase", process_index=1)
  assert other.writers == {} and other.metrics is None
  other.record(1, loss=1.0)
  other.close()
  assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "tb").exists()

  first = log.open("phase", replica_names=["a", "b"], process_index=0)
  first.record(1, loss=[1.0, 3.0])
  first.close()
  assert scalars(tmp_path / "tb" / "phase", "train/loss") == [(1, 2.0)]
  assert scalars(tmp_path / "tb" / "phase" / "b", "train/loss") == [(1, 3.0)]


def test_metrics_lines_are_strict_json_with_null_for_non_finite(tmp_path):
  path = tmp_path / "metrics.jsonl"
  MetricsLog(path).write(phase="p", step=1, loss=math.nan, grad_norm=[1.5, math.inf], lr=1e-3)
  want = [{"phase": "p", "step": 1, "loss": None, "grad_norm": [1.5, None], "lr": 1e-3}]
  assert strict_lines(path) == want
  path.write_text(path.read_text() + '{"phase": "p", "st')  # a line a kill cut short
  MetricsLog(path).drop_after("p", 1)  # keeps step 1, drops the torn line
  assert strict_lines(path) == want
  path.write_text(path.read_text().rstrip("\n"))  # a kill between a record and its newline
  MetricsLog(path).drop_after("p", 1)
  MetricsLog(path).write(phase="p", step=2, loss=None)
  assert strict_lines(path) == [*want, {"phase": "p", "step": 2, "loss": None}]


def test_logging_config_is_checked_and_never_blocks_a_resume(tmp_path):
  assert load_config(None, ["logging.every=5", "logging.tensorboard=false"]).logging == \
      LoggingConfig(every=5, tensorboard=False)
  with pytest.raises(ConfigError, match="logging.every=0"):
    LoggingConfig(every=0)
  run = RunDir(tmp_path / "run")
  defaults = load_config(None).to_dict()
  run.open(defaults, {}, defaults=defaults)
  changed = load_config(None, ["logging.every=1", "logging.tensorboard=false",
                               "logging.wandb=offline"]).to_dict()
  assert run.open(changed, {}, defaults=defaults)["config"]["logging"] == {
      "every": 1, "tensorboard": False, "wandb": "offline", "wandb_project": "ff_jax"}


def test_training_is_unchanged_by_how_often_the_loop_records(tmp_path):
  """Recording reads metrics only: the trained params do not depend on `every`."""
  model = runtime()
  params = model.init_params(seed=0)
  data = examples(12, 6)
  trainer = Trainer(model, OPTIM, 4)
  trained = []
  for every in (1, 1000):
    log = TrainingLog(tmp_path / f"m{every}.jsonl", None, every)
    trained.append(jax.tree.map(np.asarray, train_loop(
        trainer, lambda: jax.tree.map(jnp.copy, params),
        TrainIterator(data, 4, 0, BUCKETS, pad_id=PAD), 4, "p", log=log)))
  for a, b in zip(jax.tree.leaves(trained[0]), jax.tree.leaves(trained[1])):
    np.testing.assert_array_equal(a, b)
  assert [r["step"] for r in strict_lines(tmp_path / "m1000.jsonl")] == [4]  # the last only
