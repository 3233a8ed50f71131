"""How the rows of a user's table become records: the column map, the row shapes, derived ids.

A table is a JSONL file, a CSV or parquet file, a Hugging Face dataset or a TFDS dataset; a row is
one of its objects. `data.columns` (`{prompt: question, response: answer, id: qid}`) renames the
columns a table has to the keys below first. The first row decides its shape, and every row must
have it (a mixed file is an error naming the row):

  schema      `prompt`, `response` (+ `id`, `kind`, `category`, `source`, `meta`): ff_jax's own
  messages    TRL conversational: `messages`, a list of {role, content}; the last turn must be the
              assistant's and is the response, the turns before it are the prompt
  completion  TRL prompt/completion: `prompt` and `completion` strings, or message lists (the
              conversational prompt/completion form: the two lists are one conversation)

A conversation whose prompt is one user turn has that turn's text as its prompt. Any other (a
system turn, several turns) keeps its turns in `meta["prompt_messages"]`, which the chat template
renders (`ff_jax.data.templates`), and its prompt text is the transcript, one "Role: text" paragraph
per turn, which is what the raw and plain templates show. TRL renders every conversation with the
model's chat template, so `records_from_rows` counts the conversational rows, and a run whose
template has no roles says in one warning line how many rows it renders otherwise
(`templates.flattening_warning`). A self-correction cue goes into the last user turn (`with_cue`).
Columns that are no key go to `meta`.

Ids: the `id` column where the table has one, else derived from the row's content: the first 16 hex
digits of the sha256 of its canonical JSON (prompt and response, messages, or prompt and
completion), and "-2", "-3"... on the second, third... exact duplicate. The same rows give the same
ids on any run and machine; reordering a file moves no id but a duplicate's suffix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

from ff_jax.data.records import Record, check_unique
from ff_jax.errors import ConfigError, DataError

# The keys a column map may name (the record schema's and the TRL shapes').
COLUMN_KEYS = ("id", "prompt", "response", "completion", "messages", "kind", "category", "source",
               "meta")
ID_DIGITS = 16


def check_columns(columns: Mapping[str, Any] | None) -> dict[str, str]:
  """A validated `data.columns` map (key → source column)."""
  if columns is not None and not isinstance(columns, Mapping):
    raise ConfigError(f"data.columns: expected a mapping such as {{prompt: question}}, got "
                      f"{columns!r}")
  columns = dict(columns or {})
  for key, col in columns.items():
    if key not in COLUMN_KEYS:
      raise ConfigError(f"data.columns.{key}: not a key a column can map to; one of "
                        f"{COLUMN_KEYS}")
    if not isinstance(col, str) or not col:
      raise ConfigError(f"data.columns.{key}: expected a column name, got {col!r}")
  taken = list(columns.values())
  for col in taken:
    if taken.count(col) > 1:
      raise ConfigError(f"data.columns: column {col!r} is mapped to two keys")
  return columns


def rename(row: Mapping[str, Any], columns: Mapping[str, str]) -> dict[str, Any]:
  """The row with its mapped columns under their keys; a column whose own name is a mapped key
  (a `prompt` column while `prompt` maps to `question`) moves out of the way into `meta`. A
  mapping whose column the row lacks is not applied: one `data.columns` serves a run's noisy, safe
  and eval sources, which may name their columns differently."""
  columns = {key: col for key, col in columns.items() if col in row}
  if not columns:
    return dict(row)
  by_column = {col: key for key, col in columns.items()}
  out: dict[str, Any] = {}
  shadowed: dict[str, Any] = {}
  for col, value in row.items():
    if col in by_column:
      out[by_column[col]] = value
    elif col in columns:
      shadowed[col] = value
    else:
      out[col] = value
  if shadowed:
    out["meta"] = {**shadowed, **(out.get("meta") or {})}
  return out


def _detect(row: Mapping[str, Any]) -> str | None:
  if "messages" in row:
    return "messages"
  if "prompt" in row and "completion" in row:
    return "completion"
  if "prompt" in row and "response" in row:
    return "schema"
  return None


def shape_of(row: Mapping[str, Any], where: str, absent: list[str]) -> str:
  """The shape of one (renamed) row: "schema", "messages" or "completion"; `absent`: the columns
  of `data.columns` that the row did not have (for the error message)."""
  shape = _detect(row)
  if shape is not None:
    return shape
  hint = (f" (data.columns names {absent}, which it lacks)" if absent else
          "; name yours with data.columns, e.g. data.columns.prompt=question "
          "data.columns.response=answer")
  raise DataError(f"{where}: cannot tell the row's shape from its columns {sorted(row)}: expected "
                  "prompt + response (ff_jax), messages (TRL conversational) or prompt + "
                  f"completion (TRL){hint}")


def _turns(value: Any, key: str, where: str) -> list[dict[str, str]]:
  if not isinstance(value, list) or not value:
    raise DataError(f"{where}: key {key!r} must be a non-empty list of {{role, content}} turns, "
                    f"got {type(value).__name__}")
  turns = []
  for i, turn in enumerate(value):
    if not isinstance(turn, Mapping) or "role" not in turn or "content" not in turn:
      raise DataError(f"{where}: {key}[{i}] must be an object with 'role' and 'content'")
    role, content = turn["role"], turn["content"]
    if not isinstance(role, str) or not isinstance(content, str):
      raise DataError(f"{where}: {key}[{i}]: 'role' and 'content' must be strings")
    turns.append({"role": role, "content": content})
  return turns


def transcript(turns: list[dict[str, str]]) -> str:
  """The text of a conversation for templates without roles: one "Role: text" paragraph a turn."""
  return "\n\n".join(f"{t['role'].capitalize()}: {t['content']}" for t in turns)


def with_cue(record: Record, cue: str) -> Record:
  """The record with `cue` appended to its prompt on a line of its own: to the prompt text, and
  for a conversation kept as turns (`meta["prompt_messages"]`) to its last user turn too, where
  the chat template shows it (the transcript is rebuilt from the turns, so every template shows
  the same words). A conversation without a user turn gets the cue as a last user turn."""
  turns = record.meta.get("prompt_messages")
  if not turns:
    return dataclasses.replace(record, prompt=f"{record.prompt}\n{cue}")
  turns = [dict(t) for t in turns]
  users = [i for i, t in enumerate(turns) if t["role"] == "user"]
  if users:
    turns[users[-1]]["content"] = f"{turns[users[-1]]['content']}\n{cue}"
  else:
    turns.append({"role": "user", "content": cue})
  return dataclasses.replace(record, prompt=transcript(turns),
                             meta={**record.meta, "prompt_messages": turns})


def _conversation(turns: list[dict[str, str]], key: str,
                  where: str) -> tuple[str, str, list[dict[str, str]] | None]:
  """(prompt text, response, prompt turns or None for a single user turn) of a conversation."""
  if turns[-1]["role"] != "assistant":
    raise DataError(f"{where}: {key} must end with an assistant turn (the response), ends with "
                    f"a {turns[-1]['role']!r} turn")
  prior = turns[:-1]
  if not prior:
    raise DataError(f"{where}: {key} has no turn before the assistant's response")
  if len(prior) == 1 and prior[0]["role"] == "user":
    return prior[0]["content"], turns[-1]["content"], None
  return transcript(prior), turns[-1]["content"], prior


def _content(row: Mapping[str, Any], shape: str, where: str) -> tuple[str, str, dict[str, Any]]:
  """(prompt, response, meta of the conversation) of a renamed row of `shape`."""
  if shape == "schema":
    return row["prompt"], row["response"], {}
  if shape == "messages":
    prompt, response, prior = _conversation(_turns(row["messages"], "messages", where),
                                            "messages", where)
  else:
    p, c = row["prompt"], row["completion"]
    if isinstance(p, str) and isinstance(c, str):
      return p, c, {}
    if not isinstance(p, list) or not isinstance(c, list):
      raise DataError(f"{where}: 'prompt' and 'completion' must both be strings or both lists "
                      f"of turns, got {type(p).__name__} and {type(c).__name__}")
    turns = _turns(p, "prompt", where) + _turns(c, "completion", where)
    prompt, response, prior = _conversation(turns, "prompt + completion", where)
  return prompt, response, ({"prompt_messages": prior} if prior else {})


_CONTENT_KEYS = {"schema": ("prompt", "response"), "messages": ("messages",),
                 "completion": ("prompt", "completion")}


def content_id(row: Mapping[str, Any], shape: str) -> str:
  """The id derived from a row's content (before the duplicate suffix)."""
  content = {k: row[k] for k in _CONTENT_KEYS[shape]}
  text = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"),
                    default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:ID_DIGITS]


