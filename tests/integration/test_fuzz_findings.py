"""Tier 2: regressions for server bugs the fuzzer found (docs/RELIABILITY.md, "Findings" A-C).

Each test failed before its fix: a bad token count stalled every session's generate (A), a generate
that can never fit waited forever with new sessions queued behind it (B), and a connection that said
HELLO as two clients was later de-authenticated by the reaper (C).
"""
from __future__ import annotations

import time

import pytest
import torch

import djinn
from djinn.frontend.connection import Connection
from djinn.frontend.remote import RemoteModel
from djinn.protocol import codec
from djinn.protocol.messages import PROTOCOL_VERSION, MsgType

from ..models import VOCAB, tiny_gpt2
from .test_protocol_raw import RawClient


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return tiny_gpt2().eval()


@pytest.mark.parametrize("bad", [-5, -2**40, 2**21, 1.5, True, "8"])
def test_bad_token_counts_are_refused_and_others_keep_generating(server, tiny, bad):
    attacker, victim = Connection(server.address, secret=None), Connection(server.address, secret=None)
    try:
        bs, vs = attacker.session(), victim.session()
        brm, vrm = djinn.remote(tiny, session=bs), djinn.remote(tiny, session=vs)
        ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(1))
        with pytest.raises(djinn.InvalidRequest, match="max_new_tokens"):
            bs.generate(brm, ids, max_new_tokens=bad)
        with pytest.raises(djinn.InvalidRequest, match="max_length"):
            bs.generate(brm, ids, max_length=bad if bad != 2**21 else 0)
        out = vs.generate(vrm, ids, max_new_tokens=3, do_sample=False)  # timed out before the fix
        ref = tiny.generate(ids, max_new_tokens=3, do_sample=False, attention_mask=torch.ones_like(ids))
        assert torch.equal(out.cpu(), ref)
    finally:
        attacker.close()
        victim.close()


def test_generate_that_can_never_fit_is_refused_not_queued(start_server, tiny):
    srv = start_server("--data-budget-gb", str(1 / 1024))  # 1 MiB of KV: ~1000 tokens of the tiny model
    a, b = Connection(srv.address, secret=None), Connection(srv.address, secret=None)
    try:
        s1 = a.session()
        rm = djinn.remote(tiny, session=s1)
        ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
        t0 = time.monotonic()
        with pytest.raises(djinn.OutOfMemory, match="KV pool holds at most"):
            s1.generate(rm, ids, max_new_tokens=1 << 20)
        assert time.monotonic() - t0 < 10
        s2 = b.session()  # a new session's first generate is not held behind it
        out = s2.generate(djinn.remote(tiny, session=s2), ids, max_new_tokens=2, do_sample=False)
        assert out.shape == (1, 8)
        assert s1.generate(rm, ids, max_new_tokens=2, do_sample=False).shape == (1, 8)  # nor its own
    finally:
        a.close()
        b.close()


def test_hello_version_must_be_the_integer(server):
    import zmq

    ctx = zmq.Context.instance()
    raw = RawClient(ctx, server.address)
    try:
        for version in (float(PROTOCOL_VERSION), True if PROTOCOL_VERSION == 1 else PROTOCOL_VERSION + 0.0):
            msg = raw.hello(version=version)
            assert msg.kind == MsgType.ERROR and msg.header["code"] == "protocol", msg.header
        assert raw.hello().kind == MsgType.HELLO
    finally:
        raw.close()


def test_reaping_an_old_client_id_does_not_log_out_the_live_one(start_server):
    import zmq

    srv = start_server("--client-timeout", "1.5")
    ctx = zmq.Context.instance()
    raw = RawClient(ctx, srv.address)
    other_id = "b" * 32
    try:
        first = raw.client_id
        assert raw.hello().kind == MsgType.HELLO
        assert raw.hello(client_id=other_id).kind == MsgType.HELLO  # the same connection, another id
        assert raw.hello(client_id=first).kind == MsgType.HELLO     # and back
        # Keep the live id talking well past the point where the silent one is reaped.
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            msg = raw.roundtrip(codec.encode(MsgType.HEARTBEAT, {}))
            assert msg.kind == MsgType.HEARTBEAT, f"live client refused: {msg.header}"
            time.sleep(0.3)
        msg = raw.request(7, "ping", {})
        assert msg.kind == MsgType.REPLY and msg.header["rid"] == 7, msg.header
    finally:
        raw.close()


# Findings F, G, H (sessions, live runs and upload reservations without a cap) are covered by the
# per-principal caps' tests: tests/integration/test_principals.py.
