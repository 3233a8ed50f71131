"""The noisy finetuning mixture, the safe set and group-wise splits (reference §3.2).

The official `get_noisy(N, r, lists)` reseeded the global `random` inside, floored both counts (so
a mixture could be a few examples short of N), never deduplicated and never checked that the safe
finetuning data and the evaluation data were kept out of the mixture. Here everything is seeded
with a `numpy.random.Generator`, the mixture has exactly `n` distinct (prompt, response) texts, and
the safe set and evaluation split are disjoint from it by id and by prompt text.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ff_jax.atomic_io import write_json_atomic
from ff_jax.data.records import Record, fingerprint, write_jsonl_atomic
from ff_jax.errors import ConfigError

_FILES = ("noisy", "safe", "eval")


def _text_key(r: Record) -> tuple[str, str]:
  return (r.prompt, r.response)


def _check_kind(pool: Sequence[Record], name: str, kind: str) -> None:
  # `kind` is the ground truth of every filter metric, so a pool of the wrong kind would silently
  # corrupt precision/recall; refuse it instead.
  for r in pool:
    if r.kind != kind:
      raise ConfigError(f"build_noisy_mixture: pool {name!r} must hold kind {kind!r} records, but "
                        f"record {r.id!r} has kind {r.kind!r}")


def _draw(pool: Sequence[Record], count: int, name: str, rng: np.random.Generator,
          taken_text: set[tuple[str, str]], taken_ids: set[str]) -> list[Record]:
  """`count` records of `pool` in random order, skipping texts and ids already in the mixture."""
  out: list[Record] = []
  for i in rng.permutation(len(pool)):
    if len(out) == count:
      break
    r = pool[int(i)]
    if _text_key(r) in taken_text or r.id in taken_ids:
      continue
    taken_text.add(_text_key(r))
    taken_ids.add(r.id)
    out.append(r)
  if len(out) < count:
    distinct = len({_text_key(r) for r in pool})
    raise ConfigError(f"build_noisy_mixture: pool {name!r} is too small: {count} records needed, "
                      f"but it has {len(pool)} ({distinct} distinct texts, {len(out)} usable after "
                      "removing duplicates of records already drawn)")
  return out


def mixture_counts(n: int, ratio: float, n_other_pools: int) -> list[int]:
  """[n_unsafe, n_safe, n_task1, ...]: round(n·ratio) unsafe, the rest split evenly.

  The remainder of the even split goes to the first pools (safe first), so the counts sum to n.
  """
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise ConfigError(f"build_noisy_mixture: n must be a positive integer, got {n!r}")
  if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio < 1:
    raise ConfigError("build_noisy_mixture: ratio must lie strictly between 0 and 1, "
                      f"got {ratio!r}")
  n_unsafe = round(n * ratio)
  base, extra = divmod(n - n_unsafe, n_other_pools)
  return [n_unsafe] + [base + (1 if k < extra else 0) for k in range(n_other_pools)]


def build_noisy_mixture(unsafe: Sequence[Record], safe: Sequence[Record],
                        task_pools: Sequence[Sequence[Record]], n: int, ratio: float,
                        seed: int) -> list[Record]:
  """D_noisy: `n` shuffled records, round(n·ratio) unsafe and the rest split over safe and tasks.

  As in the paper's `get_noisy`, the safe pool and each task pool contribute equally (ratio 0.5
  with two task pools gives 1/2 unsafe, 1/6 safe, 1/6 each task). Texts are distinct: a record
  whose (prompt, response) is already in the mixture is skipped and another is drawn.
  """
  counts = mixture_counts(n, ratio, 1 + len(task_pools))
  pools = [("unsafe", unsafe, "unsafe"), ("safe", safe, "safe")]
  pools += [(f"task[{k}]", p, "task") for k, p in enumerate(task_pools)]
  for name, pool, kind in pools:
    _check_kind(pool, name, kind)
  rng = np.random.default_rng(seed)
  taken_text: set[tuple[str, str]] = set()
  taken_ids: set[str] = set()
  chosen: list[Record] = []
  for (name, pool, _), count in zip(pools, counts):
    chosen += _draw(pool, count, name, rng, taken_text, taken_ids)
  # The official output was ordered by pool and relied on the trainer's sampler; shuffle here so
  # any consumer (and its fingerprint) sees one fixed, mixed order.
  return [chosen[int(i)] for i in rng.permutation(len(chosen))]


def sample_safe_set(safe_pool: Sequence[Record], size: int, exclude: Iterable[Record],
                    seed: int) -> list[Record]:
  """D_safe: `size` records of `safe_pool` sharing no id and no prompt text with `exclude`.

  Pass the mixture and the evaluation records as `exclude`. Prompt texts (not just ids) are
  compared because the same prompt under two ids (e.g. hh-rlhf's chosen/rejected pair, BBQ's
  biased/unknown pair) would let safety finetuning see a prompt of the mixture.
  """
  if isinstance(size, bool) or not isinstance(size, int) or size < 1:
    raise ConfigError(f"sample_safe_set: size must be a positive integer, got {size!r}")
  ex_ids: set[str] = set()
  ex_prompts: set[str] = set()
  for r in exclude:
    ex_ids.add(r.id)
    ex_prompts.add(r.prompt)
  candidates: list[Record] = []
  seen: set[tuple[str, str]] = set()
  for r in safe_pool:
    if r.id in ex_ids or r.prompt in ex_prompts or _text_key(r) in seen:
      continue
    seen.add(_text_key(r))
    candidates.append(r)
  if size > len(candidates):
    raise ConfigError(f"sample_safe_set: size {size} is larger than the {len(candidates)} records "
                      f"left of the safe pool's {len(safe_pool)} after removing the excluded ids "
                      "and prompts (and duplicate texts)")
  rng = np.random.default_rng(seed)
  return [candidates[int(i)] for i in rng.choice(len(candidates), size=size, replace=False)]


def _group_of(key: str | Callable[[Record], Any]) -> Callable[[Record], Any]:
  if callable(key):
    return key
  if key in ("id", "source", "category", "kind"):
    return lambda r: getattr(r, key)

  def meta_key(r: Record) -> Any:
    if key not in r.meta:
      raise ConfigError(f"split_by_group: record {r.id!r} has no meta key {key!r}")
    return r.meta[key]
  return meta_key


def split_by_group(records: Sequence[Record], key: str | Callable[[Record], Any],
                   fractions: Mapping[str, float], seed: int) -> dict[str, list[Record]]:
  """Split records so that all records of one group land in the same split.

  `key` is a record attribute ("id", "source", "category", "kind"), a `meta` key (e.g. "template"
  for BBQ) or a function of the record. `fractions` maps split names to positive fractions of the
  *groups* that sum to 1. Groups are sorted, shuffled with `seed` and cut by cumulative rounding;
  each split keeps its records in input order.
  """
  if not fractions:
    raise ConfigError("split_by_group: fractions is empty")
  for name, frac in fractions.items():
    if not isinstance(frac, int | float) or not frac > 0:
      raise ConfigError(f"split_by_group: fractions[{name!r}] must be positive, got {frac!r}")
  total = sum(fractions.values())
  if abs(total - 1.0) > 1e-6:
    raise ConfigError(f"split_by_group: fractions must sum to 1, got {total}")
  group_of = _group_of(key)
  keys = [group_of(r) for r in records]
  groups = sorted({str(k) for k in keys})  # str: a stable order whatever the key's type
  if len(groups) < len(fractions):
    raise ConfigError(f"split_by_group: {len(groups)} groups cannot fill {len(fractions)} splits")
  order = [groups[int(i)] for i in np.random.default_rng(seed).permutation(len(groups))]
  assign: dict[str, str] = {}
  cum, start = 0.0, 0
  names = list(fractions)
  for k, name in enumerate(names):
    cum += fractions[name]
    stop = len(order) if k == len(names) - 1 else round(cum * len(order))
    stop = max(stop, start + 1)  # every split gets at least one group
    stop = min(stop, len(order) - (len(names) - 1 - k))  # and leaves one for each later split
    for g in order[start:stop]:
      assign[g] = name
    start = stop
  out: dict[str, list[Record]] = {name: [] for name in names}
  for r, k in zip(records, keys):
    out[assign[str(k)]].append(r)
  return out


def _check_disjoint(sets: Mapping[str, Sequence[Record]]) -> None:
  names = list(sets)
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      ids = {r.id for r in sets[a]} & {r.id for r in sets[b]}
      prompts = {r.prompt for r in sets[a]} & {r.prompt for r in sets[b]}
      if ids or prompts:
        what = f"id {sorted(ids)[0]!r}" if ids else f"prompt {sorted(prompts)[0][:60]!r}"
        raise ConfigError(f"write_mixture: {a} and {b} overlap ({len(ids)} ids, {len(prompts)} "
                          f"prompts), e.g. {what}")


def _counts(records: Sequence[Record]) -> dict[str, Any]:
  by_kind: dict[str, int] = {}
  by_source: dict[str, int] = {}
  for r in records:
    by_kind[str(r.kind)] = by_kind.get(str(r.kind), 0) + 1
    by_source[str(r.source)] = by_source.get(str(r.source), 0) + 1
  return {"n": len(records), "by_kind": dict(sorted(by_kind.items())),
          "by_source": dict(sorted(by_source.items()))}


def write_mixture(folder: str | Path, noisy: Sequence[Record], safe: Sequence[Record],
                  eval_records: Sequence[Record] | None = None) -> dict[str, Any]:
  """Write noisy.jsonl, safe.jsonl, eval.jsonl (if given) and manifest.json; return the manifest.

  The three sets must be pairwise disjoint by id and prompt text. Each file is written atomically
  and the manifest last, so a manifest on disk always describes complete files.
  """
  sets = {"noisy": list(noisy), "safe": list(safe)}
  if eval_records is not None:
    sets["eval"] = list(eval_records)
  for name, recs in sets.items():
    if not recs:
      raise ConfigError(f"write_mixture: the {name} set is empty")
    ids = [r.id for r in recs]
    if len(set(ids)) != len(ids):
      raise ConfigError(f"write_mixture: the {name} set has duplicate ids")
  _check_disjoint(sets)
  folder = Path(folder)
  manifest: dict[str, Any] = {"files": {}}
  for name in _FILES:
    if name not in sets:
      continue
    write_jsonl_atomic(folder / f"{name}.jsonl", sets[name])
    manifest["files"][name] = {"path": f"{name}.jsonl", "fingerprint": fingerprint(sets[name]),
                               **_counts(sets[name])}
  write_json_atomic(folder / "manifest.json", manifest)
  return manifest
