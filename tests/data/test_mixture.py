"""Noisy mixture, safe set, group splits and writing: counts, disjointness, determinism, errors."""

import json

import pytest

from ff_jax.data.mixture import (
  build_noisy_mixture,
  mixture_counts,
  sample_safe_set,
  split_by_group,
  write_mixture,
)
from ff_jax.data.records import Record, fingerprint, read_jsonl
from ff_jax.data.sources import read_alpaca, read_hh_rlhf, read_squad
from ff_jax.data.sources_bbq import read_bbq, split_bbq
from ff_jax.errors import ConfigError
from tests.helpers.paths import SHARED_DATA

DATA = SHARED_DATA


def _pool(kind: str, n: int, tag: str = "") -> list[Record]:
  return [Record(id=f"{kind}{tag}:{i}", prompt=f"{kind}{tag} prompt {i}", response=f"r{i}",
                 kind=kind, source=f"{kind}{tag}") for i in range(n)]


def test_counts_follow_get_noisy():
  assert mixture_counts(12, 0.5, 3) == [6, 2, 2, 2]
  assert mixture_counts(10, 0.25, 3) == [2, 3, 3, 2]  # the remainder goes to the first pools
  assert sum(mixture_counts(101, 0.75, 2)) == 101


def test_mixture_counts_dedup_and_determinism():
  unsafe = _pool("unsafe", 50)
  # Duplicated text under another id must not enter the mixture twice.
  unsafe += [Record(id=f"dup:{i}", prompt=r.prompt, response=r.response, kind="unsafe")
             for i, r in enumerate(unsafe[:20])]
  safe, t1, t2 = _pool("safe", 30), _pool("task", 30, "a"), _pool("task", 30, "b")
  mix = build_noisy_mixture(unsafe, safe, [t1, t2], n=60, ratio=0.5, seed=3)
  assert len(mix) == 60
  assert [r.kind for r in mix].count("unsafe") == 30
  assert sum(r.source == "safe" for r in mix) == 10
  assert sum(r.source == "taska" for r in mix) == sum(r.source == "taskb" for r in mix) == 10
  assert len({(r.prompt, r.response) for r in mix}) == 60
  again = build_noisy_mixture(unsafe, safe, [t1, t2], n=60, ratio=0.5, seed=3)
  assert fingerprint(mix) == fingerprint(again)
  other = build_noisy_mixture(unsafe, safe, [t1, t2], n=60, ratio=0.5, seed=4)
  assert fingerprint(mix) != fingerprint(other)
  assert [r.kind for r in mix[:30]].count("unsafe") not in (0, 30)  # shuffled, not by pool


@pytest.mark.parametrize("ratio", [0, 1, -0.1, 1.5, float("nan"), True])
def test_bad_ratio(ratio):
  with pytest.raises(ConfigError, match="ratio must lie strictly between 0 and 1"):
    build_noisy_mixture(_pool("unsafe", 9), _pool("safe", 9), [], n=4, ratio=ratio, seed=0)


def test_pool_too_small_and_wrong_kind():
  with pytest.raises(ConfigError, match=r"pool 'task\[1\]' is too small: 5 records needed, but "
                     r"it has 3"):
    build_noisy_mixture(_pool("unsafe", 20), _pool("safe", 9), [_pool("task", 9, "a"),
                        _pool("task", 3, "b")], n=30, ratio=0.5, seed=0)
  with pytest.raises(ConfigError, match=r"pool 'safe' must hold kind 'safe'.*'task:0'"):
    build_noisy_mixture(_pool("unsafe", 9), _pool("task", 9), [], n=4, ratio=0.5, seed=0)


def test_safe_set_disjoint_and_too_large():
  safe = _pool("safe", 40)
  mix = build_noisy_mixture(_pool("unsafe", 20), safe, [], n=20, ratio=0.5, seed=0)
  # A record with a mixture prompt under a new id is excluded too.
  safe_pool = safe + [Record(id="alias", prompt=mix[0].prompt, response="x", kind="safe")]
  chosen = sample_safe_set(safe_pool, 30, exclude=mix, seed=1)
  assert len(chosen) == 30
  assert not {r.id for r in chosen} & {r.id for r in mix}
  assert not {r.prompt for r in chosen} & {r.prompt for r in mix}
  assert chosen == sample_safe_set(safe_pool, 30, exclude=mix, seed=1)
  with pytest.raises(ConfigError, match=r"size 31 is larger than the 30 records left of the safe "
                     r"pool's 41"):
    sample_safe_set(safe_pool, 31, exclude=mix, seed=1)


