"""Tier 2: what a peer can make the server hold, before and after it authenticates.

Before the secret is checked, a peer gets as far as one handshake command of at most one wire frame
(server/gate.py, Note [Credentials before any message]; protocol/codec.py, Note [Small frames]). Errors
echo little (protocol/errors.py, Note [Errors echo little]). Connections are capped, with a typed
refusal at HELLO (Note [Connection limit]); a peer that stops reading gets a bounded send queue. A client
that knows the secret still sends and receives tensors far larger than a wire frame.
"""
from __future__ import annotations

import socket
import time

import pytest
import torch
import zmq

import djinn
from djinn.frontend.connection import Connection
from djinn.frontend.remote import RemoteModel
from djinn.protocol import codec
from djinn.protocol.messages import PROTOCOL_VERSION, MsgType
from djinn.server.gate import HANDSHAKE_HEADROOM

from ..conftest import DEVICE, ServerProcess

SECRET = "s3cret-limits"
MIB = 1 << 20


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def _hostport(address: str) -> tuple[str, int]:
    host, port = address[len("tcp://"):].rsplit(":", 1)
    return host, int(port)


def _greeting(mechanism: bytes) -> bytes:
    """A ZMTP 3.0 greeting: signature, version, mechanism, as-server, filler (64 bytes)."""
    return b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + mechanism.ljust(20, b"\0") + b"\0" + b"\0" * 31


def _raw_peer(address: str, mechanism: bytes) -> socket.socket:
    """A TCP connection that has sent a ZMTP greeting and, for NULL, its READY: past the handshake
    if the server does take NULL."""
    s = socket.create_connection(_hostport(address), timeout=10)
    s.sendall(_greeting(mechanism))
    if mechanism == b"NULL":
        ready = b"\x05READY" + b"\x0bSocket-Type" + (6).to_bytes(4, "big") + b"DEALER"
        s.sendall(bytes([0x04, len(ready)]) + ready)
        try:  # libzmq resets a NULL peer whose frames arrive before it has sent its own READY
            head = _recv_exactly(s, 64 + 2)  # the server's greeting, then its READY's flags and size
            if len(head) == 66:
                _recv_exactly(s, head[-1])
        except OSError:  # a server that does not take NULL hangs up
            pass
    return s


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = s.recv(n - len(got))
        if not chunk:
            break
        got += chunk
    return got


def _send_until_refused(s: socket.socket, chunks) -> None:
    try:
        for chunk in chunks:
            s.sendall(chunk)
    except OSError:  # the server hung up on it: what should happen
        pass


