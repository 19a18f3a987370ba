"""Tier 1: a graph's cost, estimated from the SRG's shapes when it is compiled, before it runs (Note [Graph
cost] in djinn/server/execution/interpreter.py): exact counts for matmul-like, convolution and attention ops (as
torch.utils.flop_counter counts them), one per element of the largest tensor of every other op, none for
views; and the budget's setting (graph_max_flops)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from djinn.config import ServerConfig
from djinn.server.execution.interpreter import Interpreter, compile_graph
from djinn.srg.graph import from_wire

from ..srg_builder import Builder

CPU = torch.device("cpu")


def _compiled(b: Builder, *outs):
    _, wire = b.wire(*outs)
    return compile_graph(from_wire(wire), CPU)


def _counted(fn) -> int:
    """FLOPs torch.utils.flop_counter counts for fn() run eagerly."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_a_matmul_costs_2mnk():
    m, k, n = 3, 5, 7
    b = Builder()
    (y,) = b.op("aten.mm.default", b.input(torch.randn(m, k)), b.input(torch.randn(k, n)))
    c = _compiled(b, y)
    assert c.flops == 2 * m * n * k == 210
    x, w = torch.randn(m, k), torch.randn(k, n)
    assert torch.equal(Interpreter(c).run([x, w], [])[0], x @ w)  # the estimate changes nothing of the run


def test_matmul_like_ops_count_their_contracted_dim():
    bx, by = torch.randn(2, 3, 5), torch.randn(2, 5, 4)
    a, m1, m2, v = torch.randn(3, 4), torch.randn(3, 9), torch.randn(9, 4), torch.randn(9)
    cases = [  # (op, args, what flop_counter counts eagerly)
        ("aten.mm.default", (m1, m2), lambda: torch.mm(m1, m2), 2 * 3 * 4 * 9),
        ("aten.bmm.default", (bx, by), lambda: torch.bmm(bx, by), 2 * 2 * 3 * 4 * 5),
        ("aten.mv.default", (m1, v), lambda: torch.mv(m1, v), 2 * 3 * 9),
        ("aten.addmv.default", (a[:, 0], m1, v), lambda: torch.addmv(a[:, 0], m1, v), 2 * 3 * 9),
        ("aten.dot.default", (v, v), lambda: torch.dot(v, v), 2 * 9),
        ("aten.addmm.default", (a, m1, m2), lambda: torch.addmm(a, m1, m2), 2 * 3 * 4 * 9),
        ("aten.baddbmm.default", (torch.randn(2, 3, 4), bx, by), lambda: torch.baddbmm(torch.randn(2, 3, 4), bx, by),
         2 * 2 * 3 * 4 * 5),
    ]
    for name, args, eager, want in cases:
        b = Builder()
        (y,) = b.op(name, *[b.input(t) for t in args])
        assert _compiled(b, y).flops == want, name
        if name.split(".")[1] not in ("mv", "addmv", "dot"):  # flop_counter has no formula for these
            assert _counted(eager) == want, name


def test_convolutions_and_attention_match_torchs_flop_counter():
    x, w = torch.randn(2, 4, 9, 9), torch.randn(6, 2, 3, 3)  # groups=2: each output channel reads 2 inputs
    b = Builder()
    (y,) = b.op("aten.convolution.default", b.input(x), b.input(w), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 2)
    want = 2 * (2 * 6 * 9 * 9) * (2 * 3 * 3)
    assert _compiled(b, y).flops == want == _counted(lambda: F.conv2d(x, w, padding=1, groups=2))
    wt = torch.randn(4, 3, 2, 2)  # transposed: weight (C_in, C_out, kh, kw); every input element feeds 3 x 2 x 2
    b = Builder()
    (y,) = b.op("aten.convolution.default", b.input(x), b.input(wt), None, [2, 2], [0, 0], [1, 1], True, [0, 0], 1)
    want = 2 * x.numel() * 3 * 2 * 2
    assert _compiled(b, y).flops == want == _counted(lambda: F.conv_transpose2d(x, wt, stride=2))
    q, k, v = torch.randn(2, 4, 10, 8), torch.randn(2, 4, 12, 8), torch.randn(2, 4, 12, 16)
    b = Builder()
    (o,) = b.op("aten.scaled_dot_product_attention.default", b.input(q), b.input(k), b.input(v))
    want = 2 * 2 * 4 * 10 * 12 * (8 + 16)
    assert _compiled(b, o).flops == want == _counted(lambda: F.scaled_dot_product_attention(q, k, v))


def test_other_ops_cost_their_largest_tensor_and_views_nothing():
    b = Builder()
    x = b.input(torch.randn(64, 32))                              # given: no op, no cost
    (t,) = b.op("aten.t.default", x)                              # a view: 0
    (e,) = b.op("aten.expand.default", b.input(torch.randn(1, 32)), [1000, 32])  # a view, however large: 0
    (r,) = b.op("aten.relu.default", t)                           # 2048
    (s,) = b.op("aten.sum.dim_IntList", r, [0])                   # reads 2048, writes 64: 2048
    (a,) = b.op("aten.add_.Tensor", r, 1.0)                       # in place, writes 2048: 2048
    (c,) = b.op("aten.cat.default", [a, a])                       # writes 4096: 4096
    (y,) = b.op("aten.mm.default", x, b.input(torch.randn(32, 16)))  # 2 x 64 x 16 x 32 = 65536
    assert _compiled(b, s, c, y, e).flops == 2048 + 2048 + 2048 + 4096 + 65536


def test_the_budget_setting_is_validated():
    assert ServerConfig().graph_max_flops == 1e15
    ServerConfig(graph_max_flops=None).validate()
    ServerConfig(graph_max_flops=1).validate()
    for bad in (0, -5, 0.5, True, "1e15", float("inf"), float("nan")):
        with pytest.raises(ValueError, match=r"^graph_max_flops=.* must be a number >= 1"):
            ServerConfig(graph_max_flops=bad).validate()
