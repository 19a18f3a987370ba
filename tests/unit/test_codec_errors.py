"""The decoder refuses every malformed message with ProtocolError (never another exception)."""
from __future__ import annotations

import re

import pytest
import torch

from djinn.protocol.codec import EXT_DTYPE, EXT_TENSOR_FRAME, EXT_TENSOR_INLINE, decode, encode
from djinn.protocol.errors import DjinnError, ProtocolError
from djinn.protocol.messages import Limits, MsgType

from ._util import ext, frame_bytes, packb, raw_ext

T = bytes([MsgType.REPLY])


def rejects(frames, match: str, limits: Limits | None = None) -> ProtocolError:
    for copy in (True, False):
        kw = {} if limits is None else {"limits": limits}
        with pytest.raises(ProtocolError) as info:
            decode(frames, copy=copy, **kw)
        assert type(info.value) is ProtocolError
        assert re.search(match, str(info.value)), str(info.value)
    return info.value


def inline(dtype, shape, data):
    return ext(EXT_TENSOR_INLINE, [dtype, shape, data])


def framed(dtype, shape, ref):
    return ext(EXT_TENSOR_FRAME, [dtype, shape, ref])


def test_protocol_error_is_a_djinn_error():
    assert issubclass(ProtocolError, DjinnError)
    assert ProtocolError.code == "protocol"


# ---- frames ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("frames", [[], [T]], ids=["none", "one"])
def test_fewer_than_two_frames(frames):
    e = rejects(frames, r"needs at least 2 frames \(type, header\), got %d" % len(frames))
    assert e.code == "protocol"


def test_too_many_frames():
    rejects([T, packb({})] + [b""] * 3, r"message has 5 frames, limit is 4", Limits(max_frames=4))
    assert decode([T, packb({})] + [b""] * 2, Limits(max_frames=4)).header == {}
    rejects([T, packb({})] + [b""] * 4095, r"message has 4097 frames, limit is 4096")


@pytest.mark.parametrize("byte", [0, 8, 9, 100, 255])
def test_unknown_type_byte(byte):
    rejects([bytes([byte]), packb({})], rf"unknown message type {byte}$")


@pytest.mark.parametrize("first", [b"", b"\x03\x00", b"\x02" * 10], ids=["empty", "two", "ten"])
def test_first_frame_must_be_one_byte(first):
    rejects([first, packb({})], re.escape(f"first frame must be one type byte (and a header frame count), "
                                          f"got {len(first)} bytes"))


@pytest.mark.parametrize("tail", [1, 2, 2**32 - 1])
def test_header_continuation_count_must_fit_the_message(tail):
    rejects([T + tail.to_bytes(4, "little"), packb({})], rf"^header continues in {tail} frames, message has 2$")


# ---- header ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("header", [
    b"", b"\xc1", b"\x82\xa1a", b"\x92\x01", packb({}) + packb(1), b"\xd9\x05ab", b"\xa2\xff\xfe",
    b"\x81\x01\x02",  # int key (strict_map_key)
    b"\x81\xc0\x02",  # nil key
    b"\x91" * 2000 + b"\xc0",  # nesting deeper than msgpack's stack
], ids=["empty", "reserved-c1", "truncated-map", "truncated-array", "extra-data", "short-str",
        "bad-utf8", "int-key", "nil-key", "too-deep"])
def test_header_not_msgpack(header):
    rejects([T, header], r"^header is not valid msgpack: ")


@pytest.mark.parametrize("value,name", [([1, 2], "list"), (5, "int"), ("s", "str"), (None, "NoneType"),
                                        (b"x", "bytes"), (True, "bool"), (1.5, "float")])
def test_header_not_a_map(value, name):
    rejects([T, packb(value)], rf"^header must be a map, got {name}$")


def test_tensor_as_whole_header_is_not_a_map():
    rejects([T, packb(inline("uint8", [1], b"\x01"))], r"header must be a map, got Tensor")


