"""The LM head and its cross-entropy at target positions only, a tile of positions at a time.

A train or score step needs logits only where a position predicts a target (response tokens:
about one position in ten on the bias mixtures), and never all of them at once. So
`target_cross_entropy` never builds the [tokens, vocabulary] logits:

- the positions of each group of rows (one group per data-parallel shard, so that every gather
  stays on the device that holds the rows) are ordered targets first;
- a loop computes the head's logits for one tile of those positions at a time, [tile, V], and
  stops after the last tile that holds a target, so the head's FLOPs follow the targets rather
  than the sequence;
- a custom VJP recomputes each live tile's logits in the backward pass from the log-normalisers
  saved by the forward pass, so nothing of size tokens x vocabulary is kept between the passes
  either, and the weight gradient is accumulated tile by tile;
- where one tile holds all of a group's positions (a small vocabulary or batch), the tile is
  the group itself: no order, no loop.

This is the same bound on memory as Levanter's blockwise cross-entropy or MaxText's vocabulary
tiling (they tile every position); the targets-first order is what also removes the FLOPs.
Values equal the full-logits path up to float summation order: the per-position NLL, whether
the argmax (first maximum, as `jnp.argmax`) is the target, and the gradients.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from ff_jax.models.layout import UNSHARDED, StepLayout


@dataclasses.dataclass(frozen=True)
class Head:
  """The LM head as a step uses it: the weight in the compute dtype, [D, V], or [V, D] when
  `transposed` (a tied embedding), and Gemma's final-logit soft cap (None: uncapped)."""

  transposed: bool = False
  softcap: float | None = None


def target_cross_entropy(hidden: jax.Array, weight: jax.Array, targets: jax.Array,
                         weights: jax.Array, head: Head = Head(),
                         layout: StepLayout = UNSHARDED) -> tuple[jax.Array, jax.Array]:
  """(nll, correct), both [B, T] float32: at each position with weights > 0, the cross-entropy
  of targets[b, t] under the logits softcap(hidden[b, t] · W) and whether their argmax is the
  target, each times the weight; 0 elsewhere. `correct` carries no gradient. `layout`: row
  groups, tile size and sharding constraints (`ff_jax.models.layout`)."""
  layout = layout.for_rows(hidden.shape[0])
  tiles = _Tiles(*hidden.shape[:2], layout.groups, layout.tile)
  weights = weights.astype(jnp.float32)
  nll, correct = _cross_entropy(tiles, head, layout, hidden, weight, targets, weights)
  return nll, jax.lax.stop_gradient(correct)


@dataclasses.dataclass(frozen=True)
class _Tiles:
  """Static shapes: [rows, length] positions in `groups` groups of `per_group`, cut into
  `count` tiles of `size`."""

  rows: int
  length: int
  groups: int
  size_wanted: int

  @property
  def per_group(self) -> int:
    return self.rows // self.groups * self.length

  @property
  def size(self) -> int:
    return min(self.size_wanted, self.per_group)

  @property
  def count(self) -> int:
    return -(-self.per_group // self.size)

  def group(self, x: jax.Array) -> jax.Array:
    """[B, T, ...] -> [groups, per_group, ...]: rows of one shard stay together."""
    return x.reshape(self.groups, self.per_group, *x.shape[2:])

  def tiled(self, x: jax.Array) -> jax.Array:
    """[groups, per_group, ...] -> [count, groups, size, ...], padded with zeros."""
    pad = self.count * self.size - self.per_group
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(self.groups, self.count, self.size, *x.shape[2:]), 1, 0)

  def untiled(self, x: jax.Array) -> jax.Array:
    """The inverse of `tiled` (padding dropped)."""
    x = jnp.moveaxis(x, 0, 1).reshape(self.groups, self.count * self.size, *x.shape[3:])
    return x[:, :self.per_group]


