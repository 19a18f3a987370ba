"""Codec round trips: every dtype, shape, layout and header value that may cross the wire."""
from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
import torch
import zmq

from djinn.protocol.codec import EXT_DTYPE, EXT_TENSOR_FRAME, EXT_TENSOR_INLINE, decode, encode
from djinn.protocol.errors import ProtocolError
from djinn.protocol.messages import Limits, Message, MsgType
from djinn.protocol.tensors import DTYPES, itemsize

from ._util import bits, frame_bytes, random_tensor

DTYPE_NAMES = list(DTYPES)
SHAPES = [(), (0,), (3, 4), (2, 0, 5), (300, 300)]
INLINE = Limits().inline_bytes
WIRE = Limits().wire_frame_bytes


def wire_header(frames) -> dict:
    """The header as msgpack sees it, ext values left as ExtType (what actually went on the wire)."""
    return msgpack.unpackb(bytes(frames[1]), raw=False)


def meta(e: msgpack.ExtType) -> list:
    return msgpack.unpackb(e.data, raw=False)


def test_default_inline_threshold_is_4096():
    assert INLINE == 4096


def test_dtype_table_has_the_documented_names():
    for name in ("float32", "float64", "float16", "bfloat16", "complex64", "complex128", "uint8", "int8",
                 "int16", "int32", "int64", "bool", "float8_e4m3fn", "float8_e5m2"):
        assert name in DTYPES
        assert DTYPES[name] is getattr(torch, name)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)) or "scalar")
@pytest.mark.parametrize("name", DTYPE_NAMES)
def test_roundtrip_every_dtype_and_shape(name, shape):
    dt = DTYPES[name]
    t, raw = random_tensor(dt, shape, seed=len(name))
    nbytes = math.prod(shape) * itemsize(dt)
    in_frame = nbytes > INLINE
    assert in_frame == (shape == (300, 300))

    frames = encode(MsgType.REPLY, {"t": t, "rid": 7})
    pieces = math.ceil(nbytes / WIRE) if in_frame else 0  # complex128 300x300 is over one wire frame
    assert len(frames) == 2 + pieces
    assert bytes(frames[0]) == bytes([MsgType.REPLY])
    w = wire_header(frames)
    assert w["rid"] == 7
    assert isinstance(w["t"], msgpack.ExtType)
    if in_frame:
        assert w["t"].code == EXT_TENSOR_FRAME
        assert meta(w["t"]) == [name, list(shape), 2] + ([pieces] if pieces > 1 else [])
        assert all(len(bytes(f)) <= WIRE for f in frames)
        assert b"".join(bytes(f) for f in frames[2:]) == raw.tobytes()
    else:
        assert w["t"].code == EXT_TENSOR_INLINE
        assert meta(w["t"]) == [name, list(shape), raw.tobytes()]

    for copy in (True, False):
        msg = decode(frame_bytes(frames), copy=copy)
        out = msg.header["t"]
        assert type(out) is torch.Tensor
        assert out.dtype == dt
        assert out.shape == torch.Size(shape)
        assert out.is_contiguous()
        assert bits(out) == raw.tobytes()
        assert msg.header["rid"] == 7


@pytest.mark.parametrize("name", DTYPE_NAMES)
def test_roundtrip_non_contiguous(name):
    dt = DTYPES[name]
    t, raw = random_tensor(dt, (6, 8), seed=3)
    cases = {
        "transposed": (t.t(), raw.transpose(1, 0, 2)),
        "sliced": (t[1:5:2, ::3], raw[1:5:2, ::3]),
        "offset_row": (t[3], raw[3]),
        "expanded": (t[:, :1].expand(6, 5), np.broadcast_to(raw[:, :1], (6, 5, raw.shape[-1]))),
        "expanded_new_dim": (t[0].expand(4, 8), np.broadcast_to(raw[0], (4, 8, raw.shape[-1]))),
    }
    header = {k: v for k, (v, _) in cases.items()}
    assert not any(v.is_contiguous() for v in header.values() if v.dim() > 1)
    msg = decode(frame_bytes(encode(MsgType.REPLY, header)))
    for k, (src, want) in cases.items():
        out = msg.header[k]
        assert out.dtype == dt, k
        assert out.shape == src.shape, k
        assert out.is_contiguous(), k
        assert bits(out) == np.ascontiguousarray(want).tobytes(), k


