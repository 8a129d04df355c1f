"""The library's layers, read from its import statements (`ast`, nothing imported).

A unit is a subpackage of `cai_jax` (`cai_jax.data`, `cai_jax.evaluation`, ...) or
a top-level module (`cai_jax.records`, `cai_jax.paths`, ...). Every import counts,
also one inside a function. Two rules:
- only the stages (`cai_jax.phases`), the pipeline that runs them and the console
  command (the module `[project.scripts]` names) import `cai_jax.phases`;
- the units' import graph has no cycle, so no two packages import each other.
"""

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "cai_jax")
# Modules allowed to import the stages, besides `cai_jax.phases` itself.
STAGE_RUNNERS = {"cai_jax.pipeline"}


def _modules() -> dict[str, str]:
  """Dotted module name -> file, for every module of the package."""
  found = {}
  for directory, _, names in os.walk(PACKAGE):
    for name in names:
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        dotted = os.path.relpath(path[:-3], ROOT).replace(os.sep, ".")
        found[dotted.removesuffix(".__init__")] = path
  return found


MODULES = _modules()


def _owner(name: str) -> str | None:
  """The module of the package that `name` (a module or a name in one) lives in."""
  while name and name not in MODULES:
    name = name.rpartition(".")[0]
  return name or None


def imports(module: str) -> set[str]:
  """The package's modules that `module` imports, anywhere in its file."""
  path = MODULES[module]
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
        base = f"{parent}.{base}" if base else parent
      names = [f"{base}.{alias.name}" for alias in node.names]
    else:
      continue
    found |= {owner for name in names if (owner := _owner(name))}
  return found - {module}


def unit(module: str) -> str:
  """`cai_jax.data.sft` -> `data`; `cai_jax.records` -> `records`; `cai_jax` -> ``."""
  return module.split(".")[1] if "." in module else ""


def unit_graph() -> dict[str, set[str]]:
  """Unit -> the other units it imports (the package's `__init__` is no unit)."""
  graph = {}
  for module in MODULES:
    if unit(module):
      targets = {unit(m) for m in imports(module)} - {unit(module), ""}
      graph.setdefault(unit(module), set()).update(targets)
  return graph


def console_modules() -> set[str]:
  """The modules `pyproject.toml`'s `[project.scripts]` entries point to."""
  with open(os.path.join(ROOT, "pyproject.toml")) as f:
    text = f.read()
  section = re.search(r"^\[project\.scripts\]\n(.*?)(?=^\[|\Z)", text, re.M | re.S)
  entries = re.findall(r"=\s*[\"']([\w.]+):", section.group(1)) if section else []
  return set(entries)


def cycle(graph: dict[str, set[str]]) -> list[str]:
  """One cycle of `graph` as [a, b, ..., a], or [] when it has none (depth first)."""
  done = set()

  def visit(node, path):
    if node in path:
      return path[path.index(node):] + [node]
    if node in done:
      return []
    for target in sorted(graph.get(node, ())):
      if found := visit(target, path + [node]):
        return found
    done.add(node)
    return []

  for node in sorted(graph):
    if found := visit(node, []):
      return found
  return []


def _listing(graph: dict[str, set[str]]) -> str:
  return "\n".join(f"  {a} -> {', '.join(sorted(graph[a])) or '(nothing)'}" for a in sorted(graph))


def test_import_reader_resolves_modules_and_names():
  assert imports("cai_jax.records") >= {"cai_jax.files", "cai_jax.constitution",
                                        "cai_jax.distributed"}
  assert "cai_jax.phases.cli" in imports("cai_jax.phases.p3_sft")
  assert unit("cai_jax.data.sft") == "data" and unit("cai_jax.paths") == "paths"


def test_cycle_finds_a_planted_cycle():
  assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
  assert cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_only_stage_runners_import_the_stages():
  allowed = STAGE_RUNNERS | console_modules()
  offenders = sorted(f"{module} imports {target}"
                     for module in MODULES
                     if unit(module) != "phases" and module not in allowed
                     for target in imports(module) if unit(target) == "phases")
  assert not offenders, "library modules import a stage:\n" + "\n".join(offenders)


def test_package_import_graph_has_no_cycle():
  graph = unit_graph()
  print("cai_jax's import graph:\n" + _listing(graph))
  found = cycle(graph)
  assert not found, (f"import cycle {' -> '.join(found)}; move the shared code below both."
                     f"\nThe graph:\n{_listing(graph)}")
