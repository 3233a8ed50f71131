"""Train state and the pure, jit-compiled train and score steps, for one model or K replicas.

`train_step(state, batch) -> (state, metrics)` and `score_step(params, batch) -> {nll_sum,
tokens, correct}[B]` are pure functions of pytrees; the NNX graphdef and the optimizer are closed
over as static values. Both are jitted with explicit shardings (parameters by the logical rules,
batches by rows) and the train state is donated, so a step updates parameters in place on device.
`Trainer(..., replicas=K)` vmaps the same step over K replicas stacked on a leading axis (sharded
over the mesh's `replica` axis where it has one): K finetunes for one compiled program and one
dispatch per step.

Batches follow the contract in `ff_jax.data.batching`: `tokens`, `mask`, `loss_mask` [B, T] and
`example_id` [B]; `loss_mask[b, t]` marks tokens[b, t] as a target predicted from position t-1.
Packed batches add `segment_ids` and `positions` [B, T] and carry `example_id` [B, S] (the example
of each segment): the same jitted steps take both layouts (a compile per layout and shape), the
train loss is the same token mean, and the score step returns its statistics per segment, [B, S].
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ff_jax import parallel
from ff_jax.data.batching import is_packed
from ff_jax.errors import ConfigError
from ff_jax.models import (
  ModelConfig,
  abstract_model,
  forward,
  forward_hidden,
  init_params,
  lora,
  positions_from_mask,
)
from ff_jax.models.head import target_cross_entropy
from ff_jax.models.layout import FULL_LOGITS, UNSHARDED, StepLayout, tile_positions

Batch = dict[str, jax.Array]
TrainState = dict[str, Any]  # {"params", "opt_state", "step"}


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with optional warmup and decay, global-norm clipping and gradient accumulation.

  The defaults are the paper's finetune (PyTorch's AdamW at a constant rate, β2 0.999, no weight
  decay, clipping at 1.0): β2 0.95 with warmup and linear decay made the safety finetune erase
  short task answers that the paper's setup keeps (docs/fidelity.md).
  """

  learning_rate: float = 1e-3
  warmup_steps: int = 0
  schedule: Literal["cosine", "linear", "constant"] = "constant"
  end_lr_fraction: float = 0.1
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  max_grad_norm: float = 1.0
  grad_accum_steps: int = 1
  # "response": loss on response tokens (and EOS) only, as ForgetFilter measures forgetting of y;
  # "all": every non-padding token, as the official code's LM collator does.
  loss_on: Literal["response", "all"] = "response"

  def __post_init__(self):
    if self.schedule not in ("cosine", "linear", "constant"):
      raise ConfigError(f"optim.schedule: unknown schedule {self.schedule!r}")
    if self.loss_on not in ("response", "all"):
      raise ConfigError(f"optim.loss_on: must be 'response' or 'all', got {self.loss_on!r}")
    if self.grad_accum_steps < 1:
      raise ConfigError(f"optim.grad_accum_steps: must be >= 1, got {self.grad_accum_steps}")


def make_optimizer(cfg: OptimConfig, total_steps: int):
  """(AdamW chain, learning-rate schedule) for a phase of `total_steps` optimizer steps."""
  total_steps = max(int(total_steps), 1)
  warmup = min(cfg.warmup_steps, total_steps - 1) if total_steps > 1 else 0
  decay_steps = max(total_steps - warmup, 1)
  end = cfg.learning_rate * cfg.end_lr_fraction
  if cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps, cfg.end_lr_fraction)
  elif cfg.schedule == "linear":
    decay = optax.linear_schedule(cfg.learning_rate, end, decay_steps)
  else:
    decay = optax.constant_schedule(cfg.learning_rate)
  schedule = decay
  if warmup:
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.learning_rate, warmup), decay], [warmup])
  return optax.chain(
      optax.clip_by_global_norm(cfg.max_grad_norm),
      optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay),
  ), schedule


def _target_weights(batch: Batch, loss_on: str) -> tuple[jax.Array, jax.Array]:
  """(targets [B,T-1], weights [B,T-1]) for next-token prediction."""
  targets = batch["tokens"][:, 1:]
  if loss_on == "all":
    weights = batch["mask"][:, 1:]
  else:
    weights = batch["loss_mask"][:, 1:]
  if is_packed(batch):
    # An example's first token is never a target of the previous example's last one (loss_mask
    # is 0 there already; the mask of loss_on="all" is not).
    segments = batch["segment_ids"]
    weights = weights * (segments[:, 1:] == segments[:, :-1])
  return targets, weights.astype(jnp.float32)


