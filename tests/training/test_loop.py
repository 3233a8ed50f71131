"""The step loop's checkpoints (by wall time on an injected clock, or by steps; never after the last
step) and what it reports about itself (`LoopStats`)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from ff_jax import parallel
from ff_jax.data.batching import Batching, TrainIterator
from ff_jax.data.templates import EncodedExample
from ff_jax.models import tiny_llama
from ff_jax.training.checkpoints import PhaseCheckpoints
from ff_jax.training.loop import (
  CompileTimer,
  LoopStats,
  PhaseSpec,
  padding_counts,
  train_loop,
  train_phase,
)
from ff_jax.training.steps import ModelRuntime, OptimConfig, Trainer

BUCKETS = (16, 32)
PAD = 0
OPTIM = OptimConfig(learning_rate=3e-3)


def examples(n: int, seed: int, lo: int = 6, hi: int = 30) -> list[EncodedExample]:
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    length = int(rng.integers(lo, hi))
    loss_mask = np.zeros(length, np.int32)
    loss_mask[length // 2:] = 1
    out.append(EncodedExample(tokens=rng.integers(3, 256, length).astype(np.int32),
                              loss_mask=loss_mask, prompt_len=length // 2, truncated=False,
                              id=f"ex{i}"))
  return out


def runtime() -> ModelRuntime:
  cfg = tiny_llama(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1)
  return ModelRuntime.create(cfg, parallel.make_mesh(parallel.MeshConfig(), jax.devices()[:1]))


class SpyCheckpoints(PhaseCheckpoints):
  """Step checkpoints that remember the steps they saved."""

  def __init__(self, directory):
    super().__init__(directory)
    self.saved: list[int] = []

  def save(self, step, state, meta):
    self.saved.append(step)
    super().save(step, state, meta)


def test_step_checkpoints_by_wall_time_on_a_fake_clock_never_after_the_last_step(tmp_path):
  model = runtime()
  params = model.init_params(seed=0)
  now = [0.0]

  def tick(step, _params):  # every step takes 25 s on the fake clock
    now[0] += 25.0

  checkpoints = SpyCheckpoints(tmp_path / "ckpt")
  stats = LoopStats()
  train_loop(Trainer(model, OPTIM, 9), lambda: jax.tree.map(jnp.copy, params),
             TrainIterator(examples(16, 1), 4, 0, BUCKETS, pad_id=PAD), 9, "timed",
             checkpoints=checkpoints, checkpoint_minutes=1.0, hook=tick, hook_steps=range(1, 10),
             stats=stats, clock=lambda: now[0])
  # 75 s after the start at step 3, 75 s after that save at step 6; step 9, the last, is the
  # caller's to save.
  assert checkpoints.saved == [3, 6] and stats.checkpoints == 2
  assert checkpoints.latest_step() == 6  # the newest one only is kept
  checkpoints.close()
  # Every time is on the loop's clock: here all of it passed in the hook.
  assert stats.steps == 9 and stats.seconds == stats.hook_seconds == 9 * 25.0


def test_no_step_checkpoint_at_zero_minutes_and_steps_win_when_set(tmp_path):
  model = runtime()
  params = model.init_params(seed=0)
  for minutes, every, want in ((0.0, 0, []), (0.0, 2, [2, 4]), (1e-9, 3, [3])):
    checkpoints = SpyCheckpoints(tmp_path / f"ckpt_{minutes}_{every}")
    train_loop(Trainer(model, OPTIM, 5), lambda: jax.tree.map(jnp.copy, params),
               TrainIterator(examples(16, 1), 4, 0, BUCKETS, pad_id=PAD), 5, "steps",
               checkpoints=checkpoints, checkpoint_minutes=minutes, checkpoint_every=every)
    checkpoints.close()
    assert checkpoints.saved == want, (minutes, every)


def test_a_phase_resumed_from_its_last_step_checkpoint_matches_one_run_straight(tmp_path):
  """The last step is not step-checkpointed: a phase killed after it resumes from the one
  before, and still ends bit-identical."""
  model = runtime()
  data = examples(20, 2)
  spec = PhaseSpec("phase", steps=5, batching=Batching(4, BUCKETS, PAD), optim=OPTIM, seed=3,
                   checkpoint_every=2)

  def run():
    params = model.init_params(seed=0)
    trainer = Trainer(model, OPTIM, 5)
    return jax.tree.map(np.asarray, train_phase(spec, trainer, lambda: params, data,
                                                tmp_path / "ckpt"))

  straight = run()
  checkpoints = PhaseCheckpoints(tmp_path / "ckpt")
  assert checkpoints.latest_step() == 4  # not 5: the phase's output is its caller's save
  checkpoints.close()
  # As if killed after step 5 but before the output was saved: the rerun trains step 5 again.
  resumed = run()
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def test_stats_count_compiles_shapes_and_padding():
  model = runtime()
  params = model.init_params(seed=0)
  data = examples(24, 4)  # batches of both buckets with this order
  trainer = Trainer(model, OPTIM, 6)

  def run():
    stats = LoopStats()
    train_loop(trainer, lambda: jax.tree.map(jnp.copy, params),
               TrainIterator(data, 2, 0, BUCKETS, pad_id=PAD), 6, "stats", stats=stats)
    return stats

  first = run()
  batches = TrainIterator(data, 2, 0, BUCKETS, pad_id=PAD)
  seen = [batches.next_batch()[0] for _ in range(6)]
  shapes = {b["tokens"].shape for b in seen}
  assert len(shapes) == 2
  assert first.compiled_shapes == first.compiles == trainer.trace_count == 2
  assert first.compile_seconds > 0 and first.seconds >= first.compile_seconds
  assert first.token_slots == sum(b["tokens"].size for b in seen)
  assert first.padded_tokens == sum(int((b["mask"] == 0).sum()) for b in seen)
  assert 0 < first.padded_tokens < first.token_slots
  assert (first.checkpoints, first.checkpoint_seconds) == (0, 0.0)
  # The same trainer again: nothing new to compile, the same shapes stepped.
  again = run()
  assert (again.compiles, again.compile_seconds, again.compiled_shapes) == (0, 0.0, 2)
  assert set(first.as_dict()) == {
      "steps", "seconds", "compile_seconds", "compiles", "compiled_shapes", "checkpoint_seconds",
      "checkpoints", "hook_seconds", "token_slots", "padded_tokens"}


def test_compile_timer_counts_the_compile_not_the_first_run():
  """A program whose run sleeps 2 s on the host: its first call takes over 2 s, of which the
  timer counts only the trace, lowering and compile (a fraction of a second), a nested jit's
  with its caller's; a second call compiles nothing."""

  def slow(x):
    time.sleep(2.0)
    return x

  inner = jax.jit(lambda x: x * 2)
  program = jax.jit(
      lambda x: inner(jax.pure_callback(slow, jax.ShapeDtypeStruct((), x.dtype), x)) + 1)
  x = jnp.float32(1.0)
  began = time.perf_counter()
  with CompileTimer() as timer:
    jax.block_until_ready(program(x))
  wall = time.perf_counter() - began
  assert wall >= 2.0 and 0 < timer.seconds < wall - 1.5
  with CompileTimer() as again:
    jax.block_until_ready(program(x))
  assert again.seconds == 0.0


def test_padding_counts_filler_rows_and_right_padding():
  batch = {"tokens": np.zeros((3, 4), np.int32),
           "mask": np.array([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], np.int32)}
  assert padding_counts(batch) == (12, 7)


def test_token_counts_are_summed_over_processes_past_int32(monkeypatch):
  """On a pod each process counts the rows it loaded; the loop's stats (the manifest's) are the
  run's: every process's, summed without wrapping at JAX's int32."""
  from ff_jax.training import loop

  monkeypatch.setattr(loop.jax, "process_count", lambda: 2)
  monkeypatch.setattr(loop.multihost_utils, "process_allgather",
                      lambda x: np.stack([x, x]))  # process 1 counted as many
  big = 3 * 2**31 + 5
  assert loop._summed_over_processes(7, big) == (14, 2 * big)
