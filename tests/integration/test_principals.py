"""Tier 2: caps are charged to the authenticated principal, not to the client id (issue 15, item 3;
Note [Principals] and Note [One ledger] in djinn/server/principals.py).

A tenant that connects with several client ids (several Connections) shares one set of caps: open
sessions, live breakpoint runs and bytes of unfinished uploads; server-wide caps bound all principals
together. A request past a cap fails with QuotaExceeded naming the setting, and another principal's
work goes on, bitwise-equal to local execution.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
import zmq

import djinn
from djinn.frontend.connection import Connection
from djinn.frontend.run import Breakpoint

from ..conftest import ServerProcess
from ..models import VOCAB, tiny_gpt2

IDS = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(3))
GEN = dict(max_new_tokens=6, do_sample=False)


def _server(tmp_path, settings: dict, *extra: str, env=None) -> ServerProcess:
    path = tmp_path / "server.yaml"
    path.write_text(yaml.safe_dump(settings))
    return ServerProcess("--config", str(path), *extra, env=env)


def _env_without_secret() -> dict:
    return {k: v for k, v in os.environ.items() if k != "DJINN_SECRET"}


def _upload(s, total: int):
    """The first chunk of a tensor of `total` bytes: reserves all of it until it finishes."""
    item = {"hash": os.urandom(32).hex(), "data": torch.zeros(16, dtype=torch.uint8), "offset": 0, "total": total,
            "dtype": "uint8", "shape": [total]}
    return s.submit("upload", {"items": [item]}).result(30)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return tiny_gpt2().eval()


@pytest.fixture(scope="module")
def local_server(tmp_path_factory):
    """Loopback without secret or keys: every client is the one principal "local"."""
    s = _server(tmp_path_factory.mktemp("local"), {"max_sessions_per_principal": 3, "upload_in_flight_gb": 2**-10,
                                                   "max_runs_per_principal": 5, "max_runs_total": 2})
    yield s
    s.stop()


def test_several_client_ids_share_one_principals_sessions(local_server):
    a, b = Connection(local_server.address, secret=None), Connection(local_server.address, secret=None)
    try:
        assert a.transport.client_id != b.transport.client_id
        mine = [a.session(), a.session(), b.session()]
        for c in (a, b):  # a fourth session under either id is the same tenant's fourth
            with pytest.raises(djinn.QuotaExceeded, match=r"holds 3 open sessions.*max_sessions_per_principal"):
                c.session()
        st = a.stats()["principal"]
        assert st["kind"] == "local" and st["sessions"] == {"limit": 3, "used": 3}
        mine[2].close()
        a.session()  # a closed session frees its place, for any of the tenant's ids
    finally:
        a.close()
        b.close()


def test_a_new_client_id_gets_no_new_upload_reservations(local_server):
    a, b = Connection(local_server.address, secret=None), Connection(local_server.address, secret=None)
    try:
        assert _upload(a.session(), 600_000) == {"stored": 0}  # of the 1 MiB allowed
        with pytest.raises(djinn.QuotaExceeded, match=r"holds 600000 bytes of unfinished uploads.*upload_in_flight_gb"):
            _upload(b.session(), 600_000)
        assert a.stats()["principal"]["upload_bytes"] == {"limit": 1 << 20, "used": 600_000}
    finally:
        a.close()
        b.close()
    c = Connection(local_server.address, secret=None)
    try:  # the closed sessions gave their reservations back
        assert _upload(c.session(), 1 << 20) == {"stored": 0}
    finally:
        c.close()


def test_live_runs_are_capped_server_wide(local_server, tiny):
    a, b = Connection(local_server.address, secret=None), Connection(local_server.address, secret=None)
    try:
        sa, sb = a.session(), b.session()
        ra, rb = djinn.remote(tiny, session=sa), djinn.remote(tiny, session=sb)
        runs = [sa.start(ra, IDS, breakpoints=[Breakpoint(layer=0)]), sb.start(rb, IDS, breakpoints=[Breakpoint(layer=0)])]
        stops = [r.wait(60) for r in runs]
        assert [r.state for r in runs] == ["paused", "paused"]
        with pytest.raises(djinn.QuotaExceeded, match=r"the server holds 2 live breakpoint runs.*max_runs_total"):
            sa.start(ra, IDS, breakpoints=[Breakpoint(layer=0)]).wait(60)
        with pytest.raises(djinn.QuotaExceeded, match="max_runs_total"):
            stops[1].fork()
        assert a.stats()["principal"]["server"]["runs"] == {"limit": 2, "used": 2}
        with torch.no_grad():  # work that parks no thread goes on, bitwise local
            want = tiny.generate(IDS, **GEN)
        assert torch.equal(ra.generate(IDS, **GEN), want)
        runs[0].cancel()
        again = sa.start(ra, IDS, breakpoints=[Breakpoint(layer=0)])  # room again
        assert again.wait(60) is not None and again.state == "paused"
    finally:
        a.close()
        b.close()


def test_everyone_with_the_shared_secret_is_one_principal(tmp_path):
    srv = _server(tmp_path, {"max_sessions_per_principal": 2}, "--secret", "s3cret")
    a, b = Connection(srv.address, secret="s3cret"), Connection(srv.address, secret="s3cret")
    try:
        a.session()
        b.session()
        with pytest.raises(djinn.QuotaExceeded, match="max_sessions_per_principal"):
            a.session()
        assert b.stats()["principal"]["kind"] == "secret"
    finally:
        a.close()
        b.close()
        srv.stop()


# -- CurveZMQ: one principal per key ------------------------------------------------------------------
def _keys(root) -> dict:
    for name in ("server", "client-alice", "client-bob"):
        r = subprocess.run([sys.executable, "-m", "djinn.cli", "keys", str(root / "keys"), "--name", name],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    (root / "allowed").mkdir()
    for name in ("client-alice", "client-bob"):
        shutil.copy(root / "keys" / f"{name}.key", root / "allowed")
    return {n: str(root / "keys" / f"{n}.key_secret") for n in ("server", "client-alice", "client-bob")} | {
        "server_public": str(root / "keys" / "server.key"), "allowed": str(root / "allowed")}


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")
def test_each_curve_key_is_a_principal_and_others_go_on(tmp_path, tiny):
    keys = _keys(tmp_path)
    srv = _server(tmp_path, {"max_sessions_per_principal": 2, "max_sessions_total": 3, "max_runs_per_principal": 1},
                  "--curve-secret-key", keys["server"], "--curve-allowed-dir", keys["allowed"],
                  env=_env_without_secret())

    def connect(who: str) -> Connection:
        return Connection(srv.address, secret=None, server_public_key=keys["server_public"],
                          client_secret_key=keys[who])

    alice1, alice2, bob = connect("client-alice"), connect("client-alice"), connect("client-bob")
    try:
        a1, a2 = alice1.session(), alice2.session()
        with pytest.raises(djinn.QuotaExceeded, match="max_sessions_per_principal"):
            alice2.session()  # alice's second client id is still alice
        bs = bob.session()  # bob is another principal: his own sessions
        st = bob.stats()["principal"]
        assert st["kind"] == "curve" and st["sessions"] == {"limit": 2, "used": 1}
        assert st["server"]["sessions"] == {"limit": 3, "used": 3}
        with pytest.raises(djinn.QuotaExceeded, match="max_sessions_total"):
            bob.session()  # under his own cap, but the server is full
        ra, rb = djinn.remote(tiny, session=a1), djinn.remote(tiny, session=bs)
        run = a1.start(ra, IDS, breakpoints=[Breakpoint(layer=0)])
        run.wait(60)
        with pytest.raises(djinn.QuotaExceeded, match="max_runs_per_principal"):
            a2.start(djinn.remote(tiny, session=a2), IDS, breakpoints=[Breakpoint(layer=0)]).wait(60)
        other = bs.start(rb, IDS, breakpoints=[Breakpoint(layer=0)])  # bob's run is his own
        assert other.wait(60) is not None and other.state == "paused"
        with torch.no_grad():
            want = tiny.generate(IDS, **GEN)
        assert torch.equal(rb.generate(IDS, **GEN), want)
    finally:
        for c in (alice1, alice2, bob):
            c.close()
        srv.stop()


# -- the per-principal GPU quota ---------------------------------------------------------------------------
BLOCK = 16 * 512  # the tiny Llama's KV: 512 bytes a token, in blocks of 16 tokens
PROMPT = torch.tensor([[1, 17, 42, 99, 5, 250, 7, 64]])
LLAMA_GEN = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)  # 8 + 8 tokens: one block of KV


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")
def test_a_principals_sessions_share_one_gpu_quota_and_others_go_on(tmp_path):
    """Note [Principal GPU quota]: alice's sessions, opened under two client ids with her key, hold KV
    against one quota of 2.5 blocks; the third block is refused (generate, and a fork that would copy
    one), while bob, another key, generates on with the same tokens as before and as local torch."""
    from djinn.frontend.remote import RemoteModel

    from ..models import tiny_llama

    model = tiny_llama(seed=3)
    with torch.no_grad():
        want = model.generate(PROMPT, **LLAMA_GEN)
    keys = _keys(tmp_path)
    quota = 5 * BLOCK // 2
    srv = _server(tmp_path, {}, "--quota-principal-gpu-gb", repr(quota / 2**30),  # exact: a power-of-two divisor
                  "--curve-secret-key", keys["server"], "--curve-allowed-dir", keys["allowed"],
                  env=_env_without_secret())

    def connect(who: str) -> Connection:
        return Connection(srv.address, secret=None, server_public_key=keys["server_public"],
                          client_secret_key=keys[who])

    def generate(s):
        return s.generate(RemoteModel.from_module(s, model), PROMPT, **LLAMA_GEN)

    alice1, alice2, bob = connect("client-alice"), connect("client-alice"), connect("client-bob")
    try:
        before = generate(bob.session("bob"))
        assert torch.equal(before, want)
        a1, a2, a3 = alice1.session("a1"), alice2.session("a2"), alice1.session("a3")
        assert torch.equal(generate(a1), want) and torch.equal(generate(a2), want)  # two blocks: within
        st = alice2.stats()
        assert st["principal"]["gpu_bytes"] == {"limit": quota, "used": 2 * BLOCK}
        assert st["sessions"][a1.sid]["quota"]["gpu_bytes"] == {"limit": None, "used": BLOCK}
        # A third block in any of her sessions would pass her quota: refused, and a3 holds nothing.
        with pytest.raises(djinn.QuotaExceeded) as info:
            generate(a3)
        assert info.value.code == "quota_exceeded" and info.value.message.startswith(
            f"generate would take this principal (curve) to {3 * BLOCK} bytes on the device over all its sessions")
        assert "quota_principal_gpu_gb" in info.value.message
        st = alice1.stats()["sessions"][a3.sid]
        assert (st["kv_tokens"], st["gpu_bytes"], st["job"]) == ({}, 0, None)
        with pytest.raises(djinn.QuotaExceeded, match=rf"fork_session would take .* to {3 * BLOCK} bytes"):
            a2.fork()  # its copy would be charged a block too
        assert alice2.stats()["principal"]["sessions"]["used"] == 3  # no fork was opened
        # Bob, another principal, generates on: the same tokens as before alice filled her quota.
        assert torch.equal(generate(bob.session("bob-2")), before)
        assert bob.stats()["principal"]["gpu_bytes"] == {"limit": quota, "used": 2 * BLOCK}
        # A closed session's KV is freed for the rest of her sessions.
        a1.close()
        assert torch.equal(generate(a3), want)
        assert alice2.stats()["principal"]["gpu_bytes"]["used"] == 2 * BLOCK
    finally:
        for c in (alice1, alice2, bob):
            c.close()
        srv.stop()
