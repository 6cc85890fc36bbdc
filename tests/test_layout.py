"""The package layout of docs/development.md holds: imports point down its table, no module
imports itself back through others (not even inside a function or for annotations only), and
no module grows past ~500 lines."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "pldr"
LEAVES = {"errors", "config", "devices", "files", "_version"}
# room -> the rooms it may import (docs/development.md, the layout table); leaves may import errors only
ALLOWED = {
    "leaf": {"errors"},
    "model": LEAVES,
    "checkpoint": LEAVES | {"model"},
    "data": LEAVES,
    "inference": LEAVES | {"model", "checkpoint"},
    "training": LEAVES | {"model", "checkpoint", "data"},
    "analysis": LEAVES | {"model", "inference", "data", "checkpoint"},
    "integrations": LEAVES | {"model", "checkpoint", "inference", "data"},
    "serve": LEAVES | {"inference", "checkpoint", "data"},
    "finetune": LEAVES | {"model", "checkpoint", "data", "training"},
    "hf": {"integrations"},  # pldr/hf.py: `import pldr.hf` names pldr.integrations.hf
    "lm_eval": {"integrations"},  # pldr/lm_eval.py: `import pldr.lm_eval` registers the model
}
MAX_LINES = 520


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, top_level_only: bool, typing: bool = False) -> set[str]:
    """The pldr modules `path` imports (relative imports resolved); with `typing`, also
    those imported for annotations only (under `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text())
    pkg = module_name(path).split(".")
    if path.name != "__init__.py":
        pkg = pkg[:-1]
    typing_only = set() if typing else {
        id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
        and "TYPE_CHECKING" in ast.unparse(block.test) for n in ast.walk(block)}
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if id(node) in typing_only:
            continue  # annotations only: not an import at run time
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("pldr"):
                found.add(mod)
                found.update(f"{mod}.{a.name}" for a in node.names)  # `from . import x`
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("pldr"))
    return found


def room(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # pldr/__init__ re-exports everything
    return "leaf" if parts[1] in LEAVES else parts[1]


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in SRC.rglob("*.py")}


def test_imports_point_down_the_design_table():
    modules = all_modules()
    wrong = []
    for name, path in modules.items():
        here = room(name)
        if here is None or here in ("cli", "bench") or name == "pldr.__main__":
            continue
        for target in imports_of(path, top_level_only=False):
            if target not in modules:
                continue  # `from .x import name` also lists x.name
            there = room(target)
            if there is None:
                wrong.append(f"{name} imports the top-level pldr package")
                continue
            # a leaf is allowed by its own name (config may import errors, nothing else)
            there_name = target.split(".")[1] if there == "leaf" else there
            if there_name != (name.split(".")[1] if here == "leaf" else here) \
                    and there_name not in ALLOWED[here]:
                wrong.append(f"{name} -> {target}")
    assert not wrong, "imports that DESIGN.md's table forbids:\n" + "\n".join(sorted(wrong))


def import_graph() -> dict[str, set[str]]:
    """Module -> the pldr modules importing it runs: every import statement, at the top, in
    a function or for annotations only, and the packages above each target (importing
    pldr.a.b runs pldr.a's __init__ first). A module's own packages are left out: they are
    always initialised before it."""
    modules = all_modules()
    graph = {}
    for name, path in modules.items():
        own = {".".join(name.split(".")[:k]) for k in range(1, name.count(".") + 2)}
        targets = set()
        for t in imports_of(path, top_level_only=False, typing=True):
            parts = t.split(".")
            targets.update(a for k in range(2, len(parts) + 1)
                           if (a := ".".join(parts[:k])) in modules)
        graph[name] = targets - own
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state and (found := visit(name)):
            return found
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_sees_cycles_through_functions_and_packages(tmp_path, monkeypatch):
    # what the walker reports for a function-level and an annotation-only import
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path / "pldr")
    f = tmp_path / "pldr" / "m.py"
    f.parent.mkdir()
    f.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pldr.a import X\n"
                 "def g():\n    from pldr.b import y\n")
    assert imports_of(f, top_level_only=False, typing=True) >= {"pldr.a", "pldr.b"}
    assert "pldr.a" not in imports_of(f, top_level_only=False)
    assert find_cycle({"x": {"y"}, "y": {"z"}, "z": {"x"}}) == ["x", "y", "z", "x"]
    assert find_cycle({"x": {"y"}, "y": {"z"}, "z": set()}) is None
    monkeypatch.undo()
    graph = import_graph()  # package inits count: pldr.model runs pldr.model.model
    assert "pldr.model.model" in graph["pldr.model"]
    assert "pldr.model" not in graph["pldr.model.model"]


def test_no_module_is_too_long():
    long = {name: n for name, path in all_modules().items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_checker_sees_a_forbidden_arrow(tmp_path):
    # the walker resolves relative imports, including ones inside functions
    f = SRC / "model" / "model.py"
    assert "pldr.model.pretrained" in imports_of(f, top_level_only=False)
    assert room("pldr.model.model") == "model" and room("pldr.errors") == "leaf"
    assert "data" not in ALLOWED["model"]


def test_test_module_names_are_unique():
    """pytest imports test modules by their file name (tests/ has no __init__.py files), so two
    test files of one name in different folders stop the whole run at collection."""
    tests = Path(__file__).resolve().parent
    names = [p.name for p in tests.rglob("test_*.py")]
    assert len(names) == len(set(names)), sorted(n for n in set(names) if names.count(n) > 1)
