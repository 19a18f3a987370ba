"""Tier 2: random streams are per call and per tenant (Note [Random streams] in djinn/server/execution/rng.py).

Unseeded sampling is fresh every time; a seeded call draws what the same call draws locally after
`torch.manual_seed(seed)`, whatever other tenants run, seed or sample meanwhile; and one tenant's seed
decides nothing another tenant draws. On the eager path (the shared server) and the decode fast path.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import djinn
from djinn.frontend import wire
from djinn.frontend.connection import Connection
from djinn.frontend.remote import RemoteModel

from ..models import tiny_llama

PROMPT = torch.tensor([[1, 17, 42, 99, 5, 250, 7, 64, 31, 128]])
SAMPLE = dict(max_new_tokens=24, do_sample=True)


@pytest.fixture(scope="module")
def model(device):
    return tiny_llama(seed=21, device=device)


def local_sample(model, device, seed: int, **kw) -> torch.Tensor:
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(PROMPT.to(device), **kw).cpu()


def submit_generate(s, rm, ids, seed=None, **kw):
    """A stateless generate sent without waiting for its reply."""
    rm.attach(s)
    return s.submit("generate", {"model_id": rm.model_id, "input_ids": ids, "use_session_kv": False,
                                 "seed": seed, "kwargs": wire.pack(s, kw)})


def test_unseeded_sampling_differs_between_calls(conn, model):
    """Each unseeded call draws fresh entropy: generates, session generates and generate runs differ
    (the engine used to put its RNG state back after every step, so each started from the same one)."""
    with conn.session("a") as s:
        rm = RemoteModel.from_module(s, model)
        a, b = rm.generate(PROMPT, **SAMPLE), rm.generate(PROMPT, **SAMPLE)
        assert not torch.equal(a, b)
        s1, s2 = s.generate(rm, PROMPT, **SAMPLE), conn.session().generate(rm, PROMPT, **SAMPLE)
        assert not torch.equal(s1, s2) and not torch.equal(s1, a)
        r1 = s.start(rm, PROMPT, method="generate", **SAMPLE)
        r2 = s.start(rm, PROMPT, method="generate", **SAMPLE)
        assert r1.wait() is None and r2.wait() is None
        assert not torch.equal(r1.output, r2.output)


def test_a_seed_does_not_decide_another_tenants_draws(conn, model, device):
    """Tenant A's seed (on a greedy generate, a graph forward, a sampled generate) is not the stream
    tenant B samples from next: B's unseeded generate is not the seeded local one, nor repeatable."""
    victim = Connection(conn.address, secret=None)
    try:
        a, b = conn.session("a"), victim.session("b")
        rm_a, rm_b = RemoteModel.from_module(a, model), RemoteModel.from_module(b, model)
        drop = djinn.remote(nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5)).train(), session=a)
        ref = local_sample(model, device, 5, **SAMPLE)
        seeding = [lambda: rm_a.generate(PROMPT, seed=5, max_new_tokens=2, do_sample=False),
                   lambda: drop(torch.ones(2, 8), seed=5),
                   lambda: rm_a.generate(PROMPT, seed=5, **SAMPLE)]
        outs = []
        for seed_it in seeding:
            seed_it()
            outs.append(rm_b.generate(PROMPT, **SAMPLE))
        assert all(not torch.equal(o, ref) for o in outs)
        assert len({tuple(o[0].tolist()) for o in outs}) == len(outs)
    finally:
        victim.close()


def test_unseeded_dropout_is_fresh_and_not_seeded_by_others(conn):
    """The graph path's random ops: an unseeded call after another tenant's seeded one does not continue
    that tenant's stream, and two unseeded calls differ."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5)).train()
    x = torch.ones(4, 8)
    torch.manual_seed(11)
    with torch.no_grad():
        m(x)
        continued = m(x)  # what a call drawing on from seed 11's stream gets
    other = Connection(conn.address, secret=None)
    try:
        ra = djinn.remote(m, session=conn.session("a"))
        rb = djinn.remote(m, session=other.session("b"))
        ra(x, seed=11).cpu()
        first, second = rb(x).cpu(), rb(x).cpu()
        assert not torch.equal(first, continued)
        assert not torch.equal(first, second)
    finally:
        other.close()


def test_a_seeded_generate_is_bitwise_local_while_others_sample(conn, model, device):
    """Tenant A's seeded generate equals the local one with the same seed while tenant B's seeded and
    unseeded generates (and a seeded graph forward) step between its steps."""
    kw = dict(max_new_tokens=24, do_sample=True, top_k=40)
    ref = local_sample(model, device, 1234, **kw)
    other = Connection(conn.address, secret=None)
    try:
        a, b = conn.session("a"), other.session("b")
        rm_a, rm_b = RemoteModel.from_module(a, model), RemoteModel.from_module(b, model)
        drop = djinn.remote(nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5)).train(), session=b)
        for _ in range(2):
            noise = [submit_generate(b, rm_b, PROMPT, seed=9, **kw), submit_generate(b, rm_b, PROMPT, **kw)]
            mine = submit_generate(a, rm_a, PROMPT, seed=1234, **kw)
            noise.append(submit_generate(other.session(), rm_b, PROMPT, **kw))
            drop(torch.ones(2, 8), seed=3).cpu()
            assert torch.equal(mine.result(60)["sequences"], ref)
            for f in noise:
                f.result(60)
    finally:
        other.close()


# -- the decode fast path ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fast_server():
    from ..conftest import ServerProcess

    s = ServerProcess("--fast-decode", "on", "--fast-decode-max-batch", "4", "--fast-decode-max-len", "128")
    yield s
    s.stop()


def test_fast_path_unseeded_sampling_is_not_decided_by_a_seed(fast_server, model):
    """The fast path's unseeded rows seed their generator from the OS, not from the global stream another
    tenant can seed: after the same seeded graph call, two unseeded fast generates still differ."""
    a_conn, b_conn = Connection(fast_server.address, secret=None), Connection(fast_server.address, secret=None)
    try:
        drop = djinn.remote(nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5)).train(), session=a_conn.session())
        s = b_conn.session()
        rm = RemoteModel.from_module(s, model)
        outs = []
        for _ in range(2):
            drop(torch.ones(2, 8), seed=5).cpu()
            outs.append(rm.generate(PROMPT, **SAMPLE))
        assert b_conn.stats()["sessions"][s.sid]["decode"]["fast"] == 2
        assert not torch.equal(outs[0], outs[1])
        # seeded fast rows stay repeatable next to each other
        kw = dict(SAMPLE, temperature=0.9, top_k=30)
        sa = a_conn.session()
        rm_a = RemoteModel.from_module(sa, model)
        f1 = submit_generate(s, rm, PROMPT, seed=3, **kw)
        f2 = submit_generate(sa, rm_a, PROMPT, **kw)
        one = f1.result(60)["sequences"]
        f2.result(60)
        assert torch.equal(rm.generate(PROMPT, seed=3, **kw), one)
    finally:
        a_conn.close()
        b_conn.close()
