"""The package walls: no import circle among privcode's modules.

Every `import` / `from ... import` of every module under privcode/ counts -- at module level and inside
functions (a lazy import still makes two modules depend on each other) -- when it names a privcode module
(`from privcode.sandbox import cgroup` is an arrow to privcode.sandbox.cgroup, `from privcode.sandbox
import get_backend` one to the package privcode.sandbox). The graph of those arrows must have no cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "privcode"


def modules(root: Path = ROOT) -> dict[str, tuple[Path, bool]]:
    """{dotted name: (file, is a package)} of every module under `root`."""
    out = {}
    for p in sorted(root.rglob("*.py")):
        parts = list(p.relative_to(root.parent).with_suffix("").parts)
        pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if pkg else parts)] = (p, pkg)
    return out


def import_graph(mods: dict[str, tuple[Path, bool]]) -> dict[str, set[str]]:
    """{module: the privcode modules it imports anywhere in its file}."""
    def known(name: str) -> str | None:  # the longest prefix that is a module ('privcode.x.attr' -> 'privcode.x')
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, (path, pkg) in mods.items():
        here = name if pkg else name.rpartition(".")[0]
        arrows = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                arrows |= {known(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x, from ..y import z
                    up = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                if base.split(".")[0] != "privcode":
                    continue
                arrows |= {f"{base}.{a.name}" if f"{base}.{a.name}" in mods else known(base) for a in node.names}
        graph[name] = {a for a in arrows if a and a != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_circle(tmp_path):
    pkg = tmp_path / "privcode"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("def make():\n    from privcode.sub import impl\n")
    (pkg / "sub" / "base.py").write_text("X = 1\n")
    (pkg / "sub" / "impl.py").write_text("from . import base\nfrom privcode.sub import make\n")
    (pkg / "leaf.py").write_text("import privcode.sub.base\n")
    g = import_graph(modules(pkg))
    assert g["privcode.leaf"] == {"privcode.sub.base"}
    assert g["privcode.sub.impl"] == {"privcode.sub.base", "privcode.sub"}
    assert cycles(g) == [["privcode.sub", "privcode.sub.impl"]]  # only through the function-level import
    (pkg / "sub" / "impl.py").write_text("from . import base\n")
    assert cycles(import_graph(modules(pkg))) == []


def test_no_import_circle():
    graph = import_graph(modules())
    assert "privcode.cli" in graph and len(graph) > 50
    found = cycles(graph)
    lines = [" <-> ".join(c) + "\n    " + "\n    ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c)
             for c in found]
    assert not found, "import circles among privcode's modules:\n" + "\n".join(lines)