def _stall_inside_a_huge_frame(address: str, mechanism: bytes, send: int) -> socket.socket:
    """A raw peer that declares a 2 GiB frame, sends `send` bytes of it and stops: with the NULL
    mechanism a message frame, with PLAIN the handshake's HELLO command."""
    s = _raw_peer(address, mechanism)
    flags = 0x02 if mechanism == b"NULL" else 0x06  # 8-byte size; message or command
    _send_until_refused(s, [bytes([flags]) + (2 << 30).to_bytes(8, "big")] + [b"\xab" * MIB] * (send // MIB))
    return s


def _stall_inside_a_multipart_message(address: str, send: int) -> socket.socket:
    """A raw peer that sends `send` bytes of 1 KiB frames, each saying more follow, and stops: libzmq
    delivers a message only whole and holds its frames until then, however small each one is."""
    s = _raw_peer(address, b"NULL")
    frame = bytes([0x03]) + (1024).to_bytes(8, "big") + b"\xcd" * 1024  # MORE, 8-byte size
    _send_until_refused(s, [frame * 1024] * (send // MIB))
    return s


def _closed_among(socks: list[socket.socket], within_s: float) -> list[int]:
    """Indexes of the sockets the server closes within `within_s`, all watched at once (select)."""
    import select

    closed: set[int] = set()
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        live = {s.fileno(): i for i, s in enumerate(socks) if i not in closed}
        if not live:
            break
        ready, _, _ = select.select([socks[i] for i in live.values()], [], [], 0.05)
        for s in ready:
            try:
                data = s.recv(65536)
            except OSError:  # reset
                data = b""
            if data == b"":
                closed.add(live[s.fileno()])
    return sorted(closed)


def _closed_by_server(s: socket.socket, within_s: float) -> bool:
    s.settimeout(0.2)
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if s.recv(65536) == b"":
                return True
        except socket.timeout:
            continue
        except OSError:  # reset
            return True
    return False


@pytest.fixture(scope="module")
def secret_server():
    s = ServerProcess("--secret", SECRET)
    yield s
    s.stop()


def test_strangers_cannot_make_the_server_hold_memory(secret_server):
    """Peers without the secret: ones stalled inside declared 2 GiB frames, and one inside a multipart
    message of small frames, leave the server's memory where it was, and are hung up on."""
    good = Connection(secret_server.address, secret=SECRET)
    stalled: list[socket.socket] = []
    try:
        pid = good.info["pid"]
        assert good.ping() > 0
        before = _rss(pid)
        for mechanism in (b"NULL", b"PLAIN", b"NULL", b"PLAIN"):
            stalled.append(_stall_inside_a_huge_frame(secret_server.address, mechanism, 48 * MIB))
        stalled.append(_stall_inside_a_multipart_message(secret_server.address, 64 * MIB))
        time.sleep(1.0)
        grown = _rss(pid) - before
        assert grown < 32 * MIB, f"the server grew by {grown / MIB:.0f} MiB"
        assert all(_closed_by_server(s, 3.0) for s in stalled), "a stalled stranger is still connected"
        assert good.ping() > 0
    finally:
        for s in stalled:
            s.close()
        good.close()
    assert secret_server.alive()


def test_a_frame_over_the_wire_limit_is_refused_from_anyone(secret_server):
    """Even past the handshake (the right secret), a frame longer than wire_frame_bytes drops the
    connection; the codec splits everything a client sends below it."""
    ctx = zmq.Context()
    d = ctx.socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    d.setsockopt(zmq.PLAIN_USERNAME, b"raw")
    d.setsockopt(zmq.PLAIN_PASSWORD, SECRET.encode())
    monitor = d.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    d.connect(secret_server.address)
    try:
        hello = {"rid": 1, "version": PROTOCOL_VERSION, "client_id": "r" * 32, "secret": SECRET}
        d.send_multipart(codec.encode(MsgType.HELLO, hello))
        assert d.poll(15000) and codec.decode(d.recv_multipart()).kind == MsgType.HELLO
        split = codec.encode(MsgType.REQUEST, {"rid": 2, "op": "ping", "args": {"pad": "p" * (3 * MIB)}})
        assert len(split) == 5 and all(len(bytes(f)) <= MIB for f in split)
        d.send_multipart(split)
        assert d.poll(15000) and codec.decode(d.recv_multipart()).kind == MsgType.REPLY
        d.send_multipart([bytes([MsgType.REQUEST]), b"\x80" + b"\0" * MIB])  # one frame of 1 MiB + 1
        assert monitor.poll(15000), "the server kept a connection that sent a frame over the limit"
    finally:
        monitor.close(linger=0)
        d.close(linger=0)
        ctx.term()
    assert secret_server.alive()


def test_large_tensors_still_cross_after_hello(secret_server, device):
    """An authenticated client uploads an 8 MiB weight and gets a 2 MiB tensor back, bitwise."""
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(11)
    cfg = GPT2Config(n_layer=1, n_embd=256, n_head=4, vocab_size=8192, n_positions=128, bos_token_id=1, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(cfg).to(DEVICE).eval()
    assert model.transformer.wte.weight.numel() * 4 == 8 * MIB
    ids = torch.randint(0, 8192, (1, 64), generator=torch.Generator().manual_seed(5))
    conn = Connection(secret_server.address, secret=SECRET)
    try:
        rm = RemoteModel.from_module(conn.session("big"), model)
        with torch.no_grad():
            ref = model(ids.to(DEVICE)).logits.cpu()
        out = rm(ids).logits.cpu()
        assert out.numel() * 4 == 2 * MIB and torch.equal(out, ref)
    finally:
        conn.close()


def _raw_hello(ctx, address: str, client_id: str, **hello):
    d = ctx.socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    d.connect(address)
    d.send_multipart(codec.encode(MsgType.HELLO, {"rid": 1, "version": PROTOCOL_VERSION, "client_id": client_id,
                                                  **hello}))
    if not d.poll(15000):
        d.close(linger=0)
        raise AssertionError("no answer to HELLO")
    return d, codec.decode(d.recv_multipart())


def test_errors_do_not_echo_large_fields(server):
    """An 8 MiB field is named by a short prefix: before HELLO (its version) and after (an op argument)."""
    ctx = zmq.Context()
    d = None
    try:
        d, msg = _raw_hello(ctx, server.address, "e" * 32, version="v" * (8 * MIB))
        assert msg.kind == MsgType.ERROR and msg.header["code"] == "protocol"
        assert len(msg.header["message"]) < 200 and "vvvv" in msg.header["message"], msg.header["message"][:300]
        d.close(linger=0)
        d, msg = _raw_hello(ctx, server.address, "f" * 32)
        assert msg.kind == MsgType.HELLO
        d.send_multipart(codec.encode(MsgType.REQUEST, {"rid": 2, "op": "open_session",
                                                        "args": {"checkpoint": "c" * (8 * MIB)}}))
        assert d.poll(15000)
        frames = d.recv_multipart()
        assert sum(len(f) for f in frames) < 4096
        msg = codec.decode(frames)
        assert msg.header["code"] == "invalid_request" and "cccc" in msg.header["message"]
    finally:
        if d is not None:
            d.close(linger=0)
        ctx.term()
    assert server.alive()


def test_connections_are_capped_with_a_typed_refusal(start_server, tmp_path):
    config = tmp_path / "server.yaml"
    config.write_text("handshake_timeout_s: 60\n")  # only the gate closes the raw connections below
    srv = start_server("--max-connections", "2", "--config", str(config))
    a, b = Connection(srv.address, secret=None), Connection(srv.address, secret=None)
    raw: list[socket.socket] = []
    try:
        t0 = time.monotonic()
        with pytest.raises(djinn.ServerBusy, match="max_connections"):
            Connection(srv.address, secret=None)
        assert time.monotonic() - t0 < 5.0
        assert a.ping() > 0 and b.ping() > 0
        a.close()
        c = Connection(srv.address, secret=None)  # a's place is free again
        assert c.ping() > 0
        time.sleep(0.5)  # a's connection is gone on the server's side too
        # TCP connections that never speak: the ones beyond max_connections + HANDSHAKE_HEADROOM (b and c
        # hold two) are closed as they are accepted; the others wait out their handshake.
        extra = 10
        for _ in range(HANDSHAKE_HEADROOM + extra):
            raw.append(socket.create_connection(_hostport(srv.address), timeout=10))
        time.sleep(1.0)
        closed = _closed_among(raw, 1.0)
        assert closed == list(range(HANDSHAKE_HEADROOM, HANDSHAKE_HEADROOM + extra))
        assert b.ping() > 0 and c.ping() > 0
        c.close()
    finally:
        for s in raw:
            s.close()
        a.close()
        b.close()
    assert srv.alive()


def test_a_peer_that_stops_reading_gets_a_bounded_queue(start_server, tmp_path):
    """A client that sends requests but never reads its replies (its TCP window full) cannot make the
    server queue them without bound: past send_queue_messages they are dropped."""
    config = tmp_path / "server.yaml"
    config.write_text("send_queue_messages: 8\n")
    srv = start_server("--config", str(config))
    conn = Connection(srv.address, secret=None)
    ctx = zmq.Context()
    d = ctx.socket(zmq.DEALER)
    try:
        from transformers import AutoModelForCausalLM, GPT2Config

        cfg = GPT2Config(n_layer=1, n_embd=64, n_head=4, vocab_size=8192, n_positions=128)
        torch.manual_seed(3)
        rm = RemoteModel.from_module(conn.session("q"), AutoModelForCausalLM.from_config(cfg).eval())
        logits = rm(torch.randint(0, 8192, (1, 128))).logits  # 4 MiB, held on the server
        sid, hid = rm.session.sid, logits._hid
        pid = conn.info["pid"]
        # The same client id from a socket that reads one message and then nothing more.
        d.setsockopt(zmq.LINGER, 0)
        d.setsockopt(zmq.RCVHWM, 1)
        d.setsockopt(zmq.RCVBUF, 65536)
        d.connect(srv.address)
        d.send_multipart(codec.encode(MsgType.HELLO, {"rid": 1, "version": PROTOCOL_VERSION,
                                                      "client_id": conn.transport.client_id}))
        assert d.poll(15000) and codec.decode(d.recv_multipart()).kind == MsgType.HELLO
        before = _rss(pid)
        for rid in range(2, 202):  # each reply is a fresh 4 MiB copy of the logits
            d.send_multipart(codec.encode(MsgType.REQUEST, {"rid": rid, "op": "fetch",
                                                            "args": {"sid": sid, "handles": [hid]}}))
        peak = _peak_rss_until_idle(pid, timeout_s=120)
        grown = peak - before
        assert grown < 200 * MIB, f"the server grew by {grown / MIB:.0f} MiB for a peer that does not read"
        assert srv.alive()
    finally:
        d.close(linger=0)
        ctx.term()
        conn.close()


def _peak_rss_until_idle(pid: int, timeout_s: float) -> int:
    """The largest RSS of `pid` seen until its CPU time stops moving for a second (it served what it got)."""
    def cpu() -> int:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks

    peak, last, still = _rss(pid), cpu(), 0.0
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and still < 1.0:
        time.sleep(0.1)
        peak = max(peak, _rss(pid))
        now = cpu()
        still = still + 0.1 if now - last <= 1 else 0.0
        last = now
    return peak
