"""Tier 2: the scheduler in a real server. KV caches swapped to host during IO_WAIT and brought back,
dropped and recomputed, queued; generates of several sessions interleaved; accounting back to zero.

Sizes: the tiny Llama keeps 512 bytes of KV per token (2 layers, keys and values, 2 heads of 16 fp32);
these servers use KV blocks of 4 tokens (`BT`), 2 KiB each: 16 tokens are 4 blocks (8 KiB), 27 or 28
tokens 7 blocks. A pool of `KV_ONE` (15 KiB: 7 blocks) holds one session of up to 28 tokens, but not two
of 16.
"""
from __future__ import annotations

import threading
import time

import pytest
import torch

from djinn.frontend import wire
from djinn.frontend.connection import Connection
from djinn.frontend.remote import RemoteModel
from djinn.protocol.errors import InvalidRequest, SessionNotFound

from ..models import tiny_llama
from .test_sessions import LocalSession

GIB = 1 << 30
KV_ONE = 15 * 1024
BT = ("--kv-block-tokens", "4")
GEN = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
P1 = torch.tensor([[1, 17, 42, 99, 5, 250, 7, 64]])
P2 = torch.tensor([[33, 8, 190]])
Q1 = torch.tensor([[1, 200, 3, 150, 9, 12, 19, 4]])
Q2 = torch.tensor([[77, 4]])


def submit_generate(s, rm, ids, **kw):
    """A session generate sent without waiting for its reply (a Future)."""
    rm.attach(s)
    return s.submit("generate", {"model_id": rm.model_id, "input_ids": ids, "use_session_kv": True,
                                 "kwargs": wire.pack(s, kw)})


def gb(n: int) -> str:
    return f"{n / GIB:.12g}"


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=3)


def local_turns(model, device, *prompts) -> list[torch.Tensor]:
    ls = LocalSession(model.to(device), device)
    return [ls.generate(p, **GEN) for p in prompts]


def sstats(conn: Connection, s) -> dict:
    return conn.stats()["sessions"][s.sid]


def wait_for(pred, timeout_s: float = 10.0):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


def test_swapped_during_io_wait_and_back_continues_bitwise(module_server, model, device):
    srv = module_server("--policy", "signal", "--swap-on-io-wait", *BT)
    conn = Connection(srv.address, None)
    try:
        a, b = conn.session("away"), conn.session("stays")
        rm = RemoteModel.from_module(a, model)
        ref = local_turns(model, device, P1, P2)
        assert torch.equal(a.generate(rm, P1, **GEN), ref[0])
        assert torch.equal(b.generate(rm, P1, **GEN), ref[0])
        kv = sstats(conn, a)["gpu_bytes"]
        assert kv == 4 * 2048      # 15 tokens: 4 blocks of 4 tokens x 512 B
        assert a.signal("IO_WAIT", eta_s=30.0) in ("IO_WAIT", "SWAPPING_OUT", "SWAPPED")
        st = wait_for(lambda: (x := sstats(conn, a))["state"] == "SWAPPED" and x)
        assert (st["gpu_bytes"], st["host_bytes"], st["swaps_out"]) == (0, kv, 1)
        assert conn.stats()["scheduler"]["host_pool"]["used"] == kv
        out = a.generate(rm, P2, **GEN)            # a miss: brought back on demand, then continued
        assert torch.equal(out, ref[1])
        assert torch.equal(out, b.generate(rm, P2, **GEN))   # the session that never left
        st = sstats(conn, a)
        assert (st["state"], st["swaps_in"], st["prefetch_misses"], st["host_bytes"]) == ("ACTIVE", 1, 1, 0)
        assert st["bytes_moved"] == 2 * kv  # whole blocks, out and back
        one_long = model.to(device)
        with torch.no_grad():   # and one long local generate over the same tokens
            ids = torch.cat([ref[0], P2], dim=1).to(device)
            assert torch.equal(out, one_long.generate(ids, **GEN).cpu())
    finally:
        conn.close()


