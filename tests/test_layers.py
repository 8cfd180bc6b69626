"""The package's layers, read from its imports (every import, also those inside functions):

    core modules -> evidence / inference / index (and bundle) -> offline -> daemon / cli

A module imports only from its own layer or below, and no chain of imports comes back to
where it started. The imports are parsed with ast, nothing is imported or run.
"""

from __future__ import annotations

import ast
from pathlib import Path

from xtalsym.testing import REPO_ROOT

PACKAGE = REPO_ROOT / "xtalsym"

# Sub-packages by layer; a top-level module is core (0) unless named here.
PACKAGE_LAYERS = {"evidence": 1, "inference": 1, "index": 1, "offline": 2, "daemon": 3, "cli": 3}
MODULE_LAYERS = {
    "bundle": 1,  # packages what inference exports (ONNX, int8) with the index
    "testing": 3,  # harnesses that start daemons
    "__main__": 3,
}
LAYER_NAMES = ("core", "evidence/inference/index", "offline", "daemon/cli")


def module_name(path: Path, top: Path = REPO_ROOT) -> str:
    parts = list(path.relative_to(top).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return 0  # the package's own __init__
    if parts[1] in PACKAGE_LAYERS:
        return PACKAGE_LAYERS[parts[1]]
    if (PACKAGE / parts[1]).is_dir():
        raise AssertionError(f"xtalsym/{parts[1]}/ has no layer: add it to PACKAGE_LAYERS in {__file__}")
    return MODULE_LAYERS.get(parts[1], 0)


def imports_of(source: str, name: str, is_package: bool, modules: set[str]) -> set[str]:
    """The xtalsym modules one file imports: ``from a.b import c`` names the module a.b.c
    when it is one, else a.b (whose ``__init__`` defines c)."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target not in modules and "." in target:
                target = target.rpartition(".")[0]
            if target in modules and target != name:
                found.add(target)
    return found


def import_graph(top: Path = REPO_ROOT) -> dict[str, set[str]]:
    """Module -> the xtalsym modules it imports, for the package xtalsym/ under ``top``."""
    files = {module_name(p, top): p for p in sorted((top / "xtalsym").rglob("*.py"))}
    return {n: imports_of(p.read_text(), n, p.name == "__init__.py", set(files)) for n, p in files.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{m} ({LAYER_NAMES[layer_of(m)]}) imports {t} ({LAYER_NAMES[layer_of(t)]})"
        for m, targets in sorted(graph.items())
        for t in sorted(targets)
        if layer_of(t) > layer_of(m)
    ]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_module_imports_a_higher_layer():
    upward = upward_imports(import_graph())
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_checks_see_an_upward_import_and_a_cycle(tmp_path):
    """The parser on a made-up package: a core module importing offline, and a cycle."""
    pkg = tmp_path / "xtalsym"
    (pkg / "offline").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "offline" / "__init__.py").write_text("")
    (pkg / "offline" / "dataset.py").write_text("from . import reader\n")
    (pkg / "offline" / "reader.py").write_text("def f():\n    from xtalsym.offline import dataset\n")
    (pkg / "core.py").write_text("def g():\n    from xtalsym.offline.dataset import thing\n")
    graph = import_graph(tmp_path)
    assert upward_imports(graph) == ["xtalsym.core (core) imports xtalsym.offline.dataset (offline)"]
    assert cycles(graph) == [["xtalsym.offline.dataset", "xtalsym.offline.reader"]]
