"""Tier 2: one server with two worker processes (`--workers 2`, gloo on the CPU): placement, routing,
merged stats, a client leaving, and a killed worker failing only its own sessions
(Note [One server, several workers] in djinn/server/cluster/front.py)."""
from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from djinn.frontend import wire
from djinn.frontend.connection import Connection
from djinn.frontend.remote import RemoteModel
from djinn.protocol.errors import InvalidRequest, SessionLost, SessionNotFound

from ..models import TINY_BUILDERS

P = torch.tensor([[1, 17, 42, 99, 5, 250, 7, 64]])


@pytest.fixture(scope="module")
def model():
    return TINY_BUILDERS["llama"](seed=0, device="cpu")


@pytest.fixture(scope="module")
def want(model):
    with torch.no_grad():
        return model.generate(P, max_new_tokens=8, do_sample=False)


def _local_continuation(model, seq: torch.Tensor, more: torch.Tensor, n: int) -> torch.Tensor:
    """What a session that holds `seq` gives for `more` and n greedy tokens: one local generate."""
    with torch.no_grad():
        return model.generate(torch.cat([seq, more], 1), max_new_tokens=n, do_sample=False)


def _continues(model, s, rm, seq: torch.Tensor) -> bool:
    """Whether session `s`, holding `seq`, continues [[3, 4]] with 4 greedy tokens as a local generate."""
    more = torch.tensor([[3, 4]])
    return torch.equal(s.generate(rm, more, max_new_tokens=4), _local_continuation(model, seq, more, 4))


def _workers_of(conn) -> dict[str, int]:
    return {sid: s["worker"] for sid, s in conn.stats()["sessions"].items()}


