"""Tier 2: hostile raw DEALER clients against a real server, while a well-behaved client keeps working.

Every malformed or unauthorised message must get a typed ERROR reply (never silence, never a crash),
and the well-behaved djinn Connection interleaved with them must keep getting bitwise-correct results.
"""
from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass

import msgpack
import pytest
import torch
import zmq

from djinn.frontend.connection import Connection
from djinn.frontend.remote import RemoteModel
from djinn.protocol import codec
from djinn.protocol.messages import PROTOCOL_VERSION, Message, MsgType

from ..conftest import DEVICE, ServerProcess
from ..models import VOCAB, tiny_gpt2

MAX_FRAME = 1 << 20  # the private server's --max-frame-bytes
RECV_TIMEOUT_S = 15.0  # generous: a loaded 2-core machine answers in milliseconds


# -- a raw, hostile client ----------------------------------------------------------------------
class RawClient:
    """A bare DEALER socket: sends whatever frames it is given, reads one decoded message back."""

    def __init__(self, ctx: zmq.Context, address: str):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.client_id = secrets.token_hex(16)

    def send(self, frames: list) -> None:
        self.sock.send_multipart(frames)

    def recv(self, timeout_s: float = RECV_TIMEOUT_S) -> Message:
        if not self.sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            raise AssertionError(f"no reply from the server within {timeout_s}s")
        return codec.decode(self.sock.recv_multipart())

    def roundtrip(self, frames: list) -> Message:
        self.send(frames)
        return self.recv()

    def expect_error(self, frames: list, code: str, rid: int | tuple = 0) -> dict:
        msg = self.roundtrip(frames)
        assert msg.kind == MsgType.ERROR, f"expected ERROR {code}, got {msg.kind.name} {msg.header}"
        h = msg.header
        assert h["code"] == code, h
        assert isinstance(h["message"], str) and h["message"], h
        allowed = rid if isinstance(rid, tuple) else (rid,)
        assert h["rid"] in allowed, h
        return h

    def hello(self, **override) -> Message:
        header = {"rid": 1, "version": PROTOCOL_VERSION, "secret": None, "client_id": self.client_id}
        header.update(override)
        return self.roundtrip(codec.encode(MsgType.HELLO, header))

    def request(self, rid: int, op: str, args: dict) -> Message:
        return self.roundtrip(codec.encode(MsgType.REQUEST, {"rid": rid, "op": op, "args": args}))

    def close(self) -> None:
        self.sock.close(linger=0)


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


REQ = bytes([MsgType.REQUEST])


def tensor_ext_frame(dtype: str, shape: list, frame: int, count: int | None = None) -> msgpack.ExtType:
    return msgpack.ExtType(codec.EXT_TENSOR_FRAME, msgpack.packb([dtype, shape, frame] + ([count] if count else [])))


def tensor_ext_inline(dtype: str, shape: list, data: bytes) -> msgpack.ExtType:
    return msgpack.ExtType(codec.EXT_TENSOR_INLINE, msgpack.packb([dtype, shape, data], use_bin_type=True))


def ping_header(rid: int, **args) -> bytes:
    return pack({"rid": rid, "op": "ping", "args": args})


