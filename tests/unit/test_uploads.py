"""Chunked uploads: in-order chunks reassemble bitwise and are verified against their hash."""
from __future__ import annotations

import hashlib

import pytest
import torch

from djinn.protocol.errors import InvalidRequest, ProtocolError
from djinn.protocol import hashing
from djinn.protocol.hashing import weight_hash
from djinn.protocol.tensors import DTYPES, dtype_name, tensor_bytes
from djinn.vmu.uploads import Uploads

from ._util import bits, random_tensor

SID = "session-a"


@pytest.fixture
def up():
    return Uploads(torch.device("cpu"))


def raw(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as the 1-d uint8 tensor a client sends."""
    return torch.frombuffer(bytearray(bits(t)), dtype=torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def items(t: torch.Tensor, chunk: int, h: str | None = None) -> list[dict]:
    data = raw(t)
    total = data.numel()
    h = h or weight_hash(t)
    starts = list(range(0, total, chunk)) or [0]
    return [{"hash": h, "dtype": dtype_name(t.dtype), "shape": list(t.shape), "offset": o, "total": total,
             "data": data[o:o + chunk].clone()} for o in starts]


def send_all(up, sid, its):
    results = [up.put(sid, it) for it in its]
    assert results[:-1] == [None] * (len(its) - 1)
    return results[-1]


def _tree(prefix: bytes, data: bytes, leaf: int) -> str:
    """Note [Tree hash], written out independently of djinn.protocol.hashing."""
    leaves = [data[i:i + leaf] for i in range(0, len(data), leaf)]
    return hashlib.sha256(prefix + b"".join(hashlib.sha256(x).digest() for x in leaves)).hexdigest()


def test_weight_hash_covers_dtype_shape_and_bytes():
    t = torch.arange(6, dtype=torch.int32)
    expect = _tree(b"int32:[6]:", bits(t), hashing.LEAF_BYTES)
    assert weight_hash(t) == expect
    assert weight_hash(t.reshape(2, 3)) != expect
    assert weight_hash(t.view(torch.float32)) != expect
    assert weight_hash(t.reshape(2, 3).t()) == _tree(b"int32:[3, 2]:", bits(t.reshape(2, 3).t()), hashing.LEAF_BYTES)
    assert weight_hash(torch.empty(0, dtype=torch.int32)) == hashlib.sha256(b"int32:[0]:").hexdigest()


@pytest.mark.parametrize("chunk", [1, 7, 64, 100, 1000, 4800])
def test_multi_leaf_tree_hash_and_any_chunk_split(up, monkeypatch, chunk):
    # Small leaves so a 4800-byte tensor spans 48 leaves, chunk splits landing inside and on leaf edges.
    monkeypatch.setattr(hashing, "LEAF_BYTES", 100)
    t, _ = random_tensor(torch.float32, (30, 40), seed=chunk)
    assert weight_hash(t) == _tree(b"float32:[30, 40]:", bits(t), 100)
    h, out = send_all(up, SID, items(t, chunk))
    assert h == weight_hash(t) and bits(out) == bits(t)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000, 4800, 10_000])
def test_chunks_reassemble_bitwise(up, chunk):
    t, _ = random_tensor(torch.float32, (30, 40), seed=chunk)
    its = items(t, chunk)
    assert len(its) == -(-4800 // chunk)
    assert up.nbytes == 0
    first = up.put(SID, its[0])
    if len(its) > 1:
        assert first is None
        assert up.nbytes == 4800  # the whole buffer is reserved at the first chunk
        h, out = send_all(up, SID, its[1:])
    else:
        h, out = first
    assert h == weight_hash(t)
    assert out.dtype == torch.float32 and out.shape == (30, 40) and out.device.type == "cpu"
    assert bits(out) == bits(t)
    assert up.nbytes == 0


@pytest.mark.parametrize("name", list(DTYPES))
def test_every_dtype(up, name):
    t, _ = random_tensor(DTYPES[name], (5, 3), seed=1)
    h, out = send_all(up, SID, items(t, 5))
    assert h == weight_hash(t)
    assert out.dtype == t.dtype and out.shape == t.shape
    assert bits(out) == bits(t)


def test_empty_tensor(up):
    t = torch.zeros(0, 4, dtype=torch.float16)
    its = items(t, 16)
    assert len(its) == 1 and its[0]["total"] == 0 and its[0]["data"].numel() == 0
    h, out = up.put(SID, its[0])
    assert h == weight_hash(t) == hashlib.sha256(b"float16:[0, 4]:").hexdigest()
    assert out.dtype == torch.float16 and out.shape == (0, 4)
    assert up.nbytes == 0


def test_zero_dim_tensor(up):
    t = torch.tensor(3.5, dtype=torch.float64)
    its = items(t, 3)
    assert [it["offset"] for it in its] == [0, 3, 6] and its[0]["shape"] == []
    h, out = send_all(up, SID, its)
    assert h == weight_hash(t) == _tree(b"float64:[]:", bits(t), hashing.LEAF_BYTES)
    assert out.shape == () and out.item() == 3.5


def test_out_of_order_chunk_rejected_and_partial_dropped(up):
    t = torch.arange(100, dtype=torch.int64)
    its = items(t, 200)
    assert len(its) == 4
    assert up.put(SID, its[0]) is None
    with pytest.raises(InvalidRequest, match=r"chunk at 400 \(\+200\) does not follow the 200 bytes received of 800"):
        up.put(SID, its[2])
    assert up.nbytes == 0
    # The upload starts over: a chunk at a non-zero offset without a partial is refused.
    with pytest.raises(InvalidRequest, match=r"total=800 offset=200 but torch.int64\[100\] is 800 bytes"):
        up.put(SID, its[1])
    h, out = send_all(up, SID, its)
    assert h == weight_hash(t) and bits(out) == bits(t)


def test_repeated_chunk_rejected(up):
    t = torch.arange(10, dtype=torch.int32)
    its = items(t, 16)
    up.put(SID, its[0])
    with pytest.raises(InvalidRequest, match=r"chunk at 0 \(\+16\) does not follow the 16 bytes received of 40"):
        up.put(SID, its[0])
    assert up.nbytes == 0


def test_chunk_past_the_end_rejected(up):
    t = torch.arange(10, dtype=torch.int32)
    its = items(t, 16)
    up.put(SID, its[0])
    up.put(SID, its[1])
    its[2]["data"] = torch.zeros(9, dtype=torch.uint8)
    with pytest.raises(InvalidRequest, match=r"chunk at 32 \(\+9\) does not follow the 32 bytes received of 40"):
        up.put(SID, its[2])
    assert up.nbytes == 0


def test_single_chunk_larger_than_total_rejected(up):
    t = torch.arange(4, dtype=torch.uint8)
    it = items(t, 16)[0]
    it["data"] = torch.arange(5, dtype=torch.uint8)
    with pytest.raises(InvalidRequest, match=r"chunk at 0 \(\+5\) does not follow the 0 bytes received of 4"):
        up.put(SID, it)
    assert up.nbytes == 0


@pytest.mark.parametrize("total", [0, 11, 13, 24])
def test_wrong_total_rejected(up, total):
    t = torch.ones(3, dtype=torch.float32)
    it = items(t, 4)[0]
    it["total"] = total
    with pytest.raises(InvalidRequest, match=rf"total={total} offset=0 but torch.float32\[3\] is 12 bytes"):
        up.put(SID, it)
    assert up.nbytes == 0


def test_wrong_hash_raises_protocol_error(up):
    t = torch.arange(12, dtype=torch.float32)
    lie = weight_hash(torch.arange(12, dtype=torch.float32) + 1)
    its = items(t, 20, h=lie)
    with pytest.raises(ProtocolError, match=rf"upload of {lie[:12]}: the bytes received hash to {weight_hash(t)[:12]}"):
        send_all(up, SID, its)
    assert up.nbytes == 0
    # Same bytes, other shape: a different content address.
    its = items(t.reshape(3, 4), 20, h=weight_hash(t))
    with pytest.raises(ProtocolError, match=r"the bytes received hash to"):
        send_all(up, SID, its)


@pytest.mark.parametrize("data", [
    torch.arange(4, dtype=torch.int8), torch.arange(4, dtype=torch.float32), torch.zeros(2, 2, dtype=torch.uint8),
    torch.tensor(1, dtype=torch.uint8), b"\x00\x01", [0, 1], None,
], ids=["int8", "float32", "2d", "0d", "bytes", "list", "none"])
def test_non_uint8_1d_data_rejected(up, data):
    it = items(torch.zeros(4, dtype=torch.uint8), 4)[0]
    it["data"] = data
    with pytest.raises(InvalidRequest, match=r"^upload item data must be a 1-d uint8 tensor$"):
        up.put(SID, it)
    assert up.nbytes == 0


@pytest.mark.parametrize("h", [None, 5, "abc", "f" * 63, "f" * 65])
def test_bad_hash_field_rejected(up, h):
    it = items(torch.zeros(4, dtype=torch.uint8), 4)[0]
    it["hash"] = h
    with pytest.raises(InvalidRequest, match=r"upload item needs a 64-hex-digit hash"):
        up.put(SID, it)


@pytest.mark.parametrize("field,value", [("offset", None), ("offset", 1.0), ("total", "4"), ("total", True)])
def test_bad_offset_or_total_rejected(up, field, value):
    it = items(torch.zeros(4, dtype=torch.uint8), 4)[0]
    it[field] = value
    with pytest.raises(InvalidRequest, match=r"^upload item needs integer offset and total$"):
        up.put(SID, it)


def test_bad_dtype_or_shape_rejected(up):
    it = items(torch.zeros(4, dtype=torch.uint8), 4)[0]
    with pytest.raises(ProtocolError, match=r"unknown dtype 'float128'"):
        up.put(SID, dict(it, dtype="float128"))
    with pytest.raises(ProtocolError, match=r"invalid dimension -4"):
        up.put(SID, dict(it, shape=[-4]))
    assert up.nbytes == 0


def test_drop_session_discards_partial_uploads(up):
    a, b = torch.ones(100), torch.zeros(50, dtype=torch.int16)
    up.put("s1", items(a, 64)[0])
    up.put("s1", items(b, 64)[0])
    up.put("s2", items(a, 64)[0])
    assert up.nbytes == 400 + 100 + 400
    up.drop_session("s1")
    assert up.nbytes == 400
    up.drop_session("unknown")
    assert up.nbytes == 400
    up.drop_session("s2")
    assert up.nbytes == 0
    # s1 must start over from offset 0
    with pytest.raises(InvalidRequest, match=r"offset=64"):
        up.put("s1", items(a, 64)[1])


def test_sessions_upload_the_same_hash_independently(up):
    t, _ = random_tensor(torch.bfloat16, (8, 8), seed=9)
    ia, ib = items(t, 30), items(t, 50)
    assert up.put("a", ia[0]) is None
    assert up.put("b", ib[0]) is None
    assert up.nbytes == 256
    for it in ia[1:-1]:
        assert up.put("a", it) is None
    ha, out_a = up.put("a", ia[-1])
    assert up.nbytes == 128
    hb, out_b = send_all(up, "b", ib[1:])
    assert ha == hb == weight_hash(t)
    assert bits(out_a) == bits(out_b) == bits(t)
    assert out_a.data_ptr() != out_b.data_ptr()
    assert up.nbytes == 0


def test_extra_first_chunk_fields_ignored_after_start(up):
    # dtype and shape are read from the first chunk only.
    t = torch.arange(8, dtype=torch.int16)
    its = items(t, 4)
    for it in its[1:]:
        it["dtype"], it["shape"] = "garbage", "garbage"
    h, out = send_all(up, SID, its)
    assert h == weight_hash(t) and bits(out) == bits(t)


def test_client_chunks_fit_one_wire_frame_each_and_reassemble(up):
    """The client splits weights into items of at most one wire frame (Note [Small frames]), so the
    codec never has to split and rejoin an upload item; messages still carry about chunk_bytes."""
    from djinn.frontend.upload import _chunks
    from djinn.protocol.codec import decode, encode
    from djinn.protocol.messages import Limits, MsgType

    a, b = torch.randn(3000), torch.arange(100, dtype=torch.int16)  # 12000 and 200 bytes
    ha, hb = weight_hash(a), weight_hash(b)
    messages = list(_chunks([(ha, a), (hb, b)], chunk_bytes=5000, piece_bytes=1024))
    assert [n for _, n in messages] == [5000, 5000, 2200]
    assert [[it["data"].numel() for it in m] for m, _ in messages] == [
        [1024] * 4 + [904], [1024] * 4 + [904], [1024, 976, 200]]
    done = {}
    for m, _ in messages:
        frames = encode(MsgType.REQUEST, {"items": m}, Limits(wire_frame_bytes=1024, inline_bytes=16))
        assert all(len(bytes(f)) <= 1024 for f in frames[2:])
        assert len(frames) == 2 + len(m)  # one frame per item: nothing was split
        for item in decode([bytes(f) for f in frames]).header["items"]:
            finished = up.put(SID, item)
            if finished is not None:
                done[finished[0]] = finished[1]
    assert bits(done[ha]) == bits(a) and bits(done[hb]) == bits(b)