def test_prefetched_by_eta_is_a_hit(module_server, model, device):
    srv = module_server("--policy", "signal", "--swap-on-io-wait", *BT)
    conn = Connection(srv.address, None)
    try:
        s = conn.session()
        rm = RemoteModel.from_module(s, model)
        ref = local_turns(model, device, P1, P2)
        s.generate(rm, P1, **GEN)
        with s.io_wait(eta_s=0.6):
            wait_for(lambda: sstats(conn, s)["state"] == "SWAPPED")
            # Planned: back on the device before the announced return, without a request.
            wait_for(lambda: sstats(conn, s)["state"] == "IO_WAIT", timeout_s=5.0)
        assert torch.equal(s.generate(rm, P2, **GEN), ref[1])
        st = sstats(conn, s)
        assert (st["swaps_out"], st["swaps_in"], st["prefetch_hits"], st["prefetch_misses"]) == (1, 1, 1, 0)
    finally:
        conn.close()


def test_compute_signal_brings_a_swapped_session_back(module_server, model):
    srv = module_server("--policy", "signal", "--swap-on-io-wait", *BT)
    conn = Connection(srv.address, None)
    try:
        s = conn.session()
        rm = RemoteModel.from_module(s, model)
        s.generate(rm, P1, **GEN)
        s.signal("IO_WAIT", eta_s=60)
        wait_for(lambda: sstats(conn, s)["state"] == "SWAPPED")
        s.signal("COMPUTE")               # back early: due now
        wait_for(lambda: sstats(conn, s)["state"] == "ACTIVE")
        with pytest.raises(InvalidRequest, match="signal kind"):
            s.call("signal", {"kind": "NAP"})
        with pytest.raises(InvalidRequest, match="eta_s"):
            s.call("signal", {"kind": "IO_WAIT", "eta_s": -1})
    finally:
        conn.close()


def test_lru_swaps_the_idle_session_to_make_room(start_server, model, device):
    srv = start_server("--policy", "lru", "--data-budget-gb", gb(KV_ONE), *BT)
    conn = Connection(srv.address, None)
    try:
        a, b = conn.session("a"), conn.session("b")
        rm = RemoteModel.from_module(a, model)
        ra, rb = local_turns(model, device, P1, P2), local_turns(model, device, Q1, Q2)
        assert torch.equal(a.generate(rm, P1, **GEN), ra[0])
        assert torch.equal(b.generate(rm, Q1, **GEN), rb[0])   # a goes to host to make room
        assert sstats(conn, a)["state"] == "SWAPPED"
        assert torch.equal(a.generate(rm, P2, **GEN), ra[1])   # b goes, a comes back (a miss)
        assert torch.equal(b.generate(rm, Q2, **GEN), rb[1])
        sa, sb = sstats(conn, a), sstats(conn, b)
        assert (sa["swaps_out"], sa["swaps_in"], sa["prefetch_misses"]) == (2, 1, 1)
        assert (sb["swaps_out"], sb["swaps_in"]) == (1, 1)
        assert conn.stats()["scheduler"]["policy"] == "lru"
    finally:
        conn.close()


def test_recompute_drops_and_prefills_again(start_server, model, device):
    srv = start_server("--policy", "recompute", "--data-budget-gb", gb(KV_ONE), *BT)
    conn = Connection(srv.address, None)
    try:
        a, b = conn.session("a"), conn.session("b")
        rm = RemoteModel.from_module(a, model)
        ra = local_turns(model, device, P1, P2)
        a.generate(rm, P1, **GEN)
        b.generate(rm, Q1, **GEN)
        st = sstats(conn, a)
        assert (st["state"], st["drops"], st["gpu_bytes"]) == ("DROPPED", 1, 0)
        # Its prompt's full block (P1: 8 tokens, 2 blocks of 4) stayed cached (Note [Prefix sharing]):
        # it prefills the other 8 seen tokens again, then the new ones.
        out = a.generate(rm, P2, **GEN)
        assert torch.equal(out, ra[1])     # the same greedy tokens as if never dropped
        sched = conn.stats()["scheduler"]
        assert sched["recomputed_tokens"] == 8 and sched["prefix_tokens_reused"] == 8
        assert sched["swaps_out"] == 0 and sched["drops"] >= 2
    finally:
        conn.close()


