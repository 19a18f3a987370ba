"""Tier 2: CurveZMQ authentication (docs/SECURITY.md) against real server processes on loopback.

Keys are made with the `djinn keys` command. An allowed client runs a model bitwise-equal to local;
an unknown key, no keys, or the wrong server key get a typed error at once (a refused Curve handshake
delivers no message, so without the socket monitor the client would wait out its HELLO timeout), and
the server keeps serving the allowed client.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import zmq
import zmq.auth

import djinn
from djinn.config import ClientConfig, ServerConfig
from djinn.frontend.connection import Connection
from djinn.frontend.remote import RemoteModel
from djinn.protocol.auth import load_public_key
from djinn.protocol.messages import READY_PREFIX

from ..conftest import DEVICE, ServerProcess
from ..models import tiny_gpt2

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")

PROMPT = torch.tensor([[1, 17, 42, 99, 5, 250, 7, 64, 31, 128]])
FAST_S = 3.0  # a refused client must know within this (its connect timeout is 10 s)


def _env_without_secret() -> dict:
    return {k: v for k, v in os.environ.items() if k != "DJINN_SECRET"}


def _djinn_keys(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "djinn.cli", "keys", *args], capture_output=True, text=True,
                          timeout=60)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    """server/ (its pair), clients/ (alice, bob), allowed/ (alice's public key only)."""
    root = tmp_path_factory.mktemp("curve")
    for d, name in [("server", "server"), ("clients", "client-alice"), ("clients", "client-bob")]:
        r = _djinn_keys(str(root / d), "--name", name)
        assert r.returncode == 0, r.stderr
    (root / "allowed").mkdir()
    shutil.copy(root / "clients" / "client-alice.key", root / "allowed")
    return {
        "server_secret": root / "server" / "server.key_secret", "server_public": root / "server" / "server.key",
        "alice": root / "clients" / "client-alice.key_secret", "bob": root / "clients" / "client-bob.key_secret",
        "bob_public": root / "clients" / "client-bob.key", "allowed": root / "allowed",
    }


def _curve_args(keys) -> list[str]:
    return ["--curve-secret-key", str(keys["server_secret"]), "--curve-allowed-dir", str(keys["allowed"])]


@pytest.fixture(scope="module")
def curve_server(keys):
    s = ServerProcess(*_curve_args(keys), env=_env_without_secret())
    yield s
    s.stop()


def _alice(address: str, keys, **kw) -> Connection:
    return Connection(address, secret=kw.pop("secret", None), server_public_key=str(keys["server_public"]),
                      client_secret_key=str(keys["alice"]), **kw)


def _refused(address: str, **kw) -> djinn.DjinnError:
    t0 = time.monotonic()
    with pytest.raises(djinn.AuthError) as info:
        Connection(address, secret=kw.pop("secret", None), **kw)
    assert time.monotonic() - t0 < FAST_S, "refused, but only after waiting for the HELLO timeout"
    return info.value


def test_allowed_client_forward_bitwise(curve_server, keys, device):
    conn = _alice(curve_server.address, keys)
    try:
        model = tiny_gpt2(seed=0, device=device)
        rm = RemoteModel.from_module(conn.default_session(), model)
        got = rm(PROMPT).logits.cpu()
        with torch.no_grad():
            ref = model(PROMPT.to(device)).logits.cpu()
        assert torch.equal(got, ref)
        ids = rm.generate(PROMPT, max_new_tokens=6, do_sample=False)
        with torch.no_grad():
            ref_ids = model.generate(PROMPT.to(device), max_new_tokens=6, do_sample=False).cpu()
        assert torch.equal(ids, ref_ids)
    finally:
        conn.close()


def test_server_public_key_as_z85_string(curve_server, keys):
    z85 = load_public_key(str(keys["server_public"]), "server_public_key").decode()
    assert len(z85) == 40
    conn = Connection(curve_server.address, secret=None,
                      cfg=ClientConfig(server_public_key=z85, client_secret_key=str(keys["alice"])))
    try:
        assert conn.ping() > 0
    finally:
        conn.close()


def test_unknown_key_is_refused_fast(curve_server, keys):
    err = _refused(curve_server.address, server_public_key=str(keys["server_public"]),
                   client_secret_key=str(keys["bob"]))
    assert "curve_allowed_dir" in err.message, err.message
    assert curve_server.alive()


def test_client_without_keys_is_refused_fast(curve_server):
    err = _refused(curve_server.address)
    assert "CurveZMQ" in err.message, err.message
    assert curve_server.alive()


def test_wrong_server_key_is_refused_fast(curve_server, keys):
    err = _refused(curve_server.address, server_public_key=str(keys["bob_public"]),
                   client_secret_key=str(keys["alice"]))
    assert "CurveZMQ" in err.message, err.message


def test_curve_client_against_plain_server(server, keys):
    err = _refused(server.address, server_public_key=str(keys["server_public"]), client_secret_key=str(keys["alice"]))
    assert "does not use CurveZMQ" in err.message, err.message
    assert server.alive()


def test_refused_clients_leave_the_allowed_one_working(curve_server, keys, device):
    good = _alice(curve_server.address, keys)
    try:
        s = good.session("alice")
        model = tiny_gpt2(seed=1, device=device)
        rm = RemoteModel.from_module(s, model)
        for kw in ({}, {"server_public_key": str(keys["server_public"]), "client_secret_key": str(keys["bob"])}):
            _refused(curve_server.address, **kw)
            assert good.ping() > 0
        assert s.sid in good.stats()["sessions"]
        with torch.no_grad():
            ref = model(PROMPT.to(device)).logits.cpu()
        assert torch.equal(rm(PROMPT).logits.cpu(), ref)
        # A new allowed client still connects after the refusals.
        again = _alice(curve_server.address, keys)
        try:
            assert again.ping() > 0
        finally:
            again.close()
    finally:
        good.close()


def test_curve_with_secret_on_public_bind(start_server, keys):
    """Curve and the shared secret combine; Curve alone is enough for a non-loopback bind."""
    s = start_server(*_curve_args(keys), "--secret", "s3cret", "--bind", "0.0.0.0", env=_env_without_secret())
    address = "tcp://127.0.0.1:" + s.address.rsplit(":", 1)[1]
    err = _refused(address, secret="wrong", server_public_key=str(keys["server_public"]),
                   client_secret_key=str(keys["alice"]))
    assert "secret" in err.message
    _refused(address, secret="s3cret")  # the secret alone is not enough once Curve is on
    conn = _alice(address, keys, secret="s3cret")
    try:
        assert conn.ping() > 0
    finally:
        conn.close()
    # The ZAP authenticator stops with the server: a clean, prompt exit.
    s.proc.terminate()
    assert s.proc.wait(timeout=30) == 0, s.log_tail()


def test_public_bind_with_curve_only_starts(start_server, keys):
    s = start_server(*_curve_args(keys), "--bind", "0.0.0.0", env=_env_without_secret())
    conn = _alice("tcp://127.0.0.1:" + s.address.rsplit(":", 1)[1], keys)
    try:
        assert conn.ping() > 0
    finally:
        conn.close()


def _server_cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "djinn.server.server_main", "--port", "0", "--device", DEVICE, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env_without_secret())


