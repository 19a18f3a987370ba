"""Tier 2: RemoteTensor follows torch's device, numpy and formatting habits, against a real server.

`.to("cpu")` and `.cpu()` give a local torch.Tensor; `.device` is a torch.device (the server's);
`.to(<the server's device>)` and `.to(dtype)` stay remote; other devices are refused with what to do.
On a CPU server "cpu" means here (frontend/lazy.py, LazyOps.to). `np.asarray`, `format` and unbound
`torch.Tensor` methods written in Python give what they give on the same tensor held locally.
"""
from __future__ import annotations

import copy
import operator
import pickle

import numpy as np
import pytest
import torch

import djinn
from djinn import Breakpoint
from djinn.frontend.remote import RemoteModel
from djinn.protocol.errors import ProtocolError
from djinn.protocol.tensors import flat_bytes, is_remote

from ..models import tiny_gpt2

IDS = torch.tensor([[1, 17, 42, 99, 5]])


@pytest.fixture
def pair(conn, device):
    model = tiny_gpt2(seed=5, device=device)
    rm = RemoteModel.from_module(conn.default_session(), model)
    with torch.no_grad():
        ref = model(IDS.to(device)).logits.cpu()
    return rm, ref


def test_device_is_the_servers_torch_device(pair, device, conn):
    rm, _ = pair
    logits = rm(IDS).logits
    assert isinstance(logits.device, torch.device) and logits.device == torch.device(conn.device) == device
    assert isinstance(logits[:, -1].device, torch.device)
    assert (logits * 2).device == device  # a pending result too
    run = conn.default_session().start(rm, IDS, breakpoints=[Breakpoint(layer=0)])
    assert run.wait().activation.device == device
    run.cancel()


@pytest.mark.parametrize("move", [
    lambda t: t.to("cpu"), lambda t: t.cpu(), lambda t: t.to(torch.device("cpu")), lambda t: t.to(device="cpu"),
    lambda t: t.to("cpu", non_blocking=True), lambda t: t.to("cpu", copy=True),
], ids=["to_str", "cpu", "to_device", "to_kw", "non_blocking", "copy"])
def test_to_cpu_is_a_local_tensor(pair, move):
    rm, ref = pair
    got = move(rm(IDS).logits)
    assert type(got) is torch.Tensor and got.device.type == "cpu"
    assert torch.equal(got, ref)


def test_to_cpu_with_a_dtype_and_of_views(pair):
    rm, ref = pair
    logits = rm(IDS).logits
    got = logits.to("cpu", torch.float64)
    assert type(got) is torch.Tensor and got.dtype == torch.float64 and torch.equal(got, ref.double())
    like = logits.to(torch.zeros(1, dtype=torch.float16))  # another (local) tensor: its device and dtype
    assert type(like) is torch.Tensor and torch.equal(like, ref.half())
    view = logits[0, -1].to("cpu")
    assert type(view) is torch.Tensor and torch.equal(view, ref[0, -1])
    assert torch.equal((logits.softmax(-1)).to("cpu"), ref.softmax(-1))  # a pending result: one round trip


def test_dtype_and_server_device_stay_remote(pair, device):
    rm, ref = pair
    logits = rm(IDS).logits
    as_double = logits.to(torch.float64)
    assert isinstance(as_double, djinn.RemoteTensor) and as_double.dtype == torch.float64
    assert torch.equal(as_double.cpu(), ref.double())
    assert logits.to(torch.float32) is logits  # nothing to change, as in torch
    assert logits.to(as_double).dtype == torch.float64 and isinstance(logits.to(as_double), djinn.RemoteTensor)
    if device.type == "cuda":
        assert logits.to(device) is logits and logits.cuda() is logits and logits.to("cuda") is logits
        other = "cuda:7"
    else:
        other = "cuda"
    with pytest.raises(djinn.InvalidRequest, match=rf"lives on the server's {device}; \.to\('cpu'\) brings it here"):
        logits.to(other)
    with pytest.raises(TypeError, match="unexpected keyword"):
        logits.to("cpu", colour="red")


def _views(logits, ref):
    """(remote, local) pairs: a handle, basic-index views, a pending result and a view of one."""
    return [(logits, ref), (logits[0, -1], ref[0, -1]), (logits[0, 1:3, :4], ref[0, 1:3, :4]),
            (logits * 2, ref * 2), ((logits * 2)[0, -1], (ref * 2)[0, -1])]


