"""Tier 2: a generate run whose breakpoints cannot fire is a plain generate job (Note [A run that cannot
stop is a generate] in djinn/server/handlers/run_ops.py): it takes the path a plain generate takes (the
decode fast path where allowed) and gives its tokens, it does not stall the engine, and it keeps the
job's guarantees; a run with a breakpoint it can reach still pauses there."""
from __future__ import annotations

import pytest
import torch

import djinn
from djinn import Breakpoint
from djinn.frontend.connection import Connection
from djinn.frontend.remote import RemoteModel

from ..conftest import DEVICE
from ..models import VOCAB, tiny_llama
from .test_scheduling import wait_for

N = 6  # max_new_tokens: the generate's model calls are steps 0 .. N - 1


@pytest.fixture(scope="module")
def fast_server():
    from ..conftest import ServerProcess

    s = ServerProcess("--fast-decode", "on", "--fast-decode-max-batch", "8", "--fast-decode-max-len", "256")
    yield s
    s.stop()


def _prompt(seed: int, n: int = 7) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _local(model, ids, n):
    model, ids = model.to(DEVICE), ids.to(DEVICE)
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids)).cpu()


def _decode(conn, s) -> dict:
    return conn.stats()["sessions"][s.sid]["decode"]


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_a_run_that_cannot_stop_takes_the_fast_path_with_the_plain_generates_tokens(fast_server, sampled):
    model = tiny_llama(seed=21).eval()
    conn = Connection(fast_server.address, secret=None)
    try:
        s = conn.session()
        rm = RemoteModel.from_module(s, model)
        ids = _prompt(1)
        kw = dict(max_new_tokens=N, do_sample=True, temperature=0.9, top_k=20) if sampled else \
            dict(max_new_tokens=N, do_sample=False)
        plain = rm.generate(ids, seed=7, **kw)
        assert _decode(conn, s)["fast"] == 1
        # step N is one past the last model call; 10**6 is what exp3 uses for "never"
        run = s.start(rm, ids, method="generate", seed=7,
                      breakpoints=[Breakpoint(layer=1, step=10**6), Breakpoint(layer=0, step=N, where="before")], **kw)
        assert run.wait(60) is None and run.state == "finished"
        assert torch.equal(run.output, plain)
        if not sampled:
            assert torch.equal(run.output, _local(model, ids, N))
        d = _decode(conn, s)
        assert (d["fast"], d["eager"]) == (2, 0), d  # the run's generate took the fast path too
        assert set(run.timing) >= {"server_us", "compute_us", "handoff_us", "edits_us"}
        # it ended: a late resume or cancel says so, as for any run that ended
        with pytest.raises(djinn.InvalidRequest, match="has ended: finished"):
            s.call("resume", {"run": run.run_id})
        assert s.call("cancel_run", {"run": run.run_id}) == {"ended": "finished"}
        assert conn.stats()["sessions"][s.sid]["runs"] == {}
    finally:
        conn.close()


def test_the_last_reachable_step_still_pauses_and_one_past_it_does_not(conn, local_model):
    """Boundary of generate_calls: with N new tokens, step N - 1 is the last model call (it pauses,
    bitwise the local generate's tokens after resuming); step N can never fire, so that run is a
    plain generate job (counted in the session's decode stats, which runs never were)."""
    model = local_model
    s = conn.session()
    rm = RemoteModel.from_module(s, model)
    ids = _prompt(2)
    ref = _local(model, ids, N)
    before = _decode(conn, s)
    run = s.start(rm, ids, method="generate", max_new_tokens=N, do_sample=False,
                  breakpoints=[Breakpoint(layer=0, step=N - 1), Breakpoint(layer=1, step=N)])
    stop = run.wait(60)
    assert stop is not None and (stop.step, stop.hit, stop.path) == (N - 1, 0, "model.layers.0")
    assert run.resume() is None and torch.equal(run.output, ref)
    assert _decode(conn, s) == before  # a run that can stop is a run: not a generate job
    run = s.start(rm, ids, method="generate", max_new_tokens=N, do_sample=False, breakpoints=[Breakpoint(layer=0, step=N)])
    assert run.wait(60) is None and torch.equal(run.output, ref)
    assert _decode(conn, s)["eager"] == before["eager"] + 1  # the CPU server's plain generate path
    s.close()


@pytest.fixture(scope="module")
def local_model():
    return tiny_llama(seed=22).eval()


def test_a_long_run_that_cannot_stop_does_not_block_other_sessions(conn, local_model):
    """It is stepped among the other jobs: another session's generate, sent while it runs, is answered
    before it ends, and stats (served while it runs) show it as the session's job. Before, it ran
    whole on the engine thread, and stats waited for it."""
    model = local_model
    s, other = conn.session(), conn.session()
    rm = RemoteModel.from_module(s, model)
    orm = RemoteModel.from_module(other, model)
    ids = _prompt(3)
    run = s.start(rm, ids, method="generate", max_new_tokens=240, do_sample=False, breakpoints=[Breakpoint(layer=0, step=240)])
    job = wait_for(lambda: (j := conn.stats()["sessions"][s.sid]["job"]) and j.get("steps", 0) > 3 and j, 30)
    assert job["op"] == "start"
    assert torch.equal(other.generate(orm, ids, max_new_tokens=2, do_sample=False), _local(model, ids, 2))
    assert not run._future.done(), "the other session waited for the whole run"
    assert run.wait(60) is None and torch.equal(run.output, _local(model, ids, 240))
    s.close()
    other.close()


def test_closing_the_session_fails_a_run_that_cannot_stop(conn, local_model):
    s = conn.session()
    rm = RemoteModel.from_module(s, local_model)
    run = s.start(rm, _prompt(4), method="generate", max_new_tokens=240, do_sample=False)
    wait_for(lambda: ((conn.stats()["sessions"][s.sid]["job"] or {}).get("steps", 0) > 3), 30)
    s.close()
    with pytest.raises(djinn.SessionNotFound):
        run.wait(60)


def test_deterministic_keeps_a_run_that_cannot_stop_eager_and_bitwise(fast_server):
    """As for a plain generate: deterministic=True takes the eager path (bitwise the local generate)."""
    model = tiny_llama(seed=23).eval()
    conn = Connection(fast_server.address, secret=None)
    try:
        s = conn.session()
        rm = RemoteModel.from_module(s, model)
        ids = _prompt(5)
        run = s.start(rm, ids, method="generate", deterministic=True, max_new_tokens=N, do_sample=False,
                      breakpoints=[Breakpoint(layer=0, step=N)])
        assert run.wait(60) is None and torch.equal(run.output, _local(model, ids, N))
        d = _decode(conn, s)
        assert (d["fast"], d["eager"], d["eager_why"]) == (0, 1, "deterministic=True")
        with pytest.raises(djinn.InvalidRequest, match="deterministic"):
            s.start(rm, ids, method="generate", deterministic="yes", max_new_tokens=N).wait(60)
    finally:
        conn.close()
