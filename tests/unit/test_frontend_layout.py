"""Tier 1: the client package's layout (issue 18). No frontend import cycle, Session's private methods
stay in session.py, each model class starts its own runs, and wire packing and the queued frees and
edits have public homes (frontend/wire.py, frontend/outbox.py). No server: a fake transport records
what would be sent."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from djinn.frontend import wire
from djinn.frontend.graph_model import GraphModel
from djinn.frontend.outbox import Outbox
from djinn.frontend.remote import RemoteModel
from djinn.frontend.run import Breakpoint, Run
from djinn.frontend.session import Session
from djinn.frontend.tensor import RemoteTensor
from djinn.protocol.errors import DjinnError, InvalidRequest

DJINN = Path(__file__).resolve().parents[2] / "djinn"
FRONTEND = DJINN / "frontend"


# -- the import graph ------------------------------------------------------------------------------
def _type_checking_blocks(tree: ast.AST) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:`."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            out |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return out


def _frontend_imports(path: Path, modules: set[str]) -> set[str]:
    """The frontend modules `path` imports when it runs, at module level or inside a function."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_blocks(tree)
    out: set[str] = set()
    for node in ast.walk(tree):  # every depth: an import inside a function is still an edge
        if id(node) in skip:
            continue
        names: list[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:      # from .x import y / from . import x
                names = [node.module] if node.module else [a.name for a in node.names]
            elif node.level == 0 and (node.module or "").startswith("djinn.frontend"):
                rest = node.module[len("djinn.frontend"):].lstrip(".")
                names = [rest] if rest else [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name[len("djinn.frontend."):] for a in node.names if a.name.startswith("djinn.frontend.")]
        out |= {n.split(".")[0] for n in names if n.split(".")[0] in modules}
    return out - {path.stem}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_frontend_imports_form_no_cycle():
    """Imports inside functions count: they are how the cycle tensor -> lazy -> tensor (and edits) was
    hidden until issue 18, since they defer the import until it no longer fails, not the dependency.
    Imports under `if TYPE_CHECKING:` are left out: they never run (every module has `from __future__
    import annotations`), and a Session and the handles it gives out may name each other's types."""
    modules = {p.stem for p in FRONTEND.glob("*.py")}
    graph = {p.stem: _frontend_imports(p, modules) for p in FRONTEND.glob("*.py")}
    cycle = _cycle(graph)
    assert cycle is None, "frontend import cycle: " + " -> ".join(cycle)
    assert graph["lazy"] == set()  # the bottom of the tensor stack: it reaches tensors through LazyOps


def test_the_cycle_finder_sees_imports_inside_functions(tmp_path):
    (tmp_path / "a.py").write_text("from .b import x\n")
    (tmp_path / "b.py").write_text("def f():\n    from .a import y\n")
    (tmp_path / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import z\n")
    mods = {"a", "b", "c"}
    graph = {m: _frontend_imports(tmp_path / f"{m}.py", mods) for m in mods}
    assert graph == {"a": {"b"}, "b": {"a"}, "c": set()}
    assert _cycle(graph) == ["a", "b", "a"]


# -- Session's private methods ---------------------------------------------------------------------
def _session_private_names() -> set[str]:
    tree = ast.parse((FRONTEND / "session.py").read_text())
    [cls] = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Session"]
    names = {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}
    names |= {n.attr for n in ast.walk(cls) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)
              and isinstance(n.value, ast.Name) and n.value.id == "self"}  # its attributes too
    # dunders and IPython's `_repr_html_` protocol are called by Python and notebooks, not by us
    return {n for n in names if n.startswith("_") and not n.endswith("_")}


def test_no_module_outside_session_py_calls_sessions_private_methods():
    private = _session_private_names()
    assert {"_check_alive", "_flush_frees", "_generation"} <= private  # the scan reads the class
    offenders = []
    for path in sorted(DJINN.rglob("*.py")):
        if path == FRONTEND / "session.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            # `self._x` is the class's own (a method of the same name elsewhere is not Session's)
            if (isinstance(node, ast.Attribute) and node.attr in private
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                offenders.append(f"{path.relative_to(DJINN.parent)}:{node.lineno} .{node.attr}")
    assert offenders == []


# -- a session over a fake transport ---------------------------------------------------------------
class FakeTransport:
    generation = 0
    dead = None

    def __init__(self):
        self.sent: list[tuple[str, str, dict]] = []

    def call(self, op, args, **kw):
        self.sent.append(("call", op, args))
        return {"tensors": ["data"]} if op == "fetch" else {}

    def submit(self, op, args, **kw):
        self.sent.append(("submit", op, args))
        return f"future of {op}"


class FakeConn:
    address = "fake"
    device = "cpu"
    info = {"device": "cpu"}

    def __init__(self):
        self.transport = FakeTransport()


@pytest.fixture
def s():
    return Session(FakeConn(), "t", _restored={"sid": "sid-1"})


def _model(s) -> RemoteModel:
    return RemoteModel(s, "mid", "Arch", 0, None)  # remoted in s: attached, no request


# -- each model class starts its own runs ----------------------------------------------------------
def test_session_start_hands_the_run_to_the_model(s):
    class Own(RemoteModel):
        def start_run(self, session, args, kwargs, *, method="forward", breakpoints=(), seed=None):
            return ("started", session, args, kwargs, method, list(breakpoints), seed)

    rm = Own(s, "mid", "Arch", 0, None)
    got = s.start(rm, 1, 2, breakpoints="model.layers.0", seed=7, flag=True)
    assert got == ("started", s, (1, 2), {"flag": True}, "forward", [Breakpoint(path="model.layers.0")], 7)
    with pytest.raises(InvalidRequest, match="forward' or 'generate"):
        s.start(rm, 1, method="backward")


def test_session_start_does_not_ask_which_path_a_model_is_on():
    tree = ast.parse((FRONTEND / "session.py").read_text())
    [cls] = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Session"]
    assert not [n for n in ast.walk(cls) if isinstance(n, ast.Attribute) and n.attr == "path"]
    assert not [n for n in ast.walk(cls) if isinstance(n, ast.Constant) and n.value == "graph"]


def test_module_path_start_run_sends_one_start(s):
    x = RemoteTensor(s, "h1", torch.float32, (2,), "cpu")
    run = _model(s).start_run(s, (x,), {"k": 1}, method="generate", breakpoints=[Breakpoint(layer=3)], seed=5)
    assert isinstance(run, Run) and run.method == "generate"
    [(kind, op, args)] = s.conn.transport.sent
    assert (kind, op) == ("submit", "start")
    assert args == {"model_id": "mid", "method": "generate", "seed": 5, "sid": "sid-1",
                    "breakpoints": [{"path": None, "layer": 3, "where": "after", "step": None}],
                    "args": [{"$h": "h1"}], "kwargs": {"$d": {"k": 1}}}


def test_graph_path_start_run_refuses_generate_before_any_request(s):
    gm = GraphModel(s, "gid", nn.Linear(2, 2), {}, 0)
    with pytest.raises(InvalidRequest, match="graph path runs forward only"):
        s.start(gm, torch.zeros(1, 2), method="generate")
    assert s.conn.transport.sent == []


# -- wire packing ----------------------------------------------------------------------------------
def test_wire_packs_a_sessions_handles_and_unpacks_its_results(s):
    x = RemoteTensor(s, "h1", torch.float16, (2, 3), "cpu")
    assert wire.pack(s, {"a": [x, 1]}) == {"$d": {"a": [{"$h": "h1"}, 1]}}
    other = Session(FakeConn(), "o", _restored={"sid": "sid-2"})
    with pytest.raises(InvalidRequest, match="session that holds it"):
        wire.pack(other, [x])
    out = wire.unpack(s, {"$tu": [{"$t": ["h2", "float32", [4], "cpu"]}, 3]})
    t, n = out
    assert isinstance(t, RemoteTensor) and t._session is s and t.hid == "h2" and n == 3
    assert (t.dtype, tuple(t.shape)) == (torch.float32, (4,))
    [h] = wire.handles(s, {"h3": {"dtype": "int64", "shape": [1]}}, "cpu").values()
    assert (h.hid, h.dtype) == ("h3", torch.int64)


# -- the outbox: queued frees and edits -----------------------------------------------------------
def test_outbox_queues_frees_and_edits_in_order():
    box = Outbox("t")
    box.free("a")
    box.free("b")
    box.edit({"h": "x"})
    assert box.has_edits and box.take_frees() == ["a", "b"] and box.take_frees() == []
    assert box.take_edits() == [{"h": "x"}] and not box.has_edits
    box.close()
    box.free("c")  # a finalizer after close: queued, never refused
    with pytest.raises(DjinnError, match="session t is closed"):
        box.edit({"h": "y"})


def test_dropped_handles_and_edits_go_through_the_outbox(s):
    x = RemoteTensor(s, "h1", torch.float32, (2,), "cpu")
    x.add_(1.0)
    assert s.outbox.has_edits and s.conn.transport.sent == []  # queued, nothing sent yet
    del x
    assert s.fetch([RemoteTensor(s, "h2", torch.float32, (2,), "cpu")]) == ["data"]
    free, fetch = s.conn.transport.sent
    assert free == ("submit", "free", {"sid": "sid-1", "handles": ["h1"]})
    assert fetch[1] == "fetch" and fetch[2]["edits"] == [{"h": "h1", "i": [], "op": "add", "v": 1.0}]
    s.close()
    y = RemoteTensor(s, "h3", torch.float32, (2,), "cpu")
    with pytest.raises(DjinnError, match="session t is closed"):
        y.add_(1.0)
