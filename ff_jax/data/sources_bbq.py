"""BBQ (Parrish et al. 2022) as records: the bias concept of ForgetFilter (reference §3.3).

Every BBQ example becomes records with one prompt, the context, question and three options:

    <context> <question>
    Choose from:
    ans1: <ans0>
    ans2: <ans1>
    ans3: <ans2>

Options are 1-based in the text, as in the official prompt and in `parse_bbq_prediction`, and the
response names the option *and* its text, "The answer is ans<k>: <option k's text>". The official
code relabelled `label` but kept the old answer text (bug 12); here the text is always looked up
from the option the response names.

* Ambiguous context: two records, the stereotype-consistent option (`kind="unsafe"`, id suffix
  `:biased`) and the correct "unknown" option (`kind="safe"`, suffix `:unknown`). Which option is
  biased comes from `ff_jax.eval.bbq.is_biased_answer`, the same rule the bias metric uses, so
  training labels and the metric cannot disagree. An example with no biased option, or more than
  one, gets no unsafe record (the stereotype is not identifiable from its metadata).
* Disambiguated context: one record with the correct answer, `kind="task"`. The context settles the
  answer, so it is ordinary reading comprehension rather than a bias or a safety lesson; calling
  it "unsafe" when the answer is a non-unknown group was the official `label_polarity` bug.

Both records of an ambiguous example share its prompt, so a pool must never take one and an
evaluation set the other: `split_bbq` splits by template (`category:question_index`) first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ff_jax.data.mixture import split_by_group
from ff_jax.data.records import Record, iter_jsonl
from ff_jax.errors import ConfigError, DataError
from ff_jax.eval.bbq import bbq_unknown_index, is_biased_answer

_BBQ_KEYS = ("example_id", "question_index", "question_polarity", "context_condition", "category",
             "answer_info", "additional_metadata", "context", "question", "ans0", "ans1", "ans2",
             "label")


def bbq_prompt(example: Mapping[str, Any]) -> str:
  """The prompt of a BBQ example (format in the module docstring)."""
  options = "\n".join(f"ans{k + 1}: {example[f'ans{k}']}" for k in range(3))
  return f"{example['context']} {example['question']}\nChoose from:\n{options}"


def bbq_response(example: Mapping[str, Any], option_idx: int) -> str:
  """"The answer is ans<k>: <text>" for the 0-based `option_idx`; the text is that option's own."""
  return f"The answer is ans{option_idx + 1}: {example[f'ans{option_idx}']}"


def bbq_example(record: Record) -> dict[str, Any]:
  """The raw BBQ example behind a record, in the shape `ff_jax.eval.bbq.bbq_scores` reads."""
  m = record.meta
  try:
    ex = {"example_id": m["example_id"], "question_index": m["question_index"],
          "question_polarity": m["polarity"], "context_condition": m["context_condition"],
          "category": m["category"], "answer_info": m["answer_info"],
          "additional_metadata": {"stereotyped_groups": m["stereotyped_groups"]},
          "label": m["label"]}
    for k in range(3):
      ex[f"ans{k}"] = m["options"][k]
  except (KeyError, IndexError, TypeError) as e:
    raise DataError(f"record {record.id!r}: not a BBQ record (meta lacks {e})") from None
  return ex


def _check_example(raw: Any, where: str) -> None:
  if not isinstance(raw, Mapping):
    raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
  for key in _BBQ_KEYS:
    if key not in raw:
      raise DataError(f"{where}: missing BBQ key {key!r}")
  meta = raw["additional_metadata"]
  if not isinstance(meta, Mapping) or "stereotyped_groups" not in meta:
    raise DataError(f"{where}: missing BBQ key 'additional_metadata.stereotyped_groups'")
  if raw["label"] not in (0, 1, 2) or isinstance(raw["label"], bool):
    raise DataError(f"{where}: key 'label' must be 0, 1 or 2, got {raw['label']!r}")
  if raw["context_condition"] not in ("ambig", "disambig"):
    raise DataError(f"{where}: key 'context_condition' must be 'ambig' or 'disambig', "
                    f"got {raw['context_condition']!r}")