# ---- tensor descriptors ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float128", "Float32", "torch.float32", "", "qint8", 5, None, b"float32",
                                   ["float32"]])
def test_unknown_dtype_name(dtype):
    rejects([T, packb({"t": inline(dtype, [1], b"\x00" * 4)})], re.escape(f"unknown dtype {dtype!r}"))
    rejects([T, packb({"t": framed(dtype, [1], 2)}), b"\x00" * 4], re.escape(f"unknown dtype {dtype!r}"))


@pytest.mark.parametrize("name", ["float128", "", "int4"])
def test_unknown_dtype_value(name):
    rejects([T, packb({"d": ext(EXT_DTYPE, name.encode())})], re.escape(f"unknown dtype {name!r}"))


def test_dtype_value_with_bad_utf8():
    rejects([T, packb({"d": ext(EXT_DTYPE, b"\xff\xfe")})], "unknown dtype '\ufffd\ufffd'")


@pytest.mark.parametrize("shape", [[-1], [2, -3], [0, -1]])
def test_negative_dims(shape):
    bad = [d for d in shape if d < 0][0]
    rejects([T, packb({"t": inline("uint8", shape, b"")})], rf"has an invalid dimension {bad}$")


@pytest.mark.parametrize("shape,bad", [([1.0], "1.0"), (["3"], "'3'"), ([True], "True"), ([None], "None"),
                                       ([[2]], r"\[2\]"), ([2**62 + 1], str(2**62 + 1)),
                                       ([2**64 - 1], str(2**64 - 1))])
def test_non_int_or_huge_dims(shape, bad):
    rejects([T, packb({"t": inline("uint8", shape, b"\x00")})], rf"has an invalid dimension {bad}$")


@pytest.mark.parametrize("shape", [5, "3,4", None, {"a": 1}, b"\x01"])
def test_shape_not_a_list(shape):
    rejects([T, packb({"t": inline("uint8", shape, b"\x00")})], r"tensor shape must be a list of at most 32 ints")


def test_too_many_dims():
    assert decode([T, packb({"t": inline("uint8", [1] * 32, b"\x07")})]).header["t"].dim() == 32
    rejects([T, packb({"t": inline("uint8", [1] * 33, b"\x07")})], r"tensor shape must be a list of at most 32 ints")
    rejects([T, packb({"t": framed("uint8", [1] * 33, 2)}), b"\x07"], r"at most 32 ints")


@pytest.mark.parametrize("dtype,shape,n,need", [
    ("float32", [3], 11, 12), ("float32", [3], 13, 12), ("float32", [], 0, 4), ("int64", [2, 2], 16, 32),
    ("bool", [0], 1, 0), ("bfloat16", [4], 7, 8), ("float8_e5m2", [3, 3], 8, 9), ("complex128", [1], 8, 16),
])
def test_byte_count_must_match_shape(dtype, shape, n, need):
    msg = re.escape(f"tensor {dtype}{shape} needs {need} bytes, frame has {n}")
    rejects([T, packb({"t": inline(dtype, shape, b"\x01" * n)})], msg)
    rejects([T, packb({"t": framed(dtype, shape, 2)}), b"\x01" * n], msg)


def test_huge_shape_with_small_frame_allocates_nothing():
    rejects([T, packb({"t": framed("float32", [2**31, 2**31], 2)}), b"\x00" * 4],
            re.escape(f"tensor float32[{2**31}, {2**31}] needs {2**64} bytes, frame has 4"))


@pytest.mark.parametrize("ref", [0, 1, 3, 100, -1, True, "2", 2.0, None])
def test_frame_index_out_of_range(ref):
    frames = [T, packb({"t": framed("uint8", [1], ref)}), b"\x05"]
    rejects(frames, re.escape(f"tensor refers to frame {ref!r}, message has 3 frames"))


def test_frame_index_in_range_but_other_frame_size():
    frames = [T, packb({"a": framed("uint8", [1], 2), "b": framed("uint8", [2], 3)}), b"\x05", b"\x06"]
    rejects(frames, re.escape("tensor uint8[2] needs 2 bytes, frame has 1"))


