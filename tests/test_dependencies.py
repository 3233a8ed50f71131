"""pyproject.toml's ranges, the lock CI installs (requirements/ci.lock) and .ci/run agree.

No network: the lock is read as text and checked against the ranges with `packaging`.
"""

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "ci.lock"
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
# What the test extra brings, through ff_jax's own extras too (`ff_jax[gcs]`), on Linux, 3.11.
ENV = {"python_version": "3.11", "python_full_version": "3.11.0", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython"}


def _locked() -> dict[str, Version]:
  pins = {}
  for line in LOCK.read_text().splitlines():
    line = line.split("#", 1)[0].strip()
    if not line:
      continue
    m = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)", line)
    assert m, f"{LOCK.name}: not an exact pin: {line!r}"
    name = canonicalize_name(m[1])
    assert name not in pins, f"{LOCK.name}: {name} twice"
    pins[name] = Version(m[2])
  return pins


def _requirements(extras: tuple[str, ...]) -> list[Requirement]:
  """The project's requirements with `extras`, its own extras followed."""
  out, todo, seen = [], [*PROJECT["dependencies"]], set()
  for extra in extras:
    todo += PROJECT["optional-dependencies"][extra]
  while todo:
    req = Requirement(todo.pop())
    if req.marker is not None and not req.marker.evaluate({**ENV, "extra": ""}):
      continue
    if canonicalize_name(req.name) == canonicalize_name(PROJECT["name"]):
      for extra in req.extras - seen:
        seen.add(extra)
        todo += PROJECT["optional-dependencies"][extra]
      continue
    out.append(req)
  return out


def test_every_direct_requirement_is_locked_within_its_range():
  pins = _locked()
  reqs = _requirements(("test",))
  for req in reqs:
    name = canonicalize_name(req.name)
    assert name in pins, f"{req} is not in {LOCK.name}: run scripts/update_lock.sh"
    assert req.specifier.contains(pins[name], prereleases=True), (
        f"{LOCK.name} has {name}=={pins[name]}, outside pyproject.toml's {req}")
  # jax[tpu]: the libtpu that jax's own extra names for the locked jax.
  assert "libtpu" in pins and "jaxlib" in pins and pins["jaxlib"] == pins["jax"]


def test_ranges_have_lower_bounds_and_no_exact_pins():
  # Exact pins make ff_jax uninstallable beside MaxText, Tunix or a newer JAX; the lock pins.
  for req in _requirements(("test", "tpu", "gpu", "datasets", "tfds")):
    ops = {spec.operator for spec in req.specifier}
    assert ">=" in ops, f"{req}: no tested lower bound"
    assert not ops & {"==", "==="}, f"{req}: an exact pin belongs in {LOCK.name}"


@pytest.mark.parametrize("name", ["torch", "nvidia-cublas-cu12", "jax-cuda12-plugin", "triton"])
def test_the_lock_holds_no_torch_or_cuda(name):
  assert canonicalize_name(name) not in _locked()


def test_ci_installs_through_the_lock_and_readme_shows_its_command():
  ci = (REPO / ".ci" / "run").read_text()
  command = next(line for line in ci.splitlines() if line.startswith("pip install"))
  assert f"-c {LOCK.relative_to(REPO)} -e '.[test]'" in command
  # README's copy is the same command without pip's -q.
  assert command.replace("pip install -q", "pip install") in (REPO / "README.md").read_text()
