"""Turning a record into token ids: one prompt template for training, scoring and generation.

The official code trained and evaluated with different templates and put the loss on the prompt
with pad == EOS, so EOS was never learned. Here the prompt and the response are tokenized
separately and concatenated, which makes the prompt/response boundary exact; the loss mask covers
the response and the EOS that ends it, and the same rendered prompt is what generation starts from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal

import numpy as np

from ff_jax.data.records import Record
from ff_jax.errors import ConfigError, DataError
from ff_jax.models.tokenizer import TextTokenizer

PLAIN_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
  """How a prompt is rendered: verbatim ("raw", the paper's: prompt text and response concatenated),
  a format string ("plain") or the tokenizer's chat template ("chat")."""

  mode: Literal["raw", "plain", "chat"] = "plain"
  plain: str = PLAIN_TEMPLATE  # must contain "{prompt}" exactly once
  system: str | None = None  # chat mode: optional system message

  def __post_init__(self):
    if self.mode not in ("raw", "plain", "chat"):
      raise ConfigError(f"data.template: must be 'raw', 'plain' or 'chat', got {self.mode!r}")
    if self.mode == "plain" and self.plain.count("{prompt}") != 1:
      raise ConfigError("data.template.plain: must contain '{prompt}' exactly once")

  def render(self, tokenizer: TextTokenizer, prompt: str,
             turns: list[dict[str, str]] | None = None) -> str:
    """The text that precedes the response (ends exactly where the response starts).

    `turns`: a conversation's turns before the response (`meta["prompt_messages"]` of a TRL row,
    `ff_jax.data.rows`); the chat template renders them, the other modes the prompt text (their
    transcript).
    """
    if self.mode == "raw":
      return prompt
    if self.mode == "plain":
      # str.replace, not str.format: prompts may contain braces.
      return self.plain.replace("{prompt}", prompt)
    messages = list(turns) if turns else [{"role": "user", "content": prompt}]
    if self.system and messages[0]["role"] != "system":
      messages.insert(0, {"role": "system", "content": self.system})
    return tokenizer.render_chat(messages, add_generation_prompt=True)


def flattening_warning(counts: Mapping[str, tuple[int, int]], mode: str) -> str | None:
  """The one warning line for conversational rows under a template without roles, or None.

  `counts`: per setting (`data.noisy`, ...) (conversational rows, those of them with a system turn
  or several turns). TRL's SFTTrainer renders conversations with the model's chat template; the
  raw and plain templates show one user turn's text as written and flatten longer conversations
  into "Role: text" transcripts (`ff_jax.data.rows`), so the finetunes here see other text than
  the user's finetune will. Nothing is said under the chat template, or without conversations.
  """
  counts = {role: n for role, n in counts.items() if n[0]}
  if mode == "chat" or not counts:
    return None
  parts = ", ".join(f"{role} {n} ({multi} flattened into 'Role: text' transcripts)"
                    for role, (n, multi) in counts.items())
  return (f"warning: conversational rows (TRL messages) under data.template={mode}, rendered "
          f"without the model's chat template that TRL applies to them: {parts}; "
          "data.template=chat keeps them as conversations (docs/fidelity.md: why the filter "
          "preset uses raw)")


@dataclasses.dataclass(frozen=True)
class EncodedExample:
  """Token ids of prompt + response + EOS, and which of them are loss targets.

  `loss_mask[t] == 1` iff `tokens[t]` is a target predicted from position t-1: the response tokens
  and the final EOS, never the prompt (so `loss_mask[0] == 0`).
  """

  tokens: np.ndarray  # int32 [L]
  loss_mask: np.ndarray  # int32 [L]
  prompt_len: int
  truncated: bool
  prompt_dropped: int = 0  # prompt tokens cut from the left
  response_dropped: int = 0  # response tokens (EOS included) cut from the right
  id: str = ""

  def __len__(self) -> int:
    return int(self.tokens.shape[0])


def _prompt_ids(tokenizer: TextTokenizer, prompt: Record | str,
                template: PromptTemplate) -> list[int]:
  if isinstance(prompt, Record):
    text = template.render(tokenizer, prompt.prompt, prompt.meta.get("prompt_messages"))
  else:
    text = template.render(tokenizer, prompt)
  ids = tokenizer.encode(text)
  # A chat template may already start with BOS; never add a second one.
  if tokenizer.add_bos and tokenizer.bos_id is not None and ids[:1] != [tokenizer.bos_id]:
    ids = [tokenizer.bos_id] + ids
  return ids


def _cut_prompt_left(ids: list[int], keep: int, bos: int | None) -> list[int]:
  """The last `keep` tokens of the prompt, with a leading BOS kept in front of them."""
  if len(ids) <= keep:
    return ids
  if bos is not None and ids[:1] == [bos] and keep >= 1:
    return [bos] + ids[len(ids) - keep + 1:]
  return ids[len(ids) - keep:]


def encode_example(tokenizer: TextTokenizer, record: Record, template: PromptTemplate,
                   max_len: int, overflow: Literal["truncate", "error"] = "truncate",
                   min_prompt_tokens: int | None = None) -> EncodedExample:
  """Encode one record for training or scoring.

  Truncation (`overflow="truncate"`), for sequences longer than `max_len`:
    1. the prompt is cut from the left (BOS stays), because its end (the question and the
       "Response:" cue) is what the response depends on; it keeps at least `min_prompt_tokens`
       (default `max_len // 4`, at least 1) so the response is still conditioned on something;
    2. if the response still does not fit, its right end is cut *and EOS is dropped with it*:
       an answer that goes on beyond the window must not teach the model to stop mid-answer.
  `overflow="error"` raises a `DataError` naming the record id instead.
  """
  if max_len < 2:
    raise ConfigError(f"data.max_len: must be at least 2, got {max_len}")
  prompt = _prompt_ids(tokenizer, record, template)
  response = tokenizer.encode(record.response) + [tokenizer.eos_id]
  total = len(prompt) + len(response)
  p_drop = r_drop = 0
  if total > max_len:
    if overflow == "error":
      raise DataError(f"record {record.id!r}: {total} tokens (prompt {len(prompt)} + response "
                      f"{len(response)} incl. EOS) exceed max_len={max_len}")
    if overflow != "truncate":
      raise ConfigError(f"data.overflow: must be 'truncate' or 'error', got {overflow!r}")
    floor = max_len // 4 if min_prompt_tokens is None else min_prompt_tokens
    floor = min(max(floor, 1), max_len - 1)  # at least one prompt token and one target
    keep_prompt = min(len(prompt), max(floor, max_len - len(response)))
    p_drop = len(prompt) - keep_prompt
    prompt = _cut_prompt_left(prompt, keep_prompt, tokenizer.bos_id)
    keep_response = max_len - len(prompt)
    r_drop = len(response) - keep_response
    if r_drop > 0:
      response = response[:keep_response]
    r_drop = max(r_drop, 0)
  tokens = np.asarray(prompt + response, dtype=np.int32)
  loss_mask = np.zeros_like(tokens)
  loss_mask[len(prompt):] = 1
  return EncodedExample(tokens=tokens, loss_mask=loss_mask, prompt_len=len(prompt),
                        truncated=bool(p_drop or r_drop), prompt_dropped=p_drop,
                        response_dropped=r_drop, id=record.id)


def encode_responses_alone(tokenizer: TextTokenizer, records: list[Record],
                           template: PromptTemplate, max_len: int) -> list[EncodedExample]:
  """Each record's response after an empty prompt in the same template: how likely the response
  is on its own, its style without its content (the control of the `nll_pmi` signal).

  An empty prompt that renders to no tokens (the raw template) is replaced by EOS, the document
  separator, so that every response token, the first included, is a target as it is after its
  real prompt. A response longer than the window is cut from the right, EOS with it.
  """
  prefix = _prompt_ids(tokenizer, "", template) or [tokenizer.eos_id]
  prefix = _cut_prompt_left(prefix, max_len - 1, tokenizer.bos_id)  # room for one target
  out = []
  for record in records:
    full = tokenizer.encode(record.response) + [tokenizer.eos_id]
    response = full[:max_len - len(prefix)]
    tokens = np.asarray(prefix + response, dtype=np.int32)
    loss_mask = np.zeros_like(tokens)
    loss_mask[len(prefix):] = 1
    out.append(EncodedExample(tokens=tokens, loss_mask=loss_mask, prompt_len=len(prefix),
                              truncated=len(response) < len(full),
                              response_dropped=len(full) - len(response), id=record.id))
  return out


def encode_examples(tokenizer: TextTokenizer, records: list[Record], template: PromptTemplate,
                    max_len: int,
                    overflow: Literal["truncate", "error"] = "truncate") -> list[EncodedExample]:
  """`encode_example` over a dataset; list positions are the `example_id`s batches carry."""
  return [encode_example(tokenizer, r, template, max_len, overflow) for r in records]


def encode_prompt(tokenizer: TextTokenizer, record: Record | str, template: PromptTemplate,
                  max_len: int | None = None) -> np.ndarray:
  """Prompt ids for generation (int32 [P]), ending exactly where the response would start.

  With `max_len`, the prompt is cut from the left as in `encode_example` (BOS stays).
  """
  ids = _prompt_ids(tokenizer, record, template)
  if max_len is not None and len(ids) > max_len:
    ids = _cut_prompt_left(ids, max_len, tokenizer.bos_id)
  return np.asarray(ids, dtype=np.int32)
