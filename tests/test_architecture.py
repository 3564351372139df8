"""The package's floors, read from the source: imports go down, no cycles.

docs/architecture.md: base < model < priors < em < recovery < pipelines <
the tools at the top of mtd_tf/ < trainers. A module imports the project's
own modules inside a function only to defer loading TensorFlow, and says so
in a comment.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FLOORS = ["base", "model", "priors", "em", "recovery", "pipelines"]


def _module_name(path):
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def _sources():
  paths = sorted((ROOT / "mtd_tf").rglob("*.py"))
  paths += sorted((ROOT / "trainers").rglob("*.py"))
  return {_module_name(p): p for p in paths}


SOURCES = _sources()


def _floor(module):
  parts = module.split(".")
  if parts[0] == "trainers":
    return len(FLOORS) + 1
  if len(parts) > 1 and parts[1] in FLOORS:
    return FLOORS.index(parts[1])
  return len(FLOORS)  # the tools (and the package itself)


def _imports(module):
  """(imported module, line, inside a function) of mtd_tf and trainers."""
  tree = ast.parse(SOURCES[module].read_text())
  found = []

  def visit(node, local):
    for child in ast.iter_child_nodes(node):
      inner = local or isinstance(
        child, (ast.FunctionDef, ast.AsyncFunctionDef)
      )
      if isinstance(child, ast.ImportFrom) and child.module:
        if child.module.split(".")[0] in ("mtd_tf", "trainers"):
          for alias in child.names:
            target = f"{child.module}.{alias.name}"
            name = target if target in SOURCES else child.module
            found.append((name, child.lineno, local))
      elif isinstance(child, ast.Import):
        for alias in child.names:
          if alias.name.split(".")[0] in ("mtd_tf", "trainers"):
            found.append((alias.name, child.lineno, local))
      visit(child, inner)

  visit(tree, False)
  return found


GRAPH = {m: _imports(m) for m in SOURCES}


@pytest.mark.parametrize("module", sorted(SOURCES))
def test_imports_only_go_down_the_floors(module):
  for target, line, _ in GRAPH[module]:
    if target in ("mtd_tf", "trainers"):
      continue  # the package's version and lazy entry points
    assert _floor(target) <= _floor(module), (
      f"{module}:{line} imports {target}, a floor above it"
    )


def test_nothing_imports_in_a_cycle():
  edges = {
    m: {t for t, _, _ in GRAPH[m] if t in SOURCES and t != m} for m in SOURCES
  }
  # A package's __init__ is imported before its submodules; an edge from a
  # submodule to its own package is not a cycle of modules.
  for m in edges:
    edges[m] = {t for t in edges[m] if not m.startswith(t + ".")}
  state = {}

  def visit(node, path):
    state[node] = "open"
    for nxt in edges[node]:
      if state.get(nxt) == "open":
        cycle = path[path.index(nxt) :] + [nxt]
        raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
      if nxt not in state:
        visit(nxt, path + [nxt])
    state[node] = "done"

  for module in sorted(edges):
    if module not in state:
      visit(module, [module])


@pytest.mark.parametrize("module", sorted(SOURCES))
def test_local_imports_only_defer_tensorflow_and_say_so(module):
  lines = SOURCES[module].read_text().splitlines()
  for target, line, local in GRAPH[module]:
    if not local:
      continue
    # The comment stands above the import or the block of imports it heads.
    above = line - 2
    while above >= 0 and lines[above].strip().startswith(("from ", "import ")):
      above -= 1
    comment = []
    while above >= 0 and lines[above].strip().startswith("#"):
      comment.insert(0, lines[above].strip().lower())
      above -= 1
    said = " ".join(comment)
    assert "defer" in said or "tensorflow" in said, (
      f"{module}:{line} imports {target} inside a function without saying why"
    )
