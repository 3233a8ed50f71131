"""Greedy generation with each batch's rows split over the mesh's data-parallel axes
(`generate_texts`), on 8 fake CPU devices: the texts of the unsharded, one-device decode, in prompt
order, on meshes that split rows alone, rows and weights, and weights alone."""

import jax
import numpy as np
import pytest

from ff_jax import parallel
from ff_jax.errors import ConfigError
from ff_jax.models.decoding import SamplingConfig, generate
from ff_jax.training.scoring import generate_texts
from tests.helpers import generate_worker as gw

pytestmark = pytest.mark.multidevice

MESHES = [(8, 1, 1), (2, 2, 2), (1, 1, 8)]


@pytest.fixture(scope="module")
def unsharded():
  """The prompts' texts from one decode of them all on one device, and the parameters' values."""
  runtime, params, tok = gw.fixture(parallel.make_mesh(parallel.MeshConfig(1, 1, 1),
                                                       jax.devices()[:1]))
  prompts = gw.prompts()
  outs = generate(runtime.graphdef, params, prompts, eos_id=tok.eos_id, pad_id=tok.pad_id,
                  sampling=SamplingConfig(max_new_tokens=gw.MAX_NEW_TOKENS))
  return [tok.decode(o).strip() for o in outs], jax.device_get(params)


def test_fixture_decodes_long_prompt_dependent_texts(unsharded):
  texts, _ = unsharded
  assert len(set(texts)) == len(texts)
  assert all(len(t.split()) >= 3 for t in texts), texts


@pytest.mark.parametrize("shape", MESHES)
def test_rows_split_over_the_mesh_give_the_unsharded_texts(shape, unsharded):
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  mesh = parallel.make_mesh(parallel.MeshConfig(*shape))
  runtime, params, tok = gw.fixture(mesh)
  for got, want in zip(jax.tree.leaves(jax.device_get(params)), jax.tree.leaves(unsharded[1])):
    np.testing.assert_array_equal(got, want)  # the same model, only placed differently
  ways = int(np.prod([mesh.shape[a] for a in parallel.data_axes(mesh)]))
  # 13 prompts in batches of 8 (or 2 x the row ways): the last batch is partly filler rows.
  texts = generate_texts(runtime, params, tok, gw.prompts(), gw.MAX_NEW_TOKENS, max(8, 2 * ways))
  assert texts == unsharded[0]


def test_batch_size_must_split_evenly_over_the_data_parallel_rows():
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  runtime, params, tok = gw.fixture(parallel.make_mesh(parallel.MeshConfig(4, 2, 1)))
  with pytest.raises(ConfigError, match=r"batch_size 12 must be a positive multiple of 8"):
    generate_texts(runtime, params, tok, gw.prompts(), gw.MAX_NEW_TOKENS, 12)
  assert generate_texts(runtime, params, tok, [], gw.MAX_NEW_TOKENS, 12) == []
