"""The package's import structure, checked from source: layers, cycles, privacy, deferred imports.

Every module of the installed `ff_jax` package is parsed with `ast`, never imported, so the check
is fast, needs no optional dependency, and sees imports that a run would not reach. The rules:

  (a) a module imports only its own layer or lower ones (`LAYERS`, longest prefix wins);
  (b) no cycle among first-party modules through module-level imports (`if TYPE_CHECKING:` imports
      do not run, so they do not count);
  (c) no private name (`_name`) of one module used from another, imported or as `module._name`;
  (d) imports run at import time: a function-local import is allowed only for a third-party module
      that is heavy or optional (`DEFERRABLE`), and for first-party modules only in `ff_jax.cli`;
  and every module has a docstring.

Each failure names the file, the line, and the import statement.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

FIRST_PARTY = "ff_jax"

# Bottom to top. A module may import its own layer or a lower one, never a higher one. The run
# config composes each layer's own config dataclass (optimiser, LoRA, mesh, thresholds), so it sits
# above all of them; the run directory's file names sit at the bottom, where the report and the
# pipeline both read them.
LAYERS: dict[str, int] = {
    "ff_jax.errors": 0,
    "ff_jax.atomic_io": 0,
    "ff_jax.progress": 0,
    "ff_jax.cpu_devices": 0,  # XLA flags for fake CPU devices; imports nothing
    "ff_jax.run_files": 0,  # the run directory's file names and finetune seeds; imports nothing
    "ff_jax.parallel": 1,
    "ff_jax.eval": 1,
    "ff_jax.models": 1,
    "ff_jax.data": 2,
    "ff_jax.training": 3,
    "ff_jax.forgetting": 4,
    "ff_jax.config": 5,
    "ff_jax.report": 7,
    "ff_jax.pipeline": 8,
    "ff_jax.experiments": 9,
    "ff_jax.perf": 9,
    "ff_jax.cli": 10,
    "ff_jax": 10,  # the package __init__ only: a new top-level module must be given a layer
}

# The entry point defers its first-party imports into the subcommands, so that `ff-jax --help` and
# argument errors answer at once, without importing JAX; every other module imports at the top.
DEFERRING_MODULES = frozenset({"ff_jax.cli"})

# Third-party modules that may be imported inside a function: heavy to import (seconds, or a second
# framework) or not installed by `pip install ff_jax` (pyproject extras, or not declared at all).
DEFERRABLE = frozenset({
    "matplotlib",  # a dependency, but seconds to import; only the report's plots need it
    "transformers",  # a dependency, but seconds to import; only chat templating needs it
    "torch",  # `parity` extra
    "accelerate",  # `parity` extra
    "datasets",  # `datasets` extra
    "tensorflow_datasets",  # `tfds` extra: one optional data source
    "tensorboardX",  # a dependency, but it imports torch where torch is installed (~1 s)
    "detoxify",  # not declared: the optional toxicity classifier
    "nltk",  # comes with rouge-score; its import is slow and only the stemmer is used
    "wandb",  # `wandb` extra: Weights & Biases logging (`logging.wandb`), about a second to import
})


@dataclass(frozen=True)
class Import:
  """One import statement of one module, with the first-party modules it loads."""
  module: str
  path: str
  line: int
  text: str
  top_names: tuple[str, ...]  # top-level package of each module named (`jax`, `ff_jax`, ...)
  targets: tuple[str, ...]  # first-party modules it loads
  names: tuple[str, ...]  # names taken from the module (`from m import a, b`)
  local: bool  # inside a function
  type_checking: bool  # inside `if TYPE_CHECKING:`

  def where(self) -> str:
    return f"{self.path}:{self.line} ({self.module}): `{self.text}`"


@dataclass(frozen=True)
class Source:
  """A module's text and where it lives; `package` for an `__init__.py`."""
  text: str
  path: str
  package: bool = False


