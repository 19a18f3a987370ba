"""Tier 1: what a graph holds on the device, known before it runs (Note [Graph peak memory] in
djinn/server/execution/interpreter.py): its constants' bytes and the peak of its intermediates and outputs,
from the SRG's declared shapes, with views, in-place ops, `_unsafe_view` and split's list outputs
sharing their base's storage exactly as at run time."""
from __future__ import annotations

import torch

from djinn.server.execution.interpreter import Interpreter, compile_graph
from djinn.srg.graph import from_wire

from ..srg_builder import Builder

KIB = 1024
CPU = torch.device("cpu")


def _compiled(b: Builder, *outs):
    _, wire = b.wire(*outs)
    return compile_graph(from_wire(wire), CPU)


def test_peak_follows_storages_not_nodes():
    b = Builder()
    x = b.input(torch.randn(256, 256))                          # 256 KiB, given: not counted
    (a,) = b.op("aten.mm.default", x, x)                        # +256 KiB   live 256
    (v,) = b.op("aten._unsafe_view.default", a, [65536])        # a's storage (no alias annotation)
    (c,) = b.op("aten.relu.default", v)                         # +256 KiB   live 512, then a/v die: 256
    (d,) = b.op("aten.add_.Scalar", c, 1.0)                     # in place: c's storage
    p0, p1 = b.op("aten.split.Tensor", d, 32768)                # two views of c's storage
    (e,) = b.op("aten.mul.Scalar", p0, 2.0)                     # +128 KiB   live 384
    (out,) = b.op("aten.cat.default", [e, p1])                  # +256 KiB   live 640: the peak
    k = b.const(torch.ones(75))                                  # a constant: 300 B, stored in 512
    b.op("aten.mul.Tensor", k, k)                                # read by nobody: alive to the end
    c_ = _compiled(b, out)
    assert c_.peak_bytes == 640 * KIB
    assert c_.const_bytes == 512
    # Outputs are held to the end: returning the mm's result too keeps its 256 KiB alive through the cat.
    assert _compiled(b, out, a).peak_bytes == 896 * KIB
    x_ = torch.randn(256, 256)
    got = Interpreter(c_).run([x_], [])[0]
    want = torch.cat([(torch.relu(x_ @ x_).reshape(-1) + 1)[:32768] * 2, (torch.relu(x_ @ x_).reshape(-1) + 1)[32768:]])
    assert torch.equal(got, want)


def test_a_dead_intermediate_is_not_counted_twice():
    b = Builder()
    x = b.input(torch.randn(1024))                               # 4 KiB
    h = x
    for _ in range(10):                                          # each step frees the one before
        (h,) = b.op("aten.mul.Scalar", h, 2.0)
    assert _compiled(b, h).peak_bytes == 8 * KIB                 # two alive at once, never more
    b2 = Builder()
    x2 = b2.input(torch.randn(1024))
    outs = [b2.op("aten.mul.Scalar", x2, float(k))[0] for k in range(10)]
    assert _compiled(b2, *outs).peak_bytes == 40 * KIB           # all of them are outputs


def test_a_data_dependent_node_counts_what_its_kernel_may_allocate():
    """nonzero's declared shape is checked only after its kernel ran, so the peak counts the most it can
    allocate (every element of its input an index: numel x dims x 8 bytes), not the declared shape."""
    from djinn.server.execution.interpreter import compile_graph
    from djinn.srg.graph import Graph, Lifecycle, Node, Ref, TensorMeta

    g = Graph()
    g.nodes.append(Node("$in", (), {}, [TensorMeta(torch.float32, (64, 64), (64, 1))], lifecycle=Lifecycle.STACK))
    g.nodes.append(Node("aten.nonzero.default", (Ref(0),), {}, [TensorMeta(torch.int64, (1, 2), (2, 1))]))
    g.outputs = [Ref(1)]
    assert compile_graph(g, torch.device("cpu")).peak_bytes >= 64 * 64 * 2 * 8
