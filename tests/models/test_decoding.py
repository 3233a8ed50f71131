"""Batched decoding: left padding, the KV cache, stop conditions and sampling."""

import jax
import numpy as np
import pytest

from ff_jax.models import abstract_model, init_params, tiny_llama
from ff_jax.models.decoding import SamplingConfig, generate, left_pad
from tests.helpers.decoding_reference import uncached_greedy
from tests.models.test_model import FAMILIES

EOS, PAD = 1, 0


@pytest.fixture(scope="module")
def model():
  cfg = tiny_llama()
  graphdef, _, _ = abstract_model(cfg)
  # Sharper logits than the init scale, so greedy paths are long and prompt-dependent.
  params = jax.tree.map(lambda x: x * 8 if x.ndim > 1 else x, init_params(cfg, 0))
  return graphdef, params


PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25], [20],
           [30, 31, 32, 33]]


def test_batched_left_padded_greedy_equals_one_at_a_time_and_uncached(model):
  graphdef, params = model
  sampling = SamplingConfig(max_new_tokens=10)
  batched = generate(graphdef, params, PROMPTS, eos_id=EOS, pad_id=PAD, sampling=sampling)
  single = [generate(graphdef, params, [p], eos_id=EOS, pad_id=PAD, sampling=sampling)[0]
            for p in PROMPTS]
  assert batched == single
  assert batched == [uncached_greedy(graphdef, params, p, 10, EOS) for p in PROMPTS]
  assert any(len(b) >= 5 for b in batched)


def test_sliding_window_decoding_equals_uncached_and_the_window_counts():
  """A Gemma-3-style model whose first layer sees 3 slots: prompt + generation run far past the
  window, and the cached, batched decode still equals full forward passes; without the window the
  same weights decode differently."""
  # Untied: with a tied head this tiny random model mostly repeats its input token.
  cfg = FAMILIES["gemma3"].replace(tie_embeddings=False)
  graphdef, _, _ = abstract_model(cfg)
  params = jax.tree.map(lambda x: x * 8 if x.ndim > 1 else x, init_params(cfg, 0))
  sampling = SamplingConfig(max_new_tokens=10)
  batched = generate(graphdef, params, PROMPTS, eos_id=EOS, pad_id=PAD, sampling=sampling)
  assert batched == [uncached_greedy(graphdef, params, p, 10, EOS) for p in PROMPTS]
  assert any(len(b) >= 5 for b in batched)
  unwindowed, _, _ = abstract_model(cfg.replace(layer_types=None, sliding_window=None,
                                                rope_local_theta=None))
  assert generate(unwindowed, params, PROMPTS, eos_id=EOS, pad_id=PAD,
                  sampling=sampling) != batched


def test_stops_on_eos_and_on_stop_sequences(model):
  graphdef, params = model
  sampling = SamplingConfig(max_new_tokens=10)
  full = generate(graphdef, params, PROMPTS[:1], eos_id=EOS, pad_id=PAD, sampling=sampling)[0]
  assert len(full) >= 4
  stop = full[2:4]
  cut = generate(graphdef, params, PROMPTS[:1], eos_id=EOS, pad_id=PAD, sampling=sampling,
                 stop_sequences=[stop])[0]
  assert cut == full[:2]
  # Declaring the third generated token as EOS ends the row right before it.
  as_eos = generate(graphdef, params, PROMPTS[:1], eos_id=full[2], pad_id=PAD,
                    sampling=sampling)[0]
  assert as_eos == full[:full.index(full[2])]


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(model):
  graphdef, params = model
  hot = SamplingConfig(max_new_tokens=8, temperature=1.5, top_p=1.0, seed=3)
  a = generate(graphdef, params, PROMPTS, eos_id=EOS, pad_id=PAD, sampling=hot)
  b = generate(graphdef, params, PROMPTS, eos_id=EOS, pad_id=PAD, sampling=hot)
  c = generate(graphdef, params, PROMPTS, eos_id=EOS, pad_id=PAD,
               sampling=SamplingConfig(max_new_tokens=8, temperature=1.5, seed=4))
  assert a == b and a != c
  # top_p so small that only the most likely token survives: sampling becomes greedy.
  nucleus = SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=5)
  greedy = SamplingConfig(max_new_tokens=8)
  assert (generate(graphdef, params, PROMPTS, eos_id=EOS, pad_id=PAD, sampling=nucleus)
          == generate(graphdef, params, PROMPTS, eos_id=EOS, pad_id=PAD, sampling=greedy))


def test_left_pad_layout():
  tokens, mask = left_pad([[1, 2], [3]], pad_id=9, length=4)
  np.testing.assert_array_equal(tokens, [[9, 9, 1, 2], [9, 9, 9, 3]])
  np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [0, 0, 0, 1]])
  with pytest.raises(ValueError, match="does not fit"):
    left_pad([[1, 2, 3]], pad_id=0, length=2)
