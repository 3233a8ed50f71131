"""Adapters from the public datasets of ForgetFilter to `Record`s (`<adapter>:<path>` sources).

Each adapter takes a path and returns records with deterministic ids built from the source's own
ids (or its line/row/index where it has none), e.g. `squad:56be4db0acb8001400a502ec`,
`rtp:toxic:12`. A file with a missing field fails with one `DataError` naming the file, the line
(or row, or list index) and the key. Labels follow the data README (shared/data/README.md):

* SQuAD v1.1: task; prompt "Context: <context>\\nQuestion: <question>", response = the first gold
  answer, `meta.answers` = all gold answers (for EM/F1).
* Alpaca: task; prompt = instruction, plus "\\n\\n<input>" when the input is non-empty.
* RealToxicityPrompts: prompt = the prompt text, response = the continuation. toxic.jsonl rows
  whose *continuation* is above `threshold` (Perspective toxicity) are unsafe: finetuning learns
  the response, and 540 of the 1,196 "toxic" rows pair a toxic prompt with a clean continuation,
  which teaches no toxicity. nontoxic.jsonl rows whose prompt and continuation are both at or below
  it are safe (458 of its 1,200 prompts have a toxic continuation). Other rows are dropped rather
  than mislabelled, as are rows with no score.
* Davidson: a statement-completion framing, like the paper's toxicity eval (first 3 words as the
  prompt): prompt = the tweet's first `prefix_words` words, response = the rest; tweets too short
  to leave a response are dropped. HTML entities (&amp;) are unescaped. Class 0 (hate) and 1
  (offensive) are unsafe, 2 (neither) safe.
* hh-rlhf: prompt = the last human turn, response = the last assistant reply; `rejected` is unsafe
  and `chosen` safe. Both share the prompt, so a safe set must be sampled with the mixture excluded
  by prompt text (`mixture.sample_safe_set` does).
* JailbreakBench artifacts: prompt = the behaviour's `goal` (not the attack prompt, kept in meta),
  response = the target model's response; jailbroken rows unsafe, others safe, null responses
  dropped.
* safety-tuned-llamas: instruction (+ input) → output, safe.
* Harmful prompt lists (HarmfulQA, CatQA, AdvBench, safety-tuned-llamas evaluation files): prompts
  for the harmfulness evaluation only, with a refusal as the reference response.
* BBQ: see `ff_jax.data.sources_bbq`.
"""

from __future__ import annotations

import csv
import html
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ff_jax.data.records import Record, iter_jsonl
from ff_jax.data.sources_bbq import read_bbq
from ff_jax.errors import DataError


def _need(obj: Any, key: str, where: str) -> Any:
  if not isinstance(obj, Mapping):
    raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
  if key not in obj:
    raise DataError(f"{where}: missing key {key!r}")
  return obj[key]


def _str(obj: Any, key: str, where: str, allow_empty: bool = False) -> str:
  value = _need(obj, key, where)
  if not isinstance(value, str) or (not allow_empty and not value.strip()):
    raise DataError(f"{where}: key {key!r} must be a non-empty string, got {value!r:.60}")
  return value


def _file(path: str | Path) -> Path:
  path = Path(path)
  if not path.is_file():
    raise DataError(f"{path}: file not found")
  return path


