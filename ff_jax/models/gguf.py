"""Importing llama.cpp GGUF files: config, weights (dequantized one tensor at a time) and tokenizer.

A GGUF file holds everything a HF folder does, under llama.cpp's names: hyperparameters and the
tokenizer as metadata keys (`llama.embedding_length`, `tokenizer.ggml.tokens`, ...) and tensors as
`blk.N.attn_q.weight` etc., possibly quantized (Q4_1, Q8_0, ...). This module translates all three:

  cfg, params, tokenizer = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")

Weights are dequantized to fp32 by `gguf.quants.dequantize` and streamed into
`loading.assemble_params`, so at most one dequantized tensor is on the host at a time. Two
llama.cpp conventions are undone on the way: tensor shapes are stored in reversed (ggml `ne`)
order, which the reader already turns back into HF's `[out, in]` row-major layout; and for the
`llama` architecture the Q/K projection rows are permuted (convert_hf_to_gguf.py's `permute`) so
that llama.cpp's interleaved-pair RoPE matches HF's half-split RoPE, which ff_jax uses.

Tokenizers are built by transformers' GGUF tokenizer converter
(`transformers.integrations.gguf.gguf_tokenizer_mapping`, transformers >= 5.25, torch-free) where
it has one for the file: byte-level BPE (`tokenizer.ggml.model == "gpt2"`: SmolLM, Llama-3,
Qwen2) from the stored merges and the split regex of its `tokenizer.ggml.pre`, and SentencePiece
BPE (`"llama"`: Llama-2, Mistral, TinyLlama) from the piece scores, with `<0xNN>` byte fallback
and the "▁" space marker; so a new `tokenizer.ggml.pre` that transformers knows needs no change
here. Where it has none (an older transformers, a pre-tokenizer it does not know, a flag it does
not read), ff_jax's own build of the same tokenizers, from its table of llama.cpp's
pre-tokenizers (`_pre_tokenizer`), is the fallback; the tests check that both give the same ids.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import tokenizers
from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers, processors

from ff_jax import parallel
from ff_jax.errors import CheckpointError
from ff_jax.models import abstract_model
from ff_jax.models.config import ModelConfig, RopeScaling
from ff_jax.models.loading import assemble_params
from ff_jax.models.tokenizer import TextTokenizer, merges_from_scores, sentencepiece_bpe

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

_MISSING = object()


# --------------------------------------------------------------------------------------------------
# Metadata


def open_gguf(path: str | Path) -> gguf.GGUFReader:
  """A memory-mapped reader; a missing or malformed file is a CheckpointError naming it."""
  path = Path(path)
  if not path.is_file():
    raise CheckpointError(f"{path}: GGUF file not found")
  try:
    return gguf.GGUFReader(path)
  except (ValueError, OSError) as e:
    raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from e


def _meta(reader: gguf.GGUFReader, key: str, origin: str, default: Any = _MISSING) -> Any:
  field = reader.fields.get(key)
  if field is None:
    if default is _MISSING:
      raise CheckpointError(f"{origin}: GGUF metadata key {key!r} is missing")
    return default
  return field.contents()


def _float(value: Any) -> float:
  # GGUF stores float32; its shortest decimal form gives back the intended value (1e-05, not
  # 9.999999747378752e-06), so configs round-trip to what the HF config said.
  return float(str(np.float32(value)))


def _resolve_pad(eos: int, pad: int | None, fallbacks: tuple[int | None, ...]) -> int:
  # Same rule as TextTokenizer.from_tokenizer: PAD must differ from EOS so that EOS stays a
  # learned target; padding is ignored through the loss mask, never by its id.
  if pad is not None and pad != eos:
    return pad
  return next((i for i in (*fallbacks, 0) if i is not None and i != eos), 0)


def config_from_gguf(reader: gguf.GGUFReader, origin: str) -> ModelConfig:
  """ModelConfig from a GGUF file's metadata (and which tensors it has: biases, lm_head)."""
  arch = _meta(reader, "general.architecture", origin)
  if arch not in SUPPORTED_ARCHITECTURES:
    raise CheckpointError(f"{origin}: general.architecture={arch!r} is not supported; ff_jax "
                          f"reads GGUF architectures {list(SUPPORTED_ARCHITECTURES)}")
  key = lambda name: f"{arch}.{name}"
  tensors = {t.name: t for t in reader.tensors}
  hidden = int(_meta(reader, key("embedding_length"), origin))
  heads = int(_meta(reader, key("attention.head_count"), origin))
  # llama.cpp defaults the KV head count to the head count (plain multi-head attention).
  kv_heads = int(_meta(reader, key("attention.head_count_kv"), origin, heads))
  head_dim = int(_meta(reader, key("attention.key_length"), origin, hidden // heads))
  rope_dims = int(_meta(reader, key("rope.dimension_count"), origin, head_dim))
  if rope_dims != head_dim:
    raise CheckpointError(f"{origin}: {key('rope.dimension_count')}={rope_dims} rotates only part "
                          f"of each {head_dim}-dim head; partial RoPE is not supported")
  theta = _float(_meta(reader, key("rope.freq_base"), origin, 10000.0))

  if "tokenizer.ggml.tokens" in reader.fields:
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
  elif key("vocab_size") in reader.fields:
    vocab = int(_meta(reader, key("vocab_size"), origin))
  elif "token_embd.weight" in tensors:
    vocab = int(tensors["token_embd.weight"].shape[-1])
  else:
    raise CheckpointError(f"{origin}: cannot tell the vocabulary size (no tokenizer.ggml.tokens, "
                          f"{key('vocab_size')} or token_embd.weight)")

  eos = _meta(reader, "tokenizer.ggml.eos_token_id", origin, None)
  bos = _meta(reader, "tokenizer.ggml.bos_token_id", origin, None)
  pad = _meta(reader, "tokenizer.ggml.padding_token_id", origin, None)
  unk = _meta(reader, "tokenizer.ggml.unknown_token_id", origin, None)
  if eos is not None:
    pad = _resolve_pad(eos, pad, (unk, bos))

  return ModelConfig(
      vocab_size=vocab,
      hidden_size=hidden,
      num_layers=int(_meta(reader, key("block_count"), origin)),
      num_heads=heads,
      num_kv_heads=kv_heads,
      intermediate_size=int(_meta(reader, key("feed_forward_length"), origin)),
      max_position_embeddings=int(_meta(reader, key("context_length"), origin)),
      head_dim=head_dim if head_dim != hidden // heads else None,
      norm="rms",
      norm_eps=_float(_meta(reader, key("attention.layer_norm_rms_epsilon"), origin)),
      positions="rope",
      rope_theta=theta,
      rope_scaling=_rope_scaling(reader, arch, tensors, theta, head_dim, origin),
      mlp="swiglu",
      qkv_bias="blk.0.attn_q.bias" in tensors,
      tie_embeddings="output.weight" not in tensors,
      bos_token_id=bos,
      eos_token_id=eos,
      pad_token_id=pad,
  )


def _rope_scaling(reader, arch: str, tensors: dict, theta: float, head_dim: int,
                  origin: str) -> RopeScaling:
  kind_key = f"{arch}.rope.scaling.type"
  kind = _meta(reader, kind_key, origin, "none")
  if "rope_freqs.weight" in tensors:
    if kind not in ("none", "llama3"):
      raise CheckpointError(f"{origin}: both {kind_key}={kind!r} and rope_freqs.weight are set")
    freqs = gguf.quants.dequantize(tensors["rope_freqs.weight"].data,
                                   tensors["rope_freqs.weight"].tensor_type)
    return llama3_scaling_from_factors(np.asarray(freqs).reshape(-1), theta, head_dim, origin)
  if kind == "none":
    return RopeScaling()
  if kind == "linear":
    factor = _float(_meta(reader, f"{arch}.rope.scaling.factor", origin))
    return RopeScaling(kind="linear", factor=factor)
  raise CheckpointError(f"{origin}: {kind_key}={kind!r} is not supported (only none, linear and "
                        f"llama3 via rope_freqs.weight)")


def _llama3_factors(scaling: RopeScaling, wavelen: np.ndarray) -> np.ndarray:
  """llama.cpp's per-frequency divisors for HF's llama3 rule (convert_hf_to_gguf's rope_freqs)."""
  old = scaling.original_max_position_embeddings
  low, high = scaling.low_freq_factor, scaling.high_freq_factor
  smooth = (old / wavelen - low) / (high - low)
  medium = 1.0 / ((1 - smooth) / scaling.factor + smooth)
  return np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, scaling.factor, medium))