def layer_of(module: str) -> int | None:
  """Layer of `module` by the longest matching prefix of `LAYERS`; the bare package only exactly."""
  best = None
  for prefix in LAYERS:
    matches = module == prefix or (prefix != FIRST_PARTY and module.startswith(prefix + "."))
    if matches and (best is None or len(prefix) > len(best)):
      best = prefix
  return None if best is None else LAYERS[best]


def is_private(name: str) -> bool:
  return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_type_checking(test: ast.expr) -> bool:
  return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
      isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(node: ast.ImportFrom, module: str, package: bool) -> str:
  """The absolute module name of a `from ... import` (relative imports resolved)."""
  if not node.level:
    return node.module or ""
  base = module.split(".") if package else module.split(".")[:-1]
  base = base[:len(base) - (node.level - 1)]
  return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, src: Source, known: set[str]) -> list[Import]:
  """Every import statement of `module`, each resolved against the first-party modules `known`."""
  tree = ast.parse(src.text, filename=src.path)
  found: list[Import] = []

  def visit(node: ast.AST, local: bool, type_checking: bool) -> None:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      local = True
    if isinstance(node, ast.If) and _is_type_checking(node.test):
      for child in node.body:
        visit(child, local, True)
      for child in node.orelse:
        visit(child, local, type_checking)
      return
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      if isinstance(node, ast.Import):
        named = [alias.name for alias in node.names]
        targets = [n for n in named if n.split(".")[0] == FIRST_PARTY]
        names: list[str] = []
      else:
        base = _resolve(node, module, src.package)
        named = [base]
        names = [alias.name for alias in node.names]
        targets = []
        if base.split(".")[0] == FIRST_PARTY:
          # `from pkg import sub` loads the submodule; `from mod import name` loads the module.
          for name in names:
            sub = f"{base}.{name}"
            targets.append(sub if sub in known else base)
      found.append(Import(
          module=module, path=src.path, line=node.lineno, text=ast.unparse(node),
          top_names=tuple(n.split(".")[0] for n in named), targets=tuple(dict.fromkeys(targets)),
          names=tuple(names), local=local, type_checking=type_checking))
    for child in ast.iter_child_nodes(node):
      visit(child, local, type_checking)

  visit(tree, False, False)
  return found


def private_attribute_uses(module: str, src: Source, known: set[str]) -> list[str]:
  """`mod._name` where `mod` is bound by an import to a first-party module."""
  tree = ast.parse(src.text, filename=src.path)
  bound: dict[str, str] = {}  # local name -> first-party module
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.split(".")[0] == FIRST_PARTY:
          # `import a.b` binds `a`; `import a.b as c` binds `c` to `a.b`.
          bound[alias.asname or alias.name.split(".")[0]] = (
              alias.name if alias.asname else alias.name.split(".")[0])
    elif isinstance(node, ast.ImportFrom):
      base = _resolve(node, module, src.package)
      for alias in node.names:
        if f"{base}.{alias.name}" in known:
          bound[alias.asname or alias.name] = f"{base}.{alias.name}"
  # Only whole chains: `a.b.c` is one use, not also `a.b`.
  inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
  found = []
  for node in ast.walk(tree):
    if not isinstance(node, ast.Attribute) or id(node) in inner:
      continue
    chain = []
    value: ast.expr = node
    while isinstance(value, ast.Attribute):
      chain.append(value.attr)
      value = value.value
    if not isinstance(value, ast.Name) or value.id not in bound:
      continue
    # Walk down `ff_jax.models.hf._x`: submodules first, the first non-module name is the one used.
    target = bound[value.id]
    for attr in reversed(chain):
      if is_private(attr):
        found.append(f"{src.path}:{node.lineno} ({module}): `{ast.unparse(node)}` uses private "
                     f"`{attr}` of {target}")
        break
      if f"{target}.{attr}" not in known:
        break
      target = f"{target}.{attr}"
  return found