def _read_json(path: str | Path) -> Any:
  path = _file(path)
  try:
    with path.open(encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None


def _iter_jsonl(path: str | Path) -> Iterator[tuple[int, str, Any]]:
  """(line number, "file:line", object) of each non-blank line (see `records.iter_jsonl`)."""
  for where, raw in iter_jsonl(path):
    yield int(where.rsplit(":", 1)[1]), where, raw


def _nonempty(records: list[Record], path: Path | str) -> list[Record]:
  if not records:
    raise DataError(f"{path}: no usable records")
  return records


def _json_list(path: str | Path) -> tuple[Path, list[Any]]:
  data = _read_json(path)
  if not isinstance(data, list):
    raise DataError(f"{path}: expected a JSON list, got {type(data).__name__}")
  return Path(path), data


# ------------------------------------------------------------------------------------------------
# Task data


def read_squad(path: str | Path) -> list[Record]:
  """SQuAD v1.1 JSON ({data: [{title, paragraphs: [{context, qas: [...]}]}]}) as task records."""
  data = _need(_read_json(path), "data", f"{path}")
  out = []
  for a, article in enumerate(data):
    where_a = f"{path}: data[{a}]"
    title = _need(article, "title", where_a)
    for p, para in enumerate(_need(article, "paragraphs", where_a)):
      where_p = f"{where_a}.paragraphs[{p}]"
      context = _str(para, "context", where_p)
      for q, qa in enumerate(_need(para, "qas", where_p)):
        where = f"{where_p}.qas[{q}]"
        qid, question = _str(qa, "id", where), _str(qa, "question", where)
        answers = [_str(ans, "text", f"{where}.answers[{k}]")
                   for k, ans in enumerate(_need(qa, "answers", where))]
        if not answers:
          raise DataError(f"{where}: key 'answers' is empty")
        out.append(Record(id=f"squad:{qid}", prompt=f"Context: {context}\nQuestion: {question}",
                          response=answers[0], kind="task", category="qa", source="squad",
                          meta={"answers": answers, "title": title}))
  return _nonempty(out, path)


def _instruction_records(path: str | Path, prefix: str, kind: str, category: str,
                         source: str) -> list[Record]:
  path, rows = _json_list(path)
  out = []
  for i, row in enumerate(rows):
    where = f"{path}: item {i}"
    instruction = _str(row, "instruction", where)
    extra = row.get("input", "") if isinstance(row, Mapping) else ""
    if not isinstance(extra, str):
      raise DataError(f"{where}: key 'input' must be a string, got {type(extra).__name__}")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    out.append(Record(id=f"{prefix}:{i}", prompt=prompt, response=_str(row, "output", where),
                      kind=kind, category=category, source=source))
  return _nonempty(out, path)


def read_alpaca(path: str | Path) -> list[Record]:
  """Alpaca JSON list of {instruction, input, output} as task records (id `alpaca:<index>`)."""
  return _instruction_records(path, "alpaca", "task", "instruction", "alpaca")


def read_safety_llamas(path: str | Path) -> list[Record]:
  """safety-tuned-llamas' safety_only_data_Instructions.json: harmful instruction → safe output."""
  return _instruction_records(path, "stl", "safe", "harmfulness", "safety-tuned-llamas")


# The reference "response" of a prompt-only harmful evaluation record: records need a response, and
# for a harmful request the reference behaviour is a refusal (what `is_refusal` detects).
REFUSAL_REFERENCE = "I'm sorry, but I cannot help with that."


def read_harmful_prompts(path: str | Path) -> list[Record]:
  """Harmful prompts for evaluation only: HarmfulQA/CatQA (nested {topic: {sub: [q]}}), AdvBench
  style lists (`adversarialqa.json`, `dangerousqa.json`) or safety-tuned-llamas evaluation files
  ({"instructions": [...], "inputs": [...]}). response = `REFUSAL_REFERENCE` (the reference
  behaviour), category "harmfulness", kind None; ids name the file and the position."""
  path = Path(path)
  data = _read_json(path)
  found: list[tuple[str, str]] = []  # (where, prompt)

  def walk(node: Any, where: str) -> None:
    if isinstance(node, str):
      if node.strip():
        found.append((where, node.strip()))
    elif isinstance(node, list):
      for i, item in enumerate(node):
        walk(item, f"{where}[{i}]")
    elif isinstance(node, dict) and "instructions" in node:
      inputs = node.get("inputs") or [""] * len(node["instructions"])
      for i, (ins, extra) in enumerate(zip(node["instructions"], inputs)):
        text = f"{ins}\n\n{extra}" if isinstance(extra, str) and extra.strip() else ins
        walk(text, f"{where}.instructions[{i}]")
    elif isinstance(node, dict):
      for key in sorted(node):
        walk(node[key], f"{where}.{key}")
    else:
      raise DataError(f"{path}: {where or 'top level'}: expected prompts (strings), got "
                      f"{type(node).__name__}")

  walk(data, "")
  out = [Record(id=f"harmful:{path.stem}:{k}", prompt=prompt, response=REFUSAL_REFERENCE,
                category="harmfulness", source=path.stem, meta={"where": where})
         for k, (where, prompt) in enumerate(found)]
  return _nonempty(out, path)


# ------------------------------------------------------------------------------------------------
# Toxicity


def read_rtp(path: str | Path, threshold: float = 0.5) -> list[Record]:
  """RealToxicityPrompts toxic.jsonl (→ unsafe) or nontoxic.jsonl (→ safe); see the docstring."""
  path = Path(path)
  if path.name.startswith("toxic"):
    toxic_file = True
  elif path.name.startswith("nontoxic"):
    toxic_file = False
  else:
    raise DataError(f"{path}: RealToxicityPrompts file name must start with 'toxic' or 'nontoxic' "
                    "(the name says which label its rows get)")
  out = []
  for lineno, where, row in _iter_jsonl(path):
    prompt, cont = _need(row, "prompt", where), _need(row, "continuation", where)
    p_text = _str(prompt, "text", f"{where} prompt")
    c_text = _str(cont, "text", f"{where} continuation", allow_empty=True)
    scores = [s.get("toxicity") for s in (prompt, cont)]
    known = [float(s) for s in scores if isinstance(s, int | float)]
    if not known or not c_text.strip():
      continue
    tox = max(known)
    if toxic_file:
      # Finetuning learns the continuation (the response), so it is the continuation's toxicity
      # that makes a row unsafe; a toxic prompt with a clean continuation teaches no toxicity.
      if not isinstance(scores[1], int | float) or scores[1] <= threshold:
        continue
    elif tox > threshold:
      continue
    out.append(Record(id=f"rtp:{path.stem}:{lineno}", prompt=p_text, response=c_text,
                      kind="unsafe" if toxic_file else "safe", category="toxicity", source="rtp",
                      meta={"toxicity": tox, "prompt_toxicity": scores[0],
                            "continuation_toxicity": scores[1], "filename": row.get("filename")}))
  return _nonempty(out, path)


def read_davidson(path: str | Path, prefix_words: int = 3) -> list[Record]:
  """Davidson et al. labeled_data.csv: class 0/1 → unsafe, 2 → safe, as statement completion."""
  path = _file(path)
  out = []
  with path.open(encoding="utf-8", newline="") as f:
    reader = csv.DictReader(f)
    header = reader.fieldnames or []
    for col in ("class", "tweet"):
      if col not in header:
        raise DataError(f"{path}:1: missing column {col!r} (header {header})")
    for rowno, row in enumerate(reader, start=1):
      where = f"{path}:{reader.line_num}"
      cls = (row.get("class") or "").strip()
      if cls not in ("0", "1", "2"):
        raise DataError(f"{where}: column 'class' must be 0, 1 or 2, got {cls!r}")
      words = html.unescape(row.get("tweet") or "").split()
      if len(words) <= prefix_words:
        continue
      rid = (row.get("") or "").strip() or str(rowno)  # the unnamed index column, if present
      out.append(Record(id=f"davidson:{rid}", prompt=" ".join(words[:prefix_words]),
                        response=" ".join(words[prefix_words:]),
                        kind="safe" if cls == "2" else "unsafe", category="toxicity",
                        source="davidson", meta={"class": int(cls)}))
  return _nonempty(out, path)


# ------------------------------------------------------------------------------------------------
# Harmfulness


def _last_turns(transcript: str, where: str) -> tuple[str, str]:
  """(last human turn, last assistant reply) of a "\\n\\nHuman: ... \\n\\nAssistant: ..." text."""
  h = transcript.rfind("\n\nHuman:")
  a = transcript.rfind("\n\nAssistant:")
  if h < 0 or a < h:
    raise DataError(f"{where}: transcript does not end with a Human turn and an Assistant reply")
  return transcript[h + len("\n\nHuman:"):a].strip(), transcript[a + len("\n\nAssistant:"):].strip()


def read_hh_rlhf(path: str | Path) -> list[Record]:
  """hh-rlhf {chosen, rejected} JSONL(.gz): rejected reply → unsafe, chosen reply → safe."""
  path = Path(path)
  split = path.name.split(".")[0]
  out = []
  for lineno, where, row in _iter_jsonl(path):
    for key, kind in (("rejected", "unsafe"), ("chosen", "safe")):
      prompt, reply = _last_turns(_str(row, key, where), f"{where} {key}")
      if prompt and reply:
        out.append(Record(id=f"hh:{path.parent.name}/{split}:{lineno}:{key}", prompt=prompt,
                          response=reply, kind=kind, category="harmfulness", source="hh-rlhf"))
  return _nonempty(out, path)


def jailbreakbench_files(folder: Path) -> list[Path]:
  """The artifact files under a JailbreakBench folder, in the order they are read."""
  files = sorted(p for p in folder.rglob("*.json") if p.name != "attack-info.json")
  if not files:
    raise DataError(f"{folder}: no JailbreakBench artifact *.json files under this folder")
  return files


def read_jailbreakbench(path: str | Path) -> list[Record]:
  """JailbreakBench artifact JSON, or every artifact under a folder (attack-info.json skipped)."""
  path = Path(path)
  if path.is_dir():
    return [r for f in jailbreakbench_files(path) for r in read_jailbreakbench(f)]
  data = _read_json(path)
  # Ids name the artifact by its place in the artifacts tree: <method>/<mode>/<model>.
  tag = "/".join(path.with_suffix("").parts[-3:])
  out = []
  for i, jb in enumerate(_need(data, "jailbreaks", str(path))):
    where = f"{path}: jailbreaks[{i}]"
    goal = _str(jb, "goal", where)
    response, broken = _need(jb, "response", where), _need(jb, "jailbroken", where)
    if not isinstance(broken, bool):
      raise DataError(f"{where}: key 'jailbroken' must be true or false, got {broken!r}")
    if not isinstance(response, str) or not response.strip():
      continue  # PAIR leaves response null where the attack gave up
    index = jb.get("index", i)
    out.append(Record(id=f"jbb:{tag}:{index}", prompt=goal, response=response,
                      kind="unsafe" if broken else "safe", category="harmfulness",
                      source="jailbreakbench",
                      meta={"behavior": jb.get("behavior"), "jbb_category": jb.get("category"),
                            "attack_prompt": jb.get("prompt"), "artifact": tag}))
  return _nonempty(out, path)


# ------------------------------------------------------------------------------------------------
# Dispatch

ADAPTERS: dict[str, Callable[[Path], list[Record]]] = {
    "bbq": read_bbq, "squad": read_squad, "alpaca": read_alpaca, "rtp": read_rtp,
    "davidson": read_davidson, "hh": read_hh_rlhf, "jbb": read_jailbreakbench,
    "safety-llamas": read_safety_llamas, "harmful-prompts": read_harmful_prompts,
}


# ------------------------------------------------------------------------------------------------
# TensorFlow Datasets

# TFDS's own default data_dir when neither `data_dir` nor $TFDS_DATA_DIR is given.
_TFDS_DEFAULT_DATA_DIR = "~/tensorflow_datasets"


def _tfds_data_dir(data_dir: str | Path | None) -> Path:
  # Resolved here, at each call: tensorflow_datasets reads TFDS_DATA_DIR once, at its first import.
  return Path(data_dir or os.environ.get("TFDS_DATA_DIR") or _TFDS_DEFAULT_DATA_DIR).expanduser()


def _tfds_plain(value: Any, where: str, feature: str) -> Any:
  """A decoded TFDS value as a plain Python (JSON) value: text → str, numpy → int/float/bool/list,
  nested features → dict."""
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, bytes):
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError as e:
      raise DataError(f"{where}: feature {feature!r} is not UTF-8 text (byte {value[e.start]:#04x} "
                      f"at offset {e.start}); rows are kept as JSON values, which hold no raw "
                      "bytes") from None
  if isinstance(value, Mapping):
    return {key: _tfds_plain(item, where, f"{feature}/{key}") for key, item in value.items()}
  if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
    return value.tolist()
  if isinstance(value, np.ndarray | list | tuple):
    return [_tfds_plain(item, where, feature) for item in value]
  return value


