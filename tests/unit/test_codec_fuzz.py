"""Fuzz the decoder: whatever bytes arrive, decode returns a Message or raises ProtocolError.

Three sources of input: random frames, byte-level mutations of valid messages, and well-formed msgpack
with hostile tensor descriptors (odd dtypes, shapes, frame references and byte counts). A final property
checks that random valid headers survive encode -> decode unchanged.
"""
from __future__ import annotations

import time

import msgpack
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from djinn.protocol.codec import EXT_DTYPE, EXT_TENSOR_FRAME, EXT_TENSOR_INLINE, decode, encode
from djinn.protocol.errors import ProtocolError
from djinn.protocol.messages import Limits, Message, MsgType
from djinn.protocol.tensors import DTYPES

from ._util import bits, ext, frame_bytes, packb, raw_ext

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
TIGHT = Limits(max_frames=6, max_frame_bytes=256, max_header_bytes=512, max_total_bytes=1024, inline_bytes=8)
LIMITS = [Limits(), TIGHT]
TYPE_BYTES = [bytes([k]) for k in MsgType] + [b"\x00", b"\x08", b"\xff", b"", b"\x02\x02"]


def check(frames, limits: Limits = Limits()) -> Message | None:
    """Decode with copy=True and copy=False: both must agree, and only ProtocolError may escape."""
    outcome = []
    for copy in (True, False):
        t0 = time.monotonic()
        try:
            msg = decode(frames, limits, copy=copy)
        except ProtocolError as e:
            assert type(e) is ProtocolError
            assert e.message and e.code == "protocol"
            outcome.append(("error", e.message))
        else:
            assert isinstance(msg, Message)
            assert isinstance(msg.kind, MsgType)
            assert isinstance(msg.header, dict)
            assert msg.nbytes == sum(len(f) for f in frames)
            assert msg.frames == ([] if copy else list(frames))
            outcome.append(("ok", None))
        assert time.monotonic() - t0 < 5.0, "decode took more than 5 s"
    assert outcome[0] == outcome[1]
    return msg if outcome[0][0] == "ok" else None


# ---- 1. random frames -----------------------------------------------------------------------------


@FUZZ
@given(frames=st.lists(st.binary(max_size=80), max_size=8), limits=st.sampled_from(LIMITS))
def test_random_frames(frames, limits):
    check(frames, limits)


@FUZZ
@given(kind=st.sampled_from(TYPE_BYTES), header=st.binary(max_size=200),
       rest=st.lists(st.binary(max_size=40), max_size=4), limits=st.sampled_from(LIMITS))
def test_random_header_bytes(kind, header, rest, limits):
    check([kind, header, *rest], limits)


# ---- 2. mutations of valid messages ---------------------------------------------------------------


def _valid_messages() -> list[list[bytes]]:
    small = Limits(inline_bytes=8)  # most tensors get their own frame: more frame references to break
    headers = [
        {},
        {"rid": 1, "op": "forward", "sid": "abc", "args": {"$d": {"x": torch.arange(6).reshape(2, 3)}}},
        {"rid": 2, "t": torch.ones(3, dtype=torch.bfloat16), "u": torch.zeros(0, 2), "s": torch.tensor(7)},
        {"dt": [torch.float8_e4m3fn, torch.bool], "b": b"\x00\x01", "f": 1.5, "n": None, "deep": [[[[1]]]]},
        {"rid": 3, "many": [torch.full((4,), i, dtype=torch.int16) for i in range(4)]},
        {"rid": 4, "m": torch.tensor([True, False, True]), "c": torch.ones(2, dtype=torch.complex64)},
    ]
    out = []
    for i, h in enumerate(headers):
        out.append(frame_bytes(encode(MsgType(1 + i % 7), h, small)))
        out.append(frame_bytes(encode(MsgType.REPLY, h)))
    return out


VALID = _valid_messages()


def test_valid_pool_decodes():
    for frames in VALID:
        assert check(frames) is not None


def _mutate_bytes(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for op, pos, arg in ops:
        if not b and op != "insert":
            continue
        p = pos % (len(b) + 1 if op == "insert" else len(b))
        if op == "flip":
            b[p] ^= 1 << (arg % 8)
        elif op == "set":
            b[p] = arg % 256
        elif op == "insert":
            b[p:p] = bytes([arg % 256]) * (1 + arg % 3)
        elif op == "delete":
            del b[p:p + 1 + arg % 4]
        elif op == "truncate":
            del b[p:]
    return bytes(b)


byte_ops = st.lists(
    st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
              st.integers(0, 1 << 16), st.integers(0, 255)),
    min_size=1, max_size=6,
)


@FUZZ
@given(i=st.integers(0, len(VALID) - 1), ops=byte_ops, limits=st.sampled_from(LIMITS))
def test_mutated_header(i, ops, limits):
    frames = list(VALID[i])
    frames[1] = _mutate_bytes(frames[1], ops)
    check(frames, limits)


