"""Tier 2: per-session quotas from the server config (issue 8): GPU Data bytes, swapped host bytes, and
requests queued behind a running generate. A request past a quota fails with QuotaExceeded, changes
nothing in its session, and every other session runs on, bitwise-equal to local execution.

Sizes: the tiny Llama keeps 512 bytes of KV per token, in blocks of 16 tokens (8 KiB); its logits are
256 float32 per position (1 KiB).
"""
from __future__ import annotations

import gc
import time

import pytest
import torch
import yaml

import djinn
from djinn.frontend.connection import Connection
from djinn.frontend.remote import RemoteModel
from djinn.protocol.errors import QuotaExceeded, SessionNotFound
from djinn.server.sessions import KVState, Session
from djinn.vmu.data import DataSegment

from ..conftest import ServerProcess
from ..models import tiny_llama
from .test_scheduling import submit_generate
from .test_sessions import LocalSession

GIB = 1 << 30
GEN = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
P1 = torch.tensor([[1, 17, 42, 99, 5, 250, 7, 64]])
P2 = torch.tensor([[33, 8, 190]])
P3 = torch.tensor([[77, 4]])
LONG = torch.arange(3, 27).unsqueeze(0)  # 24 tokens


def kv(tokens: int) -> int:
    """Data bytes of the tiny Llama's KV of `tokens` tokens: whole blocks of 16 tokens x 512 B."""
    return -(-tokens // 16) * 16 * 512


def start(tmp_path, name: str, **settings) -> ServerProcess:
    """A private server configured through a YAML file (`--config`; keys map 1:1 onto ServerConfig)."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(settings))
    return ServerProcess("--config", str(path))


def gib(nbytes: int) -> float:
    return nbytes / GIB  # exact: a power-of-two divisor, so the server's int(gb * 2**30) gives nbytes back


@pytest.fixture(scope="module")
def model(device):
    return tiny_llama(seed=3, device=device)


def sstats(conn: Connection, s) -> dict:
    return conn.stats()["sessions"][s.sid]


def local_turns(model, device, *turns) -> list[torch.Tensor]:
    ls = LocalSession(model, device)
    return [ls.generate(p, **kw) for p, kw in turns]


# -- GPU quota -------------------------------------------------------------------------------------
QUOTA_GPU = 16 * 1024


@pytest.fixture(scope="module")
def gpu_server(tmp_path_factory):
    srv = start(tmp_path_factory.mktemp("quota"), "gpu", quota_gpu_gb=gib(QUOTA_GPU))
    yield srv
    srv.stop()


@pytest.fixture
def gpu_conn(gpu_server):
    c = Connection(gpu_server.address, secret=None)
    yield c
    c.close()


def test_generate_over_the_gpu_quota_is_refused_others_run_on(gpu_conn, model, device):
    c = gpu_conn
    big, ok = c.session("big"), c.session("ok")
    rm = RemoteModel.from_module(big, model)
    assert kv(8 + 40) > QUOTA_GPU >= kv(8 + 8 + 3 + 8)
    with pytest.raises(djinn.QuotaExceeded) as info:
        big.generate(rm, P1, max_new_tokens=40, do_sample=False, pad_token_id=0)
    assert info.value.code == "quota_exceeded" and "quota_gpu_gb" in info.value.message
    st = sstats(c, big)
    assert (st["kv_tokens"], st["gpu_bytes"], st["job"]) == ({}, 0, None)  # nothing was allocated or queued
    assert st["quota"]["gpu_bytes"] == {"limit": QUOTA_GPU, "used": 0}
    assert c.stats()["quotas"] == {"gpu_bytes": QUOTA_GPU, "host_bytes": None, "queued_requests": None,
                                   "principal_gpu_bytes": None}

    # Another session on the same server: bitwise local, turn after turn, while it stays within the quota.
    ref = local_turns(model, device, (P1, GEN), (P2, GEN))
    assert torch.equal(ok.generate(rm, P1, **GEN), ref[0])
    assert torch.equal(ok.generate(rm, P2, **GEN), ref[1])
    held = sstats(c, ok)
    assert held["gpu_bytes"] == kv(26) and held["quota"]["gpu_bytes"] == {"limit": QUOTA_GPU, "used": kv(26)}
    # Its next turn would pass the quota: refused, and its cache is as it was.
    assert kv(27 + 2 + 8) > QUOTA_GPU
    with pytest.raises(djinn.QuotaExceeded):
        ok.generate(rm, P3, **GEN)
    assert sstats(c, ok)["kv_tokens"] == {rm.model_id: 27} and sstats(c, ok)["gpu_bytes"] == kv(26)
    # The refused session still works within its quota, from scratch as a fresh local cache would.
    assert torch.equal(big.generate(rm, P1, **GEN), ref[0])
    # A stateless generate's KV blocks come from the same pool and count against its session's quota:
    # over it the generate is refused too; within it it runs, bitwise local.
    with pytest.raises(djinn.QuotaExceeded):
        rm.generate(P1, max_new_tokens=40, do_sample=False, pad_token_id=0, session=big)
    with torch.no_grad():
        want = model.generate(P1.to(device), max_new_tokens=8, do_sample=False, pad_token_id=0).cpu()
    assert torch.equal(rm.generate(P1, max_new_tokens=8, do_sample=False, pad_token_id=0, session=big), want)
    assert sstats(c, big)["gpu_bytes"] == kv(16)  # its scratch blocks went back
    # ...and they come on top of what the session holds: `ok` holds its whole quota of KV, so even a
    # stateless call whose own blocks would fit is refused (it once counted alone), as is a wide batch.
    assert sstats(c, ok)["gpu_bytes"] == QUOTA_GPU and kv(16) < QUOTA_GPU
    with pytest.raises(djinn.QuotaExceeded) as info:
        rm.generate(P1, max_new_tokens=8, do_sample=False, pad_token_id=0, session=ok)
    assert info.value.message == (
        f"generate would take session {ok.sid[:8]} to {QUOTA_GPU + kv(16)} bytes on the device ({kv(16)} bytes of "
        f"KV for 8 + 8 tokens x batch 1, a stateless call's scratch blocks), over its GPU quota of {QUOTA_GPU} "
        "bytes (quota_gpu_gb); free tensors, reset the cache or ask for less")
    with pytest.raises(djinn.QuotaExceeded, match=rf"\({64 * kv(16)} bytes of KV for 8 \+ 8 tokens x batch 64"):
        rm.generate(P1.repeat(64, 1), max_new_tokens=8, do_sample=False, pad_token_id=0, session=big)
    assert sstats(c, ok)["kv_tokens"] == {rm.model_id: 27} and sstats(c, ok)["gpu_bytes"] == QUOTA_GPU


def test_generate_runs_count_against_the_gpu_quota(gpu_conn, model, device):
    """A generate breakpoint run reserves its KV blocks when it starts and keeps them while it is paused:
    they count against its session's quota like a generate's (they once counted nothing)."""
    from djinn.frontend.run import Breakpoint

    c = gpu_conn
    s = c.session("runs")
    rm = RemoteModel.from_module(s, model)
    with pytest.raises(djinn.QuotaExceeded, match=rf"a generate run would take session .* to {kv(48)} bytes"):
        s.start(rm, P1, method="generate", max_new_tokens=40, do_sample=False, pad_token_id=0,
                breakpoints=[Breakpoint(layer=0)]).wait(60)
    assert sstats(c, s)["runs"] == {} and sstats(c, s)["gpu_bytes"] == 0
    run = s.start(rm, P1, method="generate", max_new_tokens=8, do_sample=False, pad_token_id=0,
                  breakpoints=[Breakpoint(layer=0)])
    run.wait(60)
    st = sstats(c, s)
    assert run.state == "paused" and st["paused_bytes"] >= kv(16)
    assert st["quota"]["gpu_bytes"]["used"] == st["paused_bytes"]  # the paused run's Stack counts
    # With the run's KV held, a generate that alone would fit does not.
    with pytest.raises(djinn.QuotaExceeded, match="quota_gpu_gb"):
        s.generate(rm, P1, max_new_tokens=8, do_sample=False, pad_token_id=0)
    run.cancel()
    assert sstats(c, s)["quota"]["gpu_bytes"]["used"] == 0
    ref = local_turns(model, device, (P1, GEN))[0]
    assert torch.equal(s.generate(rm, P1, **GEN), ref)


def test_forward_outputs_over_the_gpu_quota_are_freed(gpu_conn, model, device):
    c = gpu_conn
    s = c.session("fwd")
    rm = RemoteModel.from_module(s, model)
    with torch.no_grad():
        ref = model(P1.to(device)).logits.cpu()
    assert 24 * 1024 > QUOTA_GPU  # a forward over 24 tokens has 24 KiB of logits
    with pytest.raises(djinn.QuotaExceeded):
        rm(LONG)
    st = sstats(c, s)
    assert (st["tensors"], st["gpu_bytes"]) == (0, 0)
    # Outputs that fit are kept; one more that would not fit is freed, the held ones are untouched.
    a, b = rm(P1), rm(P1)
    st = sstats(c, s)
    assert (st["tensors"], st["gpu_bytes"]) == (2, 2 * 8 * 1024) and 2 * 8 * 1024 == QUOTA_GPU
    with pytest.raises(djinn.QuotaExceeded) as info:
        rm(P3)
    assert "freed" in info.value.message
    st = sstats(c, s)
    assert (st["tensors"], st["gpu_bytes"]) == (2, QUOTA_GPU)
    assert st["quota"]["gpu_bytes"] == {"limit": QUOTA_GPU, "used": QUOTA_GPU}
    assert torch.equal(a.logits.cpu(), ref) and torch.equal(b.logits.cpu(), ref)
    # A finished breakpoint run's outputs are held to the quota the same way.
    run = s.start(rm, P3, breakpoints=[])
    with pytest.raises(djinn.QuotaExceeded):
        run.wait()
    assert sstats(c, s)["tensors"] == 2
    # Freeing a handle makes room again.
    del b
    gc.collect()
    out = rm(P3)
    st = sstats(c, s)
    assert (st["tensors"], st["gpu_bytes"]) == (2, 8 * 1024 + 2 * 1024)
    with torch.no_grad():
        assert torch.equal(out.logits.cpu(), model(P3.to(device)).logits.cpu())
    # Another session of the same server is unaffected by this one's use.
    with c.session("other") as o:
        assert torch.equal(rm(P1, session=o).logits.cpu(), ref)


def test_graph_constants_and_intermediates_count_against_the_gpu_quota(gpu_conn):
    """Note [Graph peak memory]: a graph's constants are the session's Data (held with its compiled graph,
    shown in stats) and its intermediates' peak, estimated from the SRG's shapes, is checked before it
    runs. Both once ran outside any quota (a 256 KiB intermediate under this 16 KiB quota)."""
    from ..srg_builder import Builder

    c = gpu_conn
    s = c.session("graphs")

    def send(b, *outs) -> dict:
        sig, wire = b.wire(*outs)
        return s.call("run_graph", {"sig": sig, "graph": wire, "inputs": [], "fetch": [0]})

    b = Builder()
    (total,) = b.op("aten.sum.default", b.const(torch.arange(2048, dtype=torch.float32)))  # 8 KiB constant
    assert send(b, total)["tensors"][0].item() == 2047 * 2048 / 2
    st = sstats(c, s)
    assert (st["graphs"], st["graph_bytes"], st["tensors"]) == (1, 8192, 1)
    assert st["gpu_bytes"] == 8192 + 512 and st["quota"]["gpu_bytes"]["used"] == 8192 + 512  # + the output
    # Constants that would pass the quota are refused before they are copied in; nothing is kept.
    b = Builder()
    parts = [b.const(torch.full((2048,), float(k))) for k in range(2)]
    (both,) = b.op("aten.cat.default", parts)
    with pytest.raises(djinn.QuotaExceeded) as info:
        send(b, both)
    assert info.value.message == (f"this graph would take session {s.sid[:8]} to {8704 + 16384} bytes on the device "
                                  f"(16384 bytes of graph constants), over its GPU quota of {QUOTA_GPU} bytes "
                                  "(quota_gpu_gb); free tensors, reset the cache or ask for less")
    assert (sstats(c, s)["graphs"], sstats(c, s)["graph_bytes"]) == (1, 8192)
    # A 256 KiB intermediate whose output is 4 bytes: refused before it runs.
    b = Builder()
    (wide,) = b.op("aten.repeat.default", b.const(torch.ones(64)), [1024])
    (small,) = b.op("aten.sum.default", wide)
    with pytest.raises(djinn.QuotaExceeded, match=r"run_graph would take session .* \(the graph's intermediates "
                                                  r"and outputs peak at 262656 bytes\)"):
        send(b, small)
    st = sstats(c, s)
    assert (st["tensors"], st["graphs"], st["graph_bytes"]) == (1, 2, 8192 + 512)  # compiled, never run
    # Graphs within the quota run on; closing the session frees its graphs with it.
    b = Builder()
    (twice,) = b.op("aten.mul.Scalar", b.const(torch.ones(4)), 2.0)
    assert torch.equal(send(b, twice)["tensors"][0], torch.full((4,), 2.0))
    s.close()
    assert s.sid not in c.stats()["sessions"]


# -- the per-request cost budget of graphs ----------------------------------------------------------
def test_a_graph_over_the_cost_budget_is_refused_and_others_run_on(tmp_path, model, device):
    """Note [Graph cost]: a 128 x 128 x 128 matmul (2 x 128^3 operations) under a budget of 10^6 fails
    with CostBudgetExceeded naming the estimate and the limit, before it runs, as a run_graph and as a
    graph-path start; it is not cached. The same session, another client's graphs and a generate go on."""
    from ..srg_builder import Builder

    srv = start(tmp_path, "cost", graph_max_flops=10**6)
    c, other = Connection(srv.address, secret=None), Connection(srv.address, secret=None)
    try:
        s, o = c.session("heavy"), other.session("light")
        big = Builder()
        (prod,) = big.op("aten.mm.default", big.const(torch.ones(128, 128)), big.const(torch.ones(128, 128)))
        (total,) = big.op("aten.sum.default", prod)
        sig, wire = big.wire(total)
        for op in ("run_graph", "start"):
            with pytest.raises(djinn.CostBudgetExceeded) as info:
                s.call(op, {"sig": sig, "graph": wire, "inputs": [], "fetch": [0]})
            assert isinstance(info.value, QuotaExceeded) and info.value.code == "cost_budget_exceeded"
            assert info.value.message.startswith(  # the mm's 2 x 128^3, then the sum over its 128^2 elements
                f"this graph's estimated cost is {2 * 128**3 + 128**2} operations, over the server's per-request "
                "budget of 1e+06 (graph_max_flops); nothing ran.")
        st = sstats(c, s)
        assert (st["graphs"], st["graph_bytes"], st["tensors"], st["runs"]) == (0, 0, 0, {})  # nothing kept

        x16 = torch.randn(16, 16, generator=torch.Generator().manual_seed(5))

        def small(sess, scale: float) -> torch.Tensor:
            b = Builder()
            x = b.input(x16)
            (y,) = b.op("aten.mm.default", x, x)  # 2 x 16^3: within the budget
            (z,) = b.op("aten.mul.Scalar", y, scale)
            sig, wire = b.wire(z)
            return sess.call("run_graph", {"sig": sig, "graph": wire, "inputs": [x16], "fetch": [0]})["tensors"][0]

        assert torch.equal(small(o, 2.0), (x16 @ x16) * 2.0)  # another client's session
        assert torch.equal(small(s, 3.0), (x16 @ x16) * 3.0)  # and the refused one's
        rm = RemoteModel.from_module(o, model)
        assert torch.equal(o.generate(rm, P1, **GEN), local_turns(model, device, (P1, GEN))[0])
    finally:
        c.close()
        other.close()
        srv.stop()


# -- queued requests -------------------------------------------------------------------------------
def test_pipelined_requests_over_the_queue_quota_are_refused(tmp_path, model, device):
    srv = start(tmp_path, "queue", quota_queued_requests=2)
    c = Connection(srv.address, secret=None)
    intruder = Connection(srv.address, secret=None)
    try:
        s, other = c.session("pipelined"), c.session("other")
        rm = RemoteModel.from_module(s, model)
        long = dict(GEN, max_new_tokens=200)
        ref = local_turns(model, device, (P1, long), (P2, GEN))
        futs = [submit_generate(s, rm, P1, **long)]  # the running job: 1 of 2
        # Another client naming this session neither waits in its queue nor uses up its quota.
        for _ in range(3):
            with pytest.raises(SessionNotFound):
                intruder.transport.call("fetch", {"sid": s.sid, "handles": []})
        futs += [submit_generate(s, rm, P2, **GEN)]                   # queued behind it: 2 of 2
        futs += [submit_generate(s, rm, P3, **GEN) for _ in range(2)]  # one too many, twice
        futs += [s.submit("fetch", {"handles": []})]
        for f in futs[2:]:
            with pytest.raises(QuotaExceeded) as info:
                f.result(timeout=60)
            assert "quota_queued_requests=2" in info.value.message
        assert not futs[0].done()  # refused at once, while the job still ran
        st = sstats(c, s)
        assert st["quota"]["queued_requests"] == {"limit": 2, "used": 2}
        # Another session runs meanwhile, bitwise local.
        assert torch.equal(other.generate(rm, P1, **GEN), local_turns(model, device, (P1, GEN))[0])
        # The accepted ones complete in order, bitwise local.
        assert torch.equal(futs[0].result(timeout=120)["sequences"], ref[0])
        assert torch.equal(futs[1].result(timeout=120)["sequences"], ref[1])
        st = sstats(c, s)
        assert st["quota"]["queued_requests"]["used"] == 0 and st["kv_tokens"] == {rm.model_id: ref[1].shape[1]}
        # Within the quota again, pipelining works.
        pair = [submit_generate(s, rm, P3, **GEN), s.submit("fetch", {"handles": []})]
        pair[0].result(timeout=60)
        assert pair[1].result(timeout=60) == {"tensors": []}
    finally:
        intruder.close()
        c.close()
        srv.stop()


# -- host quota ------------------------------------------------------------------------------------
def test_session_over_the_host_quota_is_not_swapped_out(tmp_path, model, device):
    quota = kv(15)  # the small session's cache fits; the big one's does not
    srv = start(tmp_path, "host", policy="signal", swap_on_io_wait=True, quota_host_gb=gib(quota))
    c = Connection(srv.address, secret=None)
    try:
        small, big = c.session("small"), c.session("big")
        rm = RemoteModel.from_module(small, model)
        ref_small = local_turns(model, device, (P1, GEN), (P2, GEN))
        ref_big = local_turns(model, device, (LONG, GEN), (P2, GEN))
        assert torch.equal(small.generate(rm, P1, **GEN), ref_small[0])
        assert torch.equal(big.generate(rm, LONG, **GEN), ref_big[0])
        assert sstats(c, big)["gpu_bytes"] == kv(31) > quota
        big.signal("IO_WAIT", eta_s=30.0)
        small.signal("IO_WAIT", eta_s=30.0)
        deadline = time.monotonic() + 10
        while sstats(c, small)["state"] != "SWAPPED" and time.monotonic() < deadline:
            time.sleep(0.01)
        st_small, st_big = sstats(c, small), sstats(c, big)
        assert (st_small["state"], st_small["host_bytes"]) == ("SWAPPED", quota)
        assert st_small["quota"]["host_bytes"] == {"limit": quota, "used": quota}
        assert (st_big["state"], st_big["host_bytes"], st_big["swaps_out"]) == ("IO_WAIT", 0, 0)
        assert st_big["gpu_bytes"] == kv(31)  # it stays on the GPU
        assert torch.equal(big.generate(rm, P2, **GEN), ref_big[1])
        assert torch.equal(small.generate(rm, P2, **GEN), ref_small[1])  # swapped back, continues bitwise
        assert sstats(c, small)["swaps_in"] == 1
    finally:
        c.close()
        srv.stop()


def test_data_segment_refuses_a_swap_out_over_the_host_quota():
    """The Data segment's own check (Note [Host quota]): swap_out returns False and moves nothing."""
    from djinn.vmu.kv_pool import KVPool, KVShape

    model = tiny_llama(seed=1)  # on the CPU, like the segment
    seg = DataSegment(torch.device("cpu"), 1 << 20, swap_bw=1e9, host_quota=kv(10) - 1)
    pool = KVPool(KVShape.of_module(model), 8, 16, "cpu")
    seg.add_pool("m", pool)
    s = Session("a", "client", None)
    ids = torch.arange(3, 13).unsqueeze(0)
    seg.attach_kv(s, "m", KVState.empty(pool, ids[:, :0]))
    assert pool.reserve(s.kv["m"].table, 10)
    with torch.no_grad():
        model(ids, past_key_values=s.kv["m"].cache, use_cache=True)
    s.kv["m"].ids = ids
    seg.sync(s)  # its blocks are charged from now on
    assert seg.gpu_bytes("a") == kv(10) and not seg.swappable("a", kv(10))
    assert seg.swap_out(s) is False
    assert seg.mem("a").state.name == "ACTIVE" and seg.host_bytes("a") == 0 and seg.pool.used == 0
    assert s.kv["m"].table.blocks == 1
    seg.host_quota = kv(10)
    assert seg.swap_out(s) is True and seg.poll() == ["a"] and seg.host_bytes("a") == kv(10)
    seg.close(s)
    seg.close_all()


def test_quota_settings_are_validated(tmp_path):
    from djinn.config import ServerConfig

    assert ServerConfig().quota_gpu_gb is None and ServerConfig().quota_queued_requests is None
    ServerConfig(quota_gpu_gb=0.5, quota_host_gb=0, quota_queued_requests=1).validate()
    for bad in (dict(quota_gpu_gb=-1), dict(quota_host_gb="1"), dict(quota_gpu_gb=True),
                dict(quota_queued_requests=0), dict(quota_queued_requests=1.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ServerConfig(**bad).validate()