def test_resident_queues_until_memory_frees(module_server, model):
    srv = module_server("--policy", "resident", "--data-budget-gb", gb(KV_ONE), *BT)
    conn = Connection(srv.address, None)
    try:
        a, b, c = conn.session("a"), conn.session("b"), conn.session("c")
        rm = RemoteModel.from_module(a, model)
        a.generate(rm, P1, **GEN)
        done: dict = {}

        def second():
            done["out"] = b.generate(rm, Q1, **GEN)

        t = threading.Thread(target=second)
        t.start()
        # the job shows as soon as it is queued, its reason once the scheduler ran (the next engine turn)
        job = wait_for(lambda: (j := sstats(conn, b).get("job")) and j.get("why") and j)
        assert job["why"] == "no_memory" and sstats(conn, b)["state"] == "QUEUED"
        fut = submit_generate(c, rm, Q2, **GEN)
        wait_for(lambda: (sstats(conn, c).get("job") or {}).get("why") == "behind")
        a.close()                        # frees a's cache: b runs, then c
        t.join(10)
        assert done["out"].shape == (1, 16)
        assert fut.result(10)["sequences"].shape[1] == 10
        assert conn.stats()["scheduler"]["swaps_out"] == 0
        assert sstats(conn, b)["queue_s"] > 0
    finally:
        conn.close()


def test_a_resident_session_grows_while_an_admission_waits(start_server, model):
    """Regression: a session holding KV queued behind an admission that only its memory could satisfy,
    and the server deadlocked (Note [Running sessions go first])."""
    per_session = 18 * 2048          # 71 cached tokens: 18 blocks of 4
    srv = start_server("--policy", "resident", "--data-budget-gb", gb(2 * per_session + 6 * 4096), *BT)
    conn = Connection(srv.address, None)
    try:
        a0, a1, a2 = conn.session(), conn.session(), conn.session()
        rm = RemoteModel.from_module(a0, model)
        prompts = [torch.arange(k, k + 64).unsqueeze(0) for k in (3, 70, 140)]  # no common prefix to share
        a0.generate(rm, prompts[0], **GEN)
        a1.generate(rm, prompts[1], **GEN)
        waiting = submit_generate(a2, rm, prompts[2], **GEN)      # does not fit: waits for memory
        wait_for(lambda: (sstats(conn, a2).get("job") or {}).get("why") == "no_memory")
        out = a0.call("generate", {"model_id": rm.model_id, "input_ids": torch.arange(3, 19).unsqueeze(0),
                                   "use_session_kv": True, "kwargs": wire.pack(a0, GEN)},
                      timeout=10)["sequences"]
        assert out.shape == (1, 96)                                 # grew into the free memory
        a1.close()
        assert waiting.result(10)["sequences"].shape == (1, 72)
    finally:
        conn.close()


def test_closing_a_session_fails_its_queued_request(module_server, model):
    srv = module_server("--policy", "resident", "--data-budget-gb", gb(KV_ONE), *BT)
    c1, c2 = Connection(srv.address, None), Connection(srv.address, None)
    try:
        a, b = c1.session(), c2.session()
        rm = RemoteModel.from_module(a, model)
        a.generate(rm, P1, **GEN)
        fut = submit_generate(b, RemoteModel.from_module(b, model), Q1, **GEN)
        wait_for(lambda: sstats(c2, b).get("job"))
        c2.transport.call("close_session", {"sid": b.sid})
        with pytest.raises(SessionNotFound, match="closed"):
            fut.result(10)
        assert c1.ping()                  # the server serves on
    finally:
        c1.close()
        c2.close()


def test_generates_of_sessions_interleave_by_step(server, model):
    """A short generate submitted after a long one finishes first: they share the engine step by step."""
    conn = Connection(server.address, None)
    try:
        a, b = conn.session(), conn.session()
        rm = RemoteModel.from_module(a, model)
        long = submit_generate(a, rm, P1, **dict(GEN, max_new_tokens=200, min_new_tokens=200))
        wait_for(lambda: (sstats(conn, a).get("job") or {}).get("steps", 0) > 2)
        short = b.generate(rm, Q1, **GEN)
        assert short.shape == (1, 16)
        assert (sstats(conn, a).get("job") or {}).get("steps", 0) < 200  # still running
        assert long.result(30)["sequences"].shape == (1, 208)
    finally:
        conn.close()


