"""GPU-only checks, skipped elsewhere: cuDNN's fused attention against the einsum path in bf16.

Run on a GPU machine with `JAX_PLATFORMS=cuda python -m pytest tests/models/test_gpu.py`.
"""

import jax
import numpy as np
import pytest

from tests.models.test_model import FAMILIES, fused_vs_einsum

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU backend")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_cudnn_attention_is_close_to_the_einsum_path(name):
  want, got, g_want, g_got = fused_vs_einsum(name, "cudnn", "bfloat16")
  assert np.isfinite(got).all()
  # bf16 compute on both sides, different summation orders: compare at bf16's resolution.
  scale = np.abs(want).max()
  assert np.abs(got - want).max() < 0.03 * scale, (np.abs(got - want).max(), scale)
  for (path, a), b in zip(g_want, g_got):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    err = np.linalg.norm(b - a) / max(np.linalg.norm(a), 1e-12)
    assert err < 0.05, (jax.tree_util.keystr(path), err)
