"""`logging.wandb` (`progress.TrainingLog.wandb`): an offline Weights & Biases run, read back from
its `.wandb` file, holds the scalars of `metrics.jsonl` (a stacked pass's replicas and mean, a
second loop against its own step); a resumed run continues the same W&B run; the mode is checked;
wandb missing, or a bucket run directory, is a clear error; and ff_jax never imports wandb unless
asked.

The W&B tests need the `wandb` package (in the `test` extra) and skip without it.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ff_jax import progress
from ff_jax.config import LoggingConfig, load_config
from ff_jax.data.batching import Batching, TrainIterator
from ff_jax.errors import ConfigError
from ff_jax.progress import TrainingLog, WandbSpec, finish_wandb, wandb_run
from ff_jax.training.loop import train_and_score, train_loop
from ff_jax.training.steps import Scorer, Trainer
from tests.helpers.paths import REPO
from tests.training.test_logging import strict_lines
from tests.training.test_loop import BUCKETS, OPTIM, PAD, examples, runtime

# The `.wandb` file: LevelDB's log format (32 KiB blocks of records, each a 7-byte header:
# CRC32, length, type) after a 7-byte W&B header (":W&B", magic, version). wandb >= 0.20 reads it
# in its Go core only, so the test reads it here; each record is a protobuf `Record`.
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(path: Path) -> list[bytes]:
  data = path.read_bytes()
  assert data[:4] == b":W&B", path
  records, pos, pending = [], 7, b""
  while pos + 7 <= len(data):
    left = _BLOCK - pos % _BLOCK
    if left < 7:  # a block's tail too short for a header is padding
      pos += left
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    if kind == 0 and length == 0:  # zero-filled: the end of what was written
      break
    chunk = data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind == _FULL:
      records.append(chunk)
    elif kind == _FIRST:
      pending = chunk
    elif kind == _MIDDLE:
      pending += chunk
    elif kind == _LAST:
      records.append(pending + chunk)
  return records


def wandb_history(run_dir: Path) -> list[dict]:
  """Every `log` of the run directory's offline W&B run(s), in the order logged (W&B's own
  `_step`, `_runtime`, `_timestamp` left out); resumed pieces after the first, oldest first."""
  import wandb
  from wandb.proto import wandb_internal_pb2

  # `finish()` returns before W&B's service process has written all of the file; the service
  # ends, its files complete, at `teardown()` (at exit in a real run).
  wandb.teardown()
  rows = []
  for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
    for data in _records(path):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(data)
      if record.WhichOneof("record_type") == "history":
        row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
               for item in record.history.item}
        rows.append({k: v for k, v in row.items() if not k.startswith("_")})
  return rows


def _run_ids(run_dir: Path) -> list[str]:
  """The W&B run id of each offline piece under the run directory, oldest first."""
  return [path.name.removeprefix("run-").removesuffix(".wandb")
          for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))]


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
  """wandb, installed, with its settings and caches in the test's folder (nothing in ~)."""
  wandb = pytest.importorskip("wandb")
  for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
    monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
  monkeypatch.delenv("WANDB_MODE", raising=False)
  yield wandb
  finish_wandb()