def test_split_by_group():
  recs = [Record(id=f"r{i}", prompt=f"p{i}", response="x", meta={"template": i % 10})
          for i in range(100)]
  parts = split_by_group(recs, "template", {"a": 0.5, "b": 0.3, "c": 0.2}, seed=0)
  assert [len({r.meta["template"] for r in parts[k]}) for k in "abc"] == [5, 3, 2]
  assert sum(len(v) for v in parts.values()) == 100
  assert parts == split_by_group(recs, "template", {"a": 0.5, "b": 0.3, "c": 0.2}, seed=0)
  with pytest.raises(ConfigError, match="sum to 1"):
    split_by_group(recs, "template", {"a": 0.5, "b": 0.3}, seed=0)
  with pytest.raises(ConfigError, match="no meta key 'nope'"):
    split_by_group(recs, "nope", {"a": 1.0}, seed=0)


def test_write_mixture(tmp_path):
  mix = build_noisy_mixture(_pool("unsafe", 20), _pool("safe", 40), [], n=20, ratio=0.5, seed=0)
  safe = sample_safe_set(_pool("safe", 40), 10, exclude=mix, seed=0)
  ev = _pool("task", 5, "eval")
  manifest = write_mixture(tmp_path / "out", mix, safe, ev)
  on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
  assert on_disk == manifest
  for name, recs in (("noisy", mix), ("safe", safe), ("eval", ev)):
    assert read_jsonl(tmp_path / "out" / f"{name}.jsonl") == recs
    assert manifest["files"][name]["fingerprint"] == fingerprint(recs)
    assert manifest["files"][name]["n"] == len(recs)
  assert manifest["files"]["noisy"]["by_kind"] == {"safe": 10, "unsafe": 10}
  with pytest.raises(ConfigError, match="noisy and eval overlap"):
    write_mixture(tmp_path / "bad", mix, safe, mix[:2])
  assert not (tmp_path / "bad" / "manifest.json").exists()


def test_real_pipeline_disjoint(tmp_path):
  """BBQ unsafe + hh-rlhf safe + SQuAD/Alpaca tasks: mixture, safe set and eval never meet."""
  if not DATA.is_dir():
    pytest.skip(f"{DATA} is absent (shared data ships beside the repo in CI)")
  bbq = read_bbq(DATA / "bbq" / "Disability_status.jsonl")
  pools = split_bbq(bbq, {"unsafe": 0.5, "safe": 0.3, "eval": 0.2}, seed=0)
  squad = read_squad(DATA / "squad" / "dev-v1.1-from-explorer.json")[:300]
  alpaca = read_alpaca(DATA / "alpaca" / "BLOOM-LORA" / "alpaca_data_1k.json")[:300]
  hh = read_hh_rlhf(DATA / "hh-rlhf" / "harmless-base" / "test.jsonl.gz")
  hh_safe = [r for r in hh if r.kind == "safe"]
  mix = build_noisy_mixture(pools["unsafe"], pools["safe"], [squad, alpaca], n=300, ratio=0.5,
                            seed=0)
  assert [r.kind for r in mix].count("unsafe") == 150
  safe = sample_safe_set(hh_safe + pools["safe"], 100, exclude=mix + pools["eval"], seed=0)
  manifest = write_mixture(tmp_path, mix, safe, pools["eval"])  # checks pairwise disjointness
  assert manifest["files"]["noisy"]["by_source"] == {"alpaca": 50, "bbq": 200, "squad": 50}
  again = build_noisy_mixture(pools["unsafe"], pools["safe"], [squad, alpaca], n=300, ratio=0.5,
                              seed=0)
  assert fingerprint(again) == fingerprint(mix)