def test_sessions_are_spread_over_the_workers_and_generate_as_local(start_server, model, want):
    srv = start_server("--workers", "2")
    conn = Connection(srv.address, secret=None)
    try:
        # Opened before any model: both workers report no free KV yet, so the fewer sessions wins.
        a, b = conn.session("a"), conn.session("b")
        placed = _workers_of(conn)
        assert {placed[a.sid], placed[b.sid]} == {0, 1}
        for s in (a, b):
            rm = RemoteModel.from_module(s, model)
            assert torch.equal(s.generate(rm, P, max_new_tokens=8), want)
            # KV continues on the session's own worker
            more = s.generate(rm, torch.tensor([[3, 4]]), max_new_tokens=4)
            assert more.shape[1] == want.shape[1] + 2 + 4
        st = conn.stats()
        assert [w["rank"] for w in st["workers"]] == [0, 1]
        assert all(w["alive"] and w["sessions"] == 1 for w in st["workers"])
        mid = next(iter(st["models"]))
        assert st["models"][mid]["workers"] == [0, 1]
        assert sorted(st["models"][mid]["sessions"]) == sorted([a.sid, b.sid])
        assert st["segments"]["text"] == sum(w["segments"]["text"] for w in st["workers"]) > 0
        # A session id is only good for its client, whichever worker holds it.
        other = Connection(srv.address, secret=None)
        with pytest.raises(SessionNotFound):
            other.transport.call("reset_kv", {"sid": a.sid})
        other.close()
        # A client that leaves has its sessions closed on every worker.
        conn.close()
        conn = Connection(srv.address, secret=None)
        deadline = time.monotonic() + 10
        while conn.stats()["sessions"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert conn.stats()["sessions"] == {}
    finally:
        conn.close()


def test_a_killed_worker_fails_only_its_sessions(start_server, model, want):
    srv = start_server("--workers", "2")
    conn = Connection(srv.address, secret=None)
    try:
        a, b = conn.session("a"), conn.session("b")
        models = {s.sid: RemoteModel.from_module(s, model) for s in (a, b)}
        placed = _workers_of(conn)
        victim = next(w for w in conn.stats()["workers"] if w["rank"] == placed[b.sid])
        os.kill(victim["pid"], signal.SIGKILL)
        with pytest.raises(SessionLost):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # until the front has seen the worker go
                b.generate(models[b.sid], P, max_new_tokens=8)
                time.sleep(0.1)
        # the other worker's session goes on, bitwise as before
        assert torch.equal(a.generate(models[a.sid], P, max_new_tokens=8), want)
        st = conn.stats()
        assert [w["alive"] for w in sorted(st["workers"], key=lambda w: w["rank"])] == \
            [r != placed[b.sid] for r in (0, 1)]
        assert set(st["sessions"]) == {a.sid}
        # new sessions go to the worker left
        c = conn.session("c")
        assert _workers_of(conn)[c.sid] == placed[a.sid]
    finally:
        conn.close()


def test_a_migrated_session_continues_bitwise(start_server, model):
    """Note [Migration]: a swapped session's KV, token ids and model move; generating after the move
    equals a session that never moved, and weights are sent only to a worker that lacks them."""
    srv = start_server("--workers", "2", "--swap-on-io-wait")
    conn = Connection(srv.address, secret=None)
    try:
        a, ref = conn.session("moving"), conn.session("staying")
        placed = _workers_of(conn)
        assert placed[a.sid] != placed[ref.sid]
        ra, rr = RemoteModel.from_module(a, model), RemoteModel.from_module(ref, model)
        first = a.generate(ra, P, max_new_tokens=6)
        assert torch.equal(first, ref.generate(rr, P, max_new_tokens=6))
        weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        a.signal("IO_WAIT", eta_s=60)  # its KV goes to the host pool: it moves from there
        deadline = time.monotonic() + 10
        while conn.stats()["sessions"][a.sid]["state"] != "SWAPPED" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert conn.stats()["sessions"][a.sid]["state"] == "SWAPPED"
        # the other worker holds these weights already (the reference uploaded them): only the state goes
        moved = a.migrate()
        assert moved["moved"] and moved["worker"] == placed[ref.sid] and 0 < moved["bytes"] < weight_bytes
        st = conn.stats()
        assert st["sessions"][a.sid]["worker"] == placed[ref.sid]
        assert st["sessions"][a.sid]["kv_tokens"] == {ra.model_id: first.shape[1]}
        a.signal("COMPUTE")
        nxt = torch.tensor([[9, 8, 7]])
        second = a.generate(ra, nxt, max_new_tokens=5)
        assert torch.equal(second, ref.generate(rr, nxt, max_new_tokens=5))
        # back to a worker that holds no session now, and no weights: they go too
        ref.close()
        back = a.migrate(placed[a.sid])
        assert back["moved"] and back["worker"] == placed[a.sid] and back["bytes"] >= weight_bytes
        # it was resident, so its KV is in this worker's blocks already, not waiting for its next call
        assert conn.stats()["sessions"][a.sid]["kv_blocks"] == -(-second.shape[1] // 16)
        more = torch.tensor([[5, 6]])
        local = _local_continuation(model, second, more, 4)
        assert torch.equal(a.generate(ra, more, max_new_tokens=4), local)
        # moving where it is, or to a worker that does not exist: nothing moves, the session goes on
        assert a.migrate(placed[a.sid])["moved"] is False
        with pytest.raises(InvalidRequest, match="not a live worker"):
            a.migrate(7)
        assert _workers_of(conn)[a.sid] == placed[a.sid]
    finally:
        conn.close()


def test_migrate_on_a_one_worker_server_says_why(conn):
    with conn.session("one") as s:
        with pytest.raises(Exception, match="one worker"):
            s.migrate()


def test_a_model_used_in_a_session_on_another_worker_is_copied_there(start_server, model, want):
    """Note [Models between workers]: the second session's worker gets the model from the first's over
    the group; the client uploads nothing again, and a client that holds no such model is refused."""
    srv = start_server("--workers", "2")
    conn = Connection(srv.address, secret=None)
    other = Connection(srv.address, secret=None)
    try:
        a, b = conn.session("a"), conn.session("b")
        placed = _workers_of(conn)
        assert placed[a.sid] != placed[b.sid]
        rm = RemoteModel.from_module(a, model)
        before = conn.stats()["workers"][placed[b.sid]]["segments"]["text"]
        assert torch.equal(b.generate(rm, P, max_new_tokens=8), want)  # attach_model, then generate
        st = conn.stats()
        assert st["models"][rm.model_id]["workers"] == [0, 1]
        assert st["workers"][placed[b.sid]]["segments"]["text"] > before
        # another client cannot attach it by its id, wherever its session lands
        for s in (other.session("c"), other.session("d")):
            with pytest.raises(InvalidRequest, match="not held by any session of this client"):
                s.call("attach_model", {"model_id": rm.model_id})
    finally:
        other.close()
        conn.close()


def test_requests_waiting_for_memory_move_an_idle_session_to_another_worker(start_server, model):
    """Note [Balancing]: with one worker's KV pool held by an idle session and a generate there waiting
    for blocks (the resident policy never swaps), the front moves the idle session to the other worker;
    the waiting generate then runs, and the moved session continues exactly."""
    # 16 blocks of 16 tokens per worker's pool; each generate below holds 10 (8 + 150 tokens)
    srv = start_server("--workers", "2", "--policy", "resident", "--data-budget-gb", "0.000123",
                       "--kv-block-tokens", "16")
    conn = Connection(srv.address, secret=None)
    try:
        a, b = conn.session("idle"), conn.session("waiting")
        placed = _workers_of(conn)
        b.migrate(placed[a.sid])  # both on one worker
        ra, rb = RemoteModel.from_module(a, model), RemoteModel.from_module(b, model)
        first = a.generate(ra, P, max_new_tokens=150)
        with ThreadPoolExecutor(1) as pool:  # without the move it would wait as long as `a` idles
            waiting = pool.submit(b.generate, rb, P, max_new_tokens=150)
            try:
                got = waiting.result(timeout=30)
            finally:
                if not waiting.done():
                    conn.close()  # unblocks the call, so the test fails instead of hanging
        assert torch.equal(got, first)
        st = conn.stats()
        assert st["cluster"]["balance_moves"] >= 1
        assert st["sessions"][a.sid]["worker"] != placed[a.sid] == st["sessions"][b.sid]["worker"]
        assert _continues(model, a, ra, first)
    finally:
        conn.close()


def test_a_tensor_parallel_model_gives_the_tokens_of_one_device(start_server, model, want):
    """Note [Tensor-parallel sessions]: a tiny Llama sharded over two gloo workers (each half the heads
    and half the MLP) gives TP=1's greedy tokens, continuing its KV call after call; its logits are
    within a TP sum's rounding; a sampled call leaves both workers' KV alike (one seed for both)."""
    srv = start_server("--workers", "2", "--swap-on-io-wait")
    conn = Connection(srv.address, secret=None)
    try:
        s = conn.session("tp", tp=2)
        rm = RemoteModel.from_module(s, model, tp=2)
        assert torch.equal(s.generate(rm, P, max_new_tokens=8), want)
        # its KV is blocks of each worker's pool, half the heads each
        st = conn.stats()
        assert st["sessions"][s.sid]["kv_blocks"] == 1 and st["sessions"][s.sid]["kv_tokens"] == {rm.model_id: 16}
        half = [w["kv"]["models"][rm.model_id]["block_bytes"] for w in st["workers"]]
        assert half[0] == half[1] == 16 * 2 * 2 * 1 * 16 * 4  # tokens x layers x k|v x 1 of 2 kv heads x dim x fp32
        # swapped out while it waits on a tool (on both workers), it continues exactly when called again
        s.signal("IO_WAIT", eta_s=60)
        deadline = time.monotonic() + 10
        while conn.stats()["sessions"][s.sid]["state"] != "SWAPPED" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert conn.stats()["sessions"][s.sid]["state"] == "SWAPPED"
        again = torch.tensor([[11, 12]])
        after = _local_continuation(model, want, again, 4)
        assert torch.equal(s.generate(rm, again, max_new_tokens=4), after)
        with torch.no_grad():
            ref = model(P).logits
        torch.testing.assert_close(rm(P).logits.cpu(), ref, rtol=1e-5, atol=1e-5)
        sampled = s.generate(rm, torch.tensor([[3, 4]]), max_new_tokens=6, do_sample=True)  # no seed given
        more = torch.tensor([[5, 6, 7]])
        local = _local_continuation(model, sampled, more, 5)
        assert torch.equal(s.generate(rm, more, max_new_tokens=5), local)
        st = conn.stats()
        assert st["sessions"][s.sid]["worker"] == 0 and st["sessions"][s.sid]["workers"] == [0, 1]
        assert st["models"][rm.model_id]["workers"] == [0, 1]
        # what it does not do (yet), each refused saying so
        with pytest.raises(InvalidRequest, match="sharded over its block of workers"):
            s.migrate()
        with pytest.raises(InvalidRequest, match="needs a block of 3 workers"):
            conn.session("three", tp=3)
        plain = conn.session("plain")
        with pytest.raises(InvalidRequest, match="needs a session spanning"):
            RemoteModel.from_module(plain, model, tp=2)
        _steered_and_recorded(conn, model)  # the eager path (no fast decode on this server)
        stream = s.generate(rm, torch.tensor([[8]]), max_new_tokens=4, stream=True)  # streams there too
        toks = list(stream)
        assert len(toks) == 4 and stream.sequences[0, -4:].tolist() == toks
        # TP=1 in a plain session of the same server: the same greedy tokens
        rm1 = RemoteModel.from_module(plain, model)
        assert rm1.model_id != rm.model_id
        assert torch.equal(plain.generate(rm1, P, max_new_tokens=8), want)
        # a config drawn by the server: sharded, the tokens of the same config unsharded
        cfg = model.config
        tpc, onec = RemoteModel.from_config(s, cfg, seed=3, tp=2), RemoteModel.from_config(plain, cfg, seed=3)
        assert torch.equal(s.generate(tpc, P, max_new_tokens=8), plain.generate(onec, P, max_new_tokens=8))
    finally:
        conn.close()


@pytest.mark.parametrize("fast", [False, True], ids=["eager", "batched"])
def test_a_session_paused_at_a_breakpoint_moves_with_its_run(start_server, model, fast):
    """Note [Migration]: a generate run paused at its second stop, edited at both, moves with its
    session; on the other worker its stop reads as before (same handles), takes more edits, and resumes
    to the output of a twin run that never moved. With the fast path, the run's steps before, between
    and after its stops ran batched (Note [Between stops]): the moved run replays them eagerly, with
    the first stop's edit its earlier run logged."""
    from djinn.frontend.run import Breakpoint

    srv = start_server("--workers", "2", *(("--fast-decode", "on") if fast else ()))
    conn = Connection(srv.address, secret=None)
    v1, v0, va = (torch.randn(64, generator=torch.Generator().manual_seed(k)) for k in (5, 6, 7))
    try:
        moving, twin = conn.session("moving"), conn.session("twin")
        placed = _workers_of(conn)
        stops = []
        for s in (moving, twin):
            rm = RemoteModel.from_module(s, model)
            run = s.start(rm, P, method="generate", max_new_tokens=6,
                          breakpoints=[Breakpoint("model.layers.0", step=1), Breakpoint("model.layers.1", step=3)])
            run.wait().activation.add_(v1)
            stop = run.resume()
            stop.activation.add_(v0)
            stops.append((run, stop))
        before = stops[0][1].activation.cpu()
        moved = moving.migrate()
        assert moved["moved"] and moved["worker"] == placed[twin.sid]
        (run, stop), (trun, tstop) = stops
        assert torch.equal(stop.activation.cpu(), before) and torch.equal(before, tstop.activation.cpu())
        assert conn.stats()["sessions"][moving.sid]["paused"]
        for st in (stop, tstop):
            st.activation[:, -1] += va
        assert run.resume() is None and trun.resume() is None
        assert torch.equal(run.output, trun.output)
        with torch.no_grad():
            plain = model.generate(P, max_new_tokens=6, do_sample=False)
        assert not torch.equal(run.output, plain)  # the edits did something
        if fast:  # sampled, its batched steps could not be replayed: it stays, saying why
            run = moving.start(RemoteModel.from_module(moving, model), P, method="generate", max_new_tokens=6,
                               do_sample=True, seed=1, breakpoints=[Breakpoint("model.layers.0", step=2)])
            assert run.wait().step == 2
            with pytest.raises(InvalidRequest, match="samples and took batched steps"):
                moving.migrate()
            assert run.resume() is None
    finally:
        conn.close()


def test_a_tensor_parallel_run_stops_reads_and_steers_as_one_device(start_server, model):
    """Note [Tensor-parallel sessions]: a breakpoint at a decoder layer's output reads the replicated
    hidden state (TP=1's to rounding); an edit there, applied on both workers alike, gives TP=1's
    tokens with the same edit."""
    from djinn.frontend.run import Breakpoint

    srv = start_server("--workers", "2")
    conn = Connection(srv.address, secret=None)
    v = torch.randn(64, generator=torch.Generator().manual_seed(3)) * 4
    try:
        tp, one = conn.session("tp", tp=2), conn.session("one")
        got = {}
        for s, k in ((tp, 2), (one, None)):
            rm = RemoteModel.from_module(s, model, tp=k)
            run = s.start(rm, P, method="generate", max_new_tokens=6,
                          breakpoints=[Breakpoint("model.layers.0", step=1), Breakpoint("model.layers.1", step=2)])
            stop = run.wait()
            act = stop.activation.cpu()
            stop.activation.add_(v)
            stop = run.resume()
            assert (stop.path, stop.step) == ("model.layers.1", 2)
            assert run.resume() is None
            got[k] = (act, run.output)
        torch.testing.assert_close(got[2][0], got[None][0], rtol=1e-5, atol=1e-5)
        assert torch.equal(got[2][1], got[None][1])
        with torch.no_grad():
            assert not torch.equal(got[2][1], model.generate(P, max_new_tokens=6, do_sample=False))
        with pytest.raises(InvalidRequest, match="can never stop"):
            tp.start(RemoteModel.from_module(tp, model, tp=2), P, method="generate", max_new_tokens=2,
                     breakpoints=[Breakpoint("model.layers.0", step=5)]).wait()
    finally:
        conn.close()


def test_a_move_the_destination_has_no_room_for_leaves_the_session_where_it_was(start_server, model):
    """Note [Migration]: KV that was on the source's device must fit the destination's free blocks at
    import; when it does not, the move fails saying why, nothing is left behind there, and the session
    goes on where it was, exactly."""
    srv = start_server("--workers", "2", "--policy", "resident", "--data-budget-gb", "0.000123",
                       "--kv-block-tokens", "16")  # 16 blocks a worker; each session below holds 10
    conn = Connection(srv.address, secret=None)
    try:
        a, b = conn.session("a"), conn.session("b")
        placed = _workers_of(conn)
        ra, rb = RemoteModel.from_module(a, model), RemoteModel.from_module(b, model)
        first = a.generate(ra, P, max_new_tokens=150)
        b.generate(rb, P, max_new_tokens=150)
        with pytest.raises(InvalidRequest, match="did not move"):
            a.migrate(placed[b.sid])
        st = conn.stats()
        assert st["sessions"][a.sid]["worker"] == placed[a.sid] and set(st["sessions"]) == {a.sid, b.sid}
        assert _continues(model, a, ra, first)
    finally:
        conn.close()


def test_tensor_parallel_models_take_a_block_of_workers_each(start_server, model, want):
    """Note [Tensor-parallel sessions]: on four workers a tp=2 session takes an aligned pair (its
    sub-group made when the workers joined); a second one takes the other pair, a plain session
    meanwhile serves beside them; each gives one device's greedy tokens. tp=3 does not divide 4."""
    srv = start_server("--workers", "4")
    conn = Connection(srv.address, secret=None)
    try:
        a, b = conn.session("a", tp=2), conn.session("b", tp=2)
        ra, rb = RemoteModel.from_module(a, model, tp=2), RemoteModel.from_module(b, model, tp=2)
        plain = conn.session("plain")
        r1 = RemoteModel.from_module(plain, model)
        with ThreadPoolExecutor(3) as pool:
            outs = [f.result(timeout=120) for f in [pool.submit(s.generate, rm, P, max_new_tokens=8)
                                                     for s, rm in ((a, ra), (b, rb), (plain, r1))]]
        assert all(torch.equal(o, want) for o in outs)
        st = conn.stats()
        spans = sorted(st["sessions"][s.sid]["workers"] for s in (a, b))
        assert spans == [[0, 1], [2, 3]]
        assert st["sessions"][plain.sid]["worker"] in range(4)
        assert _continues(model, b, rb, want)
        with pytest.raises(InvalidRequest, match="needs a block of 3 workers"):
            conn.session("three", tp=3)
    finally:
        conn.close()


def test_a_tensor_parallel_generate_takes_the_decode_step(start_server, model, want):
    """Note [Tensor-parallel decode]: with the fast path on, a TP=2 generate runs in the decode pool's
    batched step on both workers (prompt chunks, then a step a token), giving one device's greedy
    tokens, continuing its KV, and a sampled call leaves both workers' KV alike."""
    srv = start_server("--workers", "2", "--fast-decode", "on")
    conn = Connection(srv.address, secret=None)
    try:
        s = conn.session("tp", tp=2)
        rm = RemoteModel.from_module(s, model, tp=2)
        assert torch.equal(s.generate(rm, P, max_new_tokens=8), want)
        assert _continues(model, s, rm, want)
        sampled = s.generate(rm, torch.tensor([[9]]), max_new_tokens=5, do_sample=True)
        again = torch.tensor([[5, 6]])
        assert torch.equal(s.generate(rm, again, max_new_tokens=3), _local_continuation(model, sampled, again, 3))
        st = conn.stats()
        assert st["sessions"][s.sid]["decode"]["fast"] == 4 and st["sessions"][s.sid]["decode"]["eager"] == 0
        assert all(w["kv"]["models"][rm.model_id]["blocks_total"] > 0 for w in st["workers"])
        # a declared KV budget reserves up to it; the call still makes its own number of tokens
        capped = conn.session("capped", tp=2, max_kv_tokens=64)
        rc = RemoteModel.from_module(capped, model, tp=2)
        assert torch.equal(capped.generate(rc, P, max_new_tokens=8), want)
        steered = _steered_and_recorded(conn, model)
        assert conn.stats()["sessions"][steered.sid]["decode"]["fast"] == 1
        # a fork spans the same pair, sharing each worker's share of the blocks; both go on alone
        child = s.fork("child")
        st = conn.stats()
        assert st["sessions"][child.sid]["workers"] == st["sessions"][s.sid]["workers"] == [0, 1]
        base = _local_continuation(model, sampled, again, 3)
        x, y = torch.tensor([[21, 22]]), torch.tensor([[31]])
        assert torch.equal(child.generate(rm, x, max_new_tokens=4), _local_continuation(model, base, x, 4))
        assert torch.equal(s.generate(rm, y, max_new_tokens=4), _local_continuation(model, base, y, 4))
        # a stream left after two tokens: the session keeps exactly those (Note [Tensor-parallel decode])
        now, z = _local_continuation(model, base, y, 4), torch.tensor([[41, 42]])
        full = _local_continuation(model, now, z, 6)[0, now.shape[1] + 2:].tolist()
        got = []
        for tok in s.generate(rm, z, max_new_tokens=6, stream=True):
            got.append(tok)
            if len(got) == 2:
                break
        assert got == full[:2]
        kept, w = torch.cat([now, z, torch.tensor([got])], 1), torch.tensor([[51]])
        held = _local_continuation(model, kept, w, 3)
        assert torch.equal(s.generate(rm, w, max_new_tokens=3), held)
        # interrupted while waiting (Ctrl-C cancels with keep=0): the call has ended; the session keeps none of it
        fut = s.submit("generate", {"model_id": rm.model_id, "input_ids": torch.tensor([[61]]), "seed": None,
                                    "kwargs": wire.pack(s, {"max_new_tokens": 3, "do_sample": False}),
                                    "use_session_kv": True, "stream": False})
        fut.result(60)
        assert s.call("cancel_generate", {"rid": fut.rid, "keep": 0}) == {"cancelled": True, "kept": 0}
        v = torch.tensor([[71]])
        assert torch.equal(s.generate(rm, v, max_new_tokens=3), _local_continuation(model, held, v, 3))
    finally:
        conn.close()


def _steered_and_recorded(conn, model):
    """A steered, recording TP=2 generate (Note [Tensor-parallel sessions]): the local hook's greedy
    tokens, its recorded outputs within a TP sum's rounding."""
    from .test_steering import _hooked_generate, _vector

    s = conn.session("steered", tp=2)
    rm = RemoteModel.from_module(s, model, tp=2)
    v, got = _vector(model, 1), []
    kw = dict(max_new_tokens=6, do_sample=False)
    want = _hooked_generate(model, P, {1: v}, {1: got}, **kw)
    assert not torch.equal(want, _hooked_generate(model, P, {}, **kw)), "the vector changes nothing: no test"
    seq, acts = s.generate(rm, P, steer={1: v}, record=[1], **kw)
    assert torch.equal(seq, want)
    torch.testing.assert_close(acts[1].cpu(), torch.cat(got).cpu(), rtol=1e-4, atol=1e-4)
    return s
