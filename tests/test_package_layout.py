"""The package's shape: no import cycle between its modules (imports inside functions count too: a lazy import
is still a dependency), and the bottom modules import nothing above them."""
from __future__ import annotations

import ast
from pathlib import Path

import dynsnap_core

PKG = Path(dynsnap_core.__file__).parent
#: Modules every other module may import; each imports nothing from dynsnap_core but the modules listed with it.
BOTTOM = {"errors": set(), "config": set(), "formats": set(), "durable": set(), "units": set(), "_version": set(),
          "hugepages": set(), "_lib": set(), "once": set(), "unixsock": {"config"}}


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts)
        is_pkg = p.name == "__init__.py"
        if is_pkg:
            name = name[: -len(".__init__")]
        out[name] = (p, is_pkg)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()

    def known(name: str) -> str:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {}
    for name, (path, is_pkg) in mods.items():
        here = name.split(".") if is_pkg else name.split(".")[:-1]
        tree = ast.parse(path.read_text())
        typing_only = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                for stmt in node.body:
                    typing_only.update(id(x) for x in ast.walk(stmt))
        deps: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[: len(here) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not target.startswith("dynsnap_core"):
                    continue
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    deps.add(full if full in mods else known(target))
            elif isinstance(node, ast.Import):
                deps.update(known(a.name) for a in node.names if a.name.startswith("dynsnap_core"))
        deps.discard(name)
        deps.discard("")
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
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


def test_graph_sees_imports():
    g = _graph()
    assert "dynsnap_core.errors" in g["dynsnap_core.criu"]
    assert "dynsnap_core.snapshot.manifest" in g["dynsnap_core.snapshot.restore"]
    assert "dynsnap_core.cuda" in g["dynsnap_core.snapshot.checkpoint"]        # a function-level import counts
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_bottom_modules_import_nothing_above_them():
    g = _graph()
    for mod, allowed in BOTTOM.items():
        deps = {d.removeprefix("dynsnap_core.") for d in g[f"dynsnap_core.{mod}"]}
        assert deps <= allowed, f"{mod} imports {sorted(deps - allowed)}"


def test_library_does_not_import_presentation():
    """bench/, demo/ and cli/ sit on top: no library module imports them."""
    g = _graph()
    top = ("dynsnap_core.bench", "dynsnap_core.demo", "dynsnap_core.cli")
    for mod, deps in g.items():
        if mod.startswith(top) or mod.startswith("dynsnap_core.agent") or mod.endswith(".cli"):
            continue
        bad = sorted(d for d in deps if d.startswith(top))
        assert bad == [], f"{mod} imports {bad}"


def test_benches_do_not_reach_into_tests():
    import re
    root = PKG.parent
    for p in sorted((root / "benches").glob("*.py")):
        code = [line.split("#")[0] for line in p.read_text().splitlines() if "sys.path" in line]
        assert not any(re.search(r"[\"'/]tests[\"'/]", line) for line in code), f"{p.name} adds tests/ to sys.path"