def trainable_params(params: Any) -> tuple[Any, Any]:
  """(what the optimizer trains, what stays frozen): the LoRA adapters and the base weights of
  an adapted model, else every parameter and nothing."""
  adapters, base = lora.split(params)
  if not adapters:
    return params, {}
  return adapters, base


def token_nll(graphdef: nnx.GraphDef, params: Any, batch: Batch, loss_on: str = "response",
              dropout_rng: jax.Array | None = None, layout: StepLayout = UNSHARDED):
  """Per-token NLL and correctness [B, T-1] (0 where no target), and the target weights
  (`dropout_rng`: LoRA dropout while training). The LM head runs only at target positions
  (`ff_jax.models.head`); `layout` from `ModelRuntime.step_layout`."""
  mask = batch["mask"]
  packed = is_packed(batch)
  positions = batch["positions"] if packed else positions_from_mask(mask)
  segment_ids = batch["segment_ids"] if packed else None
  targets, weights = _target_weights(batch, loss_on)
  if layout == FULL_LOGITS:
    logits, _ = forward(graphdef, params, batch["tokens"], positions, mask,
                        dropout_rng=dropout_rng, segment_ids=segment_ids)
    logits = logits[:, :-1]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return nll * weights, correct * weights, weights
  hidden, weight, head = forward_hidden(graphdef, params, batch["tokens"], positions, mask,
                                        dropout_rng=dropout_rng, segment_ids=segment_ids,
                                        layout=layout)
  nll, correct = target_cross_entropy(hidden[:, :-1], weight, targets, weights, head, layout)
  return nll, correct, weights


# What the score step gives per example (`make_score_fn`).
SCORE_KEYS = ("nll_sum", "tokens", "correct", "first_nll")


def make_score_fn(graphdef: nnx.GraphDef, layout: StepLayout = UNSHARDED
                  ) -> Callable[[Any, Batch], dict[str, jax.Array]]:
  """Unjitted per-example statistics, for vmapping over parameter snapshots: [B] per row, or
  [B, S] per segment of packed rows (the example of `example_id[b, s]`).

  `first_nll` is the NLL of each example's first response target alone: where the response
  opens, which a safety finetune whose answers all open alike moves for every response written
  otherwise (the `nll_tail` signal leaves it out; ff_jax.forgetting.signals).
  """

  def score(params, batch):
    nll, correct, weights = token_nll(graphdef, params, batch, "response", layout=layout)
    if not is_packed(batch):
      first = jnp.cumsum(weights, axis=-1) * weights == 1
      return {"nll_sum": nll.sum(-1), "tokens": weights.sum(-1), "correct": correct.sum(-1),
              "first_nll": jnp.where(first, nll, 0.0).sum(-1)}
    # Target t+1 belongs to the segment of token t+1. Masked sums, not one-hot matmuls: matmul
    # precision on GPU/TPU would round the per-example sums.
    segments = batch["segment_ids"][:, 1:, None] == jnp.arange(
        1, batch["example_id"].shape[1] + 1)
    per_segment = jnp.where(segments, weights[..., None], 0.0)  # [B, T-1, S]
    first = jnp.cumsum(per_segment, axis=1) * per_segment == 1
    stats = {key: jnp.where(segments, value[..., None], 0.0).sum(1)
             for key, value in (("nll_sum", nll), ("correct", correct))}
    return {**stats, "tokens": per_segment.sum(1),
            "first_nll": jnp.where(first, nll[..., None], 0.0).sum(1)}

  return score


