"""Packed rows in the decoder: attention stays inside each example, positions come from the caller,
on the einsum path and on the fused ones (`jax.nn.dot_product_attention`, JAX's reference kernel
here, cuDNN on a GPU; splash attention in Pallas interpret mode here, compiled on a TPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ff_jax.models import abstract_model, forward, init_cache, init_params, positions_from_mask
from tests.models.test_model import FAMILIES

# Three examples of very different lengths in one row of 16 slots, then 2 slots of padding.
LENGTHS = (9, 2, 3)
WIDTH = 16


def _model(cfg):
  graphdef, _, _ = abstract_model(cfg)
  # Larger weights than the init scale, so that logits differ clearly between tokens.
  params = jax.tree.map(lambda x: x * 4.0 if x.ndim > 1 else x, init_params(cfg, 0))
  return graphdef, params


def _packed_row(seed=0):
  """(tokens, segment_ids, positions) [1, WIDTH] and each example's tokens."""
  rng = np.random.default_rng(seed)
  parts = [rng.integers(3, 200, n).astype(np.int32) for n in LENGTHS]
  pad = WIDTH - sum(LENGTHS)
  tokens = np.concatenate(parts + [np.zeros(pad, np.int32)])[None]
  segments = np.concatenate([np.full(n, s + 1) for s, n in enumerate(LENGTHS)]
                            + [np.zeros(pad)]).astype(np.int32)[None]
  positions = np.concatenate([np.arange(n) for n in LENGTHS] + [np.zeros(pad)]).astype(
      np.int32)[None]
  return tokens, segments, positions, parts


def _packed_logits(graphdef, params, tokens, segments, positions):
  mask = jnp.asarray(segments > 0, jnp.int32)
  logits, _ = forward(graphdef, params, jnp.asarray(tokens), jnp.asarray(positions), mask,
                      segment_ids=jnp.asarray(segments))
  return np.asarray(logits)


@pytest.mark.parametrize("kernel", ["einsum", "xla", "splash"])
@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma3"])
def test_each_packed_example_gets_its_logits_alone(name, kernel):
  """RoPE (llama), learned positions (gpt2) and a sliding window shorter than the first example
  (gemma3): every segment's logits equal the example's own unpadded forward within 1e-5 (fp32)."""
  cfg = FAMILIES[name].replace(attention=kernel)
  graphdef, params = _model(cfg)
  tokens, segments, positions, parts = _packed_row()
  packed = _packed_logits(graphdef, params, tokens, segments, positions)
  assert np.isfinite(packed).all()  # padding slots too
  start = 0
  for part in parts:
    row = jnp.asarray(part)[None]
    mask = jnp.ones_like(row)
    alone, _ = forward(graphdef, params, row, positions_from_mask(mask), mask)
    np.testing.assert_allclose(packed[:, start:start + len(part)], alone, rtol=1e-5, atol=1e-5)
    start += len(part)


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_splash_gradients_on_packed_rows_equal_the_einsum_path(name):
  """The TPU kernel's backward pass (Pallas interpret mode) on a packed row: grouped-query heads,
  and gemma3's sliding window shorter than the first example; the loss reads real slots only."""
  cfg = FAMILIES[name]
  graphdef, params = _model(cfg)
  splash_graph, _, _ = abstract_model(cfg.replace(attention="splash"))
  tokens, segments, positions, _ = _packed_row()
  mask = jnp.asarray(segments > 0, jnp.int32)

  def loss(graph, p):
    logits, _ = forward(graph, p, jnp.asarray(tokens), jnp.asarray(positions), mask,
                        segment_ids=jnp.asarray(segments))
    return jnp.sum(jax.nn.log_softmax(logits)[..., 0] * mask) / mask.sum()

  want = jax.grad(lambda p: loss(graphdef, p))(params)
  got = jax.grad(lambda p: loss(splash_graph, p))(params)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(got)) > 0


@pytest.mark.parametrize("kernel", ["einsum", "xla", "splash"])
def test_attention_does_not_leak_across_segments(kernel):
  """Changing the first example's tokens changes none of the other examples' logits (exactly, up
  to 1e-6), and does change its own."""
  cfg = FAMILIES["llama"].replace(attention=kernel)
  graphdef, params = _model(cfg)
  tokens, segments, positions, _ = _packed_row()
  before = _packed_logits(graphdef, params, tokens, segments, positions)
  changed = tokens.copy()
  changed[0, :LENGTHS[0]] = (changed[0, :LENGTHS[0]] + 7) % 200 + 3
  after = _packed_logits(graphdef, params, changed, segments, positions)
  first = LENGTHS[0]
  np.testing.assert_allclose(after[:, first:], before[:, first:], rtol=0, atol=1e-6)
  assert np.abs(after[:, :first] - before[:, :first]).max() > 1e-2


def test_segment_ids_are_refused_with_a_cache():
  cfg = FAMILIES["llama"]
  graphdef, params = _model(cfg)
  tokens, segments, positions, _ = _packed_row()
  cache = init_cache(graphdef, params, 1, WIDTH)
  with pytest.raises(ValueError, match="uncached"):
    forward(graphdef, params, jnp.asarray(tokens), jnp.asarray(positions),
            jnp.asarray(segments > 0, jnp.int32), cache, 0, segment_ids=jnp.asarray(segments))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU backend")
@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma3"])
def test_cudnn_packed_attention_is_close_to_the_einsum_path(name):
  """cuDNN with the same-segment mask (as an additive bias) against the einsum path, bf16, with
  gradients: the check the CPU suite cannot run."""
  cfg = FAMILIES[name].replace(dtype="bfloat16")
  graphdef, params = _model(cfg)
  fused_graph, _, _ = abstract_model(cfg.replace(attention="cudnn"))
  einsum_graph, _, _ = abstract_model(cfg.replace(attention="einsum"))
  tokens, segments, positions, _ = _packed_row()
  tokens, segments, positions = (jnp.asarray(np.repeat(a, 2, axis=0))
                                 for a in (tokens, segments, positions))
  mask = (segments > 0).astype(jnp.int32)

  def loss(graph, p):
    logits, _ = forward(graph, p, tokens, positions, mask, segment_ids=segments)
    return jnp.sum(jax.nn.log_softmax(logits)[..., 0] * mask) / mask.sum(), logits

  (_, want), g_want = jax.value_and_grad(lambda p: loss(einsum_graph, p), has_aux=True)(params)
  (_, got), g_got = jax.value_and_grad(lambda p: loss(fused_graph, p), has_aux=True)(params)
  real = np.asarray(mask, bool)
  want, got = np.asarray(want)[real], np.asarray(got)[real]
  assert np.isfinite(got).all()
  assert np.abs(got - want).max() < 0.03 * np.abs(want).max()
  for a, b in zip(jax.tree.leaves(g_want), jax.tree.leaves(g_got)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.linalg.norm(b - a) < 0.05 * max(np.linalg.norm(a), 1e-12)
