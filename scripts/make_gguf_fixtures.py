"""Regenerate tests/fixtures/gguf_sp/: a tiny Llama GGUF with a SentencePiece tokenizer + goldens.

The tokenizer is a real SentencePiece BPE model trained here with Llama-2's settings (byte
fallback, split digits, whitespace-only pieces, no normalization, a dummy-prefix space) and
written the way llama.cpp's convert_hf_to_gguf.py writes one (`tokenizer.ggml.model = "llama"`,
tokens, scores, token types from the .model proto). The weights are random (seeded), F32.

Golden values come from transformers alone (its GGUF tokenizer converter and GGUF model loader),
so the tests compare ff_jax against an independent implementation without needing torch:

  tiny-llama-sp.gguf   the model file
  tokens.json          texts -> transformers' ids (without and with special tokens), decodes,
                       BOS/EOS ids, and which texts the logits rows encode
  expected.npz         input_ids / attention_mask (BOS + ids of two texts, row 1 left-padded)
                       and transformers' fp32 logits

Needs `sentencepiece`, torch (CPU) and transformers; ff_jax itself needs none of them at runtime.

  python scripts/make_gguf_fixtures.py [--out tests/fixtures/gguf_sp]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ff_jax.models import init_params, tiny_llama  # noqa: E402
from tests.helpers import gguf_fixtures as fx  # noqa: E402

FILE = "tiny-llama-sp.gguf"
SEED = 0
# Mistral's instruction markers, as control tokens the way Mistral v0.3's vocabulary has them.
CONTROL = ["[INST]", "[/INST]"]
CHAT_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}"
                 "{{ '[INST] ' + message['content'] + ' [/INST]' }}"
                 "{% else %}{{ ' ' + message['content'] + '</s>' }}{% endif %}{% endfor %}")
CORPUS = fx.CORPUS + [
    "def main():\n    return 42\n\n  two spaces, four    spaces, a\ttab.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and 2023, 1999, 31415.",
    "Question: who wrote it?\nAnswer: nobody knows.\n",
] * 20
# Texts the tokenizer tests compare on: spaces (leading, repeated, trailing), newlines and tabs,
# digits, characters the vocabulary lacks (byte fallback: 日本, ß, 🚀), control tokens.
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "   three leading spaces and  two   inner",
    "trailing spaces   ",
    "line one\nline two\n\n\tindented\r\nwindows",
    "digits 0123456789 and 2024-11-29",
    "café naïve 東京 🙂",
    "unseen: 日本語, Straße, 🚀!",
    "[INST] What is the capital of France? [/INST] Paris</s>",
    "<s>literal bos and <unk> text",
    "",
    " ",
    "\n",
]
# Logits rows: two texts after BOS, the second left-padded to the first's length.
LOGIT_TEXTS = (0, 7)


def train_sentencepiece():
  """A SentencePiece BPE model with Llama-2's trainer settings, in memory."""
  import sentencepiece as spm

  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(CORPUS), model_writer=model, model_type="bpe", vocab_size=480,
      byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
      remove_extra_whitespaces=False, normalization_rule_name="identity",
      character_coverage=1.0, add_dummy_prefix=True, control_symbols=CONTROL, num_threads=1,
      minloglevel=2)
  return spm.SentencePieceProcessor(model_proto=model.getvalue())


def sentencepiece_metadata(sp) -> dict:
  """What convert_hf_to_gguf.py's `_create_vocab_sentencepiece` stores for a .model file."""
  import gguf

  tokens, scores, types = [], [], []
  for i in range(sp.GetPieceSize()):
    kind = gguf.TokenType.NORMAL
    if sp.IsUnknown(i):
      kind = gguf.TokenType.UNKNOWN
    elif sp.IsControl(i):
      kind = gguf.TokenType.CONTROL
    elif sp.IsUnused(i):
      kind = gguf.TokenType.UNUSED
    elif sp.IsByte(i):
      kind = gguf.TokenType.BYTE
    tokens.append(sp.IdToPiece(i))
    scores.append(sp.GetScore(i))
    types.append(int(kind))
  return {"model": "llama", "tokens": tokens, "scores": scores, "types": types,
          "bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": None,
          "add_bos": True, "add_eos": False, "add_space_prefix": True,
          "chat_template": CHAT_TEMPLATE}


def random_params(cfg):
  import jax

  rng = np.random.default_rng(SEED)
  return jax.tree.map(lambda a: (rng.standard_normal(a.shape) * 0.3).astype(np.float32),
                      init_params(cfg, SEED))


def transformers_goldens(folder: Path) -> tuple[dict, dict]:
  """transformers' tokenizer ids and logits for the fixture file."""
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer

  tok = AutoTokenizer.from_pretrained(folder, gguf_file=FILE)
  tokens = {
      "texts": TEXTS,
      "ids": [tok.encode(t, add_special_tokens=False) for t in TEXTS],
      "ids_with_specials": [tok.encode(t) for t in TEXTS],
      "decoded": [tok.decode(tok.encode(t, add_special_tokens=False), skip_special_tokens=True)
                  for t in TEXTS],
      "bos_token_id": tok.bos_token_id,
      "eos_token_id": tok.eos_token_id,
      "logit_rows": list(LOGIT_TEXTS),  # which texts the rows of expected.npz encode
  }
  rows = [tok.encode(TEXTS[i]) for i in LOGIT_TEXTS]
  width = max(len(r) for r in rows)
  ids = np.zeros((len(rows), width), np.int64)
  mask = np.zeros((len(rows), width), np.int64)
  for r, row in enumerate(rows):
    ids[r, width - len(row):] = row
    mask[r, width - len(row):] = 1
  model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=FILE, dtype=torch.float32,
                                               attn_implementation="eager").eval()
  positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
  with torch.no_grad():
    logits = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                   position_ids=torch.from_numpy(positions), use_cache=False).logits
  arrays = {"input_ids": ids, "attention_mask": mask, "logits": logits.float().numpy()}
  return tokens, arrays


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  default = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "gguf_sp"
  parser.add_argument("--out", type=Path, default=default)
  args = parser.parse_args()
  meta = sentencepiece_metadata(train_sentencepiece())
  cfg = tiny_llama(vocab_size=len(meta["tokens"]), hidden_size=32, intermediate_size=64,
                   max_position_embeddings=64, rope_theta=10000.0, norm_eps=1e-5,
                   bos_token_id=meta["bos"], eos_token_id=meta["eos"])
  args.out.mkdir(parents=True, exist_ok=True)
  path = fx.write_gguf(args.out / FILE, cfg, random_params(cfg), tokenizer=meta, pre=None)
  tokens, arrays = transformers_goldens(args.out)
  (args.out / "tokens.json").write_text(json.dumps(tokens, indent=1, ensure_ascii=False) + "\n")
  np.savez(args.out / "expected.npz", **arrays)
  size = sum(p.stat().st_size for p in args.out.iterdir())
  print(f"{path}: {len(meta['tokens'])} tokens; folder {size / 1024:.0f} KiB, |logits| max "
        f"{np.abs(arrays['logits']).max():.3f}")


if __name__ == "__main__":
  main()
