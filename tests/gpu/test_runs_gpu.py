"""Tier 3 (GPU): a breakpoint run's steps before, between and after its stops run batched on the fast
path (Notes [The head of a run], [Between stops], [The tail of a run] in server/handlers/run_ops.py):
each stop on a CUDA server sees the all-eager run's activation to fp16 rounding, edits there give its
greedy tokens, a fork at a later stop continues as its parent, and every block goes back."""
from __future__ import annotations

import pytest
import torch

from djinn import Breakpoint
from djinn.frontend.connection import Connection
from djinn.frontend.remote import RemoteModel

from ..conftest import ServerProcess
from ..models import VOCAB, tiny_llama

pytestmark = pytest.mark.gpu


def test_a_runs_batched_steps_on_cuda_keep_the_eager_runs_stops_and_tokens():
    srv = ServerProcess("--fast-decode", "on", device="cuda:0")
    conn = Connection(srv.address, secret=None)
    try:
        s = conn.session()
        model = tiny_llama(seed=41).eval()
        rm = RemoteModel.from_module(s, model)
        ids = torch.randint(3, VOCAB, (1, 11), generator=torch.Generator().manual_seed(41))
        bps = [Breakpoint(layer=1, step=k) for k in (3, 8, 9)]
        got = []
        for deterministic in (True, False):
            run = s.start(rm, ids, method="generate", max_new_tokens=16, do_sample=False,
                          deterministic=deterministic, breakpoints=bps)
            stops, stop = [], run.wait(60)
            while stop is not None:
                stops.append((stop.step, stop.activation.cpu().float()))
                stop.activation[:, -1] += 2.0
                stop = run.resume()
            got.append((stops, run.output))
        (eager, out_e), (fast, out_f) = got
        assert [k for k, _ in fast] == [k for k, _ in eager] == [3, 8, 9]
        for (_, a), (_, b) in zip(eager, fast):
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)  # batched GEMMs round unlike eager ones
        assert torch.equal(out_f, out_e)
        d = conn.stats()["sessions"][s.sid]["decode"]
        assert d["fast"] == 3, d  # the head (steps 0-2), steps 4-7, the tail (10-15)
        run = s.start(rm, ids, method="generate", max_new_tokens=16, do_sample=False, breakpoints=bps)
        assert run.wait(60).step == 3
        stop = run.resume()
        assert stop.step == 8
        child = stop.fork()
        assert child.resume().step == 9 and child.resume() is None
        assert run.resume().step == 9 and run.resume() is None
        assert torch.equal(child.output, run.output)
        held = sum(m["blocks_held"] for m in conn.stats()["kv"]["models"].values())
        assert held == 0
    finally:
        conn.close()
        srv.stop()
