"""Tier 3: one server on two GPUs (`--gpus 0,1`, NCCL between the workers; Note [One server, several
workers] in djinn/server/cluster/front.py). Checked here: a session's KV moves GPU to GPU from device
memory and the session continues as a twin that never moved (eager path: bitwise), a paused run moves
with it, and a tensor-parallel model gives the greedy tokens of one GPU on a tiny Llama (its weights
are drawn on the CPU for both, uploaded from the same local model). Speeds are the benchmark's
(OSDI_Evaluation/exp_cluster/bench_cluster.py), not a test's to assert."""
from __future__ import annotations

import pytest
import torch

from djinn.frontend.connection import Connection
from djinn.frontend.embedded import EmbeddedServer
from djinn.frontend.remote import RemoteModel
from djinn.frontend.run import Breakpoint

from ..models import tiny_llama

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")]
P = torch.tensor([[1, 17, 42, 99, 5, 250, 7, 64]])


@pytest.fixture(scope="module")
def conn():
    srv = EmbeddedServer("cuda:0", 300.0, ["--gpus", "0,1", "--fast-decode", "off"])
    c = Connection(srv.address, secret=None)
    yield c
    c.close()
    srv.stop()


def test_a_session_moves_gpu_to_gpu_and_continues_as_one_that_stayed(conn):
    model = tiny_llama(seed=0)
    moving, twin = conn.session("moving"), conn.session("twin")
    rms = {s.sid: RemoteModel.from_module(s, model) for s in (moving, twin)}
    for s in (moving, twin):
        s.generate(rms[s.sid], P, max_new_tokens=8)
    before = {sid: v["worker"] for sid, v in conn.stats()["sessions"].items()}
    moved = moving.migrate()
    assert moved["moved"] and moved["worker"] != before[moving.sid]
    more = torch.tensor([[3, 4, 5]])
    assert torch.equal(moving.generate(rms[moving.sid], more, max_new_tokens=8),
                       twin.generate(rms[twin.sid], more, max_new_tokens=8))
    run = moving.start(rms[moving.sid], P, method="generate", max_new_tokens=4,
                       breakpoints=[Breakpoint("model.layers.1", step=2)])
    stop = run.wait()
    act = stop.activation.cpu()
    assert moving.migrate()["moved"]
    assert torch.equal(stop.activation.cpu(), act)
    assert run.resume() is None and run.output.shape[1] == P.shape[1] + 4


def test_a_tensor_parallel_tiny_llama_gives_the_tokens_of_one_gpu(conn):
    model = tiny_llama(seed=0)
    tp, one = conn.session("tp", tp=2), conn.session("one")
    rm2, rm1 = RemoteModel.from_module(tp, model, tp=2), RemoteModel.from_module(one, model)
    assert torch.equal(tp.generate(rm2, P, max_new_tokens=16), one.generate(rm1, P, max_new_tokens=16))
    torch.testing.assert_close(rm2(P).logits.cpu(), rm1(P).logits.cpu(), rtol=1e-4, atol=1e-4)
