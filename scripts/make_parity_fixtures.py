"""Regenerate the tiny random HF checkpoints and golden logits in tests/fixtures/parity/.

Needs torch (CPU) and transformers; ff_jax itself never imports torch. Each fixture folder holds
what `save_pretrained(safe_serialization=True)` writes plus `expected.npz` with `input_ids`,
`attention_mask`, `position_ids` and fp32 `logits` from transformers' eager attention.

Every parameter is re-drawn with a fixed seed (biases and norm scales too: HF initialises those to
0 and 1, which would leave the bias and norm mappings untested), and row 1 of the batch is
left-padded so the test also covers positions derived from the mask.

Each folder also pins ff_jax's HF export of that model as transformers was seen to load it:
`export/config.json` and `export/generation_config.json` are what `ff_jax.models.hf.save_hf`
wrote, and `expected.npz` gets `export_logits`, transformers' logits of that export (written as
one file and as shards). The script stops before writing them unless those logits equal `logits`
within 1e-4 and the generation config is the one transformers derives from the exported config,
so the torch-free tests can hold today's export to the committed one instead of loading it in
transformers.

Deterministic: a rerun rewrites the same tensors, logits and exports; only config.json's
`transformers_version` follows the installed transformers.

  python scripts/make_parity_fixtures.py [--out tests/fixtures/parity] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ff_jax.models import hf  # noqa: E402

SEQ_LEN = 12
PAD = 3  # left padding of row 1
VOCAB = 128
TOL = 1e-4  # the golden tests' bound on |logit difference|
# Bytes per shard of the sharded export: several files for every fixture (40-400 KB each).
SHARD_BYTES = 40_000

FIXTURES = {
    # GQA, untied, default RoPE.
    "llama": ("LlamaForCausalLM", dict(
        model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_theta=10000.0, bos_token_id=1, eos_token_id=2)),
    # llama3 frequency scaling; a small original context so the scaling changes every band.
    "llama3_rope": ("LlamaForCausalLM", dict(
        model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=16),
        bos_token_id=1, eos_token_id=2)),
    "gpt2": ("GPT2LMHeadModel", dict(
        model_type="gpt2", vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
        n_inner=None, activation_function="gelu_new", layer_norm_epsilon=1e-5,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)),
    # q/k/v biases, untied.
    "qwen2": ("Qwen2ForCausalLM", dict(
        model_type="qwen2", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_theta=1000000.0, bos_token_id=None, eos_token_id=2)),
    # q/k norms, explicit head_dim != hidden / heads, GQA, tied embeddings.
    "qwen3": ("Qwen3ForCausalLM", dict(
        model_type="qwen3", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
        max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_theta=1000000.0, bos_token_id=None, eos_token_id=2)),
    # Both layer kinds (sliding, sliding, full), a window shorter than the sequence, local and
    # global RoPE bases that differ, linear scaling on the global layer only, query_pre_attn_scalar
    # != head_dim, GQA, tied embeddings. The norms' (1 + w) weights are drawn around 0.
    "gemma3": ("Gemma3ForCausalLM", dict(
        model_type="gemma3_text", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=True,
        query_pre_attn_scalar=24, sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                            "rope_theta": 100000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}},
        pad_token_id=0, bos_token_id=2, eos_token_id=1)),
    # The variants below were checked only live (tests/models/test_hf.py LIVE_CONFIGS); these
    # fixtures hold the same features at a vocabulary of VOCAB, each file under 200 KB.
    # head_dim != hidden / heads, attention biases on q/k/v/o, linear RoPE scaling.
    "llama_bias_headdim": ("LlamaForCausalLM", dict(
        model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        attention_bias=True, max_position_embeddings=64, rms_norm_eps=1e-5,
        tie_word_embeddings=False, rope_theta=10000.0,
        rope_scaling=dict(rope_type="linear", factor=2.0), bos_token_id=1, eos_token_id=2)),
    # Mistral 7B v0.1's spelling: a 4096-token window, which ff_jax ignores (it cannot matter
    # for sequences up to that length); explicit head_dim as Mistral NeMo has, GQA, untied.
    "mistral": ("MistralForCausalLM", dict(
        model_type="mistral", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_theta=10000.0, sliding_window=4096, bos_token_id=1, eos_token_id=2)),
    # An untied LM head and a non-default inner size.
    "gpt2_untied": ("GPT2LMHeadModel", dict(
        model_type="gpt2", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32,
        n_inner=80, activation_function="gelu_pytorch_tanh", layer_norm_epsilon=1e-5,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)),
    # Attention biases, a 3-token window on the layers from max_window_layers on (the second),
    # untied.
    "qwen3_sliding_bias": ("Qwen3ForCausalLM", dict(
        model_type="qwen3", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        attention_bias=True, use_sliding_window=True, sliding_window=3, max_window_layers=1,
        max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_theta=1000000.0, bos_token_id=None, eos_token_id=2)),
    # Softcapped final logits, attention biases, untied; layer kinds and local/global bases given
    # to transformers in v4 terms (sliding_window_pattern, rope_local_base_freq).
    "gemma3_softcap": ("Gemma3ForCausalLM", dict(
        model_type="gemma3_text", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
        num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        attention_bias=True, query_pre_attn_scalar=16, sliding_window=5, sliding_window_pattern=2,
        final_logit_softcapping=1.5, rope_theta=20000.0, rope_local_base_freq=300.0,
        max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=2, eos_token_id=1)),
}
# Families whose RMSNorm scales by (1 + weight): their weights are offsets from the identity.
OFFSET_NORMS = ("Gemma3",)


def build_model(arch: str, config: dict, seed: int) -> torch.nn.Module:
  """A randomly initialised transformers model with every parameter drawn from `seed`."""
  config = dict(config)
  model_type = config.pop("model_type")
  hf_config = transformers.AutoConfig.for_model(model_type, **config)
  hf_config._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = getattr(transformers, arch)(hf_config)
  gen = torch.Generator().manual_seed(seed)
  norm_center = 0.0 if arch.startswith(OFFSET_NORMS) else 1.0
  with torch.no_grad():
    for name, param in sorted(model.named_parameters()):
      noise = torch.randn(param.shape, generator=gen)
      if name.endswith("norm.weight") or ".ln_" in name or name.endswith("layernorm.weight"):
        param.copy_(norm_center + 0.2 * noise)
      elif name.endswith("bias"):
        param.copy_(0.1 * noise)
      else:
        # Larger than HF's 0.02 so attention and MLP outputs are not swamped by the residual.
        param.copy_(0.08 * noise)
  return model.eval()


def example_inputs(seed: int) -> dict[str, np.ndarray]:
  """Two rows; row 1 is left-padded with PAD zeros, and positions restart at its first token."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(4, VOCAB, size=(2, SEQ_LEN), dtype=np.int64)
  mask = np.ones((2, SEQ_LEN), np.int64)
  mask[1, :PAD] = 0
  ids[1, :PAD] = 0
  # ff_jax derives positions from the mask this way (`positions_from_mask`); HF must get the same.
  positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
  return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}