def llama3_scaling_from_factors(factors: np.ndarray, theta: float, head_dim: int,
                                origin: str) -> RopeScaling:
  """Recover HF's llama3 RoPE parameters from llama.cpp's precomputed `rope_freqs` divisors.

  The rule depends on `original_max_position_embeddings` only through its ratios to the two
  freq factors, so that length is fixed at 8192 and the factors are fitted from the interpolated
  band (a straight line in 1/wavelength); the result is checked against the tensor.
  """
  factors = np.asarray(factors, np.float64)
  if factors.shape != (head_dim // 2,):
    raise CheckpointError(f"{origin}: rope_freqs.weight has shape {factors.shape}, expected "
                          f"({head_dim // 2},)")
  factor = float(factors.max())
  if np.allclose(factors, 1.0):
    return RopeScaling()
  inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  wavelen = 2 * math.pi / inv_freq
  old = 8192
  candidates = []
  band = (factors > 1 + 1e-4) & (factors < factor * (1 - 1e-4))
  if band.sum() >= 2:
    smooth = (1 / factors[band] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(old / wavelen[band], smooth, 1)
    low = -intercept / slope
    candidates.append((round(float(low), 4), round(float(low + 1 / slope), 4)))
  candidates.append((1.0, 4.0))  # HF's defaults, when the band holds too few frequencies to fit
  for low, high in candidates:
    scaling = RopeScaling(kind="llama3", factor=factor, low_freq_factor=low,
                          high_freq_factor=high, original_max_position_embeddings=old)
    if np.allclose(_llama3_factors(scaling, wavelen), factors, rtol=1e-3):
      return scaling
  raise CheckpointError(f"{origin}: rope_freqs.weight does not follow the llama3 RoPE scaling "
                        f"rule; no other per-frequency scaling is supported")


# --------------------------------------------------------------------------------------------------
# Tensors


@dataclasses.dataclass(frozen=True)
class _Layout:
  """What a transform needs to know: head counts, and whether Q/K rows are llama.cpp-permuted."""

  cfg: ModelConfig
  permuted_qk: bool


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  # Inverse of convert_hf_to_gguf's permute: rows of each head go from (pairs, 2) interleaved back
  # to HF's (2 halves, pairs) order. Works for [rows, in] weights and [rows] biases alike.
  return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


def _same(w: np.ndarray, lay: _Layout) -> np.ndarray:
  return w


def _transpose(w: np.ndarray, lay: _Layout) -> np.ndarray:
  return w.T  # HF [out, in] -> ff_jax [in, out]


def _heads_in(n_head: Callable[[ModelConfig], int], permuted: bool):
  def transform(w: np.ndarray, lay: _Layout) -> np.ndarray:
    n = n_head(lay.cfg)
    if permuted and lay.permuted_qk:
      w = _unpermute(w, n)
    if w.ndim == 1:  # bias [n*hd] -> [n, hd]
      return w.reshape(n, lay.cfg.resolved_head_dim)
    return w.T.reshape(lay.cfg.hidden_size, n, lay.cfg.resolved_head_dim)

  return transform


def _heads_out(w: np.ndarray, lay: _Layout) -> np.ndarray:
  cfg = lay.cfg
  return w.T.reshape(cfg.num_heads, cfg.resolved_head_dim, cfg.hidden_size)


_HEADS = lambda cfg: cfg.num_heads
_KV_HEADS = lambda cfg: cfg.num_kv_heads
_L = object()  # placeholder for the block index in a target path

# GGUF tensor name -> (ff_jax param path, transform from HF's [out, in] layout). The block index
# (group 1) replaces `_L`. Anything not listed, other than _CONSUMED, is an error: an unknown
# tensor usually means an architecture variant that this table would silently get wrong.
_TENSOR_TABLE: tuple[tuple[re.Pattern, tuple, Callable], ...] = tuple(
    (re.compile(pattern), path, transform) for pattern, path, transform in (
        (r"token_embd\.weight", ("embed",), _same),
        (r"output_norm\.weight", ("final_norm", "scale"), _same),
        (r"output\.weight", ("lm_head",), _transpose),
        (r"blk\.(\d+)\.attn_norm\.weight", ("layers", _L, "attn_norm", "scale"), _same),
        (r"blk\.(\d+)\.attn_q\.weight", ("layers", _L, "attn", "q"), _heads_in(_HEADS, True)),
        (r"blk\.(\d+)\.attn_k\.weight", ("layers", _L, "attn", "k"), _heads_in(_KV_HEADS, True)),
        (r"blk\.(\d+)\.attn_v\.weight", ("layers", _L, "attn", "v"), _heads_in(_KV_HEADS, False)),
        (r"blk\.(\d+)\.attn_q\.bias", ("layers", _L, "attn", "q_bias"), _heads_in(_HEADS, True)),
        (r"blk\.(\d+)\.attn_k\.bias", ("layers", _L, "attn", "k_bias"),
         _heads_in(_KV_HEADS, True)),
        (r"blk\.(\d+)\.attn_v\.bias", ("layers", _L, "attn", "v_bias"),
         _heads_in(_KV_HEADS, False)),
        (r"blk\.(\d+)\.attn_output\.weight", ("layers", _L, "attn", "o"), _heads_out),
        (r"blk\.(\d+)\.ffn_norm\.weight", ("layers", _L, "mlp_norm", "scale"), _same),
        (r"blk\.(\d+)\.ffn_gate\.weight", ("layers", _L, "mlp", "gate"), _transpose),
        (r"blk\.(\d+)\.ffn_up\.weight", ("layers", _L, "mlp", "up"), _transpose),
        (r"blk\.(\d+)\.ffn_down\.weight", ("layers", _L, "mlp", "down"), _transpose),
    ))

# Read by config_from_gguf (llama3 RoPE scaling), not a parameter.
_CONSUMED = frozenset({"rope_freqs.weight"})


def _dequantize(tensor, origin: str) -> np.ndarray:
  try:
    array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
  except NotImplementedError as e:
    raise CheckpointError(f"{origin}: tensor {tensor.name!r} is {tensor.tensor_type.name}, which "
                          f"gguf-py cannot dequantize ({e})") from e
  # ggml lists dimensions fastest-first (`ne`); reversed, they are numpy's row-major shape.
  shape = tuple(int(n) for n in reversed(tensor.shape))
  if array.size != math.prod(shape):
    raise CheckpointError(f"{origin}: tensor {tensor.name!r} holds {array.size} values, expected "
                          f"{shape}")
  if np.shares_memory(array, tensor.data):
    # F32/F16 tensors come back as views of the read-only file mapping; a parameter that aliases
    # the file (JAX's CPU backend can place numpy memory without copying) must own its memory.
    array = array.copy()
  return array.reshape(shape)


def _target(name: str) -> tuple[tuple, Callable] | None:
  """(param path, transform) for a GGUF tensor name, or None if the table has no rule for it."""
  for pattern, template, transform in _TENSOR_TABLE:
    match = pattern.fullmatch(name)
    if match:
      return tuple(int(match.group(1)) if part is _L else part for part in template), transform
  return None


def iter_gguf_params(reader: gguf.GGUFReader, cfg: ModelConfig,
                     origin: str) -> Iterator[tuple[tuple, np.ndarray, str]]:
  """Yield `(param path, fp32 array in ff_jax layout, GGUF tensor name)`, one tensor at a time."""
  lay = _Layout(cfg, permuted_qk=_meta(reader, "general.architecture", origin) == "llama")
  for tensor in reader.tensors:
    name = tensor.name
    if name in _CONSUMED:
      continue
    target = _target(name)
    if target is None:
      raise CheckpointError(f"{origin}: tensor {name!r} has no ff_jax mapping (unsupported "
                            f"architecture variant?)")
    path, transform = target
    array = _dequantize(tensor, origin)
    try:
      array = transform(array, lay)
    except ValueError as e:  # a reshape that the config's head counts do not fit
      raise CheckpointError(f"{origin}: tensor {name!r} of shape {array.shape} does not fit the "
                            f"config ({e})") from e
    yield path, array, name


# GGUF's unquantized float types as the dtype an export is written in.
_FLOAT_TYPES = {gguf.GGMLQuantizationType.F32: "float32", gguf.GGMLQuantizationType.F16: "float16",
                gguf.GGMLQuantizationType.BF16: "bfloat16"}


def gguf_dtype(path: str | Path) -> str:
  """The float dtype that holds a GGUF file's weights as their source did, for an HF export.

  The type of its matrices (tensors of two or more dimensions; norms are float32 in every GGUF):
  the one holding the most elements among F32/F16/BF16; a quantized file (Q4_1, Q8_0, ...) gives
  bfloat16: no float type holds its dequantized values exactly anyway, bf16 is what Llama-family
  checkpoints are published in, and it has float32's range, so a finetuned weight never
  overflows as it could in float16.
  """
  counts: dict[str, int] = {}
  for tensor in open_gguf(path).tensors:
    if len(tensor.shape) >= 2:
      kind = _FLOAT_TYPES.get(tensor.tensor_type, "bfloat16")
      counts[kind] = counts.get(kind, 0) + int(tensor.n_elements)
  return max(counts, key=counts.get) if counts else "float32"


def load_gguf_metadata(path: str | Path) -> tuple[ModelConfig, TextTokenizer]:
  """`(config, tokenizer)` from a GGUF file's metadata, without reading any weight."""
  origin = str(path)
  reader = open_gguf(path)
  cfg = config_from_gguf(reader, origin)
  tokenizer = tokenizer_from_gguf(reader, origin)
  return cfg.replace(pad_token_id=tokenizer.pad_id, eos_token_id=tokenizer.eos_id), tokenizer


def load_gguf(path: str | Path, mesh=None, rules: dict | None = None,
              **overrides: Any) -> tuple[ModelConfig, dict, TextTokenizer]:
  """`(config, params, tokenizer)` from a GGUF file.

  With a `mesh`, each parameter is placed straight onto its shards (`rules` default to
  `parallel.DEFAULT_RULES`); without one, onto the default device. `overrides` replace config
  fields that the file does not decide, e.g. `param_dtype="bfloat16"` or `remat=True`.
  """
  origin = str(path)
  reader = open_gguf(path)
  cfg = config_from_gguf(reader, origin)
  tokenizer = tokenizer_from_gguf(reader, origin)
  cfg = cfg.replace(**{"pad_token_id": tokenizer.pad_id, "eos_token_id": tokenizer.eos_id,
                       **overrides})
  _, abstract, logical = abstract_model(cfg)
  shardings = None
  if mesh is not None:
    shardings = parallel.tree_shardings(abstract, logical, mesh,
                                        rules if rules is not None else parallel.DEFAULT_RULES)
  params = assemble_params(abstract, shardings, iter_gguf_params(reader, cfg, origin), origin)
  return cfg, params, tokenizer


# --------------------------------------------------------------------------------------------------
# Tokenizer

# llama.cpp's `tokenizer.ggml.pre` names -> how the text is split before BPE (llama-vocab.cpp).
# GPT-2's own regex, as ByteLevel(use_regex=True) applies it:
_GPT2_PRES = frozenset({"default", "gpt2", "gpt-2", "mpt", "olmo", "jais", "trillion"})
# The GPT-2 regex after splitting every digit apart (llama.cpp: "\p{N}" then the GPT-2 regex), which
# is what SmolLM/StarCoder tokenizer.json files spell as Digits(individual_digits) + ByteLevel.
_DIGIT_PRES = frozenset({"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                         "minerva"})
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_PRES = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3", "dbrx", "pixtral"),
                    _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
}
# llama.cpp turns BOS on by default, and lets whole words skip the merges, for these.
_LLAMA3_PRES = frozenset({"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3", "pixtral"})

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def _pre_tokenizer(pre: str, origin: str):
  if pre in _GPT2_PRES:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in _DIGIT_PRES:
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                             use_regex=True)])
  if pre in _SPLIT_PRES:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(_SPLIT_PRES[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
  known = sorted(_GPT2_PRES | _DIGIT_PRES | set(_SPLIT_PRES))
  raise CheckpointError(f"{origin}: tokenizer.ggml.pre={pre!r} is not supported; known "
                        f"pre-tokenizers are {known}")


def _merge_pairs(merges: list[str], origin: str) -> list[tuple[str, str]]:
  pairs = []
  for merge in merges:
    parts = merge.split(" ")
    if len(parts) != 2:
      raise CheckpointError(f"{origin}: tokenizer.ggml.merges entry {merge!r} is not 'left right'")
    pairs.append((parts[0], parts[1]))
  return pairs


def _byte_level_bpe(reader: gguf.GGUFReader, tokens: list[str],
                    origin: str) -> tuple[tokenizers.Tokenizer, bool]:
  """`tokenizer.ggml.model == "gpt2"`: (tokenizer, whether BOS is added by default)."""
  pairs = _merge_pairs(_meta(reader, "tokenizer.ggml.merges", origin), origin)
  # Files from before the key existed use GPT-2's split (llama.cpp's "default").
  pre = _meta(reader, "tokenizer.ggml.pre", origin, "default")
  vocab = {token: i for i, token in enumerate(tokens)}
  bpe = tokenizers.models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False,
                              ignore_merges=pre in _LLAMA3_PRES)
  tok = tokenizers.Tokenizer(bpe)
  if pre in ("qwen2", "deepseek-r1-qwen"):
    tok.normalizer = normalizers.NFC()  # as Qwen2's tokenizer.json
  tok.pre_tokenizer = _pre_tokenizer(pre, origin)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  return tok, pre in _LLAMA3_PRES


def _sentencepiece_bpe(reader: gguf.GGUFReader, tokens: list[str],
                       origin: str) -> tuple[tokenizers.Tokenizer, bool]:
  """`tokenizer.ggml.model == "llama"` (Llama-2, Mistral, TinyLlama): (tokenizer, BOS default).

  The merges are the file's if it lists any, else those its piece scores imply. llama.cpp adds
  BOS to these vocabularies unless the file says otherwise.
  """
  if "tokenizer.ggml.merges" in reader.fields:
    pairs = _merge_pairs(_meta(reader, "tokenizer.ggml.merges", origin), origin)
  else:
    scores = _meta(reader, "tokenizer.ggml.scores", origin)
    if len(scores) != len(tokens):
      raise CheckpointError(f"{origin}: tokenizer.ggml.scores has {len(scores)} entries for "
                            f"{len(tokens)} tokens")
    pairs = merges_from_scores(tokens, scores)
  unk = _meta(reader, "tokenizer.ggml.unknown_token_id", origin, None)
  tok = sentencepiece_bpe(
      tokens, pairs, unk_token=tokens[unk] if unk is not None and 0 <= unk < len(tokens) else None,
      add_space_prefix=bool(_meta(reader, "tokenizer.ggml.add_space_prefix", origin, True)))
  return tok, True


# tokenizer.ggml.model -> builder of the fast tokenizer (before special tokens are added).
_TOKENIZER_MODELS = {"gpt2": _byte_level_bpe, "llama": _sentencepiece_bpe}


def _special_template(tok: tokenizers.Tokenizer, bos: str | None, eos: str | None, add_bos: bool,
                      add_eos: bool) -> processors.TemplateProcessing:
  """BOS/EOS around encoded text, as transformers' `update_post_processor` writes them."""
  first = [bos] if add_bos and bos else []
  last = [eos] if add_eos and eos else []

  def around(sequence: str, type_id: int) -> str:
    return " ".join([f"{t}:{type_id}" for t in first] + [f"${sequence}:{type_id}"]
                    + [f"{t}:{type_id}" for t in last])

  return processors.TemplateProcessing(
      single=around("A", 0), pair=f"{around('A', 0)} {around('B', 1)}",
      special_tokens=[(t, tok.token_to_id(t)) for t in dict.fromkeys(first + last)])


def _transformers_converter() -> Any:
  """transformers' GGUF tokenizer converter module, or None where this transformers has none
  (before 5.25) or cannot import it (it must not need torch)."""
  try:
    # Deferred: transformers takes seconds to import, and only GGUF tokenizers need this.
    from transformers.integrations.gguf import gguf_tokenizer_mapping
  except ImportError:
    return None
  return gguf_tokenizer_mapping


def converter_spec(reader: gguf.GGUFReader, model: str, tokens: list[str], types: list[int],
                   origin: str) -> dict[str, Any]:
  """The converter's `tokenizer_dict` for a file, read here: transformers' own reader of GGUF
  metadata (`get_gguf_tokenizer`) imports torch."""
  spec: dict[str, Any] = {"tokenizer_type": model, "tokens": tokens, "token_type": types,
                          "pre_tokenizer_type": _meta(reader, "tokenizer.ggml.pre", origin,
                                                      "default")}
  for key in ("merges", "scores"):
    if f"tokenizer.ggml.{key}" in reader.fields:
      spec[key] = _meta(reader, f"tokenizer.ggml.{key}", origin)
  return spec


def _converted(reader: gguf.GGUFReader, model: str, tokens: list[str], types: list[int],
               origin: str) -> tuple[tokenizers.Tokenizer, bool] | None:
  """(tokenizer, BOS default) as transformers' GGUF converter builds it, with llama.cpp's
  behaviour it leaves out put back; None where the converter has no build of this file's."""
  mapping = _transformers_converter()
  if mapping is None:
    return None
  pre = _meta(reader, "tokenizer.ggml.pre", origin, "default")
  if model == "gpt2" and pre not in mapping.GGUF_PRE_TOKENIZER_SPLITS and pre not in _GPT2_PRES:
    # The converter keeps GPT-2's own split for a `pre` it does not know: right for GPT-2's
    # family, wrong for e.g. "smollm" (digits one by one), so those go to the fallback.
    return None
  space_prefix = bool(_meta(reader, "tokenizer.ggml.add_space_prefix", origin, True))
  if model == "llama" and not space_prefix:
    return None  # the converter always puts SentencePiece's dummy-prefix space first
  try:
    tok, _ = mapping.convert_gguf_tokenizer(_meta(reader, "general.architecture", origin),
                                            converter_spec(reader, model, tokens, types, origin))
  except (ValueError, KeyError, TypeError) as err:
    logging.getLogger(__name__).info("%s: transformers' GGUF tokenizer converter failed (%s); "
                                     "building the tokenizer without it", origin, err)
    return None
  if model == "gpt2":
    # llama.cpp lets a whole word that is a token skip the merges for these (as Llama-3's
    # tokenizer.json: ignore_merges), and Qwen2's tokenizer.json normalizes to NFC; the converter
    # does neither.
    tok.model.ignore_merges = pre in _LLAMA3_PRES
    if pre in ("qwen2", "deepseek-r1-qwen"):
      tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok, pre in _LLAMA3_PRES
  # <unk> named, as in the fallback (tokenizer.sentencepiece_bpe): a character without byte
  # tokens is never dropped silently.
  unk = _meta(reader, "tokenizer.ggml.unknown_token_id", origin, None)
  if unk is not None and 0 <= unk < len(tokens):
    tok.model.unk_token = tokens[unk]
  return tok, True


def tokenizer_from_gguf(reader: gguf.GGUFReader, origin: str,
                        converter: bool = True) -> TextTokenizer:
  """A TextTokenizer from GGUF metadata: byte-level BPE ("gpt2") or SentencePiece ("llama").

  Built by transformers' GGUF converter where it has a build of this file's tokenizer (module
  docstring), else (or with `converter=False`) by ff_jax's own; special tokens, BOS/EOS and the
  chat template come from the file either way.
  """
  model = _meta(reader, "tokenizer.ggml.model", origin)
  if model not in _TOKENIZER_MODELS:
    raise CheckpointError(f"{origin}: tokenizer.ggml.model={model!r} is not supported; ff_jax "
                          f"builds {sorted(_TOKENIZER_MODELS)} tokenizers")
  tokens = _meta(reader, "tokenizer.ggml.tokens", origin)
  types = _meta(reader, "tokenizer.ggml.token_type", origin, [1] * len(tokens))
  if len(set(tokens)) != len(tokens):
    raise CheckpointError(f"{origin}: tokenizer.ggml.tokens lists {len(tokens) - len(set(tokens))} "
                          f"duplicate token(s)")
  built = _converted(reader, model, tokens, types, origin) if converter else None
  tok, bos_by_default = built or _TOKENIZER_MODELS[model](reader, tokens, origin)

  def name_of(key: str) -> str | None:
    token_id = _meta(reader, f"tokenizer.ggml.{key}", origin, None)
    if token_id is None:
      return None
    if not 0 <= token_id < len(tokens):
      raise CheckpointError(f"{origin}: tokenizer.ggml.{key}={token_id} is outside the "
                            f"{len(tokens)}-token vocabulary")
    return tokens[token_id]

  eos = name_of("eos_token_id")
  if eos is None:
    raise CheckpointError(f"{origin}: GGUF metadata key 'tokenizer.ggml.eos_token_id' is missing")
  config = {
      "eos_token": eos,
      "bos_token": name_of("bos_token_id"),
      "pad_token": name_of("padding_token_id"),
      "unk_token": name_of("unknown_token_id"),
      "add_bos_token": _meta(reader, "tokenizer.ggml.add_bos_token", origin, bos_by_default),
      "chat_template": _meta(reader, "tokenizer.chat_template", origin, None),
  }
  # Control tokens (<|im_start|>, <s>, [INST]) and user-defined ones (<think>) must match whole
  # in raw text, as llama.cpp does; the named special tokens too (a SentencePiece <unk> is typed
  # UNKNOWN, not CONTROL), as transformers adds them. Only special ones are dropped on decode.
  named = {config[key] for key in ("eos_token", "bos_token", "pad_token", "unk_token")}
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t, kind in zip(tokens, types) if kind == _CONTROL or t in named])
  tok.add_tokens([AddedToken(t, special=False, normalized=False)
                  for t, kind in zip(tokens, types) if kind == _USER_DEFINED and t not in named])
  if model == "llama":
    # What transformers puts around `encode(text)`; ff_jax's templates add BOS themselves.
    tok.post_processor = _special_template(
        tok, config["bos_token"], eos, bool(config["add_bos_token"]),
        bool(_meta(reader, "tokenizer.ggml.add_eos_token", origin, False)))
  return TextTokenizer.from_tokenizer(tok, config, origin=origin)
