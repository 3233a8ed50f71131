"""Tokenizers: one wrapper around a `tokenizers.Tokenizer` plus its special ids and chat template.

HF folders (`tokenizer.json` + `tokenizer_config.json`), GGUF files (built from the file's
metadata in `ff_jax.models.gguf`) and the demo's own trained tokenizer all end up as a
`TextTokenizer`, so the data layer and the decoder never care where a tokenizer came from.

`sentencepiece_bpe` rebuilds a Llama/Mistral-style SentencePiece BPE vocabulary (pieces and
scores, as a GGUF file stores them) as a fast tokenizer, the way transformers does.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, pre_tokenizers

from ff_jax.errors import CheckpointError


@dataclasses.dataclass
class TextTokenizer:
  """A fast tokenizer with the ids ff_jax needs: EOS ends a response, PAD is never a target."""

  tokenizer: tokenizers.Tokenizer
  eos_id: int
  pad_id: int
  bos_id: int | None = None
  add_bos: bool = False  # prepend BOS when encoding a whole prompt (Llama-1/2 style)
  chat_template: str | None = None

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without special tokens added by a post-processor."""
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """Render messages with the model's own chat template (jinja, as transformers does)."""
    if not self.chat_template:
      raise CheckpointError("this tokenizer has no chat template; use the plain prompt template")
    from transformers import PreTrainedTokenizerFast  # heavy import, only when templating

    # Llama-2 and Mistral templates write `bos_token` / `eos_token` themselves.
    name = self.tokenizer.id_to_token
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=self.tokenizer, chat_template=self.chat_template,
        bos_token=name(self.bos_id) if self.bos_id is not None else None,
        eos_token=name(self.eos_id))
    return wrapped.apply_chat_template(messages, tokenize=False,
                                       add_generation_prompt=add_generation_prompt)

  def save(self, folder: str | Path) -> None:
    """Write `tokenizer.json` and `tokenizer_config.json` the way HF folders hold them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    self.tokenizer.save(str(folder / "tokenizer.json"))
    vocab = {v: k for k, v in self.tokenizer.get_vocab(with_added_tokens=True).items()}
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": vocab.get(self.eos_id),
        "pad_token": vocab.get(self.pad_id),
        "bos_token": vocab.get(self.bos_id) if self.bos_id is not None else None,
        "add_bos_token": self.add_bos,
    }
    if self.chat_template:
      config["chat_template"] = self.chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))

  @classmethod
  def from_folder(cls, folder: str | Path) -> TextTokenizer:
    """Load an HF tokenizer folder (`tokenizer.json`, optional `tokenizer_config.json`)."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.exists():
      raise CheckpointError(f"{path}: not found (ff_jax needs a fast tokenizer.json)")
    tok = tokenizers.Tokenizer.from_file(str(path))
    config: dict[str, Any] = {}
    if (folder / "tokenizer_config.json").exists():
      config = json.loads((folder / "tokenizer_config.json").read_text())
    if not config.get("chat_template") and (folder / "chat_template.jinja").exists():
      config["chat_template"] = (folder / "chat_template.jinja").read_text()
    return cls.from_tokenizer(tok, config, origin=str(folder))

  @classmethod
  def from_tokenizer(cls, tok: tokenizers.Tokenizer, config: dict[str, Any],
                     origin: str) -> TextTokenizer:
    """Resolve special ids from an HF-style `tokenizer_config` dict."""

    def token_id(key: str) -> int | None:
      token = config.get(key)
      if isinstance(token, dict):  # AddedToken serialised as a dict
        token = token.get("content")
      if token is None:
        return None
      tid = tok.token_to_id(token)
      if tid is None:
        raise CheckpointError(f"{origin}: {key}={token!r} is not in the vocabulary")
      return tid

    eos = token_id("eos_token")
    if eos is None:
      raise CheckpointError(f"{origin}: tokenizer_config has no eos_token")
    pad = token_id("pad_token")
    # Pad must differ from EOS so that EOS stays a learned target; fall back to another
    # special token, or token 0, and rely on the loss mask (never on the id) to ignore padding.
    if pad is None or pad == eos:
      pad = next((i for i in (token_id("unk_token"), token_id("bos_token"), 0)
                  if i is not None and i != eos), 0)
    return cls(tokenizer=tok, eos_id=eos, pad_id=pad, bos_id=token_id("bos_token"),
               add_bos=bool(config.get("add_bos_token", False)),
               chat_template=config.get("chat_template"))


SPACE_MARKER = "\u2581"  # SentencePiece's "▁", which stands for a space inside pieces


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
  """The BPE merges a SentencePiece vocabulary implies, best first.

  SentencePiece BPE keeps no merge list: it joins the adjacent pair whose joined piece scores
  highest. Every split of a piece into two pieces of the vocabulary becomes a merge ranked by the
  joined piece's score (ties: longer left part, then longer right part, then vocabulary order),
  exactly as transformers' `generate_merges` ranks them for its SentencePiece and GGUF converters.
  """
  index = {token: i for i, token in enumerate(tokens)}
  merges: list[tuple[str, str, float]] = []
  for token, score in zip(tokens, scores):
    splits = [(token[:cut], token[cut:], score) for cut in range(1, len(token))
              if token[:cut] in index and token[cut:] in index]
    splits.sort(key=lambda merge: (index[merge[0]], index[merge[1]]))
    merges.extend(splits)
  merges.sort(key=lambda merge: (merge[2], len(merge[0]), len(merge[1])), reverse=True)
  return [(left, right) for left, right, _ in merges]


def sentencepiece_bpe(tokens: list[str], merges: list[tuple[str, str]], unk_token: str | None,
                      add_space_prefix: bool) -> tokenizers.Tokenizer:
  """A Llama-2/Mistral SentencePiece BPE tokenizer: "▁" for spaces, `<0xNN>` byte fallback.

  Spaces become "▁" and, with `add_space_prefix` (SentencePiece's dummy prefix), one is put
  before the text unless it already starts with a space; characters that no piece covers fall
  back to their UTF-8 bytes as `<0xNN>` tokens. Decoding undoes both. No normalization, as
  Llama's `normalization_rule_name: identity`. Special tokens are the caller's to add.
  """
  vocab = {token: i for i, token in enumerate(tokens)}
  # <unk> is only reached by a character whose bytes have no <0xNN> token (a vocabulary without
  # the full 256); naming it keeps such text from being dropped silently.
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges, unk_token=unk_token,
                                                   fuse_unk=True, byte_fallback=True))
  # "first": the dummy prefix goes before the text only, not after each special token.
  tok.pre_tokenizer = pre_tokenizers.Metaspace(
      replacement=SPACE_MARKER, prepend_scheme="first" if add_space_prefix else "never",
      split=False)
  steps = [decoders.Replace(SPACE_MARKER, " "), decoders.ByteFallback(), decoders.Fuse()]
  if add_space_prefix:
    steps.append(decoders.Strip(content=" ", left=1, right=0))
  tok.decoder = decoders.Sequence(steps)
  return tok