def test_public_bind_without_secret_or_curve_refuses_to_start():
    r = _server_cli("--bind", "0.0.0.0")
    assert r.returncode != 0 and READY_PREFIX not in r.stdout
    assert "--secret" in r.stderr and "--curve-secret-key" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("which", ["only_secret_key", "only_allowed_dir", "missing_file", "public_as_secret",
                                   "empty_allowed_dir"])
def test_bad_curve_settings_refuse_to_start(keys, tmp_path, which):
    args = {
        "only_secret_key": ["--curve-secret-key", str(keys["server_secret"])],
        "only_allowed_dir": ["--curve-allowed-dir", str(keys["allowed"])],
        "missing_file": ["--curve-secret-key", str(tmp_path / "nope.key_secret"), "--curve-allowed-dir",
                         str(keys["allowed"])],
        "public_as_secret": ["--curve-secret-key", str(keys["server_public"]), "--curve-allowed-dir",
                             str(keys["allowed"])],
        "empty_allowed_dir": ["--curve-secret-key", str(keys["server_secret"]), "--curve-allowed-dir", str(tmp_path)],
    }[which]
    r = _server_cli(*args)
    assert r.returncode == 2 and READY_PREFIX not in r.stdout, (r.returncode, r.stderr)
    assert "curve" in r.stderr.lower(), r.stderr
    assert "Traceback" not in r.stderr, r.stderr


