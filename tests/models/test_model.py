"""The decoder: family configs, padding invariance, cache agreement, dtypes and remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ff_jax.errors import ConfigError
from ff_jax.models import (
  ModelConfig,
  RopeScaling,
  abstract_model,
  forward,
  init_cache,
  init_params,
  positions_from_mask,
  tiny_llama,
)
from ff_jax.models.transformer import dense

FAMILIES = {
    "llama": tiny_llama(),
    "llama3_rope": tiny_llama(rope_scaling=RopeScaling(kind="llama3", factor=8.0,
                                                       original_max_position_embeddings=64)),
    "qwen2": tiny_llama(qkv_bias=True, tie_embeddings=True),
    "gpt2": tiny_llama(norm="layer", positions="learned", mlp="gelu", qkv_bias=True,
                       out_bias=True, mlp_bias=True, tie_embeddings=True, num_kv_heads=4),
    "qwen3": tiny_llama(qk_norm=True, head_dim=24, tie_embeddings=True),
    # A window of 3 slots on the first layer: shorter than every multi-token test row here.
    "gemma3": tiny_llama(mlp="geglu", qk_norm=True, norm_plus_one=True, post_norms=True,
                         scale_embeddings=True, query_pre_attn_scalar=24.0,
                         layer_types=("sliding_attention", "full_attention"), sliding_window=3,
                         rope_local_theta=500.0, tie_embeddings=True),
}


def _model(cfg, seed=0):
  graphdef, _, _ = abstract_model(cfg)
  params = init_params(cfg, seed)
  # Larger weights than the init scale, so that logits differ clearly between tokens.
  params = jax.tree.map(lambda x: x * 4.0 if x.ndim > 1 else x, params)
  return graphdef, params


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_padding_does_not_change_logits(name):
  cfg = FAMILIES[name]
  graphdef, params = _model(cfg)
  tokens = jnp.asarray([[3, 4, 5, 6, 7]])
  mask = jnp.ones_like(tokens)
  ref, _ = forward(graphdef, params, tokens, positions_from_mask(mask), mask)
  # The same row, left-padded and right-padded by 3.
  left = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), tokens], axis=1)
  left_mask = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), mask], axis=1)
  out, _ = forward(graphdef, params, left, positions_from_mask(left_mask), left_mask)
  np.testing.assert_allclose(out[:, 3:], ref, atol=1e-5)
  right = jnp.concatenate([tokens, jnp.zeros((1, 3), jnp.int32)], axis=1)
  right_mask = jnp.concatenate([mask, jnp.zeros((1, 3), jnp.int32)], axis=1)
  out, _ = forward(graphdef, params, right, positions_from_mask(right_mask), right_mask)
  np.testing.assert_allclose(out[:, :5], ref, atol=1e-5)
  assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_cached_and_uncached_logits_agree(name):
  cfg = FAMILIES[name]
  graphdef, params = _model(cfg)
  tokens = jnp.asarray([[0, 0, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16]])
  mask = jnp.asarray([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
  full, _ = forward(graphdef, params, tokens, positions_from_mask(mask), mask)
  # Prefill 5 slots, then feed the last 3 tokens one at a time through the cache.
  cache = init_cache(graphdef, params, 2, 8)
  positions = positions_from_mask(mask)
  kv_mask = jnp.zeros((2, 8), jnp.int32).at[:, :5].set(mask[:, :5])
  logits, cache = forward(graphdef, params, tokens[:, :5], positions[:, :5], kv_mask, cache, 0)
  np.testing.assert_allclose(logits[:, 2:], full[:, 2:5], atol=1e-4)
  for slot in range(5, 8):
    kv_mask = kv_mask.at[:, slot].set(1)
    logits, cache = forward(graphdef, params, tokens[:, slot:slot + 1],
                            positions[:, slot:slot + 1], kv_mask, cache, slot)
    np.testing.assert_allclose(logits[:, 0], full[:, slot], atol=1e-4)


@pytest.mark.slow  # several compiled meshes or precisions: CI runs it, the fast loop skips it
def test_bf16_compute_is_close_to_fp32_and_remat_is_exact():
  cfg = tiny_llama()
  graphdef, params = _model(cfg)
  tokens = jnp.asarray([[1, 2, 3, 4, 5, 6]])
  mask = jnp.ones_like(tokens)
  ref, _ = forward(graphdef, params, tokens, positions_from_mask(mask), mask)
  bf16_graph, _, _ = abstract_model(cfg.replace(dtype="bfloat16"))
  low, _ = forward(bf16_graph, params, tokens, positions_from_mask(mask), mask)
  assert low.dtype == jnp.float32  # logits are always fp32
  assert float(jnp.max(jnp.abs(low - ref))) < 0.1 * float(jnp.max(jnp.abs(ref)))

  remat_graph, _, _ = abstract_model(cfg.replace(remat=True))

  def loss(graph, p):
    logits, _ = forward(graph, p, tokens, positions_from_mask(mask), mask)
    return jnp.mean(logits ** 2)

  g_ref = jax.grad(lambda p: loss(graphdef, p))(params)
  g_remat = jax.grad(lambda p: loss(remat_graph, p))(params)
  for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_remat)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", ["up", "down", "heads_in", "tied_head", "bf16_head"])
def test_dense_value_and_gradients_equal_the_einsum(form):
  # (x shape, w shape, dense kwargs, the einsum it stands for); "up"/"down" exercise both
  # orientations of the weight gradient (x narrower than the output, and wider).
  cases = {
      "up": ((2, 5, 8), (8, 4, 6), {}, "btd,dhk->bthk"),
      "down": ((2, 5, 24), (24, 8), {}, "btf,fd->btd"),
      "heads_in": ((2, 5, 4, 6), (4, 6, 8), {"contract": 2}, "bthk,hkd->btd"),
      "tied_head": ((2, 5, 8), (40, 8), {"transpose_w": True}, "btd,vd->btv"),
      "bf16_head": ((2, 5, 8), (8, 40), {"out_dtype": jnp.float32}, "btd,dv->btv"),
  }
  x_shape, w_shape, kwargs, spec = cases[form]
  dtype = jnp.bfloat16 if form.startswith("bf16") else jnp.float32
  x = jax.random.normal(jax.random.key(0), x_shape).astype(dtype)
  w = jax.random.normal(jax.random.key(1), w_shape).astype(dtype)
  cot = jax.random.normal(jax.random.key(2), jnp.einsum(spec, x, w).shape)
  out_dtype = kwargs.get("out_dtype")

  def ours(x, w):
    return jnp.sum(dense(x, w, **kwargs).astype(jnp.float32) * cot)

  def reference(x, w):
    y = jnp.einsum(spec, x, w, preferred_element_type=out_dtype)
    return jnp.sum(y.astype(jnp.float32) * cot)

  y = dense(x, w, **kwargs)
  assert y.dtype == (out_dtype or dtype)
  tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == jnp.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(
      jnp.einsum(spec, x, w, preferred_element_type=out_dtype), np.float32), **tol)
  ours_grads = jax.jit(jax.grad(ours, argnums=(0, 1)))(x, w)
  ref_grads = jax.grad(reference, argnums=(0, 1))(x, w)
  for got, want in zip(ours_grads, ref_grads):
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **tol)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_model_gradients_equal_plain_autodiff(name, monkeypatch):
  # The whole model's gradients through dense()'s custom VJP against JAX's own transpose of the
  # same projections (the forward is shared; only the backward differs).
  from ff_jax.models import transformer

  cfg = FAMILIES[name]
  graphdef, params = _model(cfg)
  tokens = jnp.asarray([[3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 0, 0]])
  mask = jnp.asarray([[1] * 6, [1, 1, 1, 1, 0, 0]])

  def loss(p):
    logits, _ = forward(graphdef, p, tokens, positions_from_mask(mask), mask)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * mask)

  ours = jax.grad(loss)(params)
  monkeypatch.setattr(transformer, "dense", lambda x, w, contract=1, transpose_w=False,
                      out_dtype=None: transformer._dense_fwd(x, w, contract, transpose_w,
                                                             out_dtype)[0])
  plain = jax.grad(loss)(params)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(plain)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def fused_vs_einsum(name: str, kernel: str, dtype: str):
  """Logits and loss gradients of the model with attention=`kernel` and with the einsum path, on
  right-padded rows of three lengths and a filler row (length 0, zero weight)."""
  cfg = FAMILIES[name].replace(dtype=dtype)
  fused_cfg = cfg.replace(attention=kernel)
  graphdef, params = _model(cfg)
  fused_graph, _, _ = abstract_model(fused_cfg)
  tokens = jnp.asarray([[3, 4, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 0, 0, 0],
                        [16, 17, 0, 0, 0, 0, 0, 0], [0] * 8])
  mask = (jnp.arange(8)[None] < jnp.asarray([8, 5, 2, 0])[:, None]).astype(jnp.int32)

  def loss(graph, p):
    logits, _ = forward(graph, p, tokens, positions_from_mask(mask), mask)
    return jnp.sum(jax.nn.log_softmax(logits)[..., 0] * mask) / mask.sum(), logits

  (_, want), g_want = jax.value_and_grad(lambda p: loss(graphdef, p), has_aux=True)(params)
  (_, got), g_got = jax.value_and_grad(lambda p: loss(fused_graph, p), has_aux=True)(params)
  # The filler row's outputs differ and carry no weight; splash gives padded query slots only
  # padding to see (a segment of their own), which no real slot and no loss reads.
  real = (np.asarray(mask) > 0) if kernel == "splash" else np.asarray(mask.sum(-1))[:, None] > 0
  real = np.broadcast_to(real, mask.shape)
  return (np.asarray(want)[real], np.asarray(got)[real],
          jax.tree_util.tree_leaves_with_path(g_want), jax.tree.leaves(g_got))


@pytest.mark.parametrize("kernel", ["xla", "splash"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_fused_attention_equals_the_einsum_path(name, kernel):
  # xla: the call cuDNN gets on a GPU, with JAX's reference implementation: row lengths and the
  # causal flag must select the same keys as the einsum path's slot mask, padded query slots
  # included. splash: the TPU kernel in Pallas interpret mode (rows padded to 128 slots, GQA, the
  # sliding window of gemma3's first layer, Gemma's q scale).
  want, got, g_want, g_got = fused_vs_einsum(name, kernel, "float32")
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Splash's backward pass recomputes the probabilities block by block from the saved
  # log-normalisers and sums dq, dk, dv in another order: float32 gradients agree to ~3e-4
  # relative where terms cancel.
  rtol, atol = (1e-3, 1e-5) if kernel == "splash" else (1e-4, 1e-6)
  for (path, a), b in zip(g_want, g_got):
    np.testing.assert_allclose(b, a, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def test_attention_kernel_choice():
  from ff_jax.models.kernels import attention_kernel

  cfg = tiny_llama(dtype="bfloat16")
  assert attention_kernel(cfg, jnp.bfloat16, cached=False) == (
      "cudnn" if jax.default_backend() == "gpu" else "einsum")
  assert attention_kernel(cfg, jnp.float32, cached=False) == "einsum"
  assert attention_kernel(cfg.replace(attention="cudnn"), jnp.bfloat16, cached=True) == "einsum"
  assert attention_kernel(cfg.replace(attention="xla"), jnp.bfloat16, cached=False) == "xla"
  with pytest.raises(ConfigError, match="model.attention: cuDNN's fused attention needs"):
    tiny_llama(attention="cudnn")
  with pytest.raises(ConfigError, match="model.attention: must be"):
    tiny_llama(attention="flash")


def test_every_parameter_has_logical_axes():
  for cfg in FAMILIES.values():
    _, abstract, axes = abstract_model(cfg)
    for shape, spec in zip(jax.tree.leaves(abstract), jax.tree.leaves(axes)):
      assert len(spec) == len(shape.shape) and all(isinstance(a, str) for a in spec)


def test_bad_model_config_names_the_key():
  with pytest.raises(ConfigError, match="num_kv_heads"):
    tiny_llama(num_kv_heads=3)
  with pytest.raises(ConfigError, match="unknown key"):
    ModelConfig.from_dict({"vocab_size": 8, "bogus": 1})