@pytest.mark.parametrize("name", ["float32", "bfloat16", "float8_e4m3fn", "bool", "int8"])
def test_large_non_contiguous_goes_in_a_frame(name):
    dt = DTYPES[name]
    t, raw = random_tensor(dt, (300, 300), seed=5)
    frames = encode(MsgType.REPLY, {"t": t.t()})
    assert len(frames) == 3
    want = np.ascontiguousarray(raw.transpose(1, 0, 2)).tobytes()
    assert bytes(frames[2]) == want
    out = decode(frame_bytes(frames)).header["t"]
    assert out.shape == (300, 300)
    assert bits(out) == want


def test_special_float_values_are_bitwise_preserved():
    # NaN payloads, signed zeros and infinities must not be normalised on the way.
    raw = np.array([0x7FC00001, 0xFFC00000, 0x80000000, 0x00000000, 0x7F800000, 0xFF800000, 0x00000001],
                   dtype=np.uint32)
    t = torch.from_numpy(raw.view(np.float32).copy())
    out = decode(frame_bytes(encode(MsgType.REPLY, {"t": t}))).header["t"]
    assert out.numpy().view(np.uint32).tolist() == raw.tolist()


def test_inline_threshold_boundary():
    at = torch.arange(INLINE, dtype=torch.int64).to(torch.uint8)
    above = torch.arange(INLINE + 1, dtype=torch.int64).to(torch.uint8)
    assert len(encode(MsgType.REPLY, {"t": at})) == 2
    frames = encode(MsgType.REPLY, {"t": above})
    assert len(frames) == 3
    assert bytes(frames[2]) == bits(above)
    assert torch.equal(decode(frame_bytes(frames)).header["t"], above)


def test_inline_threshold_follows_limits():
    limits = Limits(inline_bytes=0)
    frames = encode(MsgType.REPLY, {"one": torch.tensor([1], dtype=torch.uint8), "empty": torch.zeros(0)}, limits)
    assert len(frames) == 3  # the 1-byte tensor gets a frame; the 0-byte one still fits "inline"
    w = wire_header(frames)
    assert w["one"].code == EXT_TENSOR_FRAME and meta(w["one"]) == ["uint8", [1], 2]
    assert w["empty"].code == EXT_TENSOR_INLINE and meta(w["empty"]) == ["float32", [0], b""]


def test_frame_count_and_order_with_many_tensors():
    big = [torch.full((64, 64), float(i)) for i in range(4)]  # 16 KiB each
    small = torch.arange(5)
    header = {"a": small, "b": [big[0], small, big[1]], "c": {"d": big[2], "e": {"f": [[big[3]]]}}, "g": big[0]}
    frames = encode(MsgType.REQUEST, header)
    assert len(frames) == 2 + 5  # big[0] is sent twice: once per reference
    w = wire_header(frames)
    assert w["a"].code == EXT_TENSOR_INLINE
    assert meta(w["b"][0])[2] == 2 and meta(w["b"][2])[2] == 3
    assert meta(w["c"]["d"])[2] == 4 and meta(w["c"]["e"]["f"][0][0])[2] == 5 and meta(w["g"])[2] == 6
    assert [bytes(f) for f in frames[2:]] == [bits(big[0]), bits(big[1]), bits(big[2]), bits(big[3]), bits(big[0])]

    msg = decode(frame_bytes(frames))
    h = msg.header
    assert msg.kind is MsgType.REQUEST
    assert torch.equal(h["a"], small) and torch.equal(h["b"][1], small)
    assert torch.equal(h["b"][0], big[0]) and torch.equal(h["b"][2], big[1])
    assert torch.equal(h["c"]["d"], big[2]) and torch.equal(h["c"]["e"]["f"][0][0], big[3])
    assert torch.equal(h["g"], big[0])
    assert msg.nbytes == sum(len(bytes(f)) for f in frames)


def test_no_tensors_means_two_frames():
    frames = encode(MsgType.HEARTBEAT, {})
    assert frame_bytes(frames) == [bytes([6]), b"\x80"]
    msg = decode(frames)
    assert msg == Message(MsgType.HEARTBEAT, {}, nbytes=2, frames=[])
    assert msg.rid == 0


@pytest.mark.parametrize("kind", list(MsgType))
def test_every_message_kind(kind):
    msg = decode(frame_bytes(encode(kind, {"rid": 42})))
    assert msg.kind is kind
    assert msg.rid == 42