# Undecodable or contract-breaking messages: (frames, expected rid or rids). All get code "protocol".
HOSTILE = {
    "garbage_one_frame": ([b"\x00\xffnot a djinn message\x13\x37" * 4], 0),
    "garbage_two_frames": ([b"\xde\xad\xbe\xef", b"\x01\x02\x03garbage"], 0),
    "type_frame_only": ([REQ], 0),
    "empty_frames": ([b"", b""], 0),
    "unknown_type_byte": ([b"\x63", pack({"rid": 41, "op": "ping", "args": {}})], (0, 41)),
    "type_byte_zero": ([b"\x00", pack({"rid": 40})], (0, 40)),
    "invalid_msgpack": ([REQ, b"\xc1\xc1\xc1\xc1"], 0),
    "truncated_msgpack": ([REQ, ping_header(42)[:-4]], (0, 42)),
    "trailing_bytes": ([REQ, ping_header(39) + b"\x00\x00"], (0, 39)),
    "header_is_list": ([REQ, pack([43, "ping", {}])], 0),
    "header_is_int": ([REQ, pack(7)], 0),
    "non_string_map_key": ([REQ, pack({1: 2, "rid": 38})], (0, 38)),
    "unknown_ext_code": ([REQ, pack({"rid": 44, "op": "ping", "args": {"x": msgpack.ExtType(77, b"?")}})], (0, 44)),
    "tensor_frame_bytes_disagree_with_shape": (
        [REQ, pack({"rid": 45, "op": "ping", "args": {"x": tensor_ext_frame("float32", [4, 4], 2)}}), b"\0" * 10],
        (0, 45),
    ),
    "tensor_inline_bytes_disagree_with_shape": (
        [REQ, pack({"rid": 46, "op": "ping", "args": {"x": tensor_ext_inline("float32", [3], b"\0" * 5)}})],
        (0, 46),
    ),
    "tensor_refers_to_missing_frame": (
        [REQ, pack({"rid": 47, "op": "ping", "args": {"x": tensor_ext_frame("float32", [1], 9)}}), b"\0" * 4],
        (0, 47),
    ),
    "tensor_unknown_dtype": (
        [REQ, pack({"rid": 48, "op": "ping", "args": {"x": tensor_ext_inline("float128", [1], b"\0" * 16)}})],
        (0, 48),
    ),
    "tensor_negative_dim": (
        [REQ, pack({"rid": 49, "op": "ping", "args": {"x": tensor_ext_inline("uint8", [-4], b"\0" * 4)}})],
        (0, 49),
    ),
    "tensor_huge_shape_tiny_frame": (
        [REQ, pack({"rid": 50, "op": "ping", "args": {"x": tensor_ext_frame("float64", [1 << 30, 1 << 30], 2)}}),
         b"\0" * 8],
        (0, 50),
    ),
    # One byte over --max-frame-bytes, in two wire frames (one frame over the wire limit would instead
    # drop the connection: test_transport_limits.py).
    "oversized_tensor": ([REQ, ping_header(51, x=tensor_ext_frame("uint8", [MAX_FRAME + 1], 2, 2)),
                          b"\0" * MAX_FRAME, b"\0"], (0, 51)),
    "too_many_frames": ([REQ, ping_header(52)] + [b""] * 4095, (0, 52)),
}


# -- fixtures -----------------------------------------------------------------------------------
@dataclass
class Good:
    conn: Connection
    rm: RemoteModel
    ids: torch.Tensor
    ref: torch.Tensor


@pytest.fixture(scope="module")
def raw_server():
    s = ServerProcess("--max-frame-bytes", str(MAX_FRAME), "--log-level", "WARNING")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def ctx():
    c = zmq.Context()
    yield c
    c.term()


@pytest.fixture(scope="module")
def good(raw_server):
    conn = Connection(raw_server.address, secret=None)
    model = tiny_gpt2(seed=7, device=DEVICE)
    rm = RemoteModel.from_module(conn.session("good"), model)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with torch.no_grad():
        ref = model(ids).logits.cpu()
    yield Good(conn, rm, ids, ref)
    conn.close()


@pytest.fixture
def raw(ctx, raw_server):
    clients: list[RawClient] = []

    def make() -> RawClient:
        c = RawClient(ctx, raw_server.address)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


def check_good(good: Good, server: ServerProcess) -> None:
    """The well-behaved client still gets the local result, bitwise."""
    assert server.alive(), "the server died"
    out = good.rm(good.ids).logits.cpu()
    assert torch.equal(out, good.ref)


# -- tests --------------------------------------------------------------------------------------
@pytest.mark.parametrize("authed", [False, True], ids=["anonymous", "after_hello"])
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_undecodable_message_gets_protocol_error(case, authed, raw, good, raw_server):
    frames, rid = HOSTILE[case]
    c = raw()
    if authed:
        assert c.hello().kind == MsgType.HELLO
    check_good(good, raw_server)
    h = c.expect_error(frames, "protocol", rid)
    if case == "oversized_tensor":
        assert str(MAX_FRAME) in h["message"]
    if case.startswith("tensor_frame_bytes"):
        assert "64 bytes" in h["message"] and "10" in h["message"]
    check_good(good, raw_server)
    # The hostile socket itself is not dropped: it is answered again, as its state allows.
    if authed:
        reply = c.request(60, "ping", {})
        assert reply.kind == MsgType.REPLY and reply.rid == 60
    else:
        c.expect_error(codec.encode(MsgType.REQUEST, {"rid": 61, "op": "ping", "args": {}}), "auth", 61)