def test_numpy_sees_the_value_of_tensors_and_views(pair):
    rm, ref = pair
    logits = rm(IDS).logits
    for got, want in _views(logits, ref):
        for conv in (np.asarray, lambda t: np.asarray(t, dtype=np.float64), np.array,
                     lambda t: t.__array__(), lambda t: torch.Tensor.__array__(t)):
            a, b = conv(got), conv(want)
            assert a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b), want.shape


def test_format_as_torch_formats(pair):
    rm, ref = pair
    logits = rm(IDS).logits
    scalars = [(logits.sum(), ref.sum(), (".3f", "+.6e", ">12.4g", "")),     # a pending 0-d result
               (logits[0, -1, 3], ref[0, -1, 3], (".3f", "")),              # a 0-d view
               (logits.argmax(), ref.argmax(), ("d", ">6", "x", ""))]       # an integer
    for got, want, specs in scalars:
        for spec in specs:
            assert format(got, spec) == format(want, spec), spec
            assert torch.Tensor.__format__(got, spec) == torch.Tensor.__format__(want, spec), spec
    assert f"loss {logits.sum():.4f}" == f"loss {ref.sum():.4f}"
    for got, want in ((logits[0, -1, :1], ref[0, -1, :1]), (logits[0], ref[0])):  # not 0-d: object's format
        assert format(got, "") == str(got)
        with pytest.raises(TypeError, match="unsupported format string"):
            format(want, ".3f")
        with pytest.raises(TypeError, match="unsupported format string"):
            format(got, ".3f")


def test_unbound_tensor_methods_in_python(pair):
    """torch.Tensor methods written in Python reach __torch_function__ with the remote tensor as self:
    its own method where it has one, else a lazy op."""
    rm, ref = pair
    logits = rm(IDS).logits
    assert torch.equal(torch.Tensor.norm(logits, dim=-1).cpu(), torch.Tensor.norm(ref, dim=-1))
    assert torch.equal(torch.Tensor.__rsub__(logits, 1).cpu(), torch.Tensor.__rsub__(ref, 1))
    assert torch.equal(torch.Tensor.unflatten(logits[0], -1, (16, 16)).cpu(), torch.Tensor.unflatten(ref[0], -1, (16, 16)))
    parts = torch.Tensor.split(logits, 2, dim=1)
    assert len(parts) == 3 and all(torch.equal(g.cpu(), w) for g, w in zip(parts, torch.Tensor.split(ref, 2, dim=1)))
    assert torch.Tensor.__len__(logits[0]) == torch.Tensor.__len__(ref[0]) == 5
    assert torch.Tensor.__repr__(logits) == repr(logits)  # no fetch: what repr(t) shows


_UNBOUND_C = [  # torch.Tensor methods written in C: the descriptor checks its self is a torch.Tensor
    ("sum", lambda t: torch.Tensor.sum(t)), ("sum_dim", lambda t: torch.Tensor.sum(t, -1, keepdim=True)),
    ("sin", lambda t: torch.Tensor.sin(t)), ("add", lambda t: torch.Tensor.add(t, 1)),
    ("add_alpha", lambda t: torch.Tensor.add(t, t, alpha=0.5)), ("view", lambda t: torch.Tensor.view(t, -1)),
    ("softmax", lambda t: torch.Tensor.softmax(t, -1)), ("argmax", lambda t: torch.Tensor.argmax(t)),
    ("argmax_dim", lambda t: torch.Tensor.argmax(t, dim=-1)), ("to_dtype", lambda t: torch.Tensor.to(t, torch.float64)),
    ("float", lambda t: torch.Tensor.float(t)), ("getitem", lambda t: torch.Tensor.__getitem__(t, 0)),
    ("getitem_slice", lambda t: torch.Tensor.__getitem__(t, (Ellipsis, slice(1, 3)))),
]


