"""The package boundaries (docs/architecture.md): no import cycle between project modules, counting imports inside
functions too (they hide cycles from the interpreter, not from a reader), and the layering mtl <- mtrec, mtrl;
serving <- mtrec, mtrl (mtl imports no other package of the project; serving imports neither mtrec nor mtrl);
library modules never import a command-line module (a package's ``cli``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mtl", "mtrec", "mtrl", "serving")
# package -> the project packages it must not import
FORBIDDEN = {"mtl": {"mtrec", "mtrl", "serving"}, "serving": {"mtrec", "mtrl"}}


def project_modules() -> dict[str, Path]:
    """``{dotted name: file}`` of every module of the four packages (a package is its ``__init__``)."""
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The most specific project module ``name`` refers to (``a.b.c`` -> ``a.b`` when ``c`` is an attribute)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    """``{module: {imported module: first line}}`` over every ``import`` statement anywhere in the module."""
    graph: dict[str, dict[str, int]] = {}
    for mod, path in modules.items():
        edges: dict[str, int] = {}
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    source = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    source = node.module or ""
                names = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
            else:
                continue
            for name in names:
                target = _resolve(name, modules)
                if target is not None and target != mod:
                    edges.setdefault(target, node.lineno)
        graph[mod] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(graph[w])))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def _is_cli(mod: str) -> bool:
    parts = mod.split(".")
    return len(parts) >= 2 and parts[1] == "cli"


GRAPH = import_graph(project_modules())


def _where(a: str, b: str) -> str:
    return f"{project_modules()[a].relative_to(ROOT)}:{GRAPH[a][b]} imports {b}"


def test_the_walker_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    """The walker itself, on a made-up package with a cycle hidden inside a function and a relative import."""
    mods = {"p": tmp_path / "__init__.py", "p.a": tmp_path / "a.py", "p.b": tmp_path / "b.py", "p.c": tmp_path / "c.py"}
    mods["p"].write_text("")
    mods["p.a"].write_text("from p.b import f\n")
    mods["p.b"].write_text("def f():\n    from . import a\n    return a\n")
    mods["p.c"].write_text("import p.a\n")
    graph = import_graph(mods)
    assert graph["p.b"] == {"p.a": 2} and graph["p.c"] == {"p.a": 1}
    assert cycles(graph) == [["p.a", "p.b"]]


def test_no_import_cycles() -> None:
    found = cycles(GRAPH)
    details = []
    for comp in found:
        details += [_where(a, b) for a in comp for b in GRAPH[a] if b in comp]
    assert not found, "import cycles:\n  " + "\n  ".join(details)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layering(package: str) -> None:
    bad = [_where(a, b) for a in GRAPH if a.split(".")[0] == package for b in GRAPH[a]
           if b.split(".")[0] in FORBIDDEN[package]]  # fmt: skip
    assert not bad, f"{package} must not import {sorted(FORBIDDEN[package])}:\n  " + "\n  ".join(bad)


def test_library_modules_never_import_a_command_line_module() -> None:
    bad = [_where(a, b) for a in GRAPH if not _is_cli(a) for b in GRAPH[a] if _is_cli(b)]
    assert not bad, "library modules import command-line modules:\n  " + "\n  ".join(bad)
