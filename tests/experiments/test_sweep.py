"""`ff-jax sweep`: stacked replicas equal separate runs, shard over a replica axis, and resume;
variants train with the run's safety optimizer and batch size unless the sweep overrides them."""

from __future__ import annotations

import dataclasses
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ff_jax import parallel
from ff_jax.data.batching import Batching
from ff_jax.errors import ConfigError, RunDirError
from ff_jax.experiments import sweep
from ff_jax.models import tiny_llama
from ff_jax.progress import Progress
from ff_jax.training.checkpoints import PhaseCheckpoints
from ff_jax.training.loop import train_and_score, train_loop
from ff_jax.training.replicas import (
  ReplicaMeshConfig,
  StackedBatches,
  make_replica_mesh,
  stacked_batch,
  variant_iterator,
)
from ff_jax.training.steps import ModelRuntime, OptimConfig, Scorer, Trainer
from tests.helpers.encoded import random_examples
from tests.helpers.pipeline_helpers import TINY_DEMO, manifest, run_ok

BUCKETS = (16, 32)
PAD = 0


def _cfg():
  return tiny_llama(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                    num_kv_heads=1)


OPTIM = OptimConfig(learning_rate=3e-3, warmup_steps=1, schedule="cosine")


def test_vmapped_replicas_match_each_variant_alone():
  devices = jax.devices()[:1]
  mesh = parallel.make_mesh(parallel.MeshConfig(1, 1, 1), devices)
  runtime = ModelRuntime.create(_cfg(), mesh)
  params = runtime.init_params(seed=0)
  safe, noisy = random_examples(20, 1), random_examples(10, 2)
  # Different sizes (one smaller than the batch: filler rows) and seeds; different bucket
  # lengths per replica and step exercise the common-length padding.
  variants = [(3, 0), (12, 0), (20, 1)]
  steps = [2, 5]
  its = [variant_iterator(safe, n, s, 4, BUCKETS, PAD) for n, s in variants]
  rmesh = make_replica_mesh(ReplicaMeshConfig(1, 1, 1, 1), devices)
  rruntime = ModelRuntime.create(_cfg(), rmesh)
  trainer = Trainer(rruntime, OPTIM, max(steps), replicas=len(variants))
  stacked = train_and_score(trainer, Scorer(rruntime), params, its, steps, noisy,
                            Batching(5, BUCKETS, PAD))[0]["nll"]
  assert stacked.shape == (len(variants), len(steps), len(noisy))
  assert trainer.trace_count == 1
  # One trainer and scorer for every variant alone; `params` stays usable across the runs.
  single, scorer = Trainer(runtime, OPTIM, max(steps)), Scorer(runtime)
  for k, (n, s) in enumerate(variants):
    alone = train_and_score(single, scorer, params,
                            [variant_iterator(safe, n, s, 4, BUCKETS, PAD)], steps, noisy,
                            Batching(5, BUCKETS, PAD))[0]["nll"]
    np.testing.assert_allclose(stacked[k], alone[0], rtol=1e-4, err_msg=str((n, s)))
  assert single.trace_count == 1
  # The replicas really differ (each trained on its own stream).
  assert not np.allclose(stacked[0], stacked[2], rtol=1e-3)


def test_replica_axis_puts_each_replica_on_its_own_devices():
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices")
  mesh = make_replica_mesh(ReplicaMeshConfig(replica=4, data=2, fsdp=1, tensor=1))
  runtime = ModelRuntime.create(_cfg(), mesh)
  trainer = Trainer(runtime, OPTIM, 3, replicas=4)
  state = trainer.init_state(runtime.init_params(seed=0))
  safe = random_examples(16, 3)
  its = [variant_iterator(safe, 8 + 2 * k, k, 4, BUCKETS, PAD) for k in range(4)]
  batch = stacked_batch([it.next_batch()[0] for it in its], PAD)
  state, metrics = trainer.step(state, trainer.put_batch(batch))
  assert metrics["loss"].shape == (4,)
  devices = np.asarray(mesh.devices)  # [replica, data, fsdp, tensor]
  for leaf in jax.tree.leaves(state["params"]) + jax.tree.leaves(state["opt_state"]):
    assert leaf.sharding.spec[0] == "replica"
    for shard in leaf.addressable_shards:
      k = shard.index[0].start or 0
      assert shard.data.shape[0] == 1
      assert shard.device in set(devices[k].ravel().tolist()), (k, shard.device)
  # The batch rows of a replica are split over its 2 data devices.
  tok = trainer.put_batch(batch)["tokens"]
  assert tok.sharding.spec[:2] == ("replica", ("data", "fsdp")) or tok.sharding.spec[1] in (
      "data", ("data",), ("data", "fsdp"))
  assert all(s.data.shape[:2] == (1, 2) for s in tok.addressable_shards)
  # The stacked score step keeps each replica's scores on its own devices too.
  scores = Scorer(runtime).stacked_step(state["params"], parallel.global_batch(
      {k: v[0] for k, v in batch.items()}, mesh))
  assert scores["nll_sum"].shape == (4, 4) and scores["nll_sum"].sharding.spec[0] == "replica"


