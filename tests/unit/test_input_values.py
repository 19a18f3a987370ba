"""Tier 1: Note [Input values] in srg/guards.py: Python values read from small integer inputs are
guards on the capture, re-evaluated on the client before a graph is reused."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from djinn.protocol.errors import CaptureError
from djinn.server.execution.interpreter import Interpreter, compile_graph
from djinn.srg.capture import capture_module


class MaskBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, mask):
        y = self.lin(x)
        if not bool((mask == 1).all()):            # what transformers asks of a padding mask
            y = y.masked_fill(mask[..., None] == 0, -1.0)
        return y * int(mask.sum())                 # a value, not only a branch


def _run(m, cap, args):
    named = dict(list(m.named_parameters()) + list(m.named_buffers()))
    sent = [v.contiguous().clone() for v in cap.layout.values(list(args))]
    c = compile_graph(cap.graph, torch.device("cpu"))
    return Interpreter(c).run(sent, [named[h] for _, h in c.weights])


def test_guards_hold_only_for_the_same_values():
    torch.manual_seed(0)
    m = MaskBranch().eval()
    hashes = {n: n for n, _ in m.named_parameters()}
    x = torch.randn(2, 3, 4)
    ones, padded = torch.ones(2, 3, dtype=torch.long), torch.tensor([[1, 1, 0], [1, 1, 1]])
    cap = capture_module(m, (x, ones), {}, hashes)
    assert [g.value for g in cap.guards.checks] == [True, 6]
    assert cap.guards.hold(cap.graph, cap.layout.values([x, ones.clone()]))
    assert not cap.guards.hold(cap.graph, cap.layout.values([x, padded]))
    for mask in (ones, padded):
        c = capture_module(m, (x, mask), {}, hashes)
        with torch.no_grad():
            assert torch.equal(_run(m, c, (x, mask))[0], m(x, mask))


def test_a_value_from_a_weight_or_float_input_is_still_refused():
    m = MaskBranch().eval()
    hashes = {n: n for n, _ in m.named_parameters()}
    with pytest.raises(CaptureError, match="control flow on a tensor's value"):
        capture_module(m, (torch.randn(2, 3, 4), torch.ones(2, 3)), {}, hashes)  # a float mask
