"""Basic-index chains on the wire (djinn/protocol/indexing.py) and server-side edits (djinn/server/execution/edits.py)."""
from __future__ import annotations

import pytest
import torch

from djinn.protocol.codec import decode, encode
from djinn.protocol.errors import InvalidRequest, ProtocolError
from djinn.protocol.indexing import MAX_ITEMS, apply_chain, decode_chain, encode_chain, encode_index, normalize
from djinn.protocol.messages import MsgType
from djinn.server.execution import edits

from ._util import frame_bytes

T = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)

CHAINS = [
    (),
    ((0,),),
    ((slice(None), -1),),
    ((0, slice(1, None, 2), Ellipsis),),
    ((None, Ellipsis, 2),),
    ((1,), (slice(None, 2), 3)),
    ((slice(-3, None),), (Ellipsis, slice(None, None, 3)), (0,)),
]


def wire(value):
    return decode(frame_bytes(encode(MsgType.REQUEST, {"v": value}))).header["v"]


@pytest.mark.parametrize("chain", CHAINS)
def test_chain_round_trip_gives_torch_views(chain):
    got = decode_chain(wire(encode_chain(chain)))
    assert got == chain
    view = apply_chain(T, got)
    ref = T
    for index in chain:
        ref = ref[index]
    assert torch.equal(view, ref)
    assert view.untyped_storage().data_ptr() == T.untyped_storage().data_ptr()  # a view: edits land in T


def test_wire_shapes():
    assert encode_index((0, slice(1, None), Ellipsis, None)) == [0, ["s", 1, None, None], ["..."], ["new"]]
    assert encode_index(-1) == [-1]
    assert encode_chain(((0,), (slice(None, None, 2),))) == [[0], [["s", None, None, 2]]]


@pytest.mark.parametrize("bad", [True, 1.5, torch.tensor([0]), [0, 1], "a"])
def test_advanced_indices_are_refused_locally(bad):
    with pytest.raises(TypeError, match="is not supported on a remote tensor"):
        normalize((0, bad))


@pytest.mark.parametrize("bad, msg", [
    ({"x": 1}, "must be a list"),
    ([[True]], "unknown index item"),
    ([[2**63]], "unknown index item"),
    ([[["s", 0, 1]]], "unknown index item"),
    ([[["s", 0, 1, 0]]], "slice step must be positive"),
    ([[["s", "a", 1, 1]]], "unknown index item"),
    ([[["..."], ["..."]]], "only one ellipsis"),
    ([[0] * (MAX_ITEMS + 1)], "at most"),
    ([[0]] * 9, "at most 8 indices"),
])
def test_bad_wire_indices(bad, msg):
    with pytest.raises(ProtocolError, match=msg):
        decode_chain(bad)


def test_edits_apply_in_order_through_views():
    t = torch.zeros(2, 3)
    other = torch.arange(3, dtype=torch.float32)
    handles = {"t": t, "o": other}
    records = [
        {"h": "t", "i": encode_chain(((0,),)), "op": "add", "v": torch.ones(3)},
        {"h": "t", "i": encode_chain(((slice(None), -1),)), "op": "mul", "v": 4},
        {"h": "t", "i": encode_chain(((1,),)), "op": "copy", "v": {"h": "o", "i": []}},
        {"h": "t", "i": [], "op": "sub", "v": 0.5},
        {"h": "t", "i": encode_chain(((1, 0),)), "op": "copy", "v": {"h": "t", "i": [[0, 2]]}},
    ]
    used = [edits.apply(e, handles[e.hid], handles.__getitem__) for e in edits.decode(records)]
    assert t.tolist() == [[0.5, 0.5, 3.5], [3.5, 0.5, 1.5]]
    assert used[2] is not other and used[4].tolist() == 3.5  # tensor values are snapshots


@pytest.mark.parametrize("record, msg", [
    ({"h": "t", "op": "pow", "v": 1}, "an edit is"),
    ({"h": 5, "op": "add", "v": 1}, "an edit is"),
    ({"h": "t", "op": "add", "v": "x"}, "a number, a tensor or a handle"),
    ({"h": "t", "op": "add", "v": {"i": []}}, "refers to"),
    ({"h": "t", "op": "add", "i": [[True]], "v": 1}, "unknown index item"),
])
def test_bad_edit_records(record, msg):
    with pytest.raises(InvalidRequest, match=msg):
        edits.decode([record])


def test_edit_that_does_not_fit_is_an_invalid_request():
    t = torch.zeros(2, 3)
    [e] = edits.decode([{"h": "t", "i": [], "op": "add", "v": torch.ones(4)}])
    with pytest.raises(InvalidRequest, match=r"edit add into t of shape \[2, 3\] failed"):
        edits.apply(e, t, {}.__getitem__)
    [e] = edits.decode([{"h": "t", "i": [[5]], "op": "add", "v": 1}])
    with pytest.raises(InvalidRequest, match=r"index does not fit shape \[2, 3\]"):
        edits.apply(e, t, {}.__getitem__)
    assert t.tolist() == [[0.0] * 3] * 2