def _order(tiles: _Tiles, weights: jax.Array):
  """(each group's positions, targets first and in place order otherwise; the inverse
  permutation; how many tiles hold a target in some group)."""
  is_target = tiles.group(weights) > 0
  order = jnp.argsort(~is_target, axis=1, stable=True)
  inverse = jnp.argsort(order, axis=1)
  live = -(-jnp.max(is_target.sum(1)) // tiles.size)
  return order, inverse, live


def _gather(x: jax.Array, index: jax.Array) -> jax.Array:
  """x [G, P, ...] at index [G, M] along the positions."""
  index = index.reshape(*index.shape, *([1] * (x.ndim - 2)))
  return jnp.take_along_axis(x, index, axis=1)


def _logits(head: Head, layout: StepLayout, h: jax.Array, weight: jax.Array) -> jax.Array:
  """Capped logits [G, M, V] float32 of a hidden tile h [G, M, D]."""
  contract = 1 if head.transposed else 0
  z = jax.lax.dot_general(h, weight, (((2,), (contract,)), ((), ())),
                          preferred_element_type=jnp.float32)
  if layout.logits is not None:
    z = jax.lax.with_sharding_constraint(z, layout.logits)
  if head.softcap is None:
    return z
  return jnp.tanh(z / head.softcap) * head.softcap


def _tile_forward(head: Head, layout: StepLayout, h, weight, target):
  """Per position of a tile: (nll, correct, log-normaliser)."""
  logits = _logits(head, layout, h, weight)
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
  correct = (jnp.argmax(logits, axis=-1) == target).astype(jnp.float32)
  return lse - picked, correct, lse


def _forward(tiles: _Tiles, head: Head, layout: StepLayout, hidden, weight, targets, weights):
  h_all, t_all = tiles.group(hidden), tiles.group(targets)
  if tiles.count == 1:  # a group's positions fit one tile: no order, no loop
    nll, correct, lse = _tile_forward(head, layout, h_all, weight, t_all)
    residuals = (hidden, weight, targets, weights, None, None, None, lse)
    return (nll.reshape(weights.shape) * weights,
            correct.reshape(weights.shape) * weights), residuals

  order, inverse, live = _order(tiles, weights)
  tiled_order = tiles.tiled(order)

  def body(tile, outputs):
    index = tiled_order[tile]
    values = _tile_forward(head, layout, _gather(h_all, index), weight, _gather(t_all, index))
    return tuple(out.at[tile].set(value) for out, value in zip(outputs, values))

  # A loop to the last live tile rather than a scan over all of them: under vmap (stacked
  # replicas) its trip count is the largest replica's, where a skipped scan step would turn
  # into a select that computes every tile.
  zeros = jnp.zeros((tiles.count, tiles.groups, tiles.size), jnp.float32)
  nll, correct, lse = jax.lax.fori_loop(0, live, body, (zeros, zeros, zeros))

  def placed(x):  # tiles of the targets-first order -> [B, T] in place
    return jnp.take_along_axis(tiles.untiled(x), inverse, axis=1).reshape(weights.shape)

  residuals = (hidden, weight, targets, weights, order, inverse, live, lse)
  return (placed(nll) * weights, placed(correct) * weights), residuals


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _cross_entropy(tiles, head, layout, hidden, weight, targets, weights):
  return _forward(tiles, head, layout, hidden, weight, targets, weights)[0]


def _tile_backward(head: Head, layout: StepLayout, h, weight, target, lse, g):
  """A tile's (d_hidden [G, M, D] float32, d_weight [V, D] float32) for the NLL's cotangent g
  [G, M], recomputing its logits from the saved log-normalisers."""
  logits = _logits(head, layout, h, weight)
  probs = jnp.exp(logits - lse[..., None])
  one_hot = jax.nn.one_hot(target, logits.shape[-1], dtype=jnp.float32)
  d_logits = (probs - one_hot) * g[..., None]
  if head.softcap is not None:  # d/dz of cap·tanh(z / cap) = 1 - (logit / cap)²
    d_logits = d_logits * (1.0 - jnp.square(logits / head.softcap))
  d_logits = d_logits.astype(weight.dtype)
  w_dims = ((2,), (0,)) if head.transposed else ((2,), (1,))
  d_h = jax.lax.dot_general(d_logits, weight, (w_dims, ((), ())),
                            preferred_element_type=jnp.float32)
  # The weight's gradient is [V, D] for either storage: the token contraction then has the
  # narrow hidden tile on its right, the orientation XLA:CPU's dot wants (see
  # `ff_jax.models.transformer._dense_bwd`).
  d_w = jax.lax.dot_general(d_logits, h, (((0, 1), (0, 1)), ((), ())),
                            preferred_element_type=jnp.float32)
  return d_h, d_w


def _backward(tiles: _Tiles, head: Head, layout: StepLayout, residuals, cotangents):
  hidden, weight, targets, weights, order, inverse, live, lse = residuals
  g_nll, _ = cotangents  # `correct` is a count: no gradient
  h_all, t_all, g_all = tiles.group(hidden), tiles.group(targets), tiles.group(g_nll * weights)

  def constrained(d_weight):
    if layout.head_grad is None:
      return d_weight
    return jax.lax.with_sharding_constraint(d_weight, layout.head_grad)

  def stored(d_weight):  # float32 [V, D] -> the weight's dtype and orientation
    return (d_weight if head.transposed else d_weight.T).astype(weight.dtype)

  if tiles.count == 1:
    d_h, d_w = _tile_backward(head, layout, h_all, weight, t_all, lse, g_all)
    return d_h.astype(hidden.dtype).reshape(hidden.shape), stored(constrained(d_w)), None, None

  tiled_order = tiles.tiled(order)
  g_sorted = tiles.tiled(jnp.take_along_axis(g_all, order, axis=1))

  def body(tile, carry):
    d_weight, d_hidden = carry
    index = tiled_order[tile]
    d_h, d_w = _tile_backward(head, layout, _gather(h_all, index), weight,
                              _gather(t_all, index), lse[tile], g_sorted[tile])
    return constrained(d_weight + d_w), d_hidden.at[tile].set(d_h.astype(hidden.dtype))

  # The weight's gradient is accumulated tile by tile in float32.
  vocab = weight.shape[0] if head.transposed else weight.shape[1]
  init = (constrained(jnp.zeros((vocab, hidden.shape[-1]), jnp.float32)),
          jnp.zeros((tiles.count, tiles.groups, tiles.size, hidden.shape[-1]), hidden.dtype))
  d_weight, d_hidden = jax.lax.fori_loop(0, live, body, init)
  d_hidden = _gather(tiles.untiled(d_hidden), inverse).reshape(hidden.shape)
  return d_hidden, stored(d_weight), None, None


_cross_entropy.defvjp(lambda *args: _forward(*args), _backward)