@pytest.mark.parametrize("call", [c for _, c in _UNBOUND_C], ids=[n for n, _ in _UNBOUND_C])
def test_unbound_tensor_methods_in_c(pair, call):
    """torch.Tensor methods written in C (`torch.Tensor.sum(t)`) on a handle, a view and a pending
    tensor: the same value as on the local tensor, bitwise, and still remote until fetched."""
    rm, ref = pair
    logits = rm(IDS).logits
    cases = [(logits, ref), (logits[0], ref[0]), (logits[0, -1], ref[0, -1]), (logits * 2, ref * 2),
             ((logits * 2)[0], (ref * 2)[0])]
    for got, want in cases:
        out, expected = call(got), call(want)
        assert isinstance(out, djinn.RemoteTensor | djinn.RemoteView), type(out)
        assert out.shape == expected.shape and out.dtype == expected.dtype and out.device == got.device
        local = out.cpu()
        assert type(local) is torch.Tensor and torch.equal(local, expected), want.shape


def test_unbound_c_methods_answer_metadata_and_conversions(pair):
    """Unbound C metadata queries and conversions reach the remote tensor's own methods: no lazy op for
    a shape, a fetch for `.cpu()`/`.tolist()`/`.item()`, and `.to("cpu")` a local tensor."""
    rm, ref = pair
    logits = rm(IDS).logits
    for got, want in ((logits, ref), (logits[0, -1], ref[0, -1]), (logits * 2, ref * 2)):
        assert torch.Tensor.size(got) == want.size() and torch.Tensor.size(got, -1) == want.size(-1)
        assert torch.Tensor.dim(got) == want.dim() and torch.Tensor.numel(got) == want.numel()
        assert torch.equal(torch.Tensor.cpu(got), want) and torch.equal(torch.Tensor.to(got, "cpu"), want)
        assert torch.Tensor.tolist(got) == want.tolist()
    assert torch.Tensor.item(logits[0, -1, 3]) == ref[0, -1, 3].item()
    assert torch.Tensor.equal(logits, logits * 1) is True and torch.Tensor.allclose(logits, logits + 1e-9) is True
    with pytest.raises(djinn.CaptureError, match="view size is not compatible"):  # torch's refusal, where written
        torch.Tensor.view(logits[0, :, 1:3], -1)
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        torch.Tensor.view(ref[0, :, 1:3], -1)


def test_remote_tensors_are_storage_less_tensors(pair, device):
    """Note [Remote tensors are Tensors]: a torch.Tensor to torch, with the server's device and no data
    here; Python's protocols keep their remote meaning, and nothing sends one as local bytes."""
    rm, ref = pair
    logits = rm(IDS).logits
    view, pend = logits[0], logits * 2
    for t in (logits, view, pend):
        assert isinstance(t, torch.Tensor) and torch.is_tensor(t) and is_remote(t)
        assert t.device == device and t.is_cuda == (device.type == "cuda") and not t.is_meta and t.grad is None
        assert hash(t) == object.__hash__(t) and isinstance(t == t, djinn.RemoteTensor)
        for refused in (iter, lambda x: 1.0 in x, operator.index, pickle.dumps, copy.copy, copy.deepcopy):
            with pytest.raises(TypeError):
                refused(t)
        with pytest.raises(ProtocolError, match="has no data here"):
            flat_bytes(t)
    assert repr(logits).startswith("RemoteTensor(") and repr(pend).endswith("pending)") and "RemoteView" in repr(view)
    with pytest.raises(ProtocolError, match="cannot send a value of type RemoteView"):
        rm(view)
    with pytest.raises(djinn.InvalidRequest, match="input_ids must be a local torch.Tensor"):
        rm.generate(logits.argmax(-1), max_new_tokens=1)
    assert type(np.exp(view)) is np.ndarray and np.array_equal(np.exp(view), np.exp(ref[0].numpy()))


def test_inplace_operators_act_on_the_same_object(pair):
    """`t /= v` (torch's in-place operators beyond the edit table's add, sub, mul) changes the tensor in
    place, as torch does, on a handle, a pending tensor and a view."""
    rm, ref = pair
    logits = rm(IDS).logits
    x = logits * 1
    alias = x
    x /= 2
    assert x is alias and torch.equal(alias.cpu(), ref / 2)
    v = x[0, -1]
    v //= 0.5
    assert torch.equal(x.cpu()[0, -1], (ref / 2)[0, -1] // 0.5) and torch.equal(x.cpu()[0, :-1], (ref / 2)[0, :-1])
    p = logits * 3
    p /= 3
    assert torch.equal(p.cpu(), ref * 3 / 3)
    h = rm(IDS).logits  # a concrete handle: the op runs at once, so every reader sees it
    alias = h
    h **= 2
    assert h is alias and h._meta is None and torch.equal(h.cpu(), ref ** 2)
