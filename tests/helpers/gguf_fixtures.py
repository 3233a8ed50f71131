"""Tiny GGUF files for tests, written the way llama.cpp's convert_hf_to_gguf.py writes them.

ff_jax params are turned into HF's `[out, in]` tensors, the llama Q/K rows are permuted for
llama.cpp's interleaved RoPE, and everything goes through `gguf.GGUFWriter` (F32, or quantized with
`gguf.quants.quantize`). The permutation here is written independently of the loader's inverse.
Tokenizer metadata is a byte-level BPE trained here, or a SentencePiece vocabulary (the committed
tests/fixtures/gguf_sp file's, read back with `read_sentencepiece_metadata`).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from ff_jax.models.config import ModelConfig
from ff_jax.models.loading import unstack_layers

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
                 "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Hello world, it's a small tokenizer for tests; numbers like 12345 and 2024 too.",
    "Byte-level BPE keeps every byte: café, naïve, 東京, emoji 🙂.",
] * 20


def train_bpe(vocab_size: int = 320) -> tokenizers.Tokenizer:
  """A GPT-2-style byte-level BPE with SPECIALS at ids 0..2."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(CORPUS, trainer)
  return tok


def bpe_metadata(tok: tokenizers.Tokenizer) -> dict:
  """tokens / token types / merges as llama.cpp stores them, from a trained tokenizer."""
  model = json.loads(tok.to_str())["model"]
  vocab = tok.get_vocab(with_added_tokens=True)
  tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
  assert [vocab[t] for t in tokens] == list(range(len(tokens)))
  types = [int(gguf.TokenType.CONTROL) if t in SPECIALS else int(gguf.TokenType.NORMAL)
           for t in tokens]
  merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
  return {"tokens": tokens, "types": types, "merges": merges}


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """convert_hf_to_gguf.py's LlamaModel.permute: half-split head rows -> interleaved pairs."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2)
          .reshape(w.shape))


def hf_tensors(cfg: ModelConfig, params: dict, arch: str) -> dict[str, np.ndarray]:
  """GGUF tensor name -> HF-layout [out, in] numpy array (Q/K permuted for llama)."""
  params = unstack_layers(params)  # a GGUF file names each layer's tensors on their own
  d, hd = cfg.hidden_size, cfg.resolved_head_dim
  h, kv = cfg.num_heads, cfg.num_kv_heads
  perm = (lambda w, n: permute(w, n)) if arch == "llama" else (lambda w, n: w)
  out = {"token_embd.weight": params["embed"], "output_norm.weight": params["final_norm"]["scale"]}
  if not cfg.tie_embeddings:
    out["output.weight"] = params["lm_head"].T
  for i in range(cfg.num_layers):
    layer = params["layers"][i]
    attn, mlp = layer["attn"], layer["mlp"]
    b = f"blk.{i}."
    out[b + "attn_norm.weight"] = layer["attn_norm"]["scale"]
    out[b + "attn_q.weight"] = perm(attn["q"].reshape(d, h * hd).T, h)
    out[b + "attn_k.weight"] = perm(attn["k"].reshape(d, kv * hd).T, kv)
    out[b + "attn_v.weight"] = attn["v"].reshape(d, kv * hd).T
    out[b + "attn_output.weight"] = attn["o"].reshape(h * hd, d).T
    if cfg.qkv_bias:
      out[b + "attn_q.bias"] = perm(attn["q_bias"].reshape(h * hd), h)
      out[b + "attn_k.bias"] = perm(attn["k_bias"].reshape(kv * hd), kv)
      out[b + "attn_v.bias"] = attn["v_bias"].reshape(kv * hd)
    out[b + "ffn_norm.weight"] = layer["mlp_norm"]["scale"]
    out[b + "ffn_gate.weight"] = mlp["gate"].T
    out[b + "ffn_up.weight"] = mlp["up"].T
    out[b + "ffn_down.weight"] = mlp["down"].T
  return {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in out.items()}


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: dict, pre: str | None) -> None:
  """Tokenizer metadata: byte-level BPE (`merges`) or SentencePiece (`model="llama"`, `scores`).

  Special ids and flags default to the BPE fixture's (<|endoftext|> unk, <|im_start|> BOS, ...);
  a SentencePiece dict (scripts/make_gguf_fixtures.py) carries its own. `pre=None` writes no
  `tokenizer.ggml.pre`, as llama.cpp's converter does for SentencePiece vocabularies.
  """
  model = tokenizer.get("model", "gpt2")
  writer.add_tokenizer_model(model)
  if pre is not None:
    writer.add_tokenizer_pre(pre)
  writer.add_token_list(tokenizer["tokens"])
  writer.add_token_types(tokenizer["types"])
  if "merges" in tokenizer:
    writer.add_token_merges(tokenizer["merges"])
  if "scores" in tokenizer:
    writer.add_token_scores(tokenizer["scores"])
  for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                   ("pad", writer.add_pad_token_id), ("unk", writer.add_unk_token_id)):
    token_id = tokenizer.get(key, {"bos": 1, "eos": 2, "pad": 2, "unk": 0}[key])
    if token_id is not None:
      add(token_id)
  writer.add_add_bos_token(tokenizer.get("add_bos", False))
  if "add_eos" in tokenizer:
    writer.add_add_eos_token(tokenizer["add_eos"])
  if "add_space_prefix" in tokenizer:
    writer.add_add_space_prefix(tokenizer["add_space_prefix"])
  writer.add_chat_template(tokenizer.get("chat_template", CHAT_TEMPLATE))


def read_sentencepiece_metadata(path: str | Path) -> dict:
  """The SentencePiece tokenizer dict of a GGUF file, to write variants of it with `write_gguf`."""
  reader = gguf.GGUFReader(path)
  value = lambda key: reader.fields[key].contents() if key in reader.fields else None
  meta = {"model": value("tokenizer.ggml.model"), "tokens": value("tokenizer.ggml.tokens"),
          "scores": value("tokenizer.ggml.scores"), "types": value("tokenizer.ggml.token_type"),
          "bos": value("tokenizer.ggml.bos_token_id"), "eos": value("tokenizer.ggml.eos_token_id"),
          "pad": value("tokenizer.ggml.padding_token_id"),
          "unk": value("tokenizer.ggml.unknown_token_id"),
          "add_bos": value("tokenizer.ggml.add_bos_token"),
          "add_eos": value("tokenizer.ggml.add_eos_token"),
          "add_space_prefix": value("tokenizer.ggml.add_space_prefix"),
          "chat_template": value("tokenizer.chat_template")}
  return {k: v for k, v in meta.items() if v is not None or k in ("bos", "eos", "pad", "unk")}


def write_gguf(path: str | Path, cfg: ModelConfig, params: dict, *, arch: str = "llama",
               tokenizer: dict | None = None, pre: str | None = "gpt2", skip: tuple[str, ...] = (),
               quant: gguf.GGMLQuantizationType | None = None,
               extra_tensors: dict[str, np.ndarray] | None = None) -> Path:
  """Write `params` as a GGUF file; `skip` drops tensors, `quant` quantizes 2-D weights."""
  path = Path(path)
  writer = gguf.GGUFWriter(path, arch)
  writer.add_context_length(cfg.max_position_embeddings)
  writer.add_embedding_length(cfg.hidden_size)
  writer.add_block_count(cfg.num_layers)
  writer.add_feed_forward_length(cfg.intermediate_size)
  writer.add_head_count(cfg.num_heads)
  writer.add_head_count_kv(cfg.num_kv_heads)
  writer.add_rope_freq_base(cfg.rope_theta)
  writer.add_layer_norm_rms_eps(cfg.norm_eps)
  writer.add_rope_dimension_count(cfg.resolved_head_dim)
  if tokenizer is not None:
    add_tokenizer(writer, tokenizer, pre)
  tensors = hf_tensors(cfg, params, arch)
  tensors.update(extra_tensors or {})
  for name, array in tensors.items():
    if name in skip:
      continue
    if quant is not None and array.ndim == 2:
      writer.add_tensor(name, gguf.quants.quantize(array, quant), raw_dtype=quant)
    else:
      writer.add_tensor(name, array)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path
