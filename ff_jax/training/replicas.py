"""K independent finetunes of one model, trained together as stacked (vmapped) replicas.

Parameters and optimizer states of K replicas are stacked on a leading `replica` axis and ONE train
step (`train.make_train_fn`) is vmapped over it, so K small finetunes cost one compiled program and
one dispatch per step instead of K. Each replica reads its own batch stream; the K batches of a
step are padded to one common bucket length ([K, B, T]) so shapes stay fixed. On a mesh with a
`replica` axis the leading axis is sharded over it: each replica's params, moments and batches live
on their own slice of devices, and inside a slice the usual rules (fsdp/tensor/data) apply.

The mesh here has axes ('replica', 'data', 'fsdp', 'tensor'); a `ModelRuntime` built on it plans
the per-replica shardings (its rules never name 'replica', so they are replicated over it) and
`ReplicaTrainer` prefixes every spec with 'replica'.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ff_jax import parallel
from ff_jax.data.batching import TrainIterator
from ff_jax.data.templates import EncodedExample
from ff_jax.errors import ConfigError, MeshError
from ff_jax.progress import Progress
from ff_jax.training.scoring import score_snapshots
from ff_jax.training.steps import (
  ModelRuntime,
  OptimConfig,
  make_optimizer,
  make_score_fn,
  make_train_fn,
  optimizer_shardings,
)

REPLICA_AXES = ("replica", *parallel.MESH_AXES)


@dataclasses.dataclass(frozen=True)
class ReplicaMeshConfig:
  """Mesh for stacked replicas: `replica` ways, each replica on a (data, fsdp, tensor) slice."""

  replica: int = 1
  data: int = 1
  fsdp: int = -1
  tensor: int = 1


def make_replica_mesh(cfg: ReplicaMeshConfig = ReplicaMeshConfig(),
                      devices: Sequence[Any] | None = None) -> Mesh:
  """A ('replica', 'data', 'fsdp', 'tensor') mesh; replica slices are contiguous device groups."""
  devices = list(devices) if devices is not None else jax.devices()
  if cfg.replica < 1 or len(devices) % cfg.replica:
    raise MeshError(f"mesh.replica={cfg.replica} must be positive and divide the "
                    f"{len(devices)} devices")
  inner = parallel.resolve_mesh_shape(parallel.MeshConfig(cfg.data, cfg.fsdp, cfg.tensor),
                                      len(devices) // cfg.replica)
  return Mesh(np.asarray(devices).reshape(cfg.replica, *inner), REPLICA_AXES,
              axis_types=(AxisType.Auto,) * len(REPLICA_AXES))


def _stack_spec(sharding: NamedSharding, mesh: Mesh) -> NamedSharding:
  """The sharding of a [K, ...] stack whose slices are sharded like `sharding`."""
  lead = "replica" if "replica" in mesh.shape else None
  return NamedSharding(mesh, PartitionSpec(lead, *sharding.spec))


def stacked_batch(locals_: Sequence[dict[str, np.ndarray]], pad_id: int) -> dict[str, np.ndarray]:
  """Stack K batches to [K, B, T], right-padding each to the longest bucket among them.

  Extra right padding changes no result: padded positions are masked out of attention and loss.
  """
  width = max(b["tokens"].shape[1] for b in locals_)
  out: dict[str, list[np.ndarray]] = {k: [] for k in locals_[0]}
  for b in locals_:
    extra = width - b["tokens"].shape[1]
    for key, value in b.items():
      if value.ndim == 2 and extra:
        fill = pad_id if key == "tokens" else 0
        value = np.pad(value, ((0, 0), (0, extra)), constant_values=fill)
      out[key].append(value)
  return {k: np.stack(v) for k, v in out.items()}


class ReplicaTrainer:
  """Jitted, vmapped train and score steps over K stacked replicas of one model."""

  def __init__(self, runtime: ModelRuntime, cfg: OptimConfig, total_steps: int, k: int):
    mesh = runtime.mesh
    ways = mesh.shape.get("replica", 1)
    if k % ways:
      raise ConfigError(f"{k} replicas do not divide over mesh.replica={ways}")
    self.runtime, self.cfg, self.k = runtime, cfg, k
    self.tx, self.schedule = make_optimizer(cfg, total_steps)
    repl = parallel.replicated(mesh)
    opt_sh = optimizer_shardings(self.tx, runtime.abstract_params, runtime.param_shardings, repl)
    stack = lambda tree: jax.tree.map(lambda s: _stack_spec(s, mesh), tree)  # noqa: E731
    self.param_shardings = stack(runtime.param_shardings)
    self.state_shardings = {"params": self.param_shardings, "opt_state": stack(opt_sh),
                            "step": _stack_spec(repl, mesh)}
    batch_sh = _stack_spec(runtime.batch_sharding, mesh)
    rows_sh = _stack_spec(runtime.row_sharding, mesh)
    self.batch_shardings = {"tokens": batch_sh, "mask": batch_sh, "loss_mask": batch_sh,
                            "example_id": rows_sh}
    self.trace_count = 0
    step_fn = jax.vmap(make_train_fn(runtime.graphdef, self.tx, cfg))

    def counted(state, batch):
      self.trace_count += 1  # trace time only: counts compilations
      return step_fn(state, batch)

    per_replica = _stack_spec(repl, mesh)
    self.step = jax.jit(counted, in_shardings=(self.state_shardings, self.batch_shardings),
                        out_shardings=(self.state_shardings, per_replica, rows_sh),
                        donate_argnums=(0,))

    def init(stacked):
      return {"params": stacked, "opt_state": jax.vmap(self.tx.init)(stacked),
              "step": jnp.zeros((k,), jnp.int32)}

    def broadcast_init(params):
      # Every replica starts from the same model: broadcast it, then one optimizer init each.
      return init(jax.tree.map(lambda x: jnp.broadcast_to(x, (k, *x.shape)), params))

    self._init = jax.jit(broadcast_init, out_shardings=self.state_shardings)
    self._init_stacked = jax.jit(init, in_shardings=(self.param_shardings,),
                                 out_shardings=self.state_shardings)
    # Scoring: each replica scores the same (shared, row-sharded) batch with its own params.
    score_batch = {"tokens": runtime.batch_sharding, "mask": runtime.batch_sharding,
                   "loss_mask": runtime.batch_sharding, "example_id": runtime.row_sharding}
    self._score = jax.jit(jax.vmap(make_score_fn(runtime.graphdef), in_axes=(0, None)),
                          in_shardings=(self.param_shardings, score_batch),
                          out_shardings={"nll_sum": rows_sh, "tokens": rows_sh,
                                         "correct": rows_sh})

  def init_state(self, params: Any, stacked: bool = False) -> dict[str, Any]:
    """Fresh optimizer states for K replicas of `params` (one model), or of K models when
    `stacked` (a [K, ...] tree, e.g. the replicas of an earlier stacked finetune)."""
    return self._init_stacked(params) if stacked else self._init(params)

  def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return jax.tree.map(jax.device_put, batch, self.batch_shardings)

  def stacked_step(self, stacked_params: Any, batch: dict[str, jax.Array]) -> dict[str, Any]:
    """The `Scorer.stacked_step` contract (a global batch), so `scoring.score_snapshots` drives
    it."""
    return self._score(stacked_params, batch)


def variant_subset(num_safe: int, n: int, seed: int) -> np.ndarray:
  """Indices of a seeded size-n subset of the safe set.

  Subsets of one seed are nested (the first n of one permutation), so growing n only adds data.
  """
  if not 1 <= n <= num_safe:
    raise ConfigError(f"safe size {n} is not in [1, {num_safe}] (the safe set has {num_safe})")
  return np.random.default_rng([7919, seed]).permutation(num_safe)[:n]


def variant_iterator(safe: Sequence[EncodedExample], n: int, seed: int, batch_size: int,
                     buckets: Sequence[int], pad_id: int) -> TrainIterator:
  """The batch stream of variant (n, seed): its subset, in an order seeded by `seed`.

  A subset smaller than the batch gets filler rows; a small subset just cycles its epochs.
  """
  subset = [safe[i] for i in variant_subset(len(safe), n, seed)]
  return TrainIterator(subset, batch_size, seed, buckets, pad_id=pad_id)


def train_replicas(trainer: ReplicaTrainer, init_params: Any, iterators: Sequence[TrainIterator],
                   steps: Sequence[int], noisy: Sequence[EncodedExample], score_batch_size: int,
                   buckets: Sequence[int], pad_id: int, stacked_init: bool = False,
                   name: str = "replicas") -> tuple[np.ndarray, Any]:
  """Train K replicas together to max(steps): (per-token NLL of `noisy` [K, len(steps), N], the
  final stacked params).

  The replicas start from `init_params` (one model, or K stacked ones with `stacked_init`). The
  noisy set is scored under every replica after each requested step, in vmapped passes.
  """
  steps = sorted(set(int(s) for s in steps))
  if len(iterators) != trainer.k:
    raise ConfigError(f"{len(iterators)} batch streams for {trainer.k} replicas")
  state = trainer.init_state(init_params, stacked=stacked_init)
  out = np.full((trainer.k, len(steps), len(noisy)), np.nan)
  progress = Progress(f"{name} x{trainer.k}", max(steps))
  step = 0
  for j, target in enumerate(steps):
    while step < target:
      batch = stacked_batch([it.next_batch()[0] for it in iterators], pad_id)
      state, _, _ = trainer.step(state, trainer.put_batch(batch))
      step += 1
      if progress.due(step):
        jax.block_until_ready(state["step"])
      progress.update(step)
    stats = score_snapshots(trainer, state["params"], noisy, score_batch_size, buckets, pad_id,
                            name=f"{name}/score@{target}")
    out[:, j] = stats["nll_sum"] / np.maximum(stats["tokens"], 1.0)
  return out, state["params"]


def train_single(runtime: ModelRuntime, cfg: OptimConfig, init_params: Any,
                 iterator: TrainIterator, steps: Sequence[int], noisy: Sequence[EncodedExample],
                 score_batch_size: int, buckets: Sequence[int], pad_id: int,
                 trainer: Any = None, scorer: Any = None) -> np.ndarray:
  """One variant alone with the ordinary `Trainer` and `Scorer`: NLL [len(steps), N].

  The reference `train_replicas` must match, and the sequential baseline of the sweep benchmark
  (pass one `trainer`/`scorer` for every variant so they compile once, as they could in practice).
  """
  from ff_jax.training.scoring import score_examples
  from ff_jax.training.steps import Scorer, Trainer

  steps = sorted(set(int(s) for s in steps))
  trainer = trainer or Trainer(runtime, cfg, max(steps))
  scorer = scorer or Scorer(runtime)
  # The step donates its state: train a copy so the caller's params stay usable.
  state = trainer.init_state(jax.tree.map(jnp.copy, init_params))
  out = np.full((len(steps), len(noisy)), np.nan)
  step = 0
  for j, target in enumerate(steps):
    while step < target:
      local, _ = iterator.next_batch()
      state, _, _ = trainer.step(state, parallel.global_batch(local, runtime.mesh, runtime.rules))
      step += 1
    stats = score_examples(scorer, state["params"], noisy, score_batch_size, buckets, pad_id,
                           name=f"single/score@{target}")
    out[j] = stats["nll_sum"] / np.maximum(stats["tokens"], 1.0)
  return out
