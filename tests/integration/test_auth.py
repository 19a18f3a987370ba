"""Tier 2: shared-secret authentication at HELLO, and the refusal to listen openly without one."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import time

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

import djinn
from djinn.frontend.connection import Connection
from djinn.protocol import codec
from djinn.protocol.auth import handshake_failed_events
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


def _raw_dealer(ctx, address: str, password: bytes | None):
    """A bare DEALER, presenting `password` in the PLAIN handshake (None: the NULL mechanism), and its monitor."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if password is not None:
        sock.setsockopt(zmq.PLAIN_USERNAME, b"anyone")
        sock.setsockopt(zmq.PLAIN_PASSWORD, password)
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | handshake_failed_events())
    sock.connect(address)
    return sock, monitor


def _handshake_event(monitor) -> tuple[int, int]:
    assert monitor.poll(15000), "no handshake event within 15s"
    ev = recv_monitor_message(monitor)
    return ev["event"], ev["value"]


def test_no_message_is_accepted_before_the_secret_is_checked(secret_server):
    """Gate, Note [Credentials before any message]: the secret is checked in the ZMTP handshake, so a
    peer without it gets no message through at all, the right secret inside a HELLO included."""
    ctx = zmq.Context()
    hello = {"rid": 3, "version": PROTOCOL_VERSION, "client_id": "a" * 32, "secret": SECRET}
    try:
        for password in (None, b"wrong", SECRET.encode() + b" ", SECRET.upper().encode()):
            sock, monitor = _raw_dealer(ctx, secret_server.address, password)
            try:
                got = _handshake_event(monitor)
                if password is None:  # the server may hang up before this side has read why
                    assert got in ((zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH),
                                   (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, errno.EPIPE),
                                   (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, errno.ECONNRESET)), got
                else:
                    assert got == (zmq.EVENT_HANDSHAKE_FAILED_AUTH, 400)
                try:  # libzmq may already have dropped the refused connection's pipe
                    sock.send_multipart(codec.encode(MsgType.HELLO, hello), zmq.NOBLOCK)
                except zmq.Again:
                    pass
                assert not sock.poll(500, zmq.POLLIN)
            finally:
                sock.disable_monitor()
                monitor.close(linger=0)
                sock.close(linger=0)
    finally:
        ctx.term()
    assert secret_server.alive()


def test_raw_hello_with_wrong_secret_does_not_authenticate(secret_server):
    """Past the handshake (the right PLAIN password), HELLO checks the secret again."""
    ctx = zmq.Context()
    sock, monitor = _raw_dealer(ctx, secret_server.address, SECRET.encode())

    def roundtrip(kind, header):
        sock.send_multipart(codec.encode(kind, header))
        assert sock.poll(15000, zmq.POLLIN), "no reply within 15s"
        return codec.decode(sock.recv_multipart())

    try:
        assert _handshake_event(monitor) == (zmq.EVENT_HANDSHAKE_SUCCEEDED, 0)
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
        sock.disable_monitor()
        monitor.close(linger=0)
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
