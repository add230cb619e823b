"""Data flows one way: text -> AST -> Spec -> SignalGraph -> Plan -> runtime. Checked on the source (every
import, at module level or inside a function), so a lazy import cannot hide a wrong-way edge or a circle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gkdlang", "planner", "runtime", "gkdc")
#: gkdlang's front end: what turns text into a Spec (the runtime reads a checked Spec, never text)
FRONT_END = ("gkdlang.parser", "gkdlang.lower", "gkdlang.fmt", "gkdlang.ast", "lark")
MAX_LINES = 800
#: modules known to be over the limit, each with why; the test fails if one gets under it (then drop it here)
OVER_LIMIT = {
}


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(name: str, root: Path) -> str:
    """The deepest project module or package that ``name`` (a module or ``module.attribute``) names."""
    parts = name.split(".")
    while parts:
        base = root.joinpath(*parts)
        if base.with_suffix(".py").exists() or (base / "__init__.py").exists():
            return ".".join(parts)
        parts.pop()
    return name


def _imports(path: Path, root: Path = ROOT) -> set[str]:
    out: set[str] = set()
    mod = _module_name(path, root)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(_resolve(a.name, root) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            out.update(_resolve(f"{base}.{a.name}", root) for a in node.names)
    return out


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


@pytest.fixture(scope="module")
def graph() -> nx.DiGraph:
    g = nx.DiGraph()
    for path in _sources():
        mod = _module_name(path)
        g.add_node(mod)
        for target in _imports(path):
            if target != mod:
                g.add_edge(mod, target)
    return g


def _within(mod: str, prefixes) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


RULES = [
    ("gkdlang", ("planner", "runtime", "gkdc"), "the language knows nothing of planning or running"),
    ("planner", ("runtime", "gkdc"), "the planner reads a Spec, never the runtime"),
    ("runtime", FRONT_END + ("gkdc",), "the runtime reads a Plan (with its checked Spec), never spec text"),
]


@pytest.mark.parametrize("layer, forbidden, why", RULES, ids=[r[0] for r in RULES])
def test_no_import_against_the_flow(graph, layer, forbidden, why):
    wrong = sorted(f"{a} imports {b}" for a, b in graph.edges if _within(a, (layer,)) and _within(b, forbidden))
    assert not wrong, f"{why}: {wrong}"


def test_no_import_circles(graph):
    ours = graph.subgraph(n for n in graph if _within(n, PACKAGES))
    cycles = [" -> ".join(c + [c[0]]) for c in nx.simple_cycles(ours)]
    assert not cycles, cycles


def test_no_module_over_the_size_limit():
    long = {str(p.relative_to(ROOT)): n for p in _sources() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert set(long) == set(OVER_LIMIT), f"modules over {MAX_LINES} lines: {long}; known: {sorted(OVER_LIMIT)}"


#: runtime modules with a collective outside runtime/engine.py, each with why
COLLECTIVES_ELSEWHERE = {
    "runtime/contrastive_losses.py": "nce(gather: true) gathers negatives from every rank inside the loss's autograd",
}


def test_collectives_only_in_the_engine():
    call = re.compile(r"\b(?:dist|ds_comm)\.(?:all_reduce|all_gather\w*|barrier|broadcast\w*|reduce_scatter\w*|"
                      r"gather|scatter|send|recv)\(")
    found = {str(p.relative_to(ROOT)) for p in (ROOT / "runtime").rglob("*.py")
             if p.name != "engine.py" and call.search(p.read_text(encoding="utf-8"))}
    assert found == set(COLLECTIVES_ELSEWHERE), f"collectives outside runtime/engine.py: {sorted(found)}"


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    """A function-level import and a relative one are edges too (a check that cannot fail proves nothing)."""
    for pkg in ("gkdlang", "planner"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "planner" / "plan.py").write_text("")
    (tmp_path / "gkdlang" / "other.py").write_text("")
    (tmp_path / "gkdlang" / "lazy.py").write_text("def f():\n    from planner.plan import Plan\n    from . import other\n")
    assert _imports(tmp_path / "gkdlang" / "lazy.py", tmp_path) == {"planner.plan", "gkdlang.other"}
