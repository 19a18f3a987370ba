"""Tier 1: the SRG without a server: golden rendering, annotations (phase, lifecycle, cost), the wire
form's checks, and the server-side checks a graph passes before anything is allocated."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import djinn
from djinn.protocol import codec
from djinn.protocol.errors import CaptureError, InvalidRequest
from djinn.protocol.messages import MsgType
from djinn.server.execution.interpreter import Interpreter, compile_graph
from djinn.srg import DECODE, PREFILL, Lifecycle, from_wire
from djinn.srg.capture import capture_module

from ..models import tiny_llama

GOLDEN_MLP = """\
SRG Sequential: phase=prefill, 5 ops, 1 inputs, 4 weights (2.7 KB), 1 outputs
<top>:
  %0   input -> f32[2, 16]  [stack -, 128 B]
0:
  %1   weight 0.weight -> f32[32, 16]  [text -, 2.0 KB]
  %2   t.default(%1) -> f32[16, 32]  [text memory, 2.0 KB]
  %3   weight 0.bias -> f32[32]  [text -, 128 B]
  %4   addmm.default(%3, %0, %2) -> f32[2, 32]  [stack compute, 256 B]
1:
  %5   relu.default(%4) -> f32[2, 32]  [stack memory, 256 B]
2:
  %6   weight 2.weight -> f32[4, 32]  [text -, 512 B]
  %7   t.default(%6) -> f32[32, 4]  [text memory, 512 B]
  %8   weight 2.bias -> f32[4]  [text -, 16 B]
  %9   addmm.default(%8, %5, %7) -> f32[2, 4]  [data compute, 32 B]
