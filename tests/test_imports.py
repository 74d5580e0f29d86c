"""The package's import graph (function-level imports included) has no cycle."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mixjax"


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
  parts = list(path.relative_to(root).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def import_graph(package: pathlib.Path = PACKAGE) -> dict[str, set[str]]:
  """Module -> the package modules it imports anywhere in its body (not the package root)."""
  modules = {_module_name(p, package.parent): p for p in package.rglob("*.py")}
  graph: dict[str, set[str]] = {}
  for name, path in modules.items():
    is_package = path.name == "__init__.py"
    deps: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
      targets: list[str] = []
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        if node.level:  # Relative import.
          anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
          base = ".".join(anchor + ([node.module] if node.module else []))
        else:
          base = node.module or ""
        # `from pkg import sub` imports the submodule; `from mod import name`, the module.
        subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
        targets = subs or [base]
      for t in targets:
        if t in modules and t != name and t != package.name:
          deps.add(t)
    graph[name] = deps
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
  """One cycle as a list of modules (first == last), or []."""
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(n: str) -> list[str]:
    state[n] = 1
    stack.append(n)
    for m in sorted(graph.get(n, ())):
      if state.get(m) == 1:
        return stack[stack.index(m):] + [m]
      if m not in state:
        found = visit(m)
        if found:
          return found
    stack.pop()
    state[n] = 2
    return []

  for n in sorted(graph):
    if n not in state:
      found = visit(n)
      if found:
        return found
  return []


def test_finder_sees_function_level_and_relative_imports(tmp_path):
  pkg = tmp_path / "pkg"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("from pkg import a\n")
  (pkg / "a.py").write_text("from pkg import b\n")
  (pkg / "b.py").write_text("def f():\n  from . import c\n  return c\n")
  (pkg / "c.py").write_text("import pkg.a\n")
  graph = import_graph(pkg)
  assert graph["pkg.b"] == {"pkg.c"}
  assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
  (pkg / "c.py").write_text("import numpy\n")
  assert find_cycle(import_graph(pkg)) == []


def test_package_has_no_import_cycle():
  graph = import_graph()
  assert "mixjax.objectives" in graph and "mixjax.adapters" in graph["mixjax.objectives"]
  assert find_cycle(graph) == [], " -> ".join(find_cycle(graph))


def test_layers():
  """amp and mixupe stand side by side: neither imports the other, nor the factory above them."""
  graph = import_graph()
  assert "mixjax.mixupe" not in graph["mixjax.amp"]
  assert "mixjax.amp" not in graph["mixjax.mixupe"]
  for low in ("mixjax.objectives", "mixjax.amp", "mixjax.mixupe", "mixjax.adapters"):
    assert "mixjax.methods" not in graph[low], low