def to_record(row: Mapping[str, Any], shape: str, where: str, source: str | None) -> Record:
  """The record of one renamed row of `shape` whose `id` is set (`records_from_rows`)."""
  prompt, response, conv_meta = _content(row, shape, where)
  used = {"id", "kind", "category", "source", "meta", *_CONTENT_KEYS[shape]}
  meta = row.get("meta")
  if meta is not None and not isinstance(meta, Mapping):
    raise DataError(f"{where}: key 'meta' must be an object, got {type(meta).__name__}")
  values = {
      "id": row["id"], "prompt": prompt, "response": response,
      # Empty cells (CSV) mean null.
      "kind": row.get("kind") or None, "category": row.get("category") or None,
      "source": row.get("source") or source,
      # Through JSON: a parquet or HF row may hold dates or bytes, and records are written as JSON.
      "meta": json.loads(json.dumps(
          {**{k: v for k, v in row.items() if k not in used}, **(meta or {}), **conv_meta},
          ensure_ascii=False, default=str)),
  }
  return Record.from_dict(values, where)


def is_conversational(row: Mapping[str, Any], shape: str) -> bool:
  """Whether a renamed row of `shape` is a conversation (TRL messages, or prompt/completion turn
  lists): the rows TRL renders with the model's chat template."""
  return shape == "messages" or (shape == "completion" and isinstance(row["prompt"], list))


