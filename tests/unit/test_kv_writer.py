"""The Data segment is the one writer of which KV a session holds (Note [One KV writer] in
djinn/vmu/data.py): `Session.kv` is read-only, and no other module of djinn/ changes it."""
from __future__ import annotations

import ast
import pathlib

import pytest
import torch

import djinn
from djinn.server.sessions import KVState, Session
from djinn.vmu.data import DataSegment
from djinn.vmu.kv_pool import KVPool, KVShape

ROOT = pathlib.Path(djinn.__file__).parent
OWNER = ROOT / "vmu" / "data.py"
MUTATORS = {"clear", "pop", "popitem", "update", "setdefault", "__setitem__", "__delitem__", "__ior__"}


def _of_other(node: ast.AST, attr: str) -> bool:
    """`<x>.<attr>` for an x other than `self` (a KVPool's own `self.kv` tensor is not a session's KV)."""
    return (isinstance(node, ast.Attribute) and node.attr == attr
            and not (isinstance(node.value, ast.Name) and node.value.id == "self"))


def _the_view(tree: ast.AST) -> set[ast.AST]:
    """The nodes of `Session.kv`, the read-only view: the one place outside the owner that reads `_kv`."""
    return {n for c in ast.walk(tree) if isinstance(c, ast.ClassDef) and c.name == "Session"
            for f in c.body if isinstance(f, ast.FunctionDef) and f.name == "kv" for n in ast.walk(f)}


def kv_writes(tree: ast.AST) -> list[tuple[int, str]]:
    """Where a module changes a session's KV mapping, or reaches for the private dict behind it."""
    out, view = [], _the_view(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "_kv" and node not in view:
            out.append((node.lineno, "uses a session's private _kv"))
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, (ast.Store, ast.Del)) \
                and _of_other(node.value, "kv"):
            out.append((node.lineno, "assigns or deletes an entry of .kv"))
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, (ast.Store, ast.Del)) and _of_other(node, "kv"):
            out.append((node.lineno, "rebinds .kv"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in MUTATORS and _of_other(node.func.value, "kv"):
            out.append((node.lineno, f"calls .kv.{node.func.attr}()"))
    return out


def test_only_the_data_segment_writes_a_sessions_kv():
    files = [f for f in sorted(ROOT.rglob("*.py")) if f != OWNER]
    assert len(files) > 50 and ROOT / "server" / "sessions.py" in files
    found = [f"{f.relative_to(ROOT.parent)}:{line}: {what}"
             for f in files for line, what in kv_writes(ast.parse(f.read_text()))]
    assert not found, "only djinn/vmu/data.py (attach_kv, detach_kv, close) may change which KV a " \
                      "session holds (Note [One KV writer]):\n" + "\n".join(found)


def test_the_scan_sees_every_kind_of_write():
    src = ("s.kv['m'] = x\ndel s.kv['m']\ns.kv.clear()\ns.kv.pop('m')\ns.kv = {}\ns._kv['m'] = x\n"
           "a, s.kv['m'] = 1, x\nself._kv.clear()\nself.kv[0] = t\npool.kv[0].copy_(t)\nx = s.kv['m']\n"
           "class Session:\n    def kv(self):\n        return view(self._kv)\n")
    assert [line for line, _ in kv_writes(ast.parse(src))] == [1, 2, 3, 4, 5, 6, 7, 8]


def kv_segment(blocks: int = 8) -> tuple[DataSegment, KVPool]:
    seg = DataSegment(torch.device("cpu"), 0, swap_bw=1e9)
    pool = KVPool(KVShape(2, 2, 16, torch.float32), blocks, 4, "cpu")  # 2048 B blocks
    seg.add_pool("m", pool)
    return seg, pool


def test_session_kv_is_read_only_from_outside():
    seg, pool = kv_segment()
    s = Session("sid", "client", None)
    state = KVState.empty(pool, torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(TypeError):
        s.kv["m"] = state
    seg.attach_kv(s, "m", state)
    assert s.kv["m"] is state and dict(s.kv) == {"m": state}
    with pytest.raises(TypeError):
        del s.kv["m"]
    with pytest.raises(AttributeError):
        s.kv.clear()
    with pytest.raises(AttributeError):
        s.kv = {}
    assert s.kv["m"] is state


def test_attach_detach_and_close_do_the_bookkeeping():
    seg, pool = kv_segment()
    s = Session("sid", "client", None)
    state = KVState.empty(pool, torch.zeros(1, 0, dtype=torch.long))
    assert pool.reserve(state.table, 9)
    seg.attach_kv(s, "m", state)
    assert seg.gpu_bytes("sid") == 3 * 2048 and seg.mem("sid").state.name == "ACTIVE"  # charged at once
    with pytest.raises(RuntimeError, match="already holds KV"):  # replacing it would leak its blocks
        seg.attach_kv(s, "m", KVState.empty(pool, torch.zeros(1, 0, dtype=torch.long)))
    seg.detach_kv(s, "m")
    assert "m" not in s.kv and pool.alloc.held == 0 and seg.gpu_bytes("sid") == 0
    assert seg.mem("sid").state.name == "NEW"

    again = KVState.empty(pool, torch.zeros(1, 0, dtype=torch.long))
    assert pool.reserve(again.table, 5)
    seg.attach_kv(s, "m", again)
    seg.close(s)
    assert not s.kv and pool.alloc.held == 0