def test_offline_run_holds_the_scalars_of_metrics_jsonl(tmp_path, wandb_env):
  run = tmp_path / "run"
  log = TrainingLog(run / "metrics.jsonl", None, every=2, wandb=WandbSpec("offline", run))
  model = runtime()
  params = model.init_params(seed=0)
  data = examples(16, 5)
  iterators = [TrainIterator(data, 4, seed, BUCKETS, pad_id=PAD) for seed in (1, 2)]
  train_and_score(Trainer(model, OPTIM, 4, replicas=2), Scorer(model), params, iterators, [4],
                  data[:4], Batching(4, BUCKETS, PAD), name="pass_0", log=log,
                  replica_names=["seed_1", "seed_2"])
  # A second loop of the same run, counting its steps from 1 again.
  train_loop(Trainer(model, OPTIM, 3), lambda: jax.tree.map(jnp.copy, params),
             TrainIterator(data, 2, 0, BUCKETS, pad_id=PAD), 3, "noisy", log=log)
  finish_wandb()

  rows = strict_lines(run / "metrics.jsonl")
  assert [(r["phase"], r["step"]) for r in rows] == [("pass_0", 2), ("pass_0", 4), ("noisy", 2),
                                                     ("noisy", 3)]
  want = []
  for r in rows:
    name = r["phase"]
    logged = {f"{name}/step": r["step"]}
    for key, value in r.items():
      if key in ("phase", "step") or value is None:
        continue
      if isinstance(value, list):
        for replica, one in zip(("seed_1", "seed_2"), value):
          logged[f"{name}/{replica}/train/{key}"] = one
        value = float(np.mean(value))
      logged[f"{name}/train/{key}"] = value
    want.append(logged)
  got = wandb_history(run)
  assert [sorted(g) for g in got] == [sorted(w) for w in want]
  for g, w in zip(got, want):
    for key in w:
      np.testing.assert_allclose(g[key], w[key], rtol=1e-6, err_msg=key)
  assert {"pass_0/train/loss", "pass_0/seed_2/train/grad_norm", "pass_0/train/lr",
          "noisy/train/tokens_per_s"} <= set(got[1]) | set(got[3])
  # One W&B run, its id kept in the run directory.
  run_id = (run / "wandb" / progress.WANDB_ID_FILE).read_text().strip()
  assert _run_ids(run) == [run_id]


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, wandb_env):
  run = tmp_path / "run"
  spec = WandbSpec("offline", run, config={"seed": 3})
  first = TrainingLog(None, None, 1, spec).open("noisy")
  first.record(1, loss=2.0)
  first.close()
  assert wandb_run(spec) is first.tracker  # the run's next loop shares the process's W&B run
  finish_wandb()  # the process ends; a new one resumes the run directory
  second = TrainingLog(None, None, 1, spec).open("noisy", first_step=1)
  second.record(2, loss=1.5)
  finish_wandb()
  # Two pieces (a W&B process writes its own), of one run: `wandb sync <run_dir>/wandb` uploads
  # them in order.
  assert _run_ids(run) == [(run / "wandb" / progress.WANDB_ID_FILE).read_text().strip()] * 2
  assert wandb_history(run) == [{"noisy/step": 1, "noisy/train/loss": 2.0},
                                {"noisy/step": 2, "noisy/train/loss": 1.5}]
  # Another run directory is another W&B run.
  other = tmp_path / "other"
  TrainingLog(None, None, 1, WandbSpec("offline", other)).open("noisy").record(1, loss=1.0)
  finish_wandb()
  assert (other / "wandb" / progress.WANDB_ID_FILE).read_text() != (
      run / "wandb" / progress.WANDB_ID_FILE).read_text()


def test_only_process_zero_starts_a_wandb_run(tmp_path, monkeypatch):
  def refuse(spec):
    raise AssertionError("W&B started on process 1")

  monkeypatch.setattr(progress, "wandb_run", refuse)
  log = TrainingLog(None, None, 1, WandbSpec("offline", tmp_path / "run"))
  other = log.open("noisy", process_index=1)
  assert other.tracker is None
  other.record(1, loss=1.0)
  assert not (tmp_path / "run").exists()


def test_wandb_mode_is_checked_and_never_blocks_a_resume():
  assert LoggingConfig().wandb == "off"
  # YAML reads bare off/true as booleans: off is off, true is offline (W&B offline unless asked).
  for override, mode in (("off", "off"), ("false", "off"), ("true", "offline"),
                         ("offline", "offline"), ("online", "online")):
    assert load_config(None, [f"logging.wandb={override}"]).logging.wandb == mode
  cfg = load_config(None, ["logging.wandb=true", "logging.wandb_project=mine"])
  assert cfg.to_dict()["logging"] == {"every": progress.LOG_EVERY, "tensorboard": True,
                                      "wandb": "offline", "wandb_project": "mine"}
  with pytest.raises(ConfigError, match="logging.wandb='cloud': use one of off, offline, online"):
    load_config(None, ["logging.wandb=cloud"])


def test_wandb_missing_or_a_bucket_run_dir_is_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
  with pytest.raises(ConfigError, match=r"pip install 'ff_jax\[wandb\]'"):
    wandb_run(WandbSpec("offline", tmp_path / "run"))
  with pytest.raises(ConfigError, match="gs://bucket/run is in a bucket"):
    wandb_run(WandbSpec("offline", "gs://bucket/run"))


def test_the_run_asks_for_wandb_only_when_on_and_refuses_a_bucket_early(tmp_path):
  """The run's TrainingLog (pipeline.context): a bucket run directory with W&B on is refused
  before any training, not at the first record."""
  from ff_jax.pipeline.context import training_log
  from ff_jax.pipeline.rundir import RunDir

  assert training_log(load_config(None), RunDir(tmp_path / "run")).wandb is None
  log = training_log(load_config(None, ["logging.wandb=online", "logging.wandb_project=p"]),
                     RunDir(tmp_path / "run"))
  assert (log.wandb.mode, log.wandb.run_dir, log.wandb.project) == ("online", tmp_path / "run",
                                                                     "p")
  assert log.wandb.config["logging"]["wandb"] == "online"  # the run's config, for W&B's table
  with pytest.raises(ConfigError, match="gs://bucket/run is in a bucket"):
    training_log(load_config(None, ["logging.wandb=offline"]), RunDir("gs://bucket/run"))


def test_ff_jax_does_not_import_wandb_unless_asked():
  code = ("import sys; import ff_jax.cli, ff_jax.config, ff_jax.progress; "
          "from ff_jax.progress import TrainingLog; TrainingLog().open('x').record(1, loss=1.0); "
          "print('wandb' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       check=True)
  assert out.stdout.strip() == "False"
