"""Greedy generation on a mesh, for `tests/training/test_generate_sharded.py` (in-process) and
`tests/training/test_generate_multihost.py` (one process of a local pod per worker).

`fixture(mesh)` gives a tiny model planned on `mesh` (weights scaled up so that greedy paths are
long and depend on the prompt), a word-level tokenizer over its whole vocabulary (token i is the
word `w<i>`) and prompts of mixed lengths, fewer than a whole number of batches.

As a worker, `python -m tests.helpers.generate_worker DATA FSDP TENSOR BATCH_SIZE`: joins the
`jax.distributed` cluster when the FF_JAX_* variables name one, builds the mesh, runs
`generate_texts` and prints one line `texts <JSON list>`; `generate_texts`'s own log line (how many
rows of each batch this process decodes) goes to stderr.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import jax
import numpy as np
import tokenizers

from ff_jax import parallel
from ff_jax.models import tiny_llama
from ff_jax.models.tokenizer import TextTokenizer
from ff_jax.training.scoring import generate_texts
from ff_jax.training.steps import ModelRuntime

# Enough heads and width that a tensor axis of 2 shards every kind of weight.
CONFIG = tiny_llama(num_heads=4, num_kv_heads=2, hidden_size=64, intermediate_size=128)
EOS, PAD = 1, 0
MAX_NEW_TOKENS = 10


def tokenizer() -> TextTokenizer:
  vocab = {f"w{i}": i for i in range(CONFIG.vocab_size)}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w2"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.add_special_tokens(["w0", "w1"])  # pad and EOS: left out of decoded text
  return TextTokenizer(tokenizer=tok, eos_id=EOS, pad_id=PAD, bos_id=None)


def prompts(count: int = 13, seed: int = 0) -> list[list[int]]:
  """`count` prompts of 1 to 20 tokens (left-padded to 32 slots, most of them half empty)."""
  rng = np.random.default_rng(seed)
  return [rng.integers(2, CONFIG.vocab_size, rng.integers(1, 21)).tolist() for _ in range(count)]


def fixture(mesh: jax.sharding.Mesh) -> tuple[ModelRuntime, Any, TextTokenizer]:
  """(runtime on `mesh`, its parameters on their shardings, the tokenizer)."""
  runtime = ModelRuntime.create(CONFIG, mesh)
  sharpen = jax.jit(lambda p: jax.tree.map(lambda x: x * 8 if x.ndim > 1 else x, p),
                    out_shardings=runtime.param_shardings)
  return runtime, sharpen(runtime.init_params(seed=0)), tokenizer()


def main(data: int, fsdp: int, tensor: int, batch_size: int) -> None:
  logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
  parallel.initialize_distributed()
  mesh = parallel.make_mesh(parallel.MeshConfig(data, fsdp, tensor))
  runtime, params, tok = fixture(mesh)
  texts = generate_texts(runtime, params, tok, prompts(), MAX_NEW_TOKENS, batch_size)
  print("texts", json.dumps(texts), flush=True)


if __name__ == "__main__":
  main(*map(int, sys.argv[1:5]))
