"""Tier 1: djinn/server has no import cycle. The import graph is read from the source (every `import` and
`from ... import`, inside functions too; `if TYPE_CHECKING:` blocks excluded, they never run), so a
cycle that a function-level import hides from the interpreter still fails here."""
from __future__ import annotations

import ast
from pathlib import Path

import djinn.server

ROOT = Path(djinn.server.__file__).parent
PACKAGE = "djinn.server"


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a subpackage is its __init__)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = (PACKAGE, *path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the nodes under `if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skip.update(id(n) for n in ast.walk(child))
    return skip


def _imported(name: str, path: Path, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The dotted names an import statement in module `name` may load."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        base = ".".join(package[:len(package) - node.level + 1])
        base = f"{base}.{node.module}" if node.module else base
    else:
        base = node.module
    return [base] + [f"{base}.{a.name}" for a in node.names]


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of djinn.server it imports, the packages a submodule import runs included."""
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_checking_only(tree)
        for node in ast.walk(tree):
            if id(node) in skip or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _imported(name, path, node):
                parts = target.split(".")
                for i in range(2, len(parts) + 1):  # the target and every package above it
                    t = ".".join(parts[:i])
                    if t in mods and t != name:
                        graph[name].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(graph, WHITE)
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        color[v] = GREY
        stack.append(v)
        for w in sorted(graph[v]):
            if color[w] == GREY:
                return stack[stack.index(w):] + [w]
            if color[w] == WHITE:
                found = visit(w)
                if found:
                    return found
        stack.pop()
        color[v] = BLACK
        return None

    for v in sorted(graph):
        if color[v] == WHITE:
            found = visit(v)
            if found:
                return found
    return None


def test_the_graph_sees_function_level_imports():
    graph = import_graph()
    assert "djinn.server.engine" in graph and "djinn.server.dispatch" in graph["djinn.server.engine"]
    # sessions imports paged_cache only inside a function
    assert any(t.endswith(".paged_cache") for t in graph["djinn.server.sessions"])


def test_find_cycle_reports_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_server_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle in djinn/server: " + " -> ".join(c.removeprefix(PACKAGE + ".") for c in cycle)