outputs: %9"""


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


def _names(m):
    return {n: f"h:{n}" for n, _ in list(m.named_parameters()) + list(m.named_buffers())}


def _wire_roundtrip(wire: dict) -> dict:
    return codec.decode(codec.encode(MsgType.REQUEST, {"rid": 1, "g": wire})).header["g"]


def test_golden_mlp_rendering():
    assert djinn.explain(_mlp(), torch.randn(2, 16)) == GOLDEN_MLP


def test_mlp_ops_and_annotations():
    m = _mlp()
    cap = capture_module(m, (torch.randn(2, 16),), {}, _names(m))
    g = cap.graph
    assert [n.op for n in g.nodes] == ["$in", "$w", "aten.t.default", "$w", "aten.addmm.default",
                                       "aten.relu.default", "$w", "aten.t.default", "$w", "aten.addmm.default"]
    assert [n.module for n in g.nodes] == ["", "0", "0", "0", "0", "1", "2", "2", "2", "2"]
    assert [n.cost for n in g.nodes if n.op.startswith("aten")] == ["memory", "compute", "memory", "memory", "compute"]
    assert [n.args[0] for n in g.nodes if n.op == "$w"] == ["h:0.weight", "h:0.bias", "h:2.weight", "h:2.bias"]


def test_lifecycle_parameters_vs_activations():
    m = _mlp()
    g = capture_module(m, (torch.randn(2, 16),), {}, _names(m)).graph
    life = {i: n.lifecycle for i, n in enumerate(g.nodes)}
    assert all(life[i] == Lifecycle.TEXT for i, n in enumerate(g.nodes) if n.op == "$w")
    assert life[2] == Lifecycle.TEXT and life[7] == Lifecycle.TEXT   # views of weights stay Text
    assert life[0] == Lifecycle.STACK                                # an input sent with the call
    assert life[4] == Lifecycle.STACK and life[5] == Lifecycle.STACK  # activations
    assert life[9] == Lifecycle.DATA                                 # the output: a session handle


def test_phase_prefill_vs_decode_tiny_llama():
    m = tiny_llama(seed=0)
    names = _names(m)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        cache = m(ids, use_cache=True).past_key_values
    prefill = capture_module(m, (ids,), {"use_cache": False}, names).graph
    decode = capture_module(m, (torch.tensor([[5]]),), {"past_key_values": cache, "use_cache": True}, names).graph
    assert prefill.phase == PREFILL and decode.phase == DECODE
    # the decode step's KV cache tensors are inputs in the Data segment; the token is Stack
    ins = [decode.nodes[i].lifecycle for i in decode.inputs]
    assert ins == [Lifecycle.STACK] + [Lifecycle.DATA] * 4
    assert len(prefill.inputs) == 1
    assert any(n.op == "aten.scaled_dot_product_attention.default" for n in decode.nodes)


def test_wire_roundtrip_runs_bitwise():
    m = _mlp()
    names = _names(m)
    x = torch.randn(3, 16)
    cap = capture_module(m, (x,), {}, names)
    g = from_wire(_wire_roundtrip(cap.wire))
    assert g.to_wire() == cap.graph.to_wire()
    c = compile_graph(g, torch.device("cpu"))
    by_hash = {names[n]: t for n, t in list(m.named_parameters()) + list(m.named_buffers())}
    out = Interpreter(c).run([x], [by_hash[h] for _, h in c.weights])
    with torch.no_grad():
        assert torch.equal(out[0], m(x))


def _mutate(wire, fn):
    import copy

    w = copy.deepcopy(wire)
    fn(w)
    return w


@pytest.mark.parametrize("case,match", [
    ("forward_ref", "not an output of an earlier node"),
    ("bad_dtype", "unknown dtype"),
    ("huge_shape", "too large|bad shape"),
    ("not_a_map", "must be a map"),
    ("bad_arg_type", "not allowed"),
])
def test_from_wire_rejects(case, match):
    m = _mlp()
    wire = capture_module(m, (torch.randn(2, 16),), {}, _names(m)).wire

    def forward_ref(w):
        w["nodes"][2][1][0] = {"$n": [5, 0]}

    def bad_dtype(w):
        w["nodes"][0][3][0][0] = "float128"

    def huge_shape(w):
        w["nodes"][0][3][0][1] = [1 << 40, 1 << 40]

    def bad_arg_type(w):
        w["nodes"][2][1].append({"$evil": "os.system"})

    if case == "not_a_map":
        bad = [1, 2]
    else:
        bad = _mutate(wire, locals()[case])
    with pytest.raises(InvalidRequest, match=match):
        from_wire(bad)


def test_server_checks_ops_shapes_and_weight_writes():
    m = _mlp()
    wire = capture_module(m, (torch.randn(2, 16),), {}, _names(m)).wire
    cpu = torch.device("cpu")
    unknown = _mutate(wire, lambda w: w["nodes"][5].__setitem__(0, "aten._local_scalar_dense.default"))
    with pytest.raises(InvalidRequest, match="not allowed"):
        compile_graph(from_wire(unknown), cpu)
    not_an_op = _mutate(wire, lambda w: w["nodes"][5].__setitem__(0, "builtins.eval"))
    with pytest.raises(InvalidRequest, match="not allowed"):
        compile_graph(from_wire(not_an_op), cpu)
    lie = _mutate(wire, lambda w: w["nodes"][5][3][0].__setitem__(1, [2, 33]))  # relu declared [2, 33]
    with pytest.raises(InvalidRequest, match="declares outputs"):
        compile_graph(from_wire(lie), cpu)
    write = _mutate(wire, lambda w: w["nodes"][5].__setitem__(0, "aten.relu_.default"))
    write["nodes"][5][1] = [{"$n": [2, 0]}]  # relu_ on a view of a weight
    write["nodes"][5][3] = [["float32", [16, 32], [1, 16]]]
    with pytest.raises(InvalidRequest, match="weight in place"):
        compile_graph(from_wire(write), cpu)


def test_capture_errors_name_op_and_module():
    class Inner(nn.Module):
        def forward(self, x):
            return torch.nonzero(x)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Inner()

        def forward(self, x):
            return self.inner(x)

    with pytest.raises(CaptureError, match=r"aten.nonzero.default in module 'inner'"):
        capture_module(Outer(), (torch.randn(3),), {}, {})


def test_known_values_answer_shape_only_control_flow():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            mask = torch.ones(x.shape[0], dtype=torch.bool)
            return self.lin(x) if mask.all() else x  # control flow on a value known from shapes alone

    m = M()
    g = capture_module(m, (torch.randn(2, 4),), {}, _names(m)).graph
    assert any(n.op == "aten.addmm.default" for n in g.nodes)


def test_module_calls_recorded_and_checked():
    """Note [Module calls]: each named submodule call with its node range, input and output refs (inner
    calls end first); from_wire refuses calls whose refs or ranges do not fit."""
    m = _mlp()
    cap = capture_module(m, (torch.randn(2, 16),), {}, _names(m))
    calls = [(c.path, c.start, c.end, [r.node for r in c.ins], [r.node for r in c.outs]) for c in cap.graph.calls]
    assert calls == [("0", 1, 5, [0], [4]), ("1", 5, 6, [4], [5]), ("2", 6, 10, [5], [9])]
    assert from_wire(_wire_roundtrip(cap.wire)).calls == cap.graph.calls
    for bad, match in (([0, 1, 99, [], [], 1, 2], "node range"),
                       ([0, 3, 5, [[4, 0]], [], 1, 2], "not an output of an earlier"),
                       ([0, 1, 5, [], [[7, 0]], 1, 2], "not an output of an earlier"),
                       ([9, 1, 5, [], [], 1, 2], "path index"), ([0, 1, 5, [], [], 2, 2], "hook order"),
                       ([0, 1, 5, [], []], "must be")):
        w = _mutate(cap.wire, lambda w: w.__setitem__("calls", [bad]))
        with pytest.raises(InvalidRequest, match=match):
            from_wire(w)


def test_graph_run_refuses_absurd_module_trees():
    from djinn.server.execution.graph_runs import MAX_DEPTH, GraphModule
    from djinn.srg.graph import ModuleCall

    m = _mlp()
    cap = capture_module(m, (torch.randn(2, 16),), {}, _names(m))
    c = compile_graph(from_wire(_wire_roundtrip(cap.wire)), torch.device("cpu"))
    assert isinstance(GraphModule(c, []).get_submodule("2"), nn.Module)
    c.graph.calls.append(ModuleCall(".".join(["a"] * (MAX_DEPTH + 1)), 0, 0, (), (), 1, 2))
    with pytest.raises(InvalidRequest, match="at most"):
        GraphModule(c, [])


def test_module_calls_with_many_tensors_still_pass_from_wire():
    """A submodule called with 40 tensors that returns 40: its recorded call keeps at most MAX_ARGS // 2
    refs a side (the first ones, which a stop exposes), so the graph is not refused as a whole."""
    from djinn.srg.graph import MAX_ARGS

    class Many(nn.Module):
        def forward(self, *xs):
            return tuple(x * 2 for x in xs)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.many = Many()

        def forward(self, x):
            return sum(self.many(*[x + k for k in range(40)]))

    m = Outer()
    x = torch.randn(3)
    cap = capture_module(m, (x,), {}, _names(m))
    (call,) = [c for c in cap.graph.calls if c.path == "many"]
    assert len(call.ins) == len(call.outs) == MAX_ARGS // 2
    g = from_wire(_wire_roundtrip(cap.wire))
    out = Interpreter(compile_graph(g, torch.device("cpu"))).run([x], [])
    assert torch.equal(out[0], m(x))


def test_graph_module_fires_hooks_in_module_order():
    """Nested calls that start (or end) at the same node: befores fire outer first, afters inner first,
    as nn.Module hooks would; a call that ran no op fires its before ahead of its after."""
    from djinn.server.execution.graph_runs import GraphModule

    torch.manual_seed(0)
    m = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.Identity()), nn.ReLU()).eval()
    names = _names(m)
    x = torch.randn(2, 4)
    c = compile_graph(from_wire(_wire_roundtrip(capture_module(m, (x,), {}, names).wire)), torch.device("cpu"))
    by_hash = {names[n]: t for n, t in m.named_parameters()}
    gm = GraphModule(c, [by_hash[h] for _, h in c.weights])
    order, local = [], []
    for target, log in ((gm, order), (m, local)):
        for path in ("0", "0.0", "0.1", "1"):
            sub = target.get_submodule(path)
            sub.register_forward_pre_hook(lambda mod, a, p=path, log=log: log.append(("before", p)))
            sub.register_forward_hook(lambda mod, a, o, p=path, log=log: log.append(("after", p)))
    out = gm(x)
    with torch.no_grad():
        ref = m(x)
    assert torch.equal(out[0], ref)
    assert order == local
