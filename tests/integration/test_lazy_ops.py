"""Tier 2: lazy tensor ops (DESIGN.md section 4.3) against a real server, bitwise-equal to local torch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import djinn
from djinn.frontend.remote import RemoteModel
from djinn.frontend.tensor import RemoteTensor

from ..conftest import DEVICE
from ..models import tiny_gpt2

PROMPT = torch.tensor([[1, 17, 42, 99, 5, 250, 7, 64, 31, 128]])


@pytest.fixture(scope="module")
def model():
    return tiny_gpt2(seed=0)


@pytest.fixture
def remote_out(conn, model):
    import copy

    rm = RemoteModel.from_module(conn.default_session(), model)
    with torch.no_grad():  # the reference runs on the server's device
        ref = copy.deepcopy(model).to(DEVICE)(PROMPT.to(DEVICE)).logits
    return rm(PROMPT), ref


def _requests(conn) -> int:
    return conn.transport.call("graph_stats", {})["runs"]


def test_sampling_chain_one_round_trip(conn, remote_out):
    out, ref = remote_out
    t = 0.7
    top = (out.logits[:, -1] / t).softmax(-1).topk(5)
    assert isinstance(top.indices, RemoteTensor) and top.indices.shape == (1, 5)
    runs = _requests(conn)
    got = top.indices.tolist()
    assert _requests(conn) == runs + 1       # one graph run for the whole chain
    ref_top = (ref[:, -1] / t).softmax(-1).topk(5)
    assert got == ref_top.indices.tolist()
    assert torch.equal(top.values.cpu(), ref_top.values.cpu())  # already a handle: a plain fetch
    assert _requests(conn) == runs + 1


def test_arithmetic_reductions_and_local_tensors(remote_out):
    out, ref = remote_out
    bias = torch.randn(256, generator=torch.Generator().manual_seed(3))  # local: uploaded with the flush
    y = (out.logits * 2 - bias).sum(-1) + out.logits.amax(-1)
    z = torch.log_softmax(out.logits, dim=-1)[0, :3]          # torch functions dispatch too
    w = F.gelu(out.logits).mean()
    lb = bias.to(ref.device)
    assert torch.equal(y.cpu(), ((ref * 2 - lb).sum(-1) + ref.amax(-1)).cpu())
    assert torch.equal(z.cpu(), torch.log_softmax(ref, dim=-1)[0, :3].cpu())
    assert w.item() == F.gelu(ref).mean().item()


def test_inplace_add_on_slice_equals_local(remote_out):
    out, ref = remote_out
    steer = torch.randn(256, generator=torch.Generator().manual_seed(4))
    x = out.logits.clone()              # pending
    x[:, -1].add_(steer)                # in place on a view of a pending tensor: recorded
    x[:, 0] += 1.5
    loc = ref.clone()
    loc[:, -1].add_(steer.to(ref.device))
    loc[:, 0] += 1.5
    assert torch.equal(x.cpu(), loc.cpu())
    h = out.logits                      # a concrete handle: the edit applies server-side, in order
    before = (h * 1).sum()              # pending: reads h before the edit
    h[:, 0].add_(steer)
    loc2 = ref.clone()
    loc2[:, 0].add_(steer.to(ref.device))
    assert torch.equal(before.cpu(), (ref * 1).sum().cpu())
    assert torch.equal(h.softmax(-1).cpu(), loc2.softmax(-1).cpu())


def test_tensor_index_and_bool(remote_out):
    out, ref = remote_out
    idx = torch.tensor([0, 3, 9])
    got = out.logits[0].index_select(0, idx).argmax(-1)
    assert torch.equal(got.cpu(), ref[0][idx.to(ref.device)].argmax(-1).cpu())
    with pytest.raises(TypeError, match="not supported on a remote tensor"):
        out.logits[idx]  # tensor indices: use index_select / gather
    assert bool((out.logits.max() > -1e9)) is True


def test_error_raises_at_materialization_naming_op_and_line(remote_out):
    out, _ = remote_out
    bad = torch.tensor([[1000]])  # out of range for gather: only the server can know
    g = out.logits[:, -1].gather(-1, bad)   # no error yet: shapes are fine
    line = test_error_raises_at_materialization_naming_op_and_line.__code__.co_firstlineno + 3
    with pytest.raises(djinn.RemoteExecutionError, match=rf"aten.gather.default.*test_lazy_ops.py:{line}"):
        g.cpu()
    # the session keeps working
    assert out.logits[:, -1].argmax(-1).shape == (1,)


def test_shape_error_raises_where_written(remote_out):
    out, _ = remote_out
    with pytest.raises(djinn.CaptureError, match="aten.mm|aten.matmul|mm"):
        out.logits[0] @ torch.randn(3, 3)
