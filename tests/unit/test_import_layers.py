"""The package's import graph is layered and acyclic, deferred imports included.

Every ``import`` between files of ``titanax/`` counts, wherever it sits (module level, inside a
function, under ``TYPE_CHECKING``): an import hidden in a function to dodge a cycle is still the
cycle. Each file belongs to a layer (its subpackage, or itself for a top-level module) and may
import only from its own layer or the ones below it; within a layer, files import each other
without a cycle. The order is the one the README's "Layout" section documents.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2] / "titanax"

# Lowest first. A layer may import from itself and from every layer before it.
LAYERS = (
    "version", "exceptions", "units", "html",
    "runtime", "launch",
    "nn", "optim",
    "parallel", "profiling",
    "data", "io", "logging",
    "exec",
    "config",
    "planner",
    "<package>",  # titanax/__init__.py re-exports the public surface
    "cli",
)
# The CLI may defer heavy imports to keep `titanax --help` fast; deferring changes no arrow here.


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ("titanax",) + path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The titanax modules an import statement loads, resolved to files."""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    names = []
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            parts = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(parts + ([base] if base else []))
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                 for alias in node.names]
    found = []
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.append(name)
    return found


def _graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[module] = {t for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                         for t in _targets(module, node)}
    return graph


GRAPH = _graph()


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "<package>"
    return parts[1]


def test_every_file_has_a_layer():
    unknown = sorted({_layer(m) for m in MODULES} - set(LAYERS))
    assert not unknown, f"add these to LAYERS (and to the README's Layout): {unknown}"


def test_imports_go_down_the_layers():
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = sorted(f"{m} -> {t}" for m, targets in GRAPH.items() for t in targets
                    if rank[_layer(t)] > rank[_layer(m)])
    assert not upward, "imports reaching up a layer:\n" + "\n".join(upward)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one file (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycle_between_files():
    cycles = _cycles(GRAPH)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_cycle_finder_finds_a_cycle():
    # the check above must be able to fail
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_over_500_lines():
    sizes = {str(path.relative_to(ROOT)): len(path.read_text().splitlines()) for path in MODULES.values()}
    over = {name: n for name, n in sorted(sizes.items()) if n > 500}
    assert not over, f"modules over 500 lines (split them by concept): {over}"
