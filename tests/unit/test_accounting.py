"""Per-segment and per-session byte accounting: exact numbers, back to zero when sessions close."""
from __future__ import annotations

import pytest
import torch

from djinn.scheduler import MemoryView
from djinn.vmu.accounting import DATA, HOST, SEGMENTS, STACK, TEXT, Accounting, data_memory_view
from djinn.vmu.host_pool import HostPool
from djinn.vmu.swap import Swapper

ZERO = dict.fromkeys(SEGMENTS, 0)


def test_segments_and_sessions_add_up_and_return_to_zero():
    a = Accounting()
    a.add(TEXT, 1000)                      # weights: shared, no session
    a.add(DATA, 300, "s1")
    a.add(DATA, 200, "s2")
    a.add(DATA, 50, "s1")                  # a tensor handle
    a.add(STACK, 70, "s2")                 # a paused run
    assert a.segments() == {TEXT: 1000, DATA: 550, STACK: 70, HOST: 0}
    assert a.session("s1") == {**ZERO, DATA: 350} and a.session("s2") == {**ZERO, DATA: 200, STACK: 70}
    a.move("s1", DATA, HOST, 300)          # its KV swapped out
    assert a.segments() == {TEXT: 1000, DATA: 250, STACK: 70, HOST: 300}
    a.check()
    assert a.close_session("s2") == {**ZERO, DATA: 200, STACK: 70}
    a.move("s1", HOST, DATA, 300)          # and back in
    a.sub(DATA, 50, "s1")                  # the handle freed
    assert a.close_session("s1") == {**ZERO, DATA: 300}
    assert a.segments() == {**ZERO, TEXT: 1000} and a.snapshot()["sessions"] == {}
    assert a.session("s1") == ZERO and a.close_session("s1") == ZERO   # closing twice frees nothing more
    a.sub(TEXT, 1000)
    assert a.segments() == ZERO
    a.check()


def test_releasing_more_than_was_charged_raises_where_it_happens():
    a = Accounting()
    a.add(DATA, 10, "s")
    with pytest.raises(RuntimeError, match="holds only 10"):
        a.sub(DATA, 11, "s")
    with pytest.raises(RuntimeError, match="holds only 10"):
        a.move("s", DATA, HOST, 11)
    assert a.session("s") == {**ZERO, DATA: 10}          # a failed move changed nothing
    a.close_session("s")
    with pytest.raises(RuntimeError, match="holds no bytes"):
        a.sub(DATA, 1, "s")
    with pytest.raises(RuntimeError, match="shared holds only 0"):
        a.sub(TEXT, 1)
    with pytest.raises(ValueError, match="unknown segment 'kv'"):
        a.add("kv", 1, "s")
    with pytest.raises(ValueError):
        a.add(DATA, -1, "s")
    a._totals[DATA] += 1                                  # corrupt it: check() must notice
    with pytest.raises(AssertionError, match="data"):
        a.check()


def test_swapping_real_tensors_keeps_accounting_and_pool_exact():
    """Two sessions' caches through a real swapper: the host segment equals the pool's used bytes, and
    everything is zero after both close."""
    pool = HostPool(1 << 16)
    sw = Swapper(pool, "cpu")
    a = Accounting()
    kv = {"s1": [torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)], "s2": [torch.randn(1, 2, 30, 8).half()]}
    nbytes = {sid: sum(t.numel() * t.element_size() for t in ts) for sid, ts in kv.items()}
    assert nbytes == {"s1": 2304, "s2": 960}
    for sid in kv:
        a.add(DATA, nbytes[sid], sid)
    assert data_memory_view(a, 10_000, pool) == MemoryView(10_000, 3264, 1 << 16, 0, 1 << 16)

    away = {}
    for sid, ts in kv.items():
        h = sw.swap_out(ts)
        h.wait()                           # completion: GPU bytes freed, host region charged
        a.sub(DATA, h.nbytes, sid)
        a.add(HOST, h.host.alloc.nbytes, sid)
        away[sid] = h.host
    # s1: 2 x 1152 B in 2 x 1536 B slots; s2: 960 B in 1024 B
    assert a.segments() == {**ZERO, HOST: 3072 + 1024} == {**ZERO, HOST: pool.used}
    m = data_memory_view(a, 10_000, pool)
    assert (m.gpu_used, m.gpu_free, m.host_used, m.host_largest_free) == (0, 10_000, 4096, (1 << 16) - 4096)

    back = sw.swap_in(away["s1"])
    back.wait()
    a.add(DATA, back.nbytes, "s1")
    a.sub(HOST, away["s1"].alloc.nbytes, "s1")
    sw.release(away["s1"])
    assert a.session("s1") == {**ZERO, DATA: 2304} and a.segment(HOST) == pool.used == 1024

    for sid in kv:                         # close: the engine frees what each still holds
        held = a.close_session(sid)
        if held[HOST]:
            sw.release(away[sid])
    assert a.segments() == ZERO and pool.used == 0
    a.check()
    pool.check()
    assert data_memory_view(a, 5, None) == MemoryView(5, 0)