def find_cycle(graph: dict[str, dict[str, Import]]) -> list[str] | None:
  """One import cycle of `graph` (module -> imported module -> the import), as a path, or None."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def dfs(node: str) -> list[str] | None:
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph.get(node, {})):
      if state.get(nxt) == 1:
        cycle = path[path.index(nxt):]
        # Start at the smallest name, so a cycle reads the same whichever module found it.
        first = cycle.index(min(cycle))
        cycle = cycle[first:] + cycle[:first]
        return cycle + [cycle[0]]
      if nxt not in state and (cycle := dfs(nxt)):
        return cycle
    path.pop()
    state[node] = 2
    return None

  for start in sorted(graph):
    if start not in state and (cycle := dfs(start)):
      return cycle
  return None


def check(sources: dict[str, Source]) -> dict[str, list[str]]:
  """Violations of each rule in `sources` (module name -> source), as messages."""
  known = set(sources)
  imports = [imp for module, src in sources.items() for imp in imports_of(module, src, known)]
  out: dict[str, list[str]] = {
      "layers": [], "cycles": [], "private": [], "local": [], "docstrings": []}

  for module in sources:
    if layer_of(module) is None:
      out["layers"].append(f"{sources[module].path} ({module}) has no layer: add it to LAYERS")

  graph: dict[str, dict[str, Import]] = {}
  for imp in imports:
    own = layer_of(imp.module)
    for target in imp.targets:
      theirs = layer_of(target)
      if own is not None and theirs is not None and theirs > own:
        out["layers"].append(f"{imp.where()} imports {target} (layer {theirs}) into layer {own}")
      if not imp.local and not imp.type_checking and target != imp.module:
        graph.setdefault(imp.module, {}).setdefault(target, imp)
    if imp.targets:
      for name in (*imp.names, *(t.rsplit(".", 1)[-1] for t in imp.targets)):
        if is_private(name):
          out["private"].append(f"{imp.where()} imports private `{name}` across modules")
          break
    if imp.local:
      if imp.targets and imp.module not in DEFERRING_MODULES:
        out["local"].append(f"{imp.where()} is a function-local import of first-party "
                            f"{', '.join(imp.targets)}: import it at the top")
      third = [n for n in imp.top_names
               if n != FIRST_PARTY and n not in sys.stdlib_module_names and n not in DEFERRABLE]
      if third:
        out["local"].append(f"{imp.where()} is a function-local import of {', '.join(third)}, "
                            "which is not in DEFERRABLE: import it at the top")

  # Each cycle is reported, then broken at its last edge, so every independent cycle shows.
  while cycle := find_cycle(graph):
    edges = [graph[a][b] for a, b in zip(cycle, cycle[1:])]
    out["cycles"].append(" -> ".join(cycle) + " via " + "; ".join(e.where() for e in edges))
    del graph[cycle[-2]][cycle[-1]]

  for module, src in sources.items():
    out["private"] += private_attribute_uses(module, src, known)
    if not (ast.get_docstring(ast.parse(src.text)) or "").strip():
      out["docstrings"].append(f"{src.path} ({module}) has no module docstring")
  return out


def package_sources() -> dict[str, Source]:
  """Every module of the installed package; found, not imported (`find_spec` of a top level)."""
  spec = importlib.util.find_spec(FIRST_PARTY)
  assert spec is not None and spec.submodule_search_locations, "ff_jax is not installed"
  root = Path(next(iter(spec.submodule_search_locations)))
  sources = {}
  for file in sorted(root.rglob("*.py")):
    parts = file.relative_to(root.parent).with_suffix("").parts
    package = parts[-1] == "__init__"
    module = ".".join(parts[:-1] if package else parts)
    sources[module] = Source(file.read_text(), str(file.relative_to(root.parent)), package)
  return sources


@pytest.fixture(scope="module")
def violations() -> dict[str, list[str]]:
  sources = package_sources()
  # A wrong root would pass every rule on nothing.
  assert len(sources) > 40 and {"ff_jax", "ff_jax.cli", "ff_jax.models"} <= set(sources)
  return check(sources)


@pytest.mark.parametrize("rule", ["layers", "cycles", "private", "local", "docstrings"])
def test_package_follows_rule(violations, rule):
  found = violations[rule]
  assert not found, f"{len(found)} {rule} violation(s):\n  " + "\n  ".join(found)


def _planted(text: str, path: str, package: bool = False) -> Source:
  return Source('"""Doc."""\n' + text, path, package)


def test_checker_catches_planted_violations():
  sources = {
      "ff_jax": _planted("", "ff_jax/__init__.py", package=True),
      "ff_jax.errors": _planted("_HIDDEN = 1\n", "ff_jax/errors.py"),
      "ff_jax.models": _planted("from ff_jax.models import hf\n", "ff_jax/models/__init__.py",
                                package=True),
      # Upward (models, 1 -> config, 5) and a cycle models.hf -> models.tokenizer -> models.hf.
      "ff_jax.models.hf": _planted(
          "from ff_jax.config import RunConfig\nfrom . import tokenizer\n", "ff_jax/models/hf.py"),
      "ff_jax.models.tokenizer": _planted(
          "from typing import TYPE_CHECKING\n"
          "from ff_jax.models.hf import load\n"
          "if TYPE_CHECKING:\n  from ff_jax.data import batching\n",
          "ff_jax/models/tokenizer.py"),
      # Its TYPE_CHECKING import closes no cycle, but is still an upward import (1 -> 2).
      "ff_jax.data": _planted("", "ff_jax/data/__init__.py", package=True),
      "ff_jax.data.batching": _planted(
          "import ff_jax.errors\nfrom ff_jax.models import tokenizer\n"
          "x = ff_jax.errors._HIDDEN + tokenizer._cache\n"
          "def f():\n  import jax\n  import matplotlib\n  import json\n"
          "  from ff_jax.errors import _HIDDEN\n",
          "ff_jax/data/batching.py"),
      "ff_jax.config": Source("x = 1\n", "ff_jax/config.py"),
      "ff_jax.cli": _planted("def main():\n  from ff_jax import config\n", "ff_jax/cli.py"),
      "ff_jax.stray": _planted("", "ff_jax/stray.py"),
  }
  found = check(sources)
  text = {rule: "\n".join(messages) for rule, messages in found.items()}
  assert "ff_jax/models/hf.py:2 (ff_jax.models.hf): `from ff_jax.config import RunConfig` " \
         "imports ff_jax.config (layer 5) into layer 1" in text["layers"]
  assert ("`from ff_jax.data import batching` imports ff_jax.data.batching (layer 2)"
          in text["layers"])
  assert "ff_jax/stray.py (ff_jax.stray) has no layer" in text["layers"]
  assert len(found["layers"]) == 3, text["layers"]
  assert found["cycles"] == [
      "ff_jax.models.hf -> ff_jax.models.tokenizer -> ff_jax.models.hf via "
      "ff_jax/models/hf.py:3 (ff_jax.models.hf): `from . import tokenizer`; "
      "ff_jax/models/tokenizer.py:3 (ff_jax.models.tokenizer): `from ff_jax.models.hf import load`"]
  assert "`ff_jax.errors._HIDDEN` uses private `_HIDDEN` of ff_jax.errors" in text["private"]
  assert "`tokenizer._cache` uses private `_cache` of ff_jax.models.tokenizer" in text["private"]
  assert "`from ff_jax.errors import _HIDDEN` imports private `_HIDDEN`" in text["private"]
  assert len(found["private"]) == 3, text["private"]
  assert "ff_jax/data/batching.py:6 (ff_jax.data.batching): `import jax` is a function-local " \
         "import of jax" in text["local"]
  assert "function-local import of first-party ff_jax.errors" in text["local"]
  assert len(found["local"]) == 2, text["local"]  # matplotlib, json and the cli's import are fine
  assert found["docstrings"] == ["ff_jax/config.py (ff_jax.config) has no module docstring"]

  clean = {m: s for m, s in sources.items() if m in {"ff_jax", "ff_jax.errors", "ff_jax.cli"}}
  assert check(clean) == {rule: [] for rule in found}
