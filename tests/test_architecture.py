"""The package's shape: layers import one way, no import circle, small files, no branch on an algorithm's name,
and no comment that points outside the repository.

The import graph is read with ``ast`` from the source (every ``import`` statement, including those inside
functions, except the ones under ``if TYPE_CHECKING:``), so a lazy import cannot hide a circle.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> dotted package (pipelines/ and rewards/ install as flowrl.pipelines and flowrl.rewards)
PACKAGES = {ROOT / "flowrl": "flowrl", ROOT / "pipelines": "flowrl.pipelines", ROOT / "rewards": "flowrl.rewards"}

# Which layer may import which (a layer may always import itself and every layer listed for it).
LAYERS = {
    "flowrl.core": set(),
    "flowrl.flow": {"flowrl.core"},
    "flowrl.llm": {"flowrl.core"},
    "flowrl.pipelines": {"flowrl.core", "flowrl.flow", "flowrl.llm"},
    "flowrl.rewards": {"flowrl.core", "flowrl.flow", "flowrl.llm", "flowrl.pipelines"},
    "flowrl.train": {"flowrl.core", "flowrl.flow", "flowrl.llm", "flowrl.pipelines", "flowrl.rewards", "flowrl.config",
                     "flowrl.plugins"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, pkg in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [] if rel.parts == ("__init__",) else list(rel.parts)
            if parts and parts[-1] == "__init__":
                parts = parts[:-1]
            if any(p.startswith(".") for p in parts):
                continue
            out[".".join([pkg, *parts])] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()

    def resolve(target: str) -> None:
        while target and target not in modules:  # an attribute of a module: walk up to the module
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for c in child.orelse:
                    visit(c)
                continue
            if isinstance(child, ast.Import):
                for a in child.names:
                    resolve(a.name)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                for a in child.names:
                    full = f"{mod}.{a.name}"
                    resolve(full if full in modules else mod)
            visit(child)

    visit(tree)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layer(module: str) -> str | None:
    for layer in sorted(LAYERS, key=len, reverse=True):
        if module == layer or module.startswith(layer + "."):
            return layer
    return None


def test_layers_import_one_way(graph):
    bad = []
    for mod, deps in graph.items():
        layer = _layer(mod)
        if layer is None:
            continue
        for d in deps:
            dl = _layer(d)
            if dl is not None and dl != layer and dl not in LAYERS[layer]:
                bad.append(f"{mod} -> {d}")
            if dl is None and d in ("flowrl.cli",) and layer is not None:
                bad.append(f"{mod} -> {d}")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a circle of imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    import sys

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    try:
        for v in graph:
            if v not in index:
                strong(v)
    finally:
        sys.setrecursionlimit(limit)
    return out


def test_no_import_circle(graph):
    assert _cycles(graph) == []


def test_the_circle_check_sees_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_lazy_imports_are_seen(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import flowrl.x\n"
                   "def f():\n    from flowrl.y import z\n")
    mods = {"flowrl.m": src, "flowrl.x": src, "flowrl.y": src}
    assert _imports("flowrl.m", src, mods) == {"flowrl.y"}


def test_no_python_file_over_500_lines():
    long = []
    for folder in ("flowrl", "pipelines", "rewards", "scripts", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            n = len(path.read_text().splitlines())
            if n > 500:
                long.append(f"{path.relative_to(ROOT)}: {n} lines")
    assert not long, "split these files:\n" + "\n".join(long)


def test_no_branch_on_an_algorithm_name():
    hits = []
    for path in (ROOT / "flowrl" / "train").rglob("*.py"):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"algorithm\s*(==|!=|in\s*[\(\[{])", line) or re.search(r"\bFLOW_ALGORITHMS\b|\bLLM_ALGORITHMS\b", line):
                hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)


# Words that point outside the repository: an issue tracker, the shared folder, notes nobody ships.
_OUTSIDE = re.compile(r"\bissue\s*#?\d|\bshared/|design\.md|\bseed papers?\b|\bthe notes\b|\bsession \d", re.I)


def test_no_comment_points_outside_the_repository():
    hits = []
    for folder in ("flowrl", "pipelines", "rewards", "scripts", "configs"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix not in (".py", ".yaml", ".c") or not path.is_file():
                continue
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if _OUTSIDE.search(line):
                    hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)