@pytest.mark.parametrize("name", DTYPE_NAMES)
def test_dtype_values_in_header(name):
    dt = DTYPES[name]
    frames = encode(MsgType.REPLY, {"dtype": dt, "many": [dt, torch.float32], "nested": {"x": (dt,)}})
    assert len(frames) == 2
    w = wire_header(frames)
    assert w["dtype"] == msgpack.ExtType(EXT_DTYPE, name.encode())
    h = decode(frame_bytes(frames)).header
    assert h == {"dtype": dt, "many": [dt, torch.float32], "nested": {"x": [dt]}}
    assert h["dtype"] is dt


def test_nested_plain_values():
    header = {
        "rid": 3, "op": "forward", "none": None, "flag": True, "off": False, "pi": 3.25, "neg": -(2**63),
        "big": 2**64 - 1, "blob": b"\x00\xff", "unicode": "h\u00e9llo \u2603",
        "list": [1, [2, [3, [4, {"deep": "yes"}]]]], "tuple": (1, (2, 3)), "size": torch.Size([2, 3]),
        "empty": {"l": [], "d": {}},
    }
    h = decode(frame_bytes(encode(MsgType.REQUEST, header))).header
    assert h == {
        "rid": 3, "op": "forward", "none": None, "flag": True, "off": False, "pi": 3.25, "neg": -(2**63),
        "big": 2**64 - 1, "blob": b"\x00\xff", "unicode": "h\u00e9llo \u2603",
        "list": [1, [2, [3, [4, {"deep": "yes"}]]]], "tuple": [1, [2, 3]], "size": [2, 3],
        "empty": {"l": [], "d": {}},
    }
    assert type(h["flag"]) is bool and type(h["blob"]) is bytes


def test_tensor_with_grad_and_views_of_one_storage():
    w = torch.randn(3, 4, requires_grad=True)
    base = torch.arange(12, dtype=torch.int32)
    h = decode(frame_bytes(encode(MsgType.REPLY, {"w": w, "a": base[:6], "b": base[6:].view(2, 3)}))).header
    assert h["w"].requires_grad is False
    assert bits(h["w"]) == bits(w.detach())
    assert h["a"].tolist() == [0, 1, 2, 3, 4, 5]
    assert h["b"].tolist() == [[6, 7, 8], [9, 10, 11]]


@pytest.mark.parametrize("dt", [torch.complex64, torch.complex128])
def test_conjugate_and_negative_views_roundtrip(dt):
    x = torch.complex(torch.tensor([1.0, -2.0, 3.5]), torch.tensor([0.5, 4.0, -1.0])).to(dt)
    cj = x.conj()
    ng = torch._neg_view(x)
    assert cj.is_conj() and ng.is_neg()
    h = decode(frame_bytes(encode(MsgType.REPLY, {"c": cj, "n": ng}))).header
    assert h["c"].is_conj() is False
    assert bits(h["c"]) == bits(cj.resolve_conj())
    assert h["c"].tolist() == [complex(1, -0.5), complex(-2, -4), complex(3.5, 1)]
    assert h["n"].tolist() == [complex(-1, -0.5), complex(2, -4), complex(-3.5, 1)]


def test_unsendable_values_raise_protocol_error():
    with pytest.raises(ProtocolError, match="cannot send a value of type object"):
        encode(MsgType.REPLY, {"x": object()})
    with pytest.raises(ProtocolError, match="cannot send a value of type set"):
        encode(MsgType.REPLY, {"x": {1, 2}})
    with pytest.raises(ProtocolError, match=r"dtype torch\.qint8 cannot be sent"):
        encode(MsgType.REPLY, {"x": torch.qint8})


# ---- copy semantics -------------------------------------------------------------------------------


def _addr(buf) -> int:
    return np.frombuffer(buf, dtype=np.uint8).ctypes.data


def test_copy_false_aliases_frames():
    big = torch.arange(2048, dtype=torch.float32)  # 8 KiB: its own frame
    small = torch.arange(4, dtype=torch.int16)
    frames = [bytearray(f) for f in encode(MsgType.REPLY, {"big": big, "small": small})]
    assert len(frames) == 3
    msg = decode(frames, copy=False)
    out = msg.header["big"]
    assert out.data_ptr() == _addr(frames[2])
    assert len(msg.frames) == 3 and all(a is b for a, b in zip(msg.frames, frames))
    frames[2][0:4] = np.float32(-7.5).tobytes()
    assert out[0].item() == -7.5
    # Inline tensors are always copied out of the header.
    frames[1][:] = bytes(len(frames[1]))
    assert msg.header["small"].tolist() == [0, 1, 2, 3]