def records_from_rows(rows: Iterable[tuple[str, Mapping[str, Any]]], columns: Mapping[str, str],
                      source: str | None, origin: str) -> tuple[list[Record], int]:
  """The records of a table's (where, row) pairs, in order (see the module docstring), and how
  many rows were conversations (`is_conversational`)."""
  records, wheres = [], []
  conversations = 0
  first: tuple[str, str] | None = None
  seen: dict[str, int] = {}
  for where, raw in rows:
    if not isinstance(raw, Mapping):
      raise DataError(f"{where}: expected an object (a row), got {type(raw).__name__}")
    row = rename(raw, columns)
    if first is None:
      first = (shape_of(row, where, sorted(c for c in columns.values() if c not in raw)), where)
    shape = first[0]
    missing = [key for key in _CONTENT_KEYS[shape] if key not in row]
    if missing:
      other = _detect(row)
      if other is not None:
        raise DataError(f"{where}: a {other} row in a table of {shape} rows (the first row, "
                        f"{first[1]}, decides); one file holds one shape")
      raise DataError(f"{where}: missing required key {missing[0]!r} (a table of {shape} rows, "
                      f"as its first row, {first[1]}, decides)")
    if row.get("id") is None or row.get("id") == "":
      base = content_id(row, shape)
      seen[base] = seen.get(base, 0) + 1
      row["id"] = base if seen[base] == 1 else f"{base}-{seen[base]}"
    records.append(to_record(row, shape, where, source))
    wheres.append(where)
    conversations += is_conversational(row, shape)
  check_unique(records, wheres, origin)
  return records, conversations