def test_inline_data_must_be_bytes():
    rejects([T, packb({"t": inline("uint8", [1], [5])})], r"^inline tensor data must be bytes$")
    rejects([T, packb({"t": inline("uint8", [1], "\x05")})], r"^inline tensor data must be bytes$")


@pytest.mark.parametrize("desc", [["uint8", [1]], ["uint8", [1], b"\x00", 0, 0], {"dtype": "uint8"}, "uint8", 3, []])
def test_tensor_descriptor_shape(desc):
    rejects([T, packb({"t": ext(EXT_TENSOR_INLINE, packb(desc))}), b"\x00"],
            re.escape("tensor descriptor must be [dtype, shape, data]"))
    rejects([T, packb({"t": ext(EXT_TENSOR_FRAME, packb(desc))}), b"\x00"],
            re.escape("tensor descriptor must be [dtype, shape, frame] or [dtype, shape, frame, count]"))


def test_tensor_descriptor_not_msgpack():
    rejects([T, packb({"t": ext(EXT_TENSOR_INLINE, b"\xc1")})], r"^header is not valid msgpack: ")
    rejects([T, packb({"t": ext(EXT_TENSOR_FRAME, b"\x93\xa5uint8")})], r"^header is not valid msgpack: ")


@pytest.mark.parametrize("code", [0, 4, 5, 42, 127, -2, -128])
def test_unknown_ext_code(code):
    header = b"\x81\xa1x" + raw_ext(code, b"\x01\x02")
    rejects([T, header], rf"^unknown ext type {code}$")


def test_errors_inside_nested_values_are_found():
    good = inline("uint8", [1], b"\x01")
    rejects([T, packb({"a": [good, {"b": [good, inline("uint8", [2], b"\x01")]}]})], r"needs 2 bytes, frame has 1")


# ---- limits ---------------------------------------------------------------------------------------


def test_oversized_tensor_frame():
    limits = Limits(max_frame_bytes=100)
    header = packb({"t": framed("uint8", [101], 2)})
    rejects([T, header, b"\x00" * 101], r"^frame 2 is 101 bytes, limit is 100$", limits)
    rejects([T, packb({}), b"", b"\x00" * 101], r"^frame 3 is 101 bytes, limit is 100$", limits)
    ok = decode([T, packb({"t": framed("uint8", [100], 2)}), b"\x01" * 100], limits)
    assert ok.header["t"].sum().item() == 100


def test_oversized_header():
    limits = Limits(max_header_bytes=64)
    fits = packb({"s": "x" * 59})
    assert len(fits) == 64
    assert decode([T, fits], limits).header == {"s": "x" * 59}
    big = packb({"s": "x" * 60})
    rejects([T, big], r"^header is 65 bytes, limit is 64$", limits)


def test_oversized_total():
    limits = Limits(max_total_bytes=1000)
    header = packb({})
    frames = [T, header, b"\x00" * 500, b"\x00" * (1000 - 500 - 2)]
    assert decode(frames, limits).nbytes == 1000
    frames[-1] += b"\x00"
    rejects(frames, r"^message is 1001 bytes, limit is 1000$", limits)


def test_total_limit_is_checked_before_frame_count_and_type():
    # The cheapest checks run first; a message over the total is refused whatever its content.
    rejects([b"\xff\xff", b"\x00" * 10], r"^message is 12 bytes, limit is 8$", Limits(max_total_bytes=8))


def test_encoded_message_respects_decoder_limits():
    big = torch.zeros(200, dtype=torch.uint8)
    frames = frame_bytes(encode(MsgType.REPLY, {"t": big}, Limits(inline_bytes=16)))
    assert len(frames) == 3
    rejects(frames, r"^frame 2 is 200 bytes, limit is 199$", Limits(max_frame_bytes=199))
    assert decode(frames, Limits(max_frame_bytes=200)).header["t"].shape == (200,)