def test_djinn_keys_makes_usable_files(tmp_path):
    d = tmp_path / "k"
    r = _djinn_keys(str(d), "--name", "client-carol")
    assert r.returncode == 0, r.stderr
    public, secret = d / "client-carol.key", d / "client-carol.key_secret"
    pub, none = zmq.auth.load_certificate(public)
    pub2, sec = zmq.auth.load_certificate(secret)
    assert none is None and pub == pub2 and len(pub) == 40 and len(sec) == 40
    assert zmq.curve_public(sec) == pub  # a real keypair
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    # Never silently replaced: that would lock out everyone holding the old key.
    again = _djinn_keys(str(d), "--name", "client-carol")
    assert again.returncode != 0 and "--force" in again.stderr
    assert zmq.auth.load_certificate(public)[0] == pub
    forced = _djinn_keys(str(d), "--name", "client-carol", "--force")
    assert forced.returncode == 0 and zmq.auth.load_certificate(public)[0] != pub
    bad = _djinn_keys(str(d), "--name", "../escape")
    assert bad.returncode == 2 and not (tmp_path / "escape.key").exists()


def test_config_validation(keys, tmp_path):
    ok = ServerConfig(bind="0.0.0.0", curve_secret_key=str(keys["server_secret"]),
                      curve_allowed_dir=str(keys["allowed"]))
    ok.validate()
    ServerConfig(bind="0.0.0.0", secret="x").validate()
    with pytest.raises(ValueError, match="curve"):
        ServerConfig(bind="0.0.0.0").validate()
    (tmp_path / "junk.key").write_text("not a certificate\n")
    with pytest.raises(ValueError, match="junk.key"):
        ServerConfig(curve_secret_key=str(keys["server_secret"]), curve_allowed_dir=str(tmp_path)).validate()
    ClientConfig(server_public_key=str(keys["server_public"]), client_secret_key=str(keys["alice"])).validate()
    for kw in ({"server_public_key": str(keys["server_public"])},
               {"client_secret_key": str(keys["alice"])},
               {"server_public_key": "too-short", "client_secret_key": str(keys["alice"])},
               {"server_public_key": str(keys["server_public"]), "client_secret_key": str(keys["bob_public"])}):
        with pytest.raises(ValueError):
            ClientConfig(**kw).validate()
        with pytest.raises(ValueError):  # before any socket or thread is made
            Connection("tcp://127.0.0.1:1", secret=None, cfg=ClientConfig(**kw))


def test_client_id_is_bound_to_its_curve_key(start_server, keys, tmp_path, device):
    """Another allowed key that learned a live client id cannot take that client's sessions over
    (router Note [Client id and key]); the holder keeps working and can still reconnect with its id."""
    from djinn.protocol import codec
    from djinn.protocol.auth import apply_client_curve, check_client_curve
    from djinn.protocol.messages import PROTOCOL_VERSION, MsgType

    both = tmp_path / "both"
    both.mkdir()
    shutil.copy(keys["allowed"] / "client-alice.key", both)
    shutil.copy(keys["bob_public"], both)
    s = start_server("--curve-secret-key", str(keys["server_secret"]), "--curve-allowed-dir", str(both),
                     env=_env_without_secret())
    alice = _alice(s.address, keys)
    ctx = zmq.Context()
    try:
        sess = alice.session("alice")
        model = tiny_gpt2(seed=2, device=device)
        rm = RemoteModel.from_module(sess, model)
        before = rm(PROMPT).logits.cpu()

        def hello_as_alice(secret_key: Path) -> object:
            d = ctx.socket(zmq.DEALER)
            d.setsockopt(zmq.LINGER, 0)
            apply_client_curve(d, check_client_curve(str(keys["server_public"]), str(secret_key)))
            d.connect(s.address)
            try:
                d.send_multipart(codec.encode(MsgType.HELLO, {"rid": 1, "version": PROTOCOL_VERSION, "secret": None,
                                                              "client_id": alice.transport.client_id}))
                assert d.poll(10_000), "no reply to HELLO"
                return codec.decode(d.recv_multipart())
            finally:
                d.close()

        reply = hello_as_alice(keys["bob"])
        assert reply.kind == MsgType.ERROR and reply.header["code"] == "auth", reply.header
        assert "another CurveZMQ key" in reply.header["message"]
        # Alice's session is untouched and answers on her own connection.
        assert alice.stats()["sessions"][sess.sid]["mine"] is True
        assert torch.equal(rm(PROMPT).logits.cpu(), before)  # (remote vs local: test_allowed_client_...)
        # Bob with an id of his own is served; alice's key may still reconnect with her id.
        bob = Connection(s.address, secret=None, server_public_key=str(keys["server_public"]),
                         client_secret_key=str(keys["bob"]))
        try:
            assert bob.ping() > 0 and bob.stats()["sessions"][sess.sid]["mine"] is False
        finally:
            bob.close()
        reply = hello_as_alice(keys["alice"])
        assert reply.kind == MsgType.HELLO and reply.header["reconnected"] is True, reply.header
    finally:
        ctx.term()
        alice.close()