def test_request_before_hello_is_auth_error(raw, good, raw_server):
    c = raw()
    c.expect_error(codec.encode(MsgType.REQUEST, {"rid": 7, "op": "stats", "args": {}}), "auth", 7)
    check_good(good, raw_server)
    c.expect_error(codec.encode(MsgType.HEARTBEAT, {}), "auth", 0)
    c.expect_error(codec.encode(MsgType.BYE, {}), "auth", 0)
    # A session id guessed (here: known) without HELLO gets nothing either.
    c.expect_error(codec.encode(MsgType.REQUEST, {"rid": 8, "op": "close_session",
                                                  "args": {"sid": good.rm.session.sid}}), "auth", 8)
    check_good(good, raw_server)


def test_hello_with_wrong_protocol_version(raw, good, raw_server):
    c = raw()
    bad_version = PROTOCOL_VERSION + 98
    msg = c.hello(rid=9, version=bad_version)
    assert msg.kind == MsgType.ERROR and msg.header["code"] == "protocol" and msg.rid == 9
    text = msg.header["message"]
    assert str(bad_version) in text
    assert str(PROTOCOL_VERSION) in text.replace(str(bad_version), "")
    # The refused HELLO did not authenticate the socket.
    c.expect_error(codec.encode(MsgType.REQUEST, {"rid": 10, "op": "ping", "args": {}}), "auth", 10)
    check_good(good, raw_server)
    # Missing version, wrong types, bad client ids: refused the same way.
    for rid, override in enumerate([{"version": None}, {"version": "1"}, {"client_id": "short"},
                                    {"client_id": "x" * 65}, {"client_id": 12345678}], start=11):
        msg = c.hello(rid=rid, **override)
        assert msg.kind == MsgType.ERROR and msg.header["code"] == "protocol" and msg.rid == rid, msg.header
    check_good(good, raw_server)


def test_client_only_sends_client_messages(raw, good, raw_server):
    c = raw()
    assert c.hello().kind == MsgType.HELLO
    for kind in (MsgType.REPLY, MsgType.ERROR, MsgType.STREAM):
        c.expect_error(codec.encode(kind, {"rid": 20}), "protocol", (0, 20))
    # A request needs an integer rid and a string op.
    c.expect_error([REQ, pack({"rid": "21", "op": "ping", "args": {}})], "protocol", 0)
    c.expect_error([REQ, pack({"rid": 22, "op": 5, "args": {}})], "protocol", 22)
    c.expect_error([REQ, pack({"rid": 23})], "protocol", 23)
    check_good(good, raw_server)
    assert c.roundtrip(codec.encode(MsgType.HEARTBEAT, {})).kind == MsgType.HEARTBEAT


def test_unknown_op_and_bad_args_are_invalid_request(raw, good, raw_server):
    c = raw()
    assert c.hello().kind == MsgType.HELLO
    h = c.expect_error(codec.encode(MsgType.REQUEST, {"rid": 30, "op": "no_such_op", "args": {}}),
                       "invalid_request", 30)
    assert "no_such_op" in h["message"]
    check_good(good, raw_server)
    for rid, op in enumerate(["__init__", "OPS", "", "op"], start=31):
        c.expect_error(codec.encode(MsgType.REQUEST, {"rid": rid, "op": op, "args": {}}), "invalid_request", rid)
    c.expect_error(codec.encode(MsgType.REQUEST, {"rid": 36, "op": "ping", "args": [1, 2]}), "invalid_request", 36)
    check_good(good, raw_server)


