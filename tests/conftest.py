"""Test setup: 8 fake CPU devices for the mesh tests, set before JAX initialises its backend."""

import os

from ff_jax.cpu_devices import cpu_device_flags

# XLA reads this once, when the CPU backend starts; setting it later has no effect.
os.environ.setdefault("XLA_FLAGS", cpu_device_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# No persistent compilation cache in the test process itself: commands run in-process would
# otherwise open the user's ~/.cache/ff_jax. Commands run as subprocesses get the suite's own
# fresh cache (tests.helpers.pipeline_helpers.cli_env).
os.environ.setdefault("FF_JAX_COMPILE_CACHE", "")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# Tests import their helpers as `tests.helpers...`, from any working directory.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers.paths import SHARED_DATA  # noqa: E402

# XLA:CPU maps every compiled program's code into the process, a few memory maps per kernel, and
# jit caches keep the programs alive. The whole suite in one process compiles thousands of them;
# past the kernel's vm.max_map_count (65 530 by default) the next compile segfaults. So once a
# module has left more than a third of that in use, its programs are dropped.
MAPS = Path("/proc/self/maps")
MAX_MAPS = Path("/proc/sys/vm/max_map_count")


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs_when_maps_run_high():
  yield
  if not MAPS.exists():
    return
  limit = int(MAX_MAPS.read_text()) if MAX_MAPS.exists() else 65530
  with MAPS.open() as maps:
    if sum(1 for _ in maps) > limit // 3:
      import gc

      import jax

      jax.clear_caches()
      gc.collect()


@pytest.fixture
def shared_data() -> Path:
  if not SHARED_DATA.is_dir():
    pytest.skip(f"{SHARED_DATA} is absent (shared data ships beside the repo in CI)")
  return SHARED_DATA
