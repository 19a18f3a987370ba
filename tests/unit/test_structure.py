"""structure.pack / unpack: nested Python values <-> tagged msgpack values."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutputWithPast

from djinn.frontend.wire import model_output as _model_output
from djinn.protocol.codec import decode, encode
from djinn.protocol.errors import ProtocolError
from djinn.protocol.messages import MsgType
from djinn.protocol.structure import MAX_DEPTH, pack, unpack

from ._util import bits, frame_bytes


def no_leaf(obj):
    return NotImplemented


def no_tag(name, value):
    raise AssertionError(f"unexpected tag {name}")


def wire(value):
    """value as the peer sees it: through the codec."""
    return decode(frame_bytes(encode(MsgType.REQUEST, {"v": value}))).header["v"]


def roundtrip(obj, leaf=no_leaf, tag=no_tag, model_output=None):
    return unpack(wire(pack(obj, leaf)), tag, model_output)


# ---- pack: exact wire shapes ----------------------------------------------------------------------


@pytest.mark.parametrize("v", [None, True, False, 0, -5, 2**64 - 1, 1.25, "s", "", b"\x00", torch.bfloat16])
def test_scalars_pass_through(v):
    assert pack(v, no_leaf) is v
    assert unpack(v, no_tag) is v


def test_tensor_passes_through_as_itself():
    t = torch.arange(3)
    assert pack(t, no_leaf) is t
    assert pack([t], no_leaf)[0] is t


def test_wire_shapes():
    assert pack((1, 2), no_leaf) == {"$tu": [1, 2]}
    assert pack((), no_leaf) == {"$tu": []}
    assert pack([1, (2,)], no_leaf) == [1, {"$tu": [2]}]
    assert pack({}, no_leaf) == {"$d": {}}
    assert pack({"a": (1, [2, {"b": 3}])}, no_leaf) == {"$d": {"a": {"$tu": [1, [2, {"$d": {"b": 3}}]]}}}
    assert pack(torch.Size([2, 3]), no_leaf) == {"$tu": [2, 3]}
    assert pack(torch.Size([]), no_leaf) == {"$tu": []}


def test_dicts_are_always_tagged_so_user_keys_never_collide():
    user = {"$tu": [1], "$d": {"x": 1}, "$h": "abc", "$t": [1], "$mo": "CausalLMOutputWithPast"}
    packed = pack(user, no_leaf)
    assert packed == {"$d": {"$tu": [1], "$d": {"$d": {"x": 1}}, "$h": "abc", "$t": [1],
                             "$mo": "CausalLMOutputWithPast"}}
    assert roundtrip(user) == user


# ---- round trips ----------------------------------------------------------------------------------


def test_nested_roundtrip_keeps_tuples_lists_and_dicts_apart():
    t = torch.arange(6, dtype=torch.float16).reshape(2, 3)
    obj = {"args": (1, [2, (3, {"k": t})], ()), "kw": {"use_cache": True, "dtype": torch.float8_e5m2},
           "empty": [], "none": None, "pair": ((1, 2), [3, 4])}
    out = roundtrip(obj)
    assert out.keys() == obj.keys()
    assert type(out["args"]) is tuple and type(out["args"][1]) is list and type(out["args"][1][1]) is tuple
    assert out["args"][0] == 1 and out["args"][2] == ()
    assert bits(out["args"][1][1][1]["k"]) == bits(t) and out["args"][1][1][1]["k"].dtype == torch.float16
    assert out["kw"] == {"use_cache": True, "dtype": torch.float8_e5m2}
    assert out["empty"] == [] and out["none"] is None
    assert out["pair"] == ((1, 2), [3, 4]) and type(out["pair"][0]) is tuple and type(out["pair"][1]) is list


def test_torch_size_arrives_as_tuple():
    out = roundtrip({"shape": torch.Size([4, 5])})
    assert out == {"shape": (4, 5)}
    assert type(out["shape"]) is tuple
    assert out["shape"] == torch.Size([4, 5])


def test_model_output_roundtrip():
    logits = torch.randn(1, 3, 11)
    hidden = (torch.ones(1, 3, 4), torch.zeros(1, 3, 4))
    mo = CausalLMOutputWithPast(loss=torch.tensor(2.5), logits=logits, hidden_states=hidden)
    packed = pack(mo, no_leaf)
    assert list(packed) == ["$mo", "$d"]
    assert packed["$mo"] == "CausalLMOutputWithPast"
    assert list(packed["$d"]) == ["loss", "logits", "hidden_states"]  # None fields are not sent
    assert packed["$d"]["hidden_states"]["$tu"][0] is hidden[0]

    seen = []

    def rebuild(name, fields):
        seen.append((name, sorted(fields)))
        return _model_output(name, fields)

    out = roundtrip(mo, model_output=rebuild)
    assert seen == [("CausalLMOutputWithPast", ["hidden_states", "logits", "loss"])]
    assert type(out) is CausalLMOutputWithPast
    assert bits(out.logits) == bits(logits) and out.logits.shape == (1, 3, 11)
    assert out.loss.item() == 2.5
    assert type(out.hidden_states) is tuple and len(out.hidden_states) == 2
    assert torch.equal(out.hidden_states[1], hidden[1])
    assert out.past_key_values is None and out.attentions is None
    assert out[0].item() == 2.5  # ModelOutput indexing still works


def test_model_output_without_callback_is_a_dict():
    mo = BaseModelOutput(last_hidden_state=torch.ones(2))
    out = roundtrip(mo)
    assert type(out) is dict and list(out) == ["last_hidden_state"]
    assert out["last_hidden_state"].tolist() == [1.0, 1.0]


def test_model_output_nested_in_structures():
    mo = BaseModelOutput(last_hidden_state=torch.ones(2))
    out = roundtrip([(mo,), {"o": mo}], model_output=_model_output)
    assert type(out[0][0]) is BaseModelOutput and type(out[1]["o"]) is BaseModelOutput


def test_frontend_model_output_allow_list():
    # Only transformers.modeling_outputs classes are rebuilt; any other name stays a dict.
    assert _model_output("NotAClass", {"a": 1}) == {"a": 1}
    assert _model_output("torch", {"a": 1}) == {"a": 1}
    assert _model_output("__builtins__", {"a": 1}) == {"a": 1}
    assert type(_model_output("CausalLMOutputWithPast", {"logits": torch.ones(1)})) is CausalLMOutputWithPast


def test_frontend_model_output_with_unknown_field_stays_a_dict():
    # A server on a newer transformers may send a field this client's class lacks: keep the values.
    wire_value = {"$mo": "CausalLMOutputWithPast", "$d": {"logits": torch.ones(1), "new_field": 3}}
    out = unpack(wire(wire_value), no_tag, _model_output)
    assert type(out) is dict and list(out) == ["logits", "new_field"]
    assert out["new_field"] == 3 and out["logits"].tolist() == [1.0]


# ---- leaf and tag hooks ---------------------------------------------------------------------------


class Handle:
    def __init__(self, hid):
        self.hid = hid


def test_leaf_hook_maps_custom_objects_everywhere():
    seen = []

    def leaf(obj):
        seen.append(type(obj).__name__)
        return {"$h": obj.hid} if isinstance(obj, Handle) else NotImplemented

    obj = {"x": Handle("a"), "y": (Handle("b"), [Handle("c")]), "z": 1}
    packed = pack(obj, leaf)
    assert packed == {"$d": {"x": {"$h": "a"}, "y": {"$tu": [{"$h": "b"}, [{"$h": "c"}]]}, "z": 1}}
    assert seen == ["dict", "Handle", "tuple", "Handle", "list", "Handle", "int"]
    assert pack(Handle("top"), leaf) == {"$h": "top"}

    resolved = {}

    def tag(name, value):
        assert name == "$h"
        resolved[value] = Handle(value.upper())
        return resolved[value]

    out = unpack(wire(packed), tag)
    assert out["x"].hid == "A" and out["y"][0].hid == "B" and out["y"][1][0].hid == "C" and out["z"] == 1
    assert sorted(resolved) == ["a", "b", "c"]


def test_leaf_hook_takes_precedence_over_builtins():
    # The server's leaf turns every tensor into a "$t" handle and drops caches (returns None).
    def leaf(obj):
        if isinstance(obj, torch.Tensor):
            return {"$t": ["id", "float32", list(obj.shape), "cpu"]}
        if isinstance(obj, tuple) and len(obj) == 0:
            return None
        return NotImplemented

    assert pack((torch.ones(2, 2), ()), leaf) == {"$tu": [{"$t": ["id", "float32", [2, 2], "cpu"]}, None]}
    got = unpack({"$tu": [{"$t": ["id", "float32", [2, 2], "cpu"]}]}, lambda n, v: (n, v))
    assert got == (("$t", ["id", "float32", [2, 2], "cpu"]),)


def test_tag_hook_errors_propagate():
    def tag(name, value):
        raise ProtocolError(f"no {name}")

    with pytest.raises(ProtocolError, match=r"^no \$t$"):
        unpack([{"$t": 1}], tag)


# ---- rejections -----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [
    {"a": 1}, {}, {"$x": 1}, {"$tu": 5}, {"$tu": [1], "extra": 2}, {"$d": 5}, {"$d": {}, "$tu": []},
    {"$mo": "CausalLMOutputWithPast"}, {"$d": {}, "$mo": "X", "more": 1}, {"$h": 1, "$t": 2}, {"$d": [1]},
    [{"ok": 1}], {"$tu": [{"bad": 1}]},
], ids=repr)
def test_unknown_tags_rejected(value):
    with pytest.raises(ProtocolError, match=r"unknown tagged value with keys"):
        unpack(value, lambda n, v: v)


def test_unknown_tag_error_names_the_keys():
    with pytest.raises(ProtocolError, match=r"^unknown tagged value with keys \['\$x', 'a'\]$"):
        unpack({"a": 1, "$x": 2}, no_tag)


def test_mixed_str_and_bytes_keys_rejected_with_protocol_error():
    # msgpack (strict_map_key) lets a peer send str and bytes keys in one map.
    with pytest.raises(ProtocolError, match=r"unknown tagged value with keys"):
        unpack({"a": 1, b"b": 2}, no_tag)


@pytest.mark.parametrize("d", [{b"k": 1}, {"a": 1, b"b": 2}])
def test_tagged_dict_with_non_string_keys_rejected(d):
    with pytest.raises(ProtocolError, match=r"only dicts with string keys"):
        unpack({"$d": d}, no_tag)
    with pytest.raises(ProtocolError, match=r"only dicts with string keys"):
        unpack({"$mo": "BaseModelOutput", "$d": d}, no_tag, _model_output)


@pytest.mark.parametrize("d", [{1: "a"}, {None: 1}, {("a",): 1}, {"ok": 1, b"b": 2}, {torch.float32: 1}])
def test_pack_non_string_dict_keys_rejected(d):
    with pytest.raises(ProtocolError, match=r"^only dicts with string keys can cross the wire$"):
        pack(d, no_leaf)
    with pytest.raises(ProtocolError, match=r"only dicts with string keys"):
        pack([{"x": d}], no_leaf)


@pytest.mark.parametrize("v,name", [({1, 2}, "set"), (object(), "object"), (1 + 2j, "complex"),
                                    (range(3), "range"), (Handle("x"), "Handle")])
def test_pack_unsupported_types(v, name):
    with pytest.raises(ProtocolError, match=rf"^cannot send a value of type {name}$"):
        pack(v, no_leaf)


def nest(k, leaf_value=1, wrap=lambda v: [v]):
    v = leaf_value
    for _ in range(k):
        v = wrap(v)
    return v


@pytest.mark.parametrize("wrap", [lambda v: [v], lambda v: (v,), lambda v: {"k": v}], ids=["list", "tuple", "dict"])
def test_pack_depth_limit(wrap):
    assert MAX_DEPTH == 64
    ok = pack(nest(MAX_DEPTH, wrap=wrap), no_leaf)
    assert unpack(ok, no_tag) == nest(MAX_DEPTH, wrap=wrap)
    with pytest.raises(ProtocolError, match=r"^value nested deeper than 64 levels$"):
        pack(nest(MAX_DEPTH + 1, wrap=wrap), no_leaf)


def test_unpack_depth_limit():
    assert unpack(nest(MAX_DEPTH), no_tag) == nest(MAX_DEPTH)
    with pytest.raises(ProtocolError, match=r"^value nested deeper than 64 levels$"):
        unpack(nest(MAX_DEPTH + 1), no_tag)
    with pytest.raises(ProtocolError, match=r"nested deeper than 64 levels"):
        unpack(nest(MAX_DEPTH + 1, wrap=lambda v: {"$d": {"k": v}}), no_tag)


def test_self_referential_value_hits_depth_limit():
    loop: list = []
    loop.append(loop)
    with pytest.raises(ProtocolError, match=r"nested deeper than 64 levels"):
        pack(loop, no_leaf)


# ---- fuzz: unpack of arbitrary decoded values -----------------------------------------------------

keys = st.one_of(st.sampled_from(["$tu", "$d", "$mo", "$h", "$t", "$x", "a"]), st.text(max_size=3),
                 st.binary(max_size=2))
wire_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.text(max_size=3), st.binary(max_size=3)),
    lambda kids: st.one_of(st.lists(kids, max_size=3), st.dictionaries(keys, kids, max_size=3)),
    max_leaves=10,
)


@pytest.mark.parametrize("name", [b"CausalLMOutputWithPast", None, 5, ["a"], {"$d": {}}], ids=repr)
def test_model_output_name_must_be_a_string(name):
    with pytest.raises(ProtocolError, match=r"unknown tagged value with keys"):
        unpack({"$mo": name, "$d": {"logits": 1}}, no_tag, _model_output)


tagged_mo = st.fixed_dictionaries({"$mo": st.one_of(st.text(max_size=3), st.binary(max_size=3), st.none(),
                                                    st.sampled_from(["BaseModelOutput", "__class__", "torch"])),
                                   "$d": st.dictionaries(keys, st.integers(0, 3), max_size=2)})


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(value=st.one_of(wire_values, tagged_mo, st.lists(tagged_mo, max_size=2)), with_mo=st.booleans())
def test_unpack_fuzz_only_raises_protocol_error(value, with_mo):
    try:
        unpack(value, lambda n, v: ("tag", n), _model_output if with_mo else None)
    except ProtocolError as e:
        assert type(e) is ProtocolError and e.message


plain = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False),
              st.text(max_size=4), st.binary(max_size=4)),
    lambda kids: st.one_of(st.lists(kids, max_size=3), st.tuples(kids, kids),
                           st.dictionaries(st.text(max_size=4), kids, max_size=3)),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(value=plain)
def test_pack_unpack_roundtrip_fuzz(value):
    out = roundtrip(value)
    assert out == value
    assert repr(out) == repr(value)  # same container types all the way down