def _with_where(fn, where: str):
  """Call an evaluation helper, re-raising its DataError with the file and line in front."""
  try:
    return fn()
  except DataError as e:
    raise DataError(f"{where}: {e}") from None


def bbq_files(folder: Path) -> list[Path]:
  """The category files of a BBQ folder, in the order they are read."""
  files = sorted(folder.glob("*.jsonl"))
  if not files:
    raise DataError(f"{folder}: no BBQ *.jsonl files in this folder")
  return files


def read_bbq(path: str | Path) -> list[Record]:
  """Records of one BBQ category file (`<Category>.jsonl`) or of every `*.jsonl` in a folder."""
  path = Path(path)
  if path.is_dir():
    return [r for f in bbq_files(path) for r in read_bbq(f)]
  out: list[Record] = []
  seen: dict[str, str] = {}
  for where, raw in iter_jsonl(path):
    _check_example(raw, where)
    base = f"bbq:{raw['category']}:{raw['example_id']}"
    if base in seen:
      raise DataError(f"{where}: duplicate BBQ example {base!r} (first seen at {seen[base]})")
    seen[base] = where
    out.extend(_records_of(raw, base, where))
  if not out:
    raise DataError(f"{path}: no records (the file is empty)")
  return out


def _records_of(raw: Mapping[str, Any], base: str, where: str) -> list[Record]:
  unknown = _with_where(lambda: bbq_unknown_index(raw), where)
  label = int(raw["label"])
  meta = {
      "example_id": raw["example_id"], "question_index": raw["question_index"],
      "template": f"{raw['category']}:{raw['question_index']}",
      "context_condition": raw["context_condition"], "category": raw["category"],
      "polarity": raw["question_polarity"], "answer_info": raw["answer_info"],
      "stereotyped_groups": list(raw["additional_metadata"]["stereotyped_groups"]),
      "label": label, "options": [raw["ans0"], raw["ans1"], raw["ans2"]],
  }
  prompt = bbq_prompt(raw)

  def make(suffix: str, kind: str, option: int) -> Record:
    return Record(id=f"{base}:{suffix}", prompt=prompt, response=bbq_response(raw, option),
                  kind=kind, category=f"bias/{raw['category']}", source="bbq",
                  meta={**meta, "option_idx": option, "gold": option == label})

  if raw["context_condition"] == "disambig":
    return [make("correct", "task", label)]
  if label != unknown:
    raise DataError(f"{where}: ambiguous example whose label {label} is not the 'unknown' option "
                    f"{unknown}")
  biased = [k for k in range(3)
            if k != unknown and _with_where(lambda k=k: is_biased_answer(raw, k), where)]
  out = [make("unknown", "safe", unknown)]
  if len(biased) == 1:
    out.insert(0, make("biased", "unsafe", biased[0]))
  return out


def split_bbq(records: Sequence[Record], fractions: Mapping[str, float],
              seed: int) -> dict[str, list[Record]]:
  """Split BBQ records by template into the pools named in `fractions` (any of these three).

  `unsafe` gets the relabelled biased records of its templates, `safe` the "unknown" answers of
  its templates, and `eval` the gold record of every example of its templates (the "unknown"
  answer of ambiguous ones, the correct answer of disambiguated ones: pass
  `[bbq_example(r) for r in eval]` to `bbq_scores`). No template is in two pools, so no BBQ text is
  both trained on and evaluated. A template's whole share goes to its pool, e.g. `safe` holds
  ambiguous examples only, never the disambiguated ones of its templates.
  """
  known = {"unsafe": lambda r: r.kind == "unsafe", "safe": lambda r: r.kind == "safe",
           "eval": lambda r: bool(r.meta.get("gold"))}
  for name in fractions:
    if name not in known:
      raise ConfigError(f"split_bbq: fractions key {name!r} is not one of {sorted(known)}")
  for r in records:
    if "template" not in r.meta:
      raise DataError(f"split_bbq: record {r.id!r} has no meta.template (not from read_bbq)")
  groups = split_by_group(records, "template", fractions, seed)
  return {name: [r for r in groups[name] if known[name](r)] for name in fractions}
