"""Tier 2: shared-secret authentication at HELLO, and the refusal to listen openly without one."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import zmq

import djinn
from djinn.frontend.connection import Connection
from djinn.protocol import codec
from djinn.protocol.messages import PROTOCOL_VERSION, READY_PREFIX, MsgType

from ..conftest import DEVICE, ServerProcess

SECRET = "s3cret"


def _env_without_secret() -> dict:
    return {k: v for k, v in os.environ.items() if k != "DJINN_SECRET"}


@pytest.fixture(scope="module")
def secret_server():
    s = ServerProcess("--secret", SECRET)
    yield s
    s.stop()


def _refused(address: str, secret) -> djinn.AuthError:
    t0 = time.monotonic()
    with pytest.raises(djinn.AuthError) as info:
        Connection(address, secret=secret)
    # Refused at once, not after the connect timeout.
    assert time.monotonic() - t0 < 5.0
    assert "secret" in info.value.message
    return info.value


@pytest.mark.parametrize("secret", ["wrong", None, "", SECRET + " ", SECRET.upper(), "s3cre"],
                         ids=["wrong", "none", "empty", "trailing_space", "upper", "prefix"])
def test_wrong_or_missing_secret_raises_auth_error(secret_server, secret):
    err = _refused(secret_server.address, secret)
    assert isinstance(err, djinn.DjinnError)
    assert secret_server.alive()


def test_right_secret_works(secret_server):
    c = Connection(secret_server.address, secret=SECRET)
    try:
        assert c.ping() > 0
        with c.session("authed") as s:
            assert c.stats()["sessions"][s.sid]["name"] == "authed"
    finally:
        c.close()


def test_auth_failure_leaves_other_clients_working(secret_server):
    good = Connection(secret_server.address, secret=SECRET)
    try:
        s = good.session()
        for bad in ("nope", None):
            _refused(secret_server.address, bad)
            assert good.ping() > 0
        assert s.sid in good.stats()["sessions"]
    finally:
        good.close()


def test_raw_hello_with_wrong_secret_does_not_authenticate(secret_server):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(secret_server.address)

    def roundtrip(kind, header):
        sock.send_multipart(codec.encode(kind, header))
        assert sock.poll(15000, zmq.POLLIN), "no reply within 15s"
        return codec.decode(sock.recv_multipart())

    try:
        hello = {"rid": 3, "version": PROTOCOL_VERSION, "client_id": "a" * 32}
        for rid, secret in enumerate([12345, ["s3cret"], b"s3cret", "wrong"], start=3):
            msg = roundtrip(MsgType.HELLO, dict(hello, rid=rid, secret=secret))
            assert msg.kind == MsgType.ERROR and msg.header["code"] == "auth" and msg.rid == rid, msg.header
            msg = roundtrip(MsgType.REQUEST, {"rid": 100 + rid, "op": "ping", "args": {}})
            assert msg.kind == MsgType.ERROR and msg.header["code"] == "auth" and msg.rid == 100 + rid
        msg = roundtrip(MsgType.HELLO, dict(hello, rid=9, secret=SECRET))
        assert msg.kind == MsgType.HELLO and msg.rid == 9
        assert "secret" not in msg.header  # the server never echoes secrets
        msg = roundtrip(MsgType.REQUEST, {"rid": 10, "op": "ping", "args": {}})
        assert msg.kind == MsgType.REPLY and msg.rid == 10
    finally:
        sock.close(linger=0)
        ctx.term()


def test_secret_from_server_environment(start_server):
    s = start_server(env={"DJINN_SECRET": "from-env"})
    _refused(s.address, None)
    _refused(s.address, SECRET)
    c = Connection(s.address, secret="from-env")
    try:
        assert c.ping() > 0
    finally:
        c.close()


def test_public_bind_without_secret_refuses_to_start():
    cmd = [sys.executable, "-m", "djinn.server.server_main", "--bind", "0.0.0.0", "--port", "0", "--device", DEVICE]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env_without_secret())
    assert proc.returncode != 0
    assert READY_PREFIX not in proc.stdout
    assert "secret" in proc.stderr.lower(), proc.stderr
    assert "DJINN_SECRET" in proc.stderr or "--secret" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