def test_stacked_replicas_resume_from_a_step_checkpoint(tmp_path):
  """A stacked loop killed after a checkpoint resumes every replica's stream where it was."""
  mesh = make_replica_mesh(ReplicaMeshConfig(1, 1, 1, 1), jax.devices()[:1])
  runtime = ModelRuntime.create(_cfg(), mesh)
  params = runtime.init_params(seed=0)
  safe = random_examples(12, 6)

  def train(steps, ckpt_dir):
    trainer = Trainer(runtime, OPTIM, 4, replicas=2)
    batches = StackedBatches([variant_iterator(safe, n, n, 4, BUCKETS, PAD) for n in (6, 12)],
                             PAD)
    checkpoints = PhaseCheckpoints(ckpt_dir)
    out = train_loop(trainer, lambda: jax.tree.map(jnp.copy, params), batches, steps, "stacked",
                     checkpoints=checkpoints, checkpoint_every=2)
    checkpoints.close()
    return jax.tree.map(np.asarray, out)

  straight = train(4, tmp_path / "straight")
  train(2, tmp_path / "resumed")  # as if killed right after step 2's checkpoint
  resumed = train(4, tmp_path / "resumed")
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(*jax.tree.leaves(straight)[0])  # the two replicas differ


def _inputs(mesh):
  runtime = ModelRuntime.create(_cfg(), mesh)
  noisy = random_examples(12, 5)
  return sweep.SweepInputs(runtime=runtime, m1=runtime.init_params(seed=0),
                           safe=random_examples(16, 4), noisy=noisy,
                           nll_before=np.full(len(noisy), 5.0),
                           is_unsafe=np.arange(len(noisy)) % 2 == 0, buckets=BUCKETS, pad_id=PAD,
                           safety_optim=OPTIM, safety_batch_size=4)


def test_resume_skips_finished_chunks(tmp_path, monkeypatch):
  mesh = make_replica_mesh(ReplicaMeshConfig(1, 1, 1, 1), jax.devices()[:1])
  inputs = _inputs(mesh)
  cfg = sweep.SweepConfig(out_dir=str(tmp_path / "sw"), safe_sizes=(4, 8), seeds=(0, 1, 2),
                          steps=(1, 2), batch_size=4, chunk_size=4, score_batch_size=6,
                          phis=(0.0, 0.5))
  calls = []
  real = sweep.train_and_score

  def counting(trainer, scorer, init, its, *args, **kwargs):
    calls.append(len(its))
    return real(trainer, scorer, init, its, *args, **kwargs)

  monkeypatch.setattr(sweep, "train_and_score", counting)
  out = sweep.run_sweep(cfg, inputs)
  assert calls == [4, 4]  # 6 variants in 2 chunks of 4 (the last padded)
  first = (out / "results.csv").read_text()
  for name in ("results.json", "report.md", "f1_vs_safe_size.png", "f1_vs_steps.png",
               "f1_vs_phi.png"):
    assert (out / name).exists(), name
  rows = json.loads((out / "results.json").read_text())
  assert len(rows) == 6 * 2 * 3  # variants × t × (auto + 2 fixed ϕ)
  assert {r["threshold"] for r in rows} == {"auto:gmm", "fixed:0", "fixed:0.5"}

  calls.clear()
  (out / "chunks" / "chunk_001.json").unlink()  # as if killed during the second chunk
  sweep.run_sweep(cfg, inputs)
  assert calls == [4]  # only the missing chunk was trained again
  assert (out / "results.csv").read_text() == first  # and it reproduced the same numbers

  calls.clear()
  sweep.run_sweep(cfg, inputs)
  assert calls == []
  # A saved chunk from another config is refused, not silently mixed in.
  with pytest.raises(RunDirError, match="another config"):
    sweep.run_sweep(dataclasses.replace(cfg, batch_size=2), inputs)