@FUZZ
@given(i=st.integers(0, len(VALID) - 1), frame_ops=st.lists(
    st.tuples(st.sampled_from(["drop", "dup", "insert", "mutate", "swap", "kind", "truncate_list"]),
              st.integers(0, 64), st.binary(max_size=24), byte_ops),
    min_size=1, max_size=4), limits=st.sampled_from(LIMITS))
def test_mutated_frame_list(i, frame_ops, limits):
    frames = list(VALID[i])
    for op, idx, blob, ops in frame_ops:
        n = len(frames)
        if op == "insert":
            frames.insert(idx % (n + 1), blob)
            continue
        if n == 0:
            continue
        j = idx % n
        if op == "drop":
            del frames[j]
        elif op == "dup":
            frames.insert(j, frames[j])
        elif op == "mutate":
            frames[j] = _mutate_bytes(frames[j], ops)
        elif op == "swap":
            k = (j + 1 + idx) % n
            frames[j], frames[k] = frames[k], frames[j]
        elif op == "kind":
            frames[0] = blob[:1] if blob else bytes([idx])
        elif op == "truncate_list":
            del frames[j:]
    check(frames, limits)


# ---- 3. well-formed msgpack, hostile tensor descriptors ------------------------------------------

INT64 = st.integers(-(2**63), 2**64 - 1)  # what msgpack can carry
dtype_names = st.one_of(st.sampled_from(sorted(DTYPES)), st.sampled_from(["float128", "", "qint8", "Float32"]),
                        st.integers(-3, 3), st.none(), st.binary(max_size=4))
dims = st.one_of(st.integers(0, 5), st.integers(-3, -1), st.integers(2**30, 2**64 - 1), st.booleans(),
                 st.floats(allow_nan=True), st.text(max_size=2))
shapes = st.one_of(st.lists(st.integers(0, 4), max_size=4), st.lists(dims, max_size=40), INT64, st.none())
refs = st.one_of(st.integers(-2, 8), st.booleans(), st.text(max_size=1), st.none(), st.floats())


@st.composite
def descriptor(draw):
    kind = draw(st.sampled_from(["inline", "frame", "dtype", "other", "raw"]))
    if kind == "dtype":
        return ext(EXT_DTYPE, draw(st.binary(max_size=16)) if draw(st.booleans())
                   else draw(st.sampled_from(sorted(DTYPES))).encode())
    if kind == "other":
        return msgpack.ExtType(draw(st.integers(0, 127)), draw(st.binary(max_size=16)))
    if kind == "raw":  # descriptor payload that is not a 3-list, or not msgpack at all
        code = draw(st.sampled_from([EXT_TENSOR_INLINE, EXT_TENSOR_FRAME]))
        return msgpack.ExtType(code, draw(st.one_of(st.binary(max_size=24), st.builds(packb, st.lists(
            st.one_of(INT64, st.text(max_size=3), st.binary(max_size=3)), max_size=5)))))
    dt, shape = draw(dtype_names), draw(shapes)
    if kind == "inline":
        data = draw(st.one_of(st.binary(max_size=40), INT64, st.text(max_size=3)))
        return ext(EXT_TENSOR_INLINE, [dt, shape, data])
    return ext(EXT_TENSOR_FRAME, [dt, shape, draw(refs)])


headers = st.recursive(
    st.one_of(descriptor(), INT64, st.text(max_size=4), st.none()),
    lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=3), kids, max_size=4)),
    max_leaves=8,
)


@FUZZ
@given(kind=st.sampled_from([bytes([k]) for k in MsgType]),
       header=st.dictionaries(st.text(max_size=3), headers, max_size=4),
       rest=st.lists(st.binary(max_size=40), max_size=5), limits=st.sampled_from(LIMITS))
def test_hostile_descriptors(kind, header, rest, limits):
    check([kind, packb(header), *rest], limits)


@FUZZ
@given(code=st.integers(-128, -1), data=st.binary(max_size=20))
def test_negative_ext_codes(code, data):
    check([b"\x03", b"\x81\xa1x" + raw_ext(code, data)])


# ---- 4. valid headers round trip ------------------------------------------------------------------


@st.composite
def small_tensor(draw):
    dt = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    shape = draw(st.lists(st.integers(0, 3), max_size=3))
    t = torch.empty(shape, dtype=dt)
    if t.numel():
        n = t.numel() * t.element_size()
        raw = draw(st.binary(min_size=n, max_size=n))
        if dt == torch.bool:
            raw = bytes(b & 1 for b in raw)
        t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dt).reshape(shape)
    return t


values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False),
              st.text(max_size=5), st.binary(max_size=5), st.sampled_from(list(DTYPES.values())), small_tensor()),
    lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=4), kids, max_size=4)),
    max_leaves=12,
)


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and bits(a) == bits(b))
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@FUZZ
@given(header=st.dictionaries(st.text(max_size=4), values, max_size=5),
       inline=st.sampled_from([0, 8, 4096]), copy=st.booleans())
def test_valid_headers_roundtrip(header, inline, copy):
    frames = frame_bytes(encode(MsgType.REPLY, header, Limits(inline_bytes=inline)))
    msg = decode(frames, copy=copy)
    assert same(header, msg.header)
