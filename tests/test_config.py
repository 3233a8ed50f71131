"""Run-config settings that act on the process: JAX's persistent compilation cache
(`compile_cache`), where it lives and that it is really used; and `scoring.noisy_replicas: auto`
in the shipped presets and in configs that set the count themselves."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ff_jax.config import (
  ANY_TIME,
  COMPILE_CACHE_ENV,
  auto_noisy_replicas,
  compile_cache_dir,
  load_config,
  resumable_keys,
)
from ff_jax.errors import ConfigError
from ff_jax.pipeline.rundir import RunDir
from tests.helpers.paths import REPO


def test_compile_cache_is_on_by_default_in_the_users_cache(monkeypatch, tmp_path):
  assert load_config().compile_cache == "auto"
  monkeypatch.delenv(COMPILE_CACHE_ENV, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert compile_cache_dir("auto") == tmp_path / "xdg" / "ff_jax" / "jax"
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert compile_cache_dir("auto") == tmp_path / "home" / ".cache" / "ff_jax" / "jax"
  # The environment moves (or, empty, disables) the default; a configured folder wins.
  monkeypatch.setenv(COMPILE_CACHE_ENV, str(tmp_path / "env"))
  assert compile_cache_dir("auto") == tmp_path / "env"
  monkeypatch.setenv(COMPILE_CACHE_ENV, "")
  assert compile_cache_dir("auto") is None
  assert compile_cache_dir(str(tmp_path / "mine")) == tmp_path / "mine"
  assert compile_cache_dir("") is None


PROBE = """
import sys, jax, jax.numpy as jnp
from ff_jax.config import enable_compile_cache, load_config
folder = enable_compile_cache(load_config(None, sys.argv[1:]).compile_cache)
# A tiny program that compiles in milliseconds: cached all the same.
jax.block_until_ready(jax.jit(lambda x: x * 2 + 1)(jnp.ones(3)))
print(folder, jax.config.jax_enable_compilation_cache)
"""


def probe(*overrides: str) -> str:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-c", PROBE, *overrides], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc.stdout.strip()


def test_the_configured_folder_gets_every_compiled_program_and_empty_turns_it_off(tmp_path):
  folder = tmp_path / "cache"
  assert probe(f"compile_cache={folder}") == f"{folder} True"
  assert any(p.name.startswith("jit_") for p in folder.iterdir())
  assert probe("compile_cache=") == "None False"


@pytest.mark.parametrize("preset", ["demo", "filter", "smollm2", "signals", "llama2-7b",
                                    "llama3-8b", "qwen2.5-7b", "gpt2-xl"])
def test_every_run_preset_loads_with_noisy_replicas_resolved(preset):
  cfg = load_config(f"configs/{preset}.yaml")
  assert isinstance(cfg.scoring.noisy_replicas, int)
  assert cfg.scoring.noisy_replicas >= auto_noisy_replicas(cfg.filter.signal)


def test_a_count_set_in_the_yaml_or_on_the_command_line_is_kept(tmp_path):
  path = tmp_path / "run.yaml"
  path.write_text("scoring: {noisy_replicas: 3}\nfilter: {signal: nll_nens}\n")
  assert load_config(path).scoring.noisy_replicas == 3
  # The paper's method as docs/ and scripts/ spell it, with the count explicit.
  paper = load_config("configs/filter.yaml", ["scoring.noisy_replicas=1", "filter.signal=nll"])
  assert paper.scoring.noisy_replicas == 1
  assert paper == load_config("configs/filter.yaml", ["filter.signal=nll"])


def test_the_keys_a_resumed_run_may_change_are_declared_on_the_config_fields():
  """`resumable` fields are what `RunDir` lets a resumed run change: knobs at any time, a phase's
  settings until it completes (a section covers its keys; a key inside it may say otherwise)."""
  keys = resumable_keys()
  phases = {"score_before", "safety", "safety_replicas", "noisy_replicas", "filter", "clean",
            "evaluate"}
  assert set(keys.values()) <= phases | {ANY_TIME}
  assert {k for k, v in keys.items() if v != ANY_TIME} == {
      "data.eval", "scoring.rouge", "scoring.max_new_tokens", "scoring.m0",
      "scoring.gradient_blocks", "scoring.snapshot_every", "scoring.replicas",
      "scoring.noisy_replicas", "filter", "clean", "evaluate", "export"}
  assert keys["export"] == "clean"  # the export's dtype may change until the clean model is made
  for phase in ("demo.pretrain", "demo.align", "noisy", "safety", "clean"):
    assert keys[f"{phase}.checkpoint_minutes"] == keys[f"{phase}.checkpoint_every"] == ANY_TIME
  for knob in ("data.packing", "scoring.batch_size", "scoring.replicas_per_pass",
               "evaluate.batch_size", "compile_cache", "logging.every"):
    assert keys[knob] == ANY_TIME
  # What a run trains on and with is fixed for its run directory.
  for fixed in ("seed", "data.noisy", "data.template", "noisy.steps", "safety.optim", "model"):
    assert not any(fixed == k or fixed.startswith(k + ".") for k in keys), fixed

  # RunDir reads them: the most specific declaration wins.
  manifest = {"phases": {"evaluate": {"complete": True}}}
  assert RunDir._still_open(manifest, "evaluate.batch_size")
  assert not RunDir._still_open(manifest, "evaluate.max_new_tokens")
  assert RunDir._still_open(manifest, "filter.signal")
  assert not RunDir._still_open(manifest, "safety.steps")


def test_export_dtype_is_auto_or_a_float_dtype():
  assert load_config(None).export.dtype == "auto"
  assert load_config(None, ["export.dtype=bfloat16"]).export.dtype == "bfloat16"
  with pytest.raises(ConfigError, match="export.dtype='int8'"):
    load_config(None, ["export.dtype=int8"])