def make_train_fn(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, cfg: OptimConfig,
                  lora_dropout: bool = False, layout: StepLayout = UNSHARDED):
  """Unjitted train step with gradient accumulation over `cfg.grad_accum_steps` micro-batches.

  The optimizer state covers `trainable_params(params)`: every parameter, or only the LoRA
  adapters of an adapted model (the base weights then get no gradient, moments or update).
  `lora_dropout`: draw LoRA dropout masks, from the step number (deterministic per step).
  """
  accum = cfg.grad_accum_steps

  def micro_loss(trainable, frozen, micro, total_tokens, rng):
    params = lora.combine(trainable, frozen) if frozen else trainable
    nll, _, _ = token_nll(graphdef, params, micro, cfg.loss_on, dropout_rng=rng, layout=layout)
    # Dividing by the whole batch's token count makes the accumulated gradient equal the
    # full-batch token-mean gradient, however the rows are split into micro-batches.
    return nll.sum() / total_tokens

  grad_fn = jax.value_and_grad(micro_loss)

  def step(state: TrainState, batch: Batch):
    params, frozen = trainable_params(state["params"])
    rng = None
    if lora_dropout:
      rng = jax.random.fold_in(jax.random.key(0), state["step"])
    _, weights = _target_weights(batch, cfg.loss_on)
    total_tokens = jnp.maximum(weights.sum(), 1.0)
    rows = batch["tokens"].shape[0]
    if rows % accum:
      raise ConfigError(f"batch_size {rows} is not divisible by grad_accum_steps {accum}")
    if accum == 1:
      loss, grads = grad_fn(params, frozen, batch, total_tokens, rng)
    else:
      # Interleave rows into micro-batches (row i goes to micro-batch i % accum) so that each
      # micro-batch stays spread over every data-parallel shard instead of living on a few.
      micro = jax.tree.map(
          lambda x: x.reshape(rows // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch)

      def body(carry, xs):
        mb, index = xs
        micro_rng = None if rng is None else jax.random.fold_in(rng, index)
        loss_mb, grads_mb = grad_fn(params, frozen, mb, total_tokens, micro_rng)
        loss_acc, grads_acc = carry
        return (loss_acc + loss_mb, jax.tree.map(jnp.add, grads_acc, grads_mb)), None

      zeros = jax.tree.map(jnp.zeros_like, params)
      (loss, grads), _ = jax.lax.scan(body, (jnp.zeros(()), zeros), (micro, jnp.arange(accum)))
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    params = optax.apply_updates(params, updates)
    if frozen:
      params = lora.combine(params, frozen)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "tokens": weights.sum()}
    new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
    return new_state, metrics

  return step


def optimizer_shardings(tx: optax.GradientTransformation, abstract_params: Any,
                        param_shardings: Any, default: NamedSharding) -> Any:
  """Shardings of `tx.init(params)`: moments like their parameter, scalars replicated.

  Matched by the parameter's dict-key path inside the optimizer state (optax keeps moment trees
  shaped like the params), so no optimizer state is ever created to find out.
  """
  by_path = {}
  for path, sharding in jax.tree_util.tree_leaves_with_path(param_shardings):
    by_path[tuple(k.key for k in path)] = sharding
  shapes = {tuple(k.key for k in path): a.shape
            for path, a in jax.tree_util.tree_leaves_with_path(abstract_params)}

  def pick(path, leaf):
    keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
    for start in range(len(keys)):
      suffix = keys[start:]
      if suffix in by_path and shapes[suffix] == leaf.shape:
        return by_path[suffix]
    return default

  return jax.tree_util.tree_map_with_path(pick, jax.eval_shape(tx.init, abstract_params))


def replica_axis(mesh: Mesh) -> str | None:
  """The mesh axis a vmapped stack of replicas is sharded over (`parallel.stack_sharding`), for
  `jax.vmap(spmd_axis_name=...)`: the sharding constraints inside a step then keep it."""
  return parallel.REPLICA_AXIS if parallel.REPLICA_AXIS in mesh.shape else None


@dataclasses.dataclass
class ModelRuntime:
  """A model planned on a mesh: graphdef, abstract params and their shardings."""

  cfg: ModelConfig
  mesh: Mesh
  graphdef: nnx.GraphDef
  abstract_params: Any
  param_shardings: Any
  rules: dict

  @classmethod
  def create(cls, cfg: ModelConfig, mesh: Mesh,
             rules: dict | None = None) -> ModelRuntime:
    rules = dict(rules or parallel.DEFAULT_RULES)
    graphdef, abstract, logical = abstract_model(cfg)
    shardings = parallel.tree_shardings(abstract, logical, mesh, rules)
    return cls(cfg, mesh, graphdef, abstract, shardings, rules)

  def init_params(self, seed: int) -> Any:
    """Fresh parameters, each created directly on its shards."""
    return init_params(self.cfg, seed, self.param_shardings)

  def abstract_with_shardings(self) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        self.abstract_params, self.param_shardings)

  def row_multiple(self, micro_batches: int = 1) -> int:
    """What the rows of a global batch must be a multiple of: the data-parallel shards, the
    processes (each loads its own rows) and the gradient-accumulation `micro_batches`."""
    shards = math.prod(self.mesh.shape[a] for a in parallel.data_axes(self.mesh, self.rules))
    return math.lcm(shards, jax.process_count(), micro_batches)

  def step_layout(self) -> StepLayout:
    """The train and score steps' sharding constraints, attention placement and LM-head tiles
    on this mesh (`ff_jax.models.layout`): activations and head tiles by rows over the
    data-parallel axes (one row group per shard), attention heads like the q projection's, the
    head's logits and gradient by vocabulary like the head."""
    mesh, rows = self.mesh, parallel.data_axes(self.mesh, self.rules)
    tied = self.cfg.tie_embeddings
    spec = tuple(self.param_shardings["embed" if tied else "lm_head"].spec)
    spec += (None,) * (2 - len(spec))
    head_grad = spec if tied else spec[::-1]  # the gradient is accumulated as [V, D]
    vocab = head_grad[0]
    vocab = (vocab,) if isinstance(vocab, str) else tuple(vocab or ())
    if set(vocab) & set(rows):  # custom rules that split both by one axis: rows win
      vocab = ()
    ways = math.prod(mesh.shape[a] for a in vocab)
    heads = parallel.spec_for(PartitionSpec("heads"), (self.cfg.num_heads,), mesh, self.rules)[0]
    return StepLayout(
        groups=math.prod(mesh.shape[a] for a in rows),
        tile=tile_positions(self.cfg.vocab_size // ways),
        activations=NamedSharding(mesh, PartitionSpec(rows or None, None, None)),
        heads=NamedSharding(mesh, PartitionSpec(rows or None, None, heads, None)),
        logits=NamedSharding(mesh, PartitionSpec(rows or None, None, vocab or None)),
        head_grad=NamedSharding(mesh, PartitionSpec(*head_grad)))

  def batch_sharding(self, stacked: bool = False) -> NamedSharding:
    """One sharding for a whole batch, as a jit pytree prefix: every key is split by rows alike,
    so one jitted step takes unpacked and packed batches (whose keys differ)."""
    return parallel.batch_shardings(self.mesh, self.rules, stacked=stacked)["example_id"]


class Trainer:
  """The jitted train step of one phase: optimizer, shardings and donation in one place.

  `replicas=None` trains one model. `replicas=K` trains K independent replicas with the same
  step vmapped over a leading axis of the state and the batch ([K, B, T]); each replica reads its
  own batches, and the leading axis is sharded over the mesh's `replica` axis where it has one
  (inside a replica's slice the usual rules apply).
  """

  def __init__(self, runtime: ModelRuntime, optim: OptimConfig, total_steps: int,
               replicas: int | None = None, layout: StepLayout | None = None):
    mesh = runtime.mesh
    if replicas is not None:
      ways = mesh.shape.get(parallel.REPLICA_AXIS, 1)
      if replicas < 1 or replicas % ways:
        raise ConfigError(f"{replicas} replicas do not divide over mesh.replica={ways}")
    self.runtime, self.optim, self.replicas = runtime, optim, replicas
    self.tx, self.schedule = make_optimizer(optim, total_steps)
    repl = parallel.replicated(mesh)
    trainable, _ = trainable_params(runtime.abstract_params)
    opt_shardings = optimizer_shardings(self.tx, trainable, trainable_params(
        runtime.param_shardings)[0], repl)
    state_shardings = {"params": runtime.param_shardings, "opt_state": opt_shardings,
                       "step": repl}
    step_fn = make_train_fn(runtime.graphdef, self.tx, optim,
                            lora_dropout=runtime.cfg.lora.rank > 0 and runtime.cfg.lora.dropout > 0,
                            layout=layout or runtime.step_layout())

    def init_opt(params):
      return self.tx.init(trainable_params(params)[0])

    if replicas is not None:
      state_shardings = jax.tree.map(parallel.stack_sharding, state_shardings)
      step_fn, init_opt = jax.vmap(step_fn, spmd_axis_name=replica_axis(mesh)), jax.vmap(init_opt)

      def broadcast(params):
        return jax.tree.map(lambda x: jnp.broadcast_to(x, (replicas, *x.shape)), params)

      self._broadcast = jax.jit(broadcast, out_shardings=state_shardings["params"])
    self.state_shardings = state_shardings
    # Stacked replicas: the part of every [K, B, T] batch this process builds and passes to
    # `put_batch` (its `StackedBatches` block; the streams' process_index/process_count).
    self.stack_block = (None if replicas is None
                        else parallel.stacked_batch_block(mesh, runtime.rules, replicas))
    # Packed batches: rows a multiple of this (pass it to the TrainIterator).
    self.row_multiple = runtime.row_multiple(optim.grad_accum_steps)
    self.trace_count = 0

    def counted(state, batch):
      self.trace_count += 1  # runs at trace time only: counts compilations
      return step_fn(state, batch)

    self.step = jax.jit(counted,
                        in_shardings=(state_shardings,
                                      runtime.batch_sharding(stacked=replicas is not None)),
                        # Metrics (one value per replica when stacked) replicated: every host
                        # reads them, also where the replicas live on other hosts' devices.
                        out_shardings=(state_shardings, repl), donate_argnums=(0,))
    self._init_opt = jax.jit(init_opt, out_shardings=state_shardings["opt_state"])

  def init_state(self, params: Any, stacked: bool = False) -> TrainState:
    """A fresh train state from `params`, which the first step donates (pass a copy to keep them).

    With replicas, every replica starts from `params` (one model), or with `stacked` from its own
    slice of a [K, ...] tree (e.g. the replicas of an earlier stacked finetune).
    """
    if self.replicas is not None and not stacked:
      params = self._broadcast(params)
    shape = () if self.replicas is None else (self.replicas,)
    step = jax.device_put(jnp.zeros(shape, jnp.int32), self.state_shardings["step"])
    return {"params": params, "opt_state": self._init_opt(params), "step": step}

  def abstract_state(self) -> TrainState:
    """ShapeDtypeStructs with target shardings, for restoring a checkpoint onto this mesh."""
    shapes = jax.eval_shape(self.init_state, self.runtime.abstract_params)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        shapes, self.state_shardings)

  def put_batch(self, local: dict[str, np.ndarray]) -> Batch:
    """A host batch placed on `batch_shardings`, ready for `step`.

    One model: each process passes only its own rows (`parallel.global_batch`). Stacked
    replicas: each process passes its block of the [K, B, T] batch (`stack_block`: its replicas,
    and its rows of each), and the global array is assembled from every process's.
    """
    mesh, rules = self.runtime.mesh, self.runtime.rules
    if self.replicas is None:
      return parallel.global_batch(local, mesh, rules)
    block = self.stack_block
    held, rows = local["tokens"].shape[:2]
    if held != len(block.replicas):
      raise ConfigError(f"a stacked batch of {held} replicas, but this process holds "
                        f"{len(block.replicas)} of the {self.replicas} (`Trainer.stack_block`)")
    parallel.check_batch_rows(rows * block.row_blocks, mesh, rules)
    shardings = parallel.batch_shardings(mesh, rules, stacked=True, packed=is_packed(local))
    return {key: jax.make_array_from_process_local_data(
                shardings[key], value,
                (self.replicas, rows * block.row_blocks, *value.shape[2:]))
            for key, value in local.items()}

  def learning_rate(self, step: int) -> float:
    return float(self.schedule(step))


