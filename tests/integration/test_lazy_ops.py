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
    assert bool((out.logits.max() > -1e9)) is True


def test_indices_by_value_read_and_write_like_torch(conn, remote_out):
    """Note [Advanced indices]: tensor, remote-tensor, bool-mask and list indices read copies and write
    with index_put_, equal to local torch; out-of-range indices fail on the server, which keeps serving."""
    out, ref = remote_out
    idx = torch.tensor([0, 3, 9])
    ridx = out.logits[0, :, :4].argmax(-1)                     # a pending remote index tensor
    lidx = idx.to(ref.device)
    assert torch.equal(out.logits[0, idx].cpu(), ref[0, lidx].cpu())
    assert torch.equal(out.logits[:, idx, 2:5].cpu(), ref[:, lidx, 2:5].cpu())
    assert torch.equal(out.logits[0, [1, 4]].cpu(), ref[0, [1, 4]].cpu())
    assert torch.equal(out.logits[0][ridx].cpu(), ref[0][ref[0, :, :4].argmax(-1)].cpu())
    mask = ref.cpu() > 0                                       # a local bool mask: its nonzero() rows
    assert torch.equal(out.logits[mask].cpu(), ref[ref > 0].cpu())
    assert torch.equal(out.logits[0, mask[0, :, 0]].cpu(), ref[0, mask[0, :, 0].to(ref.device)].cpu())
    assert torch.equal(out.logits[out.logits > 0].cpu(), ref[ref > 0].cpu())  # rows the server probes for
    # Writes on a pending tensor are part of its graph; on a concrete one they apply at once.
    x = out.logits.clone()
    x[0, idx] = 0.5
    x[x < -1] = -1.0
    loc = ref.clone()
    loc[0, lidx] = 0.5
    loc[loc < -1] = -1.0
    assert torch.equal(x.cpu(), loc.cpu())
    h = out.logits
    h[0, idx] = torch.ones(3, 256)
    loc2 = ref.clone()
    loc2[0, lidx] = torch.ones(3, 256, device=ref.device)
    assert torch.equal(h.cpu(), loc2.cpu())                    # a plain fetch of the handle sees the write
    with pytest.raises(djinn.RemoteExecutionError, match="out of bounds"):
        out.logits[0, torch.tensor([10_000])].cpu()
    assert torch.equal(out.logits[0, idx].cpu(), loc2[0, lidx].cpu())


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


def test_inplace_on_a_concrete_tensor_with_a_pending_value_lands_in_it(remote_out):
    """`h.add_(pending)`: the in-place op is recorded in the pending graph with h as an input; the server
    runs it on h itself (not a copy of its input), so a later fetch of h sees the change."""
    out, ref = remote_out
    h = out.logits
    h.add_(out.logits.softmax(-1))
    loc = ref.clone()
    loc.add_(ref.softmax(-1))
    assert torch.equal(h.cpu(), loc.cpu())       # a plain fetch sees it
    assert torch.equal((h * 1).cpu(), loc.cpu())


def test_equal_and_allclose_answer_with_a_bool(conn, remote_out):
    """Note [Comparisons answer here]: torch.equal / torch.allclose / t.equal on remote tensors give
    torch's bool, from one fetch; shapes or dtypes that differ need no request for equal."""
    out, ref = remote_out
    last, loc = out.logits[:, -1], ref[:, -1].cpu()
    assert torch.equal(last, loc) is True and last.equal(loc) is True and torch.equal(loc, last) is True
    assert torch.equal(last * 2, last) is False
    assert last.allclose(loc) is True
    for other, kw in [(loc + 1e-6, {}), (loc * (1 + 1e-6), {}), (loc + 1.0, {}), (loc + 1.0, {"atol": 2.0}),
                      (loc[0, :1], {"rtol": 1e3})]:  # the answers local torch gives, both ways; broadcast too
        want = torch.allclose(loc, other, **kw)
        assert torch.allclose(last, other, **kw) is want and last.allclose(other, **kw) is want
    assert [torch.allclose(loc + 1e-6, loc), torch.allclose(loc * (1 + 1e-6), loc)] == [False, True]
    nan = torch.full((2,), float("nan"))
    assert torch.allclose(last[0, :2] * nan, nan) is False and torch.allclose(last[0, :2] * nan, nan, equal_nan=True)
    runs = _requests(conn)
    assert torch.equal(last, loc[:, :3]) is False and torch.equal(last, loc.double()) is False
    assert _requests(conn) == runs            # told apart by shape and dtype alone
    assert torch.equal(last, last.clone()) is True
    assert _requests(conn) == runs + 1        # one graph run: the clone and the comparison