def test_copy_false_over_zmq_frames():
    big = torch.randn(40, 40, dtype=torch.float64)
    frames = [zmq.Frame(bytes(f)) for f in encode(MsgType.REPLY, {"t": big})]
    msg = decode(frames, copy=False)
    out = msg.header["t"]
    assert out.data_ptr() == _addr(frames[2].buffer)
    assert bits(out) == bits(big)
    assert msg.frames == frames
    assert msg.nbytes == sum(len(f.bytes) for f in frames)


def test_copy_true_is_writable_and_independent():
    big = torch.arange(2048, dtype=torch.float32)
    frames = [bytearray(f) for f in encode(MsgType.REPLY, {"big": big})]
    msg = decode(frames, copy=True)
    out = msg.header["big"]
    assert msg.frames == []
    assert out.data_ptr() != _addr(frames[2])
    frames[2][:] = bytes(len(frames[2]))
    assert torch.equal(out, big)
    out.add_(1)  # writable
    assert out[0].item() == 1.0 and bytes(frames[2][:4]) == b"\x00\x00\x00\x00"


def test_copy_true_from_read_only_frames_is_writable():
    big = torch.arange(2048, dtype=torch.int32)
    frames = frame_bytes(encode(MsgType.REPLY, {"big": big, "small": torch.ones(3)}))
    before = list(frames)
    h = decode(frames).header
    h["big"].zero_()
    h["small"].zero_()
    assert frames == before
    assert h["big"].sum().item() == 0 and h["small"].tolist() == [0.0, 0.0, 0.0]


def test_encode_does_not_copy_large_contiguous_tensors():
    big = torch.arange(4096, dtype=torch.float32)
    frames = encode(MsgType.REPLY, {"t": big})
    assert isinstance(frames[2], memoryview)
    assert _addr(frames[2]) == big.data_ptr()


# -- Note [Small frames] -------------------------------------------------------------------------------


@pytest.mark.parametrize("copy", [True, False])
def test_tensors_and_headers_larger_than_a_wire_frame_are_split(copy):
    limits = Limits(wire_frame_bytes=1000, inline_bytes=16)
    t = torch.arange(1000, dtype=torch.float32)  # 4000 bytes: 4 frames
    u = torch.arange(300, dtype=torch.int16)  # 600 bytes: 1 frame
    header = {"rid": 3, "t": t, "u": u, "text": "z" * 2500}  # the header needs 3 frames
    frames = encode(MsgType.REPLY, header, limits)
    assert all(len(bytes(f)) <= 1000 for f in frames)
    # type byte + count of the header's continuation frames, which go last
    assert bytes(frames[0]) == bytes([MsgType.REPLY]) + (2).to_bytes(4, "little")
    assert len(frames) == 1 + 3 + 4 + 1
    assert b"".join(bytes(f) for f in frames[2:6]) == bits(t) and bytes(frames[6]) == bits(u)
    body = msgpack.unpackb(bytes(frames[1]) + b"".join(bytes(f) for f in frames[7:]), raw=False)
    assert meta(body["t"]) == ["float32", [1000], 2, 4] and meta(body["u"]) == ["int16", [300], 6]
    msg = decode(frame_bytes(frames), copy=copy)
    assert torch.equal(msg.header["t"], t) and torch.equal(msg.header["u"], u)
    assert msg.header["text"] == "z" * 2500 and msg.header["rid"] == 3


def test_a_split_tensor_is_bounded_by_max_frame_bytes_as_a_whole():
    frames = frame_bytes(encode(MsgType.REPLY, {"t": torch.zeros(300, dtype=torch.uint8)},
                                Limits(wire_frame_bytes=100, inline_bytes=16)))
    assert len(frames) == 5
    with pytest.raises(ProtocolError, match=r"^tensor in frames 2\.\.4 is 300 bytes, limit is 299$"):
        decode(frames, Limits(max_frame_bytes=299))
    assert decode(frames, Limits(max_frame_bytes=300)).header["t"].shape == (300,)


