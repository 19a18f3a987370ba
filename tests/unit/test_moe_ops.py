"""Tier 1: the ops transformers' MoE experts need on the graph path (djinn/srg/ops.py,
djinn/server/execution/interpreter.py): histc and _grouped_mm are allowed, a CPU server runs the integer histc a
meta capture records (Note [Device-free captures, device-specific kernels]), _grouped_mm gets its
output shape on meta in float32 too (Note [Meta kernels narrower than the device's]), costs 2mnk, and
its group offsets are checked before the kernel reads by them."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from djinn.server.execution.interpreter import _histc, check_indices, node_flops
from djinn.srg.ops import ALLOWED, meta_call

HISTC, GMM = ALLOWED["aten.histc.default"], ALLOWED["aten._grouped_mm.default"]


def test_an_integer_histc_on_the_cpu_counts_as_the_float_one():
    ids = torch.tensor([3, 0, 3, 1, 3, 0], dtype=torch.int32)
    with pytest.raises(RuntimeError):
        HISTC(ids, 4, 0, 3)                          # what the captured op alone does on a CPU
    got = _histc(HISTC, (ids, 4, 0, 3), {})
    assert got.dtype == torch.int32 and got.tolist() == [2, 1, 0, 3]
    assert torch.equal(got, torch.histc(ids.float(), bins=4, min=0, max=3).int())
    x = torch.tensor([0.5, 2.5])
    assert torch.equal(_histc(HISTC, (x, 2, 0, 3), {}), torch.histc(x, bins=2, min=0, max=3))


def test_grouped_mm_shapes_on_meta_and_costs_2mnk():
    a, b = torch.randn(10, 16), torch.randn(4, 16, 32)
    offs = torch.tensor([2, 5, 5, 10], dtype=torch.int32)
    real = F.grouped_mm(a, b, offs=offs)
    with pytest.raises(RuntimeError, match="BF16"):
        GMM(a.to("meta"), b.to("meta"), offs.to("meta"))
    meta = meta_call(GMM, (a.to("meta"), b.to("meta"), offs.to("meta")), {})
    assert (meta.shape, meta.stride(), meta.dtype, meta.device.type) == (real.shape, real.stride(), torch.float32, "meta")
    assert node_flops(GMM, (a, b, offs), {}, (real,)) == 2 * 10 * 32 * 16


@pytest.mark.parametrize("offs,ok", [([2, 5, 5, 10], True), ([0, 0, 0, 0], True), ([2, 5, 5, 11], False),
                                     ([5, 2, 6, 10], False), ([-1, 2, 5, 10], False), ([2, 5, 10], False)])
def test_grouped_mm_offsets_are_checked(offs, ok):
    a, b = torch.randn(10, 16), torch.randn(4, 16, 32)
    args = (a, b, torch.tensor(offs, dtype=torch.int32))
    if ok:
        check_indices("aten._grouped_mm.default", args)
    else:
        with pytest.raises(IndexError, match="_grouped_mm offsets"):
            check_indices("aten._grouped_mm.default", args)
