"""A wheel of the checkout, built offline: what `launch/tpu.py install` copies to every worker.

The build runs on a clean copy of the package's sources, so stale files of an earlier in-tree
build (setuptools' build/) can never slip into the wheel, and nothing is written into the
checkout but the wheel itself.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from ff_jax.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
# What setuptools reads to build the package (pyproject.toml names README.md; LICENSE is
# picked up as the license file).
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "ff_jax")


def _can_build_wheels() -> bool:
  """Whether this Python's setuptools builds wheels without build isolation: setuptools 70.1 and
  later have bdist_wheel built in; older ones need the `wheel` package (a fresh venv has
  neither)."""
  if importlib.util.find_spec("wheel") is not None:
    return importlib.util.find_spec("setuptools") is not None
  try:
    version = metadata.version("setuptools")
  except metadata.PackageNotFoundError:
    return False
  major, minor = (int(part) for part in (version.split(".") + ["0"])[:2])
  return (major, minor) >= (70, 1)


def build_wheel(dist: Path) -> Path:
  """Build the checkout's wheel into `dist` (no index, no build isolation) and return its path."""
  if not _can_build_wheels():
    raise ConfigError("building the ff-jax wheel offline needs setuptools>=70.1 (or the `wheel` "
                      "package) in the Python that runs launch/tpu.py: `python -m pip install "
                      "'setuptools>=70.1'`, or pass --wheel")
  dist.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix="ff-jax-wheel-") as tmp:
    source, built = Path(tmp) / "source", Path(tmp) / "wheels"
    source.mkdir()
    for name in SOURCES:
      if (REPO / name).is_dir():
        shutil.copytree(REPO / name, source / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
      else:
        shutil.copy2(REPO / name, source / name)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
               "--no-index", "--quiet", "-w", str(built), str(source)]
    print(f"building the wheel of {REPO} from a copy of its sources", flush=True)
    print(f"+ {shlex.join(command)}", flush=True)
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
      raise ConfigError(f"building the ff-jax wheel failed:\n{proc.stderr.strip()}")
    (wheel,) = built.glob("*.whl")
    target = dist / wheel.name
    # Rename within dist: a reader never sees a half-copied wheel.
    partial = dist / f".{wheel.name}.partial"
    shutil.copy2(wheel, partial)
    os.replace(partial, target)
  print(f"wheel: {target}", flush=True)
  return target