def test_accounting_returns_to_zero_after_sessions_close(module_server, model):
    srv = module_server("--policy", "signal", "--swap-on-io-wait", *BT)
    conn = Connection(srv.address, None)
    try:
        sessions = [conn.session() for _ in range(3)]
        rm = RemoteModel.from_module(sessions[0], model)
        for i, s in enumerate(sessions):
            s.generate(rm, P1, **GEN)
            s.forward_out = rm(P1, session=s)  # a tensor held by the session
        sessions[0].signal("IO_WAIT", eta_s=60)
        wait_for(lambda: sstats(conn, sessions[0])["state"] == "SWAPPED")
        st = conn.stats()
        assert st["segments"]["data"] > 0 and st["scheduler"]["host_pool"]["used"] > 0
        for s in sessions:
            s.close()
        st = conn.stats()
        assert (st["segments"]["data"], st["scheduler"]["data_bytes"], st["scheduler"]["host_pool"]["used"]) == (0, 0, 0)
    finally:
        conn.close()


def test_declared_kv_budgets_make_resident_overload_queue_not_jam(start_server, model, device):
    """Six agents of three turns on a pool that holds three agents' whole contexts, resident policy.
    Undeclared, agents admitted on their first turn can fill the pool and then wait forever to grow
    (no policy move frees a block under `resident`). Declaring max_kv_tokens (Note [Declared KV
    budgets]) reserves each agent's whole context at admission: the later agents queue, every turn
    completes, and every agent's tokens equal a local run."""
    per_agent = 4 + GEN["max_new_tokens"] + 2 * (3 + GEN["max_new_tokens"])  # 26 tokens: 7 blocks of 4
    srv = start_server("--policy", "resident", "--data-budget-gb", gb(3 * 7 * 2048 + 1024), *BT)
    conns = [Connection(srv.address, None) for _ in range(6)]
    g = torch.Generator().manual_seed(5)
    turns = [[torch.randint(3, 250, (1, 4), generator=g)] + [torch.randint(3, 250, (1, 3), generator=g)
                                                          for _ in range(2)] for _ in range(6)]
    outs: dict = {}
    errors: list = []

    def agent(i):
        try:
            s = conns[i].session(f"agent{i}", max_kv_tokens=per_agent)
            rm = RemoteModel.from_module(s, model)
            outs[i] = []
            for k, t in enumerate(turns[i]):
                outs[i].append(s.generate(rm, t, **GEN))
                if k < 2:
                    with s.io_wait(eta_s=0.05):
                        time.sleep(0.05)
            assert conns[i].stats()["sessions"][s.sid]["max_kv_tokens"] == per_agent
            s.close()
        except Exception as e:  # noqa: BLE001 - every failure is reported below
            errors.append(repr(e))

    holder = conns[0].session("holder")  # keeps the model, and its pool, after the agents close
    RemoteModel.from_module(holder, model)
    try:
        threads = [threading.Thread(target=agent, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == [] and sorted(outs) == list(range(6))
        for i in range(6):
            assert len(outs[i]) == 3
            want = local_turns(model, device, *turns[i])
            assert all(torch.equal(a, b) for a, b in zip(outs[i], want)), i
        st = conns[0].stats()
        assert st["scheduler"]["swaps_out"] == 0 and st["scheduler"]["queue_s"] > 0
        seg = st["segments"]  # eager decode on the CPU: no step buffers, no staging (nothing swapped)
        assert seg["workspace"] == 0 and seg["data_outside_pools"] == 0 and st["device_memory"] is None
        kv = next(iter(st["kv"]["models"].values()))
        assert kv["blocks_held"] == 0 and kv["blocks_free"] + kv["blocks_cached"] == kv["blocks_total"] == 21
        s = conns[0].session(max_kv_tokens=8)
        rm = RemoteModel.from_module(s, model)
        with pytest.raises(InvalidRequest, match="over the session's max_kv_tokens=8"):
            s.generate(rm, P1, **GEN)  # 8 + 8 tokens
    finally:
        for c in conns:
            c.close()