def test_variants_train_with_the_runs_safety_optimizer_unless_the_sweep_overrides_it(
    tmp_path, monkeypatch, capsys):
  mesh = make_replica_mesh(ReplicaMeshConfig(1, 1, 1, 1), jax.devices()[:1])
  inputs = _inputs(mesh)
  trained_with = []
  real = sweep.train_and_score

  def recording(trainer, scorer, init, its, *args, **kwargs):
    trained_with.append((trainer.optim, its[0].batch_size))
    return real(trainer, scorer, init, its, *args, **kwargs)

  monkeypatch.setattr(sweep, "train_and_score", recording)
  cfg = sweep.SweepConfig(out_dir=str(tmp_path / "run"), safe_sizes=(4,), seeds=(0,), steps=(1,),
                          chunk_size=1, score_batch_size=6, phis=(0.0,))
  out = sweep.run_sweep(cfg, inputs)
  assert trained_with == [(OPTIM, 4)]  # the run's, as `inputs` carry them
  said = "the run's safety optimizer (lr 0.003, batch 4)"
  assert f"optimizer: {said}" in capsys.readouterr().err
  assert f"Optimizer: {said}." in (out / "report.md").read_text()
  rows = json.loads((out / "results.json").read_text())
  assert {(r["optimizer"], r["learning_rate"], r["batch_size"]) for r in rows} == {
      ("the run's safety optimizer", 0.003, 4)}
  assert "optimizer,learning_rate,batch_size" in (out / "results.csv").read_text()

  trained_with.clear()
  own = OptimConfig(learning_rate=1e-3, warmup_steps=2)
  override = dataclasses.replace(cfg, out_dir=str(tmp_path / "own"), optim=own, batch_size=2)
  out = sweep.run_sweep(override, inputs)
  assert trained_with == [(own, 2)]
  assert "Optimizer: sweep override (lr 0.001, batch 2)." in (out / "report.md").read_text()
  assert {r["optimizer"] for r in json.loads((out / "results.json").read_text())} == {
      "sweep override"}
  part = sweep.sweep_training(dataclasses.replace(cfg, batch_size=8), inputs)
  assert (part.optim, part.batch_size) == (OPTIM, 8)
  assert part.describe() == ("the run's safety optimizer, sweep override of the batch size "
                             "(lr 0.003, batch 8)")
  with pytest.raises(ConfigError, match="no run's safety finetune to take them from"):
    sweep.sweep_training(cfg, dataclasses.replace(inputs, safety_optim=None))


@pytest.mark.slow
def test_a_sweep_of_a_run_directory_takes_its_safety_finetune(tmp_path):
  """`ff-jax sweep` on a real run directory: the optimizer and batch of its manifest config.

  The run goes on to its safety replicas (`scoring.replicas_per_pass: auto`, the default): on a
  CPU one at a time, as `ff-jax plan` decides, and the manifest records the count it used."""
  run_dir = tmp_path / "run"
  ran = run_ok("run", *TINY_DEMO, f"run_dir={run_dir}", "safety.optim.learning_rate=0.002",
               "scoring.replicas_per_pass=auto", "--until", "safety_replicas", timeout=900)
  assert "2 more replicas, 1 per pass (cpu: one replica already keeps the cores busy" in ran.stderr
  run = manifest(run_dir)
  assert run["config"]["scoring"]["replicas_per_pass"] == "auto"
  assert run["phases"]["safety_replicas"]["replicas_per_pass"] == 1
  assert set(run["phases"]["safety_replicas"]["finetunes"]) == {"pass_0", "pass_1"}
  safety = run["config"]["safety"]
  assert (safety["optim"]["learning_rate"], safety["batch_size"]) == (0.002, 4)
  proc = run_ok("sweep", "--run-dir", run_dir, "safe_sizes=[4]", "seeds=[0]", "steps=[1]",
                "chunk_size=1", "score_batch_size=12", "phis=[0.0]", timeout=900)
  assert "optimizer: the run's safety optimizer (lr 0.002, batch 4)" in proc.stderr
  rows = json.loads((run_dir / "sweep" / "results.json").read_text())
  assert {(r["learning_rate"], r["batch_size"]) for r in rows} == {(0.002, 4)}


def test_progress_is_due_at_the_first_update_each_interval_and_the_end():
  """`due` tells an asynchronous loop when to wait for the device before `update` prints."""
  out = io.StringIO()
  progress = Progress("stacked", 10, interval=3600, stream=out)
  assert progress.due(1)
  progress.update(1)
  assert not progress.due(2) and not progress.due(9)
  assert progress.due(10)
  progress.update(10)
  assert out.getvalue().splitlines()[-1].startswith("[stacked] 10/10 steps")