def test_split_tensor_checks_shape_and_range_before_joining():
    ext = lambda d: msgpack.ExtType(EXT_TENSOR_FRAME, msgpack.packb(d))  # noqa: E731
    head = lambda d: msgpack.packb({"t": ext(d)}, use_bin_type=True)  # noqa: E731
    with pytest.raises(ProtocolError, match=r"needs 12 bytes, frames have 8$"):
        decode([bytes([MsgType.REPLY]), head(["float32", [3], 2, 2]), b"\0" * 4, b"\0" * 4])
    for bad in (["uint8", [8], 2, 3], ["uint8", [8], 2, 0], ["uint8", [8], 2, -1], ["uint8", [8], 1, 2],
                ["uint8", [8], 2, True]):
        with pytest.raises(ProtocolError, match="tensor refers to frame"):
            decode([bytes([MsgType.REPLY]), head(bad), b"\0" * 4, b"\0" * 4])
    # a tensor cannot take its bytes from the header's continuation frames
    tail = bytes([MsgType.REPLY]) + (1).to_bytes(4, "little")
    body = head(["uint8", [8], 2, 2])
    with pytest.raises(ProtocolError, match="tensor refers to frame 2 \\(and 2 in all\\), message has 3 frames"):
        decode([tail, body[:5], b"\0" * 4, body[5:]])
    assert decode([tail, body[:5], b"\1" * 4, b"\2" * 4, body[5:]]).header["t"].tolist() == [1] * 4 + [2] * 4


# -- Note [Any layout travels] -----------------------------------------------------------------------
def _one_element_cases(t: torch.Tensor, raw: np.ndarray) -> dict:
    """One-element views torch calls contiguous whatever their strides, with the bytes they hold."""
    flat = raw.reshape(-1, raw.shape[-1])  # [numel, itemsize]
    col = t.reshape(1, 12)
    return {
        "column_of_batch_1": (col[:, 2], flat[2:3]),                          # [1], stride 12, offset 2
        "column_kept_2d": (col[:, 5:6], flat[5:6]),                           # [1, 1], strides (12, 1)
        "as_strided": (t.reshape(-1).as_strided((1, 1), (7, 3), 4), flat[4:5]),
        "zero_dim_offset": (t.reshape(-1)[9], flat[9:10]),
        "expanded_one": (t.reshape(-1)[3:4].as_strided((1,), (0,)), flat[3:4]),
        "cloned_column": (col[:, 7].clone(), flat[7:8]),                      # clone keeps stride 12
    }


@pytest.mark.parametrize("name", DTYPE_NAMES)
def test_one_element_tensors_with_any_stride_and_offset_roundtrip(name):
    dt = DTYPES[name]
    t, raw = random_tensor(dt, (12,), seed=9)
    cases = _one_element_cases(t, raw)
    assert cases["column_of_batch_1"][0].stride() == (12,) and cases["cloned_column"][0].stride() == (12,)
    msg = decode(frame_bytes(encode(MsgType.REPLY, {k: v for k, (v, _) in cases.items()})))
    for k, (src, want) in cases.items():
        out = msg.header[k]
        assert out.dtype == dt and out.shape == src.shape and out.is_contiguous(), k
        assert out.reshape(-1).view(torch.uint8).numpy().tobytes() == want.tobytes(), k


def test_one_element_views_hash_and_upload_as_their_values():
    from djinn.frontend.upload import _chunks
    from djinn.protocol.hashing import weight_hash

    x = torch.randn(3, 5)
    for v in (x[:1, 2], x.reshape(-1).as_strided((1, 1), (7, 3), 4), x[:1, 3:4].expand(1, 1)):
        assert weight_hash(v) == weight_hash(torch.tensor(v.tolist()))
        ((items, n),) = list(_chunks([("h", v)], 1 << 20, 1 << 20))
        assert n == 4 and items[0]["data"].numpy().tobytes() == torch.tensor(v.tolist()).numpy().tobytes()


def test_values_msgpack_refuses_are_protocol_errors():
    """Encoding fails only with ProtocolError, so a sender can answer it typed: a str with a lone
    surrogate (what surrogateescape makes of a non-UTF-8 file name), a value of no wire type."""
    with pytest.raises(ProtocolError, match="UnicodeEncodeError"):
        encode(MsgType.REQUEST, {"args": {"name": "caf\udce9"}})
    with pytest.raises(ProtocolError):
        encode(MsgType.REPLY, {"result": {"x": object()}})
