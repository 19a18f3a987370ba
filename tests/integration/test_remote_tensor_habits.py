"""Tier 2: RemoteTensor follows torch's device habits, against a real server.

`.to("cpu")` and `.cpu()` give a local torch.Tensor; `.device` is a torch.device (the server's);
`.to(<the server's device>)` and `.to(dtype)` stay remote; other devices are refused with what to do.
On a CPU server "cpu" means here (frontend/lazy.py, LazyOps.to).
"""
from __future__ import annotations

import pytest
import torch

import djinn
from djinn import Breakpoint
from djinn.frontend.remote import RemoteModel

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