def hf_logits(model: torch.nn.Module, inputs: dict[str, np.ndarray]) -> np.ndarray:
  with torch.no_grad():
    out = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}, use_cache=False)
  return out.logits.float().numpy()


def write_fixture(out: Path, name: str, seed: int) -> None:
  arch, config = FIXTURES[name]
  model = build_model(arch, config, seed)
  inputs = example_inputs(seed)
  logits = hf_logits(model, inputs)
  folder = out / name
  shutil.rmtree(folder, ignore_errors=True)
  model.save_pretrained(folder, safe_serialization=True)
  (folder / "generation_config.json").unlink(missing_ok=True)  # not needed, and version-stamped
  export_logits = write_export(folder, config["model_type"], inputs, logits)
  np.savez(folder / "expected.npz", logits=logits.astype(np.float32),
           export_logits=export_logits.astype(np.float32), **inputs)
  size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
  print(f"{folder}: {size / 1024:.0f} KiB, |logits| max {np.abs(logits).max():.3f}")


def write_export(folder: Path, model_type: str, inputs: dict[str, np.ndarray],
                 logits: np.ndarray) -> np.ndarray:
  """ff_jax's export of the fixture in `folder`, loaded by transformers: its small files go to
  `folder/export/` once its logits (one file and sharded) equal `logits` within TOL and its
  generation config is transformers' own; returns the one-file export's logits."""
  cfg, params = hf.load_hf(folder)
  real = inputs["attention_mask"].astype(bool)
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    got = {}
    for layout, size in (("one_file", hf.MAX_SHARD_SIZE), ("shards", SHARD_BYTES)):
      out = hf.save_hf(tmp / layout, cfg, params, model_type, max_shard_size=size)
      model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
      got[layout] = hf_logits(model.eval(), inputs)
      diff = float(np.abs(got[layout] - logits)[real].max())
      if diff > TOL:
        raise SystemExit(f"{folder.name}: transformers' logits of ff_jax's {layout} export are "
                         f"{diff:.2e} off the fixture's")
    # What transformers' save_pretrained writes for the export loaded without its
    # generation_config.json, but the version stamp.
    bare = shutil.copytree(tmp / "one_file", tmp / "bare")
    (bare / "generation_config.json").unlink()
    model = transformers.AutoModelForCausalLM.from_pretrained(bare)
    model.generation_config.save_pretrained(tmp / "derived")
    derived = json.loads((tmp / "derived" / "generation_config.json").read_text())
    derived.pop("transformers_version")
    written = json.loads((tmp / "one_file" / "generation_config.json").read_text())
    if written != derived:
      raise SystemExit(f"{folder.name}: ff_jax wrote generation config {written}, transformers "
                       f"derives {derived}")
    (folder / "export").mkdir()
    for name in ("config.json", "generation_config.json"):
      shutil.copy(tmp / "one_file" / name, folder / "export" / name)
  return got["one_file"]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  default = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "parity"
  parser.add_argument("--out", type=Path, default=default)
  parser.add_argument("--only", nargs="+", choices=sorted(FIXTURES),
                      help="regenerate these fixtures alone (each keeps its seed)")
  args = parser.parse_args()
  torch.use_deterministic_algorithms(True)
  for seed, name in enumerate(FIXTURES):  # seeds follow the table's order: append new entries
    if args.only is None or name in args.only:
      write_fixture(args.out, name, seed)


if __name__ == "__main__":
  main()