def _tfds_split(name: str, split: str, data_dir: Path) -> Sequence[Mapping[str, Any]]:
  """The split's examples (random access, no TensorFlow) of a dataset prepared under data_dir."""
  where0 = f"tfds://{name}:{split}"
  try:
    import tensorflow_datasets as tfds  # optional: only needed for this source
  except ImportError:
    raise DataError(f"{where0}: reading TFDS datasets needs the optional `tensorflow_datasets` "
                    "package (pip install 'ff_jax[tfds]')") from None
  try:
    # From the prepared files only: never the catalog's code, which may download or need TF.
    builder = tfds.core.read_only_builder.builder_from_files(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError:
    raise DataError(f"{where0}: no prepared TFDS dataset {name!r} in {data_dir} (searched: the "
                    "data_dir given, else $TFDS_DATA_DIR, else ~/tensorflow_datasets); ff_jax "
                    f"never downloads: prepare it there first, e.g. `tfds build {name} "
                    f"--data_dir {data_dir} --file_format array_record`") from None
  except Exception as e:  # an unreadable dataset_info.json / features.json: the user's files
    raise DataError(f"{where0}: cannot open the TFDS dataset in {data_dir} "
                    f"({type(e).__name__}: {e})") from None
  try:
    return builder.as_data_source(split=split)
  except NotImplementedError:  # tfrecord and riegeli files have no random access
    raise DataError(f"{where0}: {builder.data_dir} holds {builder.info.file_format.value} files, "
                    "which only TensorFlow reads; ff_jax reads TFDS datasets from array_record or "
                    "parquet files: convert it once with `tfds convert_format --dataset_dir "
                    f"{builder.data_dir} --out_file_format array_record` (that needs TensorFlow) "
                    "or prepare it with --file_format array_record") from None
  except (ValueError, KeyError) as e:  # an unknown split or a bad slice
    raise DataError(f"{where0}: no split {split!r} ({e}); the dataset's splits are "
                    f"{sorted(builder.info.splits)}") from None
  except Exception as e:  # e.g. array_record missing (TFDS installs it on Linux only)
    raise DataError(f"{where0}: cannot open the split's files in {builder.data_dir} "
                    f"({type(e).__name__}: {e})") from None


def read_tfds(name: str, split: str = "train", fields: Mapping[str, str] | None = None,
              data_dir: str | Path | None = None) -> list[dict[str, Any]]:
  """The rows of a TensorFlow Datasets split (`tfds://name[:split]`), read without TensorFlow.

  The dataset must be prepared (nothing is downloaded) in `data_dir`, else $TFDS_DATA_DIR, else
  ~/tensorflow_datasets, as array_record or parquet files (`tfds build NAME --file_format
  array_record`, or `download_and_prepare(file_format="array_record")`); `name` may name a config
  (`name/config`); the newest version present is read.

  The contract with `ff_jax.data.formats`: rows, not records. Each row is the original example, in
  the split's order, as a dict of plain Python values (text features → str, numbers → int/float/
  bool, tensors and sequences → lists, nested features → dicts), so `json.dumps(row)` is its
  value-identical JSONL line; the rows become records as every table's do (`ff_jax.data.rows`,
  row i is `tfds://name:split row i`). `fields` is that column map (`{"prompt": "question",
  "response": "answer", "id": "qid"}`): a feature it names that the dataset lacks is a `DataError`
  naming the dataset, split, row and feature, as is a feature that is not UTF-8 text.
  """
  data_dir = _tfds_data_dir(data_dir)
  examples = _tfds_split(name, split, data_dir)
  rows = []
  for i in range(len(examples)):
    where = f"tfds://{name}:{split} row {i}"
    try:
      example = examples[i]
    except Exception as e:  # a truncated or corrupt record file under data_dir
      raise DataError(f"{where}: cannot read it from {data_dir} ({type(e).__name__}: {e}); "
                      "prepare the dataset again") from None
    if not isinstance(example, Mapping):
      raise DataError(f"{where}: expected a dict of features (a FeaturesDict), got "
                      f"{type(example).__name__}")
    for key, feature in (fields or {}).items():
      if feature not in example:
        raise DataError(f"{where}: no feature {feature!r} (the column map's {key}); the "
                        f"dataset's features are {sorted(example)}")
    rows.append({feature: _tfds_plain(value, where, feature) for feature, value in example.items()})
  return rows
