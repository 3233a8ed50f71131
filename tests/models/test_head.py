"""The LM head at target positions only (ff_jax.models.head): the same per-position NLL, argmax
hits and gradients as every position's logits, for every storage of the head, soft cap, row
grouping and tile size, under vmap, and without a [tokens x vocabulary] array in the program."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ff_jax.models.head import Head, target_cross_entropy
from ff_jax.models.layout import StepLayout

B, T, D, V = 4, 37, 16, 300


def _case(transposed: bool, seed: int = 0, share: float = 0.2):
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
  weight = jnp.asarray(rng.normal(size=(V, D) if transposed else (D, V)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, V, size=(B, T)), jnp.int32)
  weights = jnp.asarray(rng.random((B, T)) < share, jnp.float32)
  weights = weights.at[1].set(0.0)  # a row without targets
  return hidden, weight, targets, weights


def _full(hidden, weight, targets, weights, head: Head):
  """Every position's logits, as the steps computed them before."""
  logits = jnp.einsum("btd,vd->btv" if head.transposed else "btd,dv->btv", hidden, weight)
  if head.softcap is not None:
    logits = jnp.tanh(logits / head.softcap) * head.softcap
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return nll * weights, (jnp.argmax(logits, -1) == targets) * weights


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("groups,tile", [(1, 8), (2, 16), (4, 64), (3, 8), (1, 1024)])
def test_values_and_gradients_equal_the_full_logits(transposed, softcap, groups, tile):
  hidden, weight, targets, weights = _case(transposed)
  head = Head(transposed, softcap)
  layout = StepLayout(groups=groups, tile=tile)  # 3 groups do not divide 4 rows: one group
  got_nll, got_hit = jax.jit(lambda h, w: target_cross_entropy(h, w, targets, weights, head,
                                                              layout))(hidden, weight)
  want_nll, want_hit = _full(hidden, weight, targets, weights, head)
  np.testing.assert_allclose(got_nll, want_nll, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got_hit, want_hit)
  assert float(jnp.abs(got_nll).sum()) > 0 and float(want_hit.sum()) >= 0

  cotangent = jnp.asarray(np.random.default_rng(1).normal(size=(B, T)), jnp.float32)
  got = jax.grad(lambda h, w: (target_cross_entropy(h, w, targets, weights, head, layout)[0]
                               * cotangent).sum(), argnums=(0, 1))(hidden, weight)
  want = jax.grad(lambda h, w: (_full(h, w, targets, weights, head)[0] * cotangent).sum(),
                  argnums=(0, 1))(hidden, weight)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # Positions without a target get no gradient.
  assert float(jnp.abs(got[0][1]).max()) == 0.0


def test_argmax_ties_pick_the_first_maximum_as_jnp_argmax():
  hidden = jnp.ones((1, 4, 2), jnp.float32)
  weight = jnp.zeros((2, 6), jnp.float32)  # every logit equal: the argmax is token 0
  targets = jnp.asarray([[0, 3, 0, 5]], jnp.int32)
  weights = jnp.ones((1, 4), jnp.float32)
  _, hit = target_cross_entropy(hidden, weight, targets, weights, Head(), StepLayout(tile=2))
  np.testing.assert_array_equal(hit, [[1, 0, 1, 0]])


def test_stacked_under_vmap_with_other_targets_per_replica():
  hidden, weight, targets, weights = _case(False)
  few = jnp.zeros_like(weights).at[:, :2].set(1.0)
  stacked = jnp.stack([weights, few])
  layout = StepLayout(groups=2, tile=8)

  def loss(w, mask):
    return target_cross_entropy(hidden, w, targets, mask, Head(), layout)[0].sum()

  got = jax.vmap(jax.value_and_grad(loss), in_axes=(None, 0))(weight, stacked)
  for k in range(2):
    want = jax.value_and_grad(lambda w, k=k: _full(hidden, w, targets, stacked[k],
                                                   Head())[0].sum())(weight)
    np.testing.assert_allclose(got[0][k], want[0], rtol=1e-5)
    np.testing.assert_allclose(got[1][k], want[1], rtol=1e-5, atol=1e-6)


def _largest_f32(hlo: str) -> int:
  """Elements of the largest float array in an HLO text."""
  sizes = [int(np.prod([int(d) for d in dims.split(",") if d]))
           for dims in re.findall(r"f32\[([\d,]*)\]", hlo)]
  return max(sizes)


def test_no_tokens_by_vocabulary_array_in_the_compiled_gradient():
  # 4 rows x 512 positions x V: the tiles hold 64 positions of one group at a time.
  rows, length, vocab = 4, 512, 4096
  hidden = jax.ShapeDtypeStruct((rows, length, D), jnp.float32)
  weight = jax.ShapeDtypeStruct((D, vocab), jnp.float32)
  targets = jax.ShapeDtypeStruct((rows, length), jnp.int32)
  weights = jax.ShapeDtypeStruct((rows, length), jnp.float32)

  def grad(layout):
    fn = lambda h, w, t, m: target_cross_entropy(h, w, t, m, Head(), layout)[0].sum()
    return jax.jit(jax.grad(fn, argnums=(0, 1))).lower(hidden, weight, targets,
                                                        weights).compile().as_text()

  assert _largest_f32(grad(StepLayout(groups=1, tile=64))) <= 64 * vocab
  # The check can fail: a tile as large as the batch holds every position's logits.
  assert _largest_f32(grad(StepLayout(groups=1, tile=rows * length))) >= rows * length * vocab
