"""Tier 1: Note [Tensors made in a forward] in srg/capture.py: tensors a forward makes from Python data
on its input's device, and list indices, are captured as constants; capture errors name the op, the
module and the user's line."""
from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from djinn.protocol import codec
from djinn.protocol.errors import CaptureError
from djinn.protocol.messages import MsgType
from djinn.server.execution.interpreter import Interpreter, compile_graph
from djinn.srg import from_wire
from djinn.srg.capture import capture_module


class MakesTensors(nn.Module):
    def forward(self, x):
        c = torch.tensor([1.0, 2.0, 3.0], device=x.device)
        d = x.new_tensor([0.5, 0.25, 0.125])
        e = torch.as_tensor([2, 1, 0], device=x.device)
        y = x.clone()
        y[[0, 1]] = 0.5
        return x * c + d, x[[0, 2]], x[:, e], x[[[0], [2]], [1, 2]], y


def test_tensors_made_in_forward_are_constants():
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))
    cap = capture_module(MakesTensors(), (x,), {}, {})
    wire = codec.decode(codec.encode(MsgType.REQUEST, {"rid": 1, "g": cap.wire})).header["g"]
    out = Interpreter(compile_graph(from_wire(wire), torch.device("cpu"))).run([x.clone()], [])
    ref = MakesTensors()(x)
    assert len(out) == len(ref) and all(torch.equal(a, b) for a, b in zip(out, ref))


class Refused(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(3, 3)

    def forward(self, x):
        return torch.nonzero(self.inner(x))  # refused: a data-dependent shape


def test_capture_error_names_op_module_and_line():
    line = inspect.getsource(Refused.forward).splitlines().index(
        "        return torch.nonzero(self.inner(x))  # refused: a data-dependent shape")
    lineno = Refused.forward.__code__.co_firstlineno + line
    with pytest.raises(CaptureError, match=rf"nonzero.*top-level module at test_forward_tensors.py:{lineno}\b"):
        capture_module(Refused(), (torch.randn(3, 3),), {}, {n: n for n, _ in Refused().named_parameters()})
