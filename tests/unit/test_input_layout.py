"""Tier 1: graph inputs keep their strides, storage offsets and aliasing (Note [Input layout] in
srg/layout.py): the capture is run by the server's interpreter on values as the wire delivers them
(contiguous copies), and must equal local execution bitwise."""
from __future__ import annotations

import torch
from torch import nn

from djinn.server.execution.interpreter import Interpreter, compile_graph
from djinn.srg.capture import capture_module
from djinn.srg.layout import layout_of


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _remote(fn, *args):
    """What the server computes: capture, then run on contiguous copies of what the layout sends."""
    m = Fn(fn)
    cap = capture_module(m, args, {}, {})
    sent = [v.contiguous().clone() for v in cap.layout.values(list(args))]
    return Interpreter(compile_graph(cap.graph, torch.device("cpu"))).run(sent, [])


def _contig_then_write(x):
    y = x.contiguous()
    y.mul_(2)
    return x + y


def _write_through_first(a, b):
    a.add_(1)
    return a * b


def test_transposed_input_keeps_its_strides():
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)).t()
    (got,) = _remote(_contig_then_write, x)
    assert torch.equal(got, _contig_then_write(x.clone()))


def test_as_strided_reads_memory_order_and_offset():
    base = torch.arange(30, dtype=torch.float32).reshape(5, 6)
    x = base.t()[1:]                       # strides (1, 6), storage offset 1
    fn = lambda x: x.as_strided((2, 3), (1, 2), x.storage_offset() + 1) * 1.0  # noqa: E731
    (got,) = _remote(fn, x)
    assert torch.equal(got, fn(x))


def test_the_same_tensor_twice_aliases():
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    (got,) = _remote(_write_through_first, x, x)
    ref = x.clone()
    assert torch.equal(got, _write_through_first(ref, ref))


def test_overlapping_views_alias():
    x = torch.randn(6, generator=torch.Generator().manual_seed(2))
    (got,) = _remote(_write_through_first, x[:4], x[2:])
    ref = x.clone()
    assert torch.equal(got, _write_through_first(ref[:4], ref[2:]))


def test_layout_is_part_of_the_signature_and_plain_inputs_stay_plain():
    x = torch.randn(3, 4)
    assert layout_of([x]).views == (None,)            # the common case: no extra nodes
    assert layout_of([x]) != layout_of([x.t().contiguous().t()])
    assert layout_of([x, x]) != layout_of([x, x.clone()])
    cap = capture_module(Fn(lambda a: a + 1), (x,), {}, {})
    assert [n.op for n in cap.graph.nodes] == ["$in", "aten.add.Tensor"]
