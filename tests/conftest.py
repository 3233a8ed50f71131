"""Test setup: 8 fake CPU devices for the mesh tests, set before JAX initialises its backend."""

import os

from ff_jax.cpu_devices import cpu_device_flags

# XLA reads this once, when the CPU backend starts; setting it later has no effect.
os.environ.setdefault("XLA_FLAGS", cpu_device_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# Tests import their helpers as `tests.helpers...`, from any working directory.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers.paths import SHARED_DATA  # noqa: E402


@pytest.fixture
def shared_data() -> Path:
  if not SHARED_DATA.is_dir():
    pytest.skip(f"{SHARED_DATA} is absent (shared data ships beside the repo in CI)")
  return SHARED_DATA
