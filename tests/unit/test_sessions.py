"""SessionTable ownership, idleness and handle lookup."""
from __future__ import annotations

import re
import time

import pytest
import torch

from djinn.protocol.errors import HandleNotFound, SessionNotFound
from djinn.server.sessions import KVState, Session, SessionState, SessionTable


@pytest.fixture
def table():
    return SessionTable()


def test_open_and_get(table):
    s = table.open("client-a", "notebook")
    assert (s.client_id, s.name, s.state) == ("client-a", "notebook", SessionState.ACTIVE)
    assert isinstance(s.sid, str) and len(s.sid) == 24 and int(s.sid, 16) >= 0
    assert table.get(s.sid, "client-a") is s
    assert len(table) == 1 and list(table) == [s]


def test_session_ids_are_unique(table):
    sids = {table.open("c", None).sid for _ in range(200)}
    assert len(sids) == 200 and len(table) == 200


@pytest.mark.parametrize("sid", [None, 5, b"x", ["a"], "", "nope"])
def test_get_unknown_session(table, sid):
    table.open("c", None)
    msg = f"session {sid!r} does not exist (closed, reclaimed, or never opened)"
    with pytest.raises(SessionNotFound, match=f"^{re.escape(msg)}$"):
        table.get(sid, "c")


def test_get_by_wrong_client_is_not_found(table):
    s = table.open("client-a", None)
    with pytest.raises(SessionNotFound, match=rf"session '{s.sid}' does not exist") as info:
        table.get(s.sid, "client-b")
    assert type(info.value) is SessionNotFound and info.value.code == "session_not_found"
    # The owner still has it, untouched.
    assert table.get(s.sid, "client-a") is s


def test_get_by_wrong_client_does_not_refresh_activity(table):
    s = table.open("a", None)
    s.last_active = 100.0
    with pytest.raises(SessionNotFound):
        table.get(s.sid, "b")
    assert s.last_active == 100.0
    table.get(s.sid, "a")
    assert s.last_active > 100.0


def test_remove(table):
    s = table.open("a", None)
    assert table.remove(s.sid) is s
    assert s.state is SessionState.CLOSED
    assert table.remove(s.sid) is None
    assert len(table) == 0
    with pytest.raises(SessionNotFound):
        table.get(s.sid, "a")


def test_of_client(table):
    a1, b1, a2 = table.open("a", "1"), table.open("b", "1"), table.open("a", "2")
    assert table.of_client("a") == [a1, a2]
    assert table.of_client("b") == [b1]
    assert table.of_client("c") == []
    table.remove(a1.sid)
    assert table.of_client("a") == [a2]


def test_idle(table):
    s1, s2, s3 = table.open("a", None), table.open("a", None), table.open("b", None)
    s1.last_active, s2.last_active, s3.last_active = 100.0, 150.0, 200.0
    assert table.idle(60.0, now=200.0) == [s1]
    assert table.idle(50.0, now=200.0) == [s1]  # strictly longer than the timeout
    assert table.idle(49.9, now=200.0) == [s1, s2]
    assert table.idle(0.0, now=200.0) == [s1, s2]
    assert table.idle(0.0, now=200.1) == [s1, s2, s3]
    assert table.idle(1000.0, now=200.0) == []


def test_get_marks_activity(table):
    s = table.open("a", None)
    s.last_active = time.monotonic() - 100
    assert table.idle(50, now=time.monotonic()) == [s]
    table.get(s.sid, "a")
    assert table.idle(50, now=time.monotonic()) == []


def test_iteration_is_a_snapshot(table):
    for _ in range(3):
        table.open("a", None)
    for s in table:
        table.remove(s.sid)  # must not break the loop
    assert len(table) == 0


def test_tensor_handles():
    s = Session("sid", "client", None)
    t = torch.arange(4)
    hid = s.add_tensor(t)
    assert isinstance(hid, str) and len(hid) == 16
    assert s.tensor(hid) is t
    assert s.add_tensor(t) != hid
    for bad in ("0" * 16, None, 5, ["x"], b"x"):
        msg = f"tensor handle {bad!r} is not held by session sid"
        with pytest.raises(HandleNotFound, match=f"^{re.escape(msg)}$") as info:
            s.tensor(bad)
        assert type(info.value) is HandleNotFound


def test_data_bytes_counts_shared_storage_once():
    s = Session("sid", "client", None)
    base = torch.zeros(100, dtype=torch.float32)
    s.add_tensor(base)
    s.add_tensor(base[:10])
    s.add_tensor(base.view(10, 10))
    assert s.data_bytes == 400
    s.add_tensor(torch.zeros(3, dtype=torch.float64))
    assert s.data_bytes == 424


def test_data_bytes_includes_kv_blocks():
    from djinn.vmu.data import DataSegment
    from djinn.vmu.kv_pool import KVPool, KVShape

    from ..models import tiny_llama

    pool = KVPool(KVShape.of_module(tiny_llama()), 8, 4, "cpu")   # 2048 B blocks
    seg = DataSegment(torch.device("cpu"), 0, swap_bw=1e9)
    seg.add_pool("m", pool)
    s = Session("sid", "client", None)
    seg.attach_kv(s, "m", KVState.empty(pool, torch.zeros(1, 0, dtype=torch.long)))
    assert s.kv["m"].nbytes == 0 and pool.reserve(s.kv["m"].table, 9)
    assert s.kv["m"].nbytes == 3 * 2048 and s.data_bytes == 3 * 2048