class Scorer:
  """Jitted score step: per-example summed NLL, target-token count and correct-token count.

  `step(params, batch)` scores one model; `stacked_step(stacked, batch)` scores K parameter
  trees stacked on a leading axis (snapshots of one finetune, or stacked replicas) on the same
  batch in one vmapped pass: [K, B] outputs.
  """

  def __init__(self, runtime: ModelRuntime, layout: StepLayout | None = None):
    self.runtime = runtime
    # Outputs ([B] per row, or [B, S] per segment) are split by rows like the batch.
    rows = runtime.batch_sharding()
    score = make_score_fn(runtime.graphdef, layout or runtime.step_layout())
    self.step = jax.jit(score, in_shardings=(runtime.param_shardings, rows),
                        out_shardings=dict.fromkeys(SCORE_KEYS, rows))
    self.stacked_param_shardings = jax.tree.map(parallel.stack_sharding,
                                                runtime.param_shardings)
    stacked_rows = parallel.stack_sharding(rows)
    self.stacked_step = jax.jit(jax.vmap(score, in_axes=(0, None),
                                         spmd_axis_name=replica_axis(runtime.mesh)),
                                in_shardings=(self.stacked_param_shardings, rows),
                                out_shardings=dict.fromkeys(SCORE_KEYS, stacked_rows))