def test_other_clients_session_is_not_found(raw, good, raw_server):
    c = raw()
    assert c.hello().kind == MsgType.HELLO
    sid = good.rm.session.sid
    ids = good.ids.cpu()
    for rid, (op, args) in enumerate([
        ("forward", {"model_id": good.rm.model_id, "args": [ids], "kwargs": {}}),
        ("generate", {"model_id": good.rm.model_id, "input_ids": ids, "kwargs": {"max_new_tokens": 2}}),
        ("fetch", {"handles": []}),
        ("free", {"handles": []}),
        ("attach_model", {"from_sid": sid, "model_id": good.rm.model_id}),
        ("close_session", {}),
    ], start=70):
        c.expect_error(codec.encode(MsgType.REQUEST, {"rid": rid, "op": op, "args": dict(args, sid=sid)}),
                       "session_not_found", rid)
        check_good(good, raw_server)
    # Using the other client's model from a session of one's own is refused too.
    opened = c.request(80, "open_session", {})
    assert opened.kind == MsgType.REPLY
    own = opened.header["result"]["sid"]
    c.expect_error(codec.encode(MsgType.REQUEST, {"rid": 81, "op": "attach_model", "args": {
        "sid": own, "from_sid": sid, "model_id": good.rm.model_id}}), "invalid_request", 81)
    c.expect_error(codec.encode(MsgType.REQUEST, {"rid": 82, "op": "forward", "args": {
        "sid": own, "model_id": good.rm.model_id, "args": [ids]}}), "invalid_request", 82)
    # stats shows other clients' sessions without their names.
    st = c.request(83, "stats", {})
    assert st.kind == MsgType.REPLY
    theirs = st.header["result"]["sessions"][sid]
    assert theirs["mine"] is False and theirs["name"] is None
    assert st.header["result"]["sessions"][own]["mine"] is True
    check_good(good, raw_server)


def test_hostile_burst_while_good_client_runs(ctx, good, raw_server):
    """All hostile messages, from several sockets, while a well-behaved client calls in a loop."""
    stop = threading.Event()
    results: list[object] = []

    def well_behaved():
        try:
            while not stop.is_set():
                out = good.rm(good.ids).logits.cpu()
                results.append(torch.equal(out, good.ref))
        except BaseException as e:  # reported by the main thread
            results.append(e)

    t = threading.Thread(target=well_behaved, daemon=True)
    t.start()
    clients = [RawClient(ctx, raw_server.address) for _ in range(3)]
    try:
        assert clients[2].hello().kind == MsgType.HELLO
        for c in clients:
            for frames, _ in HOSTILE.values():
                c.send(frames)
        for c in clients:
            for _ in HOSTILE:
                msg = c.recv()
                assert msg.kind == MsgType.ERROR and msg.header["code"] == "protocol", msg.header
        # Keep the good client going until it has made a few calls after the burst as well.
        before = len(results)
        deadline = time.monotonic() + 30
        while len(results) < before + 3 and time.monotonic() < deadline and t.is_alive():
            time.sleep(0.01)
    finally:
        stop.set()
        t.join(30)
        for c in clients:
            c.close()
    assert not t.is_alive()
    assert results and all(r is True for r in results), [r for r in results if r is not True][:3]
    check_good(good, raw_server)


def test_upload_is_chunked_below_the_servers_frame_limit(good, raw_server):
    """A weight larger than --max-frame-bytes still uploads: the client splits it to fit."""
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(8)
    cfg = GPT2Config(n_layer=1, n_embd=64, n_head=4, vocab_size=8192, n_positions=64, bos_token_id=1, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(cfg).to(DEVICE).eval()
    assert model.transformer.wte.weight.numel() * 4 > MAX_FRAME
    s = good.conn.session("big")
    rm = RemoteModel.from_module(s, model)
    ids = torch.randint(0, 8192, (1, 6), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    with torch.no_grad():
        ref = model(ids).logits.cpu()
    assert torch.equal(rm(ids).logits.cpu(), ref)
    s.close()
    check_good(good, raw_server)


def test_server_survived(good, raw_server):
    assert raw_server.alive()
    stats = good.conn.stats()
    assert good.rm.model_id in stats["models"]
    check_good(good, raw_server)
