"""Tier 1: a header's decoded size is bounded by its container count, and the router's rid salvage
does not decode headers that failed for their size (docs/RELIABILITY.md, findings D and E)."""
from __future__ import annotations

import tracemalloc

import msgpack
import pytest
import zmq

from djinn.protocol import codec
from djinn.protocol.errors import ProtocolError
from djinn.protocol.messages import Limits, MsgType
from djinn.server.router import _salvage_rid

TYPE = bytes([MsgType.REQUEST])


def _maps(n: int) -> bytes:
    """A header {"rid": 5, "x": [[{}, {}, ...], ...]}: n empty maps (one byte each on the wire) in
    arrays of at most 2^20, the per-array limit."""
    rows = [min(1 << 20, n - i) for i in range(0, n, 1 << 20)]
    body = b"".join(b"\xdd" + r.to_bytes(4, "big") + b"\x80" * r for r in rows)
    return msgpack.packb({"rid": 5, "x": []})[:-1] + b"\xdd" + len(rows).to_bytes(4, "big") + body


def test_header_within_the_container_budget_decodes():
    msg = codec.decode([TYPE, _maps(1000)], Limits(max_containers=1003))  # + 2 arrays and the header
    assert msg.header["rid"] == 5 and len(msg.header["x"][0]) == 1000
    with pytest.raises(ProtocolError):
        codec.decode([TYPE, _maps(1000)], Limits(max_containers=1002))


def test_too_many_containers_is_a_protocol_error_before_the_memory_is_spent():
    limits = Limits(max_containers=1 << 16)
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match="more than 65536 maps and arrays"):
            codec.decode([TYPE, _maps(4 << 20)], limits)  # 4 MiB: ~270 MB of dicts if fully decoded
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, peak


def test_default_budget_bounds_a_max_size_header():
    with pytest.raises(ProtocolError, match="maps and arrays"):
        codec.decode([TYPE, _maps(15 << 20)], Limits())


def test_salvage_reads_the_rid_of_a_small_broken_message():
    header = msgpack.packb({"rid": 42, "op": "x"})
    assert _salvage_rid([zmq.Frame(b"id"), zmq.Frame(TYPE), zmq.Frame(header)]) == 42


def test_salvage_skips_an_oversized_header():
    big = zmq.Frame(msgpack.packb({"rid": 42})[:-1] + b"\xdd" + (1 << 20).to_bytes(4, "big") + b"\x80" * (1 << 20))
    tracemalloc.start()
    try:
        assert _salvage_rid([zmq.Frame(b"id"), zmq.Frame(TYPE), big]) == 0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak  # it used to decode all the maps (~70 MB per MiB of header)
