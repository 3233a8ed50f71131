"""Scanned layers: the stacked blocks run by one scan compute what the unrolled blocks do, and the
compiled program does not grow with depth."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ff_jax.models import abstract_model, forward, init_params, positions_from_mask, tiny_llama
from ff_jax.models.config import FULL_ATTENTION, SLIDING_ATTENTION


def _batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 256, (2, 12)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[1, 9:] = 0  # one right-padded row
  return tokens, mask


def _loss(graphdef, params, tokens, mask):
  logits, _ = forward(graphdef, params, tokens, positions_from_mask(mask), mask)
  logp = jax.nn.log_softmax(logits[:, :-1])
  picked = jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
  return -(picked * mask[:, 1:]).sum() / mask[:, 1:].sum()


@pytest.mark.parametrize("kinds", [None, "mixed"])
def test_scan_equals_the_unrolled_blocks_forward_and_backward(kinds):
  cfg = tiny_llama(num_layers=3)
  # Mixed kinds: each layer's kind travels through the scan as data (the Gemma 3 parity tests in
  # test_families check that path against transformers).
  if kinds == "mixed":
    cfg = cfg.replace(layer_types=(SLIDING_ATTENTION, FULL_ATTENTION, SLIDING_ATTENTION),
                      sliding_window=4, rope_local_theta=100.0)
  tokens, mask = _batch()
  params = init_params(cfg, 0)
  scanned, _, _ = abstract_model(cfg)
  unrolled, _, _ = abstract_model(cfg.replace(scan_layers=False))
  loss_s, grad_s = jax.value_and_grad(lambda p: _loss(scanned, p, tokens, mask))(params)
  loss_u, grad_u = jax.value_and_grad(lambda p: _loss(unrolled, p, tokens, mask))(params)
  np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grad_s), jax.tree.leaves(grad_u)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def _program_size(cfg, layers):
  cfg = cfg.replace(num_layers=layers)
  graph, abstract, _ = abstract_model(cfg)
  tokens, mask = _batch()
  grad = jax.jit(jax.grad(lambda p: _loss(graph, p, tokens, mask)))
  return len(grad.lower(abstract).as_text())


def test_the_compiled_step_does_not_grow_with_depth():
  cfg = tiny_llama()
  scanned = [_program_size(cfg, n) for n in (2, 8)]
  unrolled = [_program_size(cfg.replace(scan_layers=False), n) for n in (2, 8)]
  assert scanned[1] == scanned[0], scanned  # one block, whatever the depth
  assert unrolled[1] > 1.5 * unrolled[0], unrolled  # unrolled, the program grows with depth
