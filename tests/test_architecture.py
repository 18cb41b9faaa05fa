"""The package's import arrows run one way (docs/modules.md): no test runs code, each reads source.

Layers, bottom to top: `puzzlelib.core` (config, run directory, model and checkpoint format, data,
training loop), then one package per stage in pipeline order (`parent` 00 ... `evaluation` 06), then
the runner / command line (`runner`, `student`, `overview`, `__main__`). A module may import its own
layer and the layers below it; a stage may import an *earlier* stage (to read that stage's
artifacts through its public loader), never a later one. Checked here from the source (ast, no
import), function-level and TYPE_CHECKING imports included:
  * no import cycle between modules;
  * no upward import (core -> stage, stage -> later stage, anything -> runner layer);
  * no private name (`_x`) imported from, or read off, another module;
  * no re-export: every `from puzzlelib.M import name` (package, tests, benchmarks, notebooks)
    names something *defined* in M, and a module imports no puzzlelib name it does not use.
`ALLOWED` lists the violations still left (each with why); a listed one that no longer occurs
fails too, so the list only shrinks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parent.parent
PKG = REPO / "puzzlelib"
STAGE_ORDER = ("parent", "profiling", "bld", "scoring", "search", "gkd", "evaluation")
TOP = ("puzzlelib", "puzzlelib.__main__", "puzzlelib.runner", "puzzlelib.progress", "puzzlelib.student",
       "puzzlelib.overview")

# Violations still left, as (rule, module, what). Empty is the goal; an entry that no longer
# occurs is an error (remove it).
ALLOWED: set[tuple[str, str, str]] = {
    # modeling_decilm.py is copied verbatim into every exported checkpoint (trust_remote_code);
    # its `__all__` names the config classes so that copy works alone, and it must not change.
    ("re-export", "puzzlelib.core.modeling_decilm", "puzzlelib.core.configuration_decilm.DeciLMConfig"),
    ("re-export", "puzzlelib.core.modeling_decilm", "puzzlelib.core.configuration_decilm.PuzzleConfig"),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def layer(mod: str) -> tuple[int, str]:
    """(rank, layer name): core 0, stage k k+1, the runner layer 99."""
    if mod in TOP:
        return 99, "runner"
    part = mod.split(".")[1]
    if part == "core":
        return 0, "core"
    assert part in STAGE_ORDER, f"{mod} is in no layer: put it in core/, a stage package, or TOP"
    return STAGE_ORDER.index(part) + 1, part


def resolve(mod: str, node: ast.ImportFrom, is_pkg: bool) -> str:
    """The absolute module an ImportFrom reads from."""
    if not node.level:
        return node.module or ""
    base = mod.split(".")
    base = base[: len(base) - node.level + (1 if is_pkg else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def defined_names(path: Path) -> set[str]:
    """Top-level names a module defines itself (not the ones it imports)."""
    out: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                out |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.If, ast.Try)):  # e.g. a fallback definition
            for sub in ast.walk(node):
                if isinstance(sub, (ast.FunctionDef, ast.ClassDef)):
                    out.add(sub.name)
                elif isinstance(sub, ast.Assign):
                    out |= {n.id for t in sub.targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return out


class Imports:
    """Every puzzlelib import of one source text: edges, names taken, names left unused."""

    def __init__(self, mod: str, source: str, is_pkg: bool = False):
        self.mod, self.targets, self.names, self.private_attrs = mod, set(), [], []
        self.type_only: set[str] = set()  # targets imported only under `if TYPE_CHECKING:`
        tree = ast.parse(source)
        typing_nodes = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                        and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING"
                        for n in ast.walk(node)}
        runtime: set[str] = set()
        bound: dict[str, str] = {}  # local name -> the puzzlelib module it is
        imported_names: dict[str, tuple[str, str]] = {}  # local -> (module, name)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                src = resolve(mod, node, is_pkg)
                if not src.startswith("puzzlelib"):
                    continue
                for a in node.names:
                    sub = f"{src}.{a.name}"
                    target = sub if sub in MODULES else src  # `from puzzlelib.bld import stage`
                    self.targets.add(target)
                    if id(node) not in typing_nodes:
                        runtime.add(target)
                    if sub in MODULES:
                        bound[a.asname or a.name] = sub
                    else:
                        self.names.append((src, a.name))
                        imported_names[a.asname or a.name] = (src, a.name)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("puzzlelib"):
                        self.targets.add(a.name)
                        runtime.add(a.name)
                        if a.asname:
                            bound[a.asname] = a.name
        self.type_only = self.targets - runtime
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        self.unused = sorted(f"{m}.{n}" for local, (m, n) in imported_names.items()
                             if local not in used)
        # `__all__` naming an imported name re-exports it just the same
        self.unused += sorted(f"{m}.{n}" for local, (m, n) in imported_names.items()
                              if local in used and _in_all(tree, local))
        for n in ast.walk(tree):
            if (isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                    and n.value.id in bound and n.attr.startswith("_")
                    and not n.attr.startswith("__")):
                self.private_attrs.append((bound[n.value.id], n.attr))
            if (isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                    and n.value.id in bound):
                self.names.append((bound[n.value.id], n.attr))


def _in_all(tree: ast.Module, name: str) -> bool:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__"
                                                for t in node.targets):
            return name in ast.literal_eval(node.value)
    return False


@pytest.fixture(scope="module")
def graph() -> dict[str, Imports]:
    return {m: Imports(m, p.read_text(encoding="utf-8"), p.name == "__init__.py")
            for m, p in MODULES.items()}


def _violations(graph) -> set[tuple[str, str, str]]:
    found = set()
    for mod, imp in graph.items():
        rank, name = layer(mod)
        for t in imp.targets:
            if t not in MODULES and t != "puzzlelib":
                found.add(("missing", mod, t))
                continue
            trank, tname = layer(t)
            if trank > rank or (rank not in (0, 99) and trank == rank and tname != name) or (
                    rank == 0 and trank != 0):
                found.add(("upward", mod, t))
        for src, n in imp.names:
            if src in MODULES and n.startswith("_") and not n.startswith("__") and src != mod:
                found.add(("private", mod, f"{src}.{n}"))
            if src in MODULES and not n.startswith("__") and n not in _DEFINED[src] \
                    and f"{src}.{n}" not in MODULES:
                found.add(("not-defined-there", mod, f"{src}.{n}"))
        for src, n in imp.private_attrs:
            found.add(("private", mod, f"{src}.{n}"))
        for u in imp.unused:
            found.add(("re-export", mod, u))
    # Type-only imports (`if TYPE_CHECKING:`) run nothing, so they cannot form a cycle at import
    # time; an edge ALLOWED as upward or as a cycle edge is left out of the search too, so each
    # remaining exception is listed once, as the edge it is.
    allowed_edges = {(a, b) for rule, a, b in ALLOWED if rule in ("upward", "cycle-edge")}
    edges = {m: {t for t in i.targets - i.type_only
                 if t in MODULES and t != m and (m, t) not in allowed_edges}
             for m, i in graph.items()}
    for cycle in _cycles(edges):
        found.add(("cycle", cycle[0], " -> ".join(cycle)))
    found |= {("cycle-edge", a, b) for rule, a, b in ALLOWED
              if rule == "cycle-edge" and b in graph.get(a, _NO_IMPORTS).targets}
    return found


_DEFINED = {m: defined_names(p) for m, p in MODULES.items()}
_NO_IMPORTS = Imports("nothing", "")


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_imports_run_one_way(graph):
    found = _violations(graph)
    new = sorted(found - ALLOWED)
    assert not new, "import-layer violations (docs/modules.md says which way arrows run):\n  " + \
        "\n  ".join(" | ".join(v) for v in new)
    stale = sorted(ALLOWED - found)
    assert not stale, "fixed, remove from ALLOWED:\n  " + "\n  ".join(" | ".join(v) for v in stale)


def test_every_module_is_in_a_layer():
    for m in MODULES:
        layer(m)


def test_the_checks_catch_what_they_claim():
    """Each rule fires on a small made-up module (the checker is not vacuous)."""
    up = Imports("puzzlelib.core.data", "from ..search.mip import Budget\nBudget\n")
    assert ("upward", "puzzlelib.core.data", "puzzlelib.search.mip") in _violations(
        {"puzzlelib.core.data": up})
    sideways = Imports("puzzlelib.bld.stage", "from ..gkd import stage\nstage.run\n")
    assert ("upward", "puzzlelib.bld.stage", "puzzlelib.gkd.stage") in _violations(
        {"puzzlelib.bld.stage": sideways})
    priv = Imports("puzzlelib.search.stage", "from ..core.rundir import _x\n_x\n")
    assert ("private", "puzzlelib.search.stage", "puzzlelib.core.rundir._x") in _violations(
        {"puzzlelib.search.stage": priv})
    attr = Imports("puzzlelib.search.stage", "from ..core import rundir\nrundir._y()\n")
    assert ("private", "puzzlelib.search.stage", "puzzlelib.core.rundir._y") in _violations(
        {"puzzlelib.search.stage": attr})
    reexp = Imports("puzzlelib.search.stage", "from .mip import Budget  # noqa: F401\n")
    assert ("re-export", "puzzlelib.search.stage", "puzzlelib.search.mip.Budget") in _violations(
        {"puzzlelib.search.stage": reexp})
    listed = Imports("puzzlelib.search.stage", "from .mip import Budget\n__all__ = ['Budget']\n")
    assert ("re-export", "puzzlelib.search.stage", "puzzlelib.search.mip.Budget") in _violations(
        {"puzzlelib.search.stage": listed})
    via = Imports("puzzlelib.gkd.stage", "from ..core.config import atomic_write_json\n"
                  "atomic_write_json\n")
    assert ("not-defined-there", "puzzlelib.gkd.stage",
            "puzzlelib.core.config.atomic_write_json") in _violations({"puzzlelib.gkd.stage": via})
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    typed = Imports("puzzlelib.core.validation", "from typing import TYPE_CHECKING\n"
                    "if TYPE_CHECKING:\n    from .config import RunConfig\n")
    assert typed.type_only == {"puzzlelib.core.config"}


# ---- tests, benchmarks and notebooks import each name from the module that defines it ----------
def _outside_sources():
    for p in sorted([*(REPO / "tests").glob("*.py"), *(REPO / "benchmarks").glob("*.py")]):
        yield p.relative_to(REPO).as_posix(), p.read_text(encoding="utf-8")
    for p in sorted((REPO / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(p, as_version=4)
        code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        # IPython magics and shell lines are not Python
        code = "\n".join("" if ln.lstrip().startswith(("%", "!")) else ln for ln in code.split("\n"))
        yield p.relative_to(REPO).as_posix(), code


@pytest.mark.parametrize("where,source", list(_outside_sources()),
                         ids=[w for w, _ in _outside_sources()])
def test_names_come_from_their_defining_module(where, source):
    """`from puzzlelib.M import x` and `M.x` (M bound by `from puzzlelib.P import M as m`) in a
    test, benchmark or notebook name something M itself defines, not a re-export."""
    imp = Imports("outside", source)
    wrong = sorted({f"{src}.{n}" for src, n in imp.names
                    if src in MODULES and not n.startswith("__") and n not in _DEFINED[src]
                    and f"{src}.{n}" not in MODULES})
    missing = sorted(t for t in imp.targets if t not in MODULES and t != "puzzlelib")
    assert not missing, f"{where} imports modules that do not exist: {missing}"
    assert not wrong, f"{where} uses names their module does not define (import them from " \
        f"where they are defined, see docs/modules.md): {wrong}"
