"""Tier 1: weights are read-only at run time (issue 15, item 1; Note [Weights are read-only at run time]).

The interpreter checks storage identity, not alias annotations: each route the issue found (a view with
no annotation, a list-returning view, a mutated argument that is not `self`, given positionally or by
keyword, an output that aliases a weight) is refused or copied by the check that runs before the op,
and thousands of random graphs over weights never change one. The graphs are also run with the weights
passed as plain inputs, where compile_graph's annotation-based check sees no weight at all: the run-time
check alone must hold.
"""
from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest
import torch

from djinn.protocol import codec
from djinn.protocol.errors import InvalidRequest, RemoteExecutionError, WeightWriteRefused
from djinn.protocol.messages import MsgType
from djinn.server.execution.interpreter import Interpreter, compile_graph
from djinn.srg import ops as srg_ops
from djinn.srg.graph import IN, WEIGHT, from_wire
from djinn.vmu.readonly import ReadOnlyMemory
from djinn.vmu.text import TextSegment

from ..srg_builder import Builder, random_graph

CPU = torch.device("cpu")


@pytest.fixture
def one_thread():
    """libgomp on a 2-core box takes ~45 ms to wake its team for a tiny batch norm; these graphs are tiny."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(6, 4, generator=g), "b": torch.randn(6, generator=g),
            "c": torch.randn(2, 3, 4, generator=g)}


def _digest(ws: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(ws):
        h.update(ws[name].contiguous().numpy().tobytes())
    return h.hexdigest()


def _run(b: Builder, outs, ws: dict[str, torch.Tensor], *, as_inputs: bool = False) -> list[torch.Tensor]:
    """Send the graph through the wire form and run it as the server does, the Text segment holding `ws`.
    as_inputs: each weight node becomes an input that is the weight tensor itself."""
    _, wire = b.wire(*outs)
    wire = codec.decode(codec.encode(MsgType.REQUEST, {"rid": 1, "g": wire})).header["g"]
    by_hash = {f"h:{n}": t for n, t in ws.items()}
    feed = []
    if as_inputs:
        for node in wire["nodes"]:
            if node[0] == WEIGHT:
                feed.append(by_hash[node[1][0]])
                node[0], node[1], node[2] = IN, [], {}
    text = TextSegment()
    for h, t in by_hash.items():
        text.add(h, t)
    c = compile_graph(from_wire(wire), CPU)
    return Interpreter(c, text.readonly).run(feed, [by_hash[h] for _, h in c.weights])


# -- the routes of the issue, each refused before it writes ---------------------------------------------
def test_unsafe_view_then_in_place_is_refused(one_thread):
    ws = _weights()
    before = _digest(ws)
    b = Builder()
    w = b.weight("h:a", ws["a"])
    (v,) = b.op("aten._unsafe_view.default", w, [24])   # aliases w; its schema does not say so
    (o,) = b.op("aten.add_.Scalar", v, 1.0)
    with pytest.raises(WeightWriteRefused, match=r"graph node 2 \(aten.add_.Scalar\) would write its argument 'self'"):
        _run(b, [o], ws)
    assert _digest(ws) == before


def test_split_then_add_is_refused(one_thread):
    ws = _weights()
    before = _digest(ws)
    b = Builder()
    w = b.weight("h:a", ws["a"])
    parts = b.op("aten.split.Tensor", w, 2)              # a list of views
    (o,) = b.op("aten.add_.Scalar", parts[1], 1.0)
    with pytest.raises(WeightWriteRefused, match=r"node 2 .*'self'"):
        _run(b, [o], ws)
    assert _digest(ws) == before


@pytest.mark.parametrize("op", ["native", "composite"])
def test_batch_norm_running_mean_that_is_a_weight_is_refused(one_thread, op):
    """The running mean is written in training mode but not annotated as written; it is reached through an
    _unsafe_view (so compile_graph cannot see it is a weight) and, for the composite, by keyword."""
    ws = _weights()
    before = _digest(ws)
    b = Builder()
    w = b.weight("h:b", ws["b"])
    (rm,) = b.op("aten._unsafe_view.default", w, [6])
    x, var = b.const(torch.randn(3, 6)), b.const(torch.ones(6))
    if op == "native":
        outs = b.op("aten.native_batch_norm.default", x, None, None, rm, var, True, 0.5, 1e-5)
    else:
        outs = b.op("aten.batch_norm.default", x, None, None, running_mean=rm, running_var=var, training=True,
                    momentum=0.5, eps=1e-5, cudnn_enabled=False)
    with pytest.raises(WeightWriteRefused, match="would write its argument 'running_mean'"):
        _run(b, [outs[0]], ws)
    assert _digest(ws) == before


def test_batch_norm_in_eval_mode_reads_weights_as_running_stats(one_thread):
    """Eval mode only reads them: that is how every BatchNorm module runs, and it must keep working."""
    ws = _weights()
    b = Builder()
    rm = b.weight("h:b", ws["b"])
    x, var = b.const(torch.randn(3, 6, generator=torch.Generator().manual_seed(1))), b.const(torch.ones(6))
    (out,) = b.op("aten.batch_norm.default", x, None, None, rm, var, False, 0.5, 1e-5, False)
    (y,) = _run(b, [out], ws)
    x_ref = b.metas[x.node][0]
    assert torch.equal(y, torch.batch_norm(x_ref, None, None, ws["b"], torch.ones(6), False, 0.5, 1e-5, False))


def test_output_aliasing_a_weight_comes_back_as_a_copy(one_thread):
    ws = _weights()
    b = Builder()
    w = b.weight("h:a", ws["a"])
    (v,) = b.op("aten._unsafe_view.default", w, [24])
    (out,) = _run(b, [v], ws)
    assert torch.equal(out, ws["a"].reshape(24))
    assert out.untyped_storage().data_ptr() != ws["a"].untyped_storage().data_ptr()
    out.add_(1.0)                                         # the tenant's copy changes; the weight does not
    assert torch.equal(out, ws["a"].reshape(24) + 1.0)


def test_in_place_ops_on_a_tenants_own_input_still_run(one_thread):
    ws = _weights()
    b = Builder()
    x = b.input(torch.zeros(6))
    (o,) = b.op("aten.add_.Scalar", x, 2.0)
    _, wire = b.wire(o)
    c = compile_graph(from_wire(wire), CPU)
    mine = torch.zeros(6)
    (y,) = Interpreter(c, ReadOnlyMemory.of(ws.values())).run([mine], [])
    assert torch.equal(mine, torch.full((6,), 2.0)) and torch.equal(y, mine)


# -- what may write at all (Note [Unannotated writes]) ----------------------------------------------------
#: Note [Op table]: the allowed ops (base names) that write an argument other than `self`, and which. Every
#: other allowed op that writes writes only `self` and is an in-place variant (its name ends in "_").
MUTATORS = {
    "_amp_update_scale_": {"growth_tracker", "self"},
    "_batch_norm_with_update": {"running_mean", "running_var"},
    "_flash_attention_forward_no_dropout_inplace": {"out"},
    "_fused_moving_avg_obs_fq_helper": {"running_min", "running_max", "scale", "zero_point"},
    "_native_batch_norm_legit": {"running_mean", "running_var"},
    "batch_norm": {"running_mean", "running_var"},            # Note [Unannotated writes]
    "native_batch_norm": {"running_mean", "running_var"},     # Note [Unannotated writes]
    "rrelu_with_noise": {"noise"},
    "rrelu_with_noise_": {"noise", "self"},
}


def test_the_ops_that_may_write_are_exactly_these():
    found: dict[str, set[str]] = {}
    for name, fn in srg_ops.ALLOWED.items():
        n_args = len(fn._schema.arguments)
        args = tuple([True] * n_args)  # every flag on: batch norm in training mode
        for _, arg in srg_ops.written_args(fn, args, {}):
            found.setdefault(srg_ops.base_name(name), set()).add(arg)
    assert {k: v for k, v in found.items() if v != {"self"}} == MUTATORS
    assert all(k.endswith("_") for k, v in found.items() if v == {"self"})
    assert {"add_", "index_put_", "copy_", "scatter_", "uniform_", "zero_"} <= set(found)
    assert found["batch_norm"] == found["native_batch_norm"] == {"running_mean", "running_var"}


def test_batch_norm_writes_only_in_training_mode():
    bn = srg_ops.ALLOWED["aten.batch_norm.default"]
    x = object()
    assert srg_ops.written_args(bn, (x, None, None, x, x, True, 0.1, 1e-5, False), {}) == ((3, "running_mean"),
                                                                                          (4, "running_var"))
    assert srg_ops.written_args(bn, (x, None, None, x, x, False, 0.1, 1e-5, False), {}) == ()
    assert srg_ops.written_args(bn, (x, None, None), {"training": False}) == ()
    assert srg_ops.written_args(bn, (x, None, None), {"training": True}) == ((3, "running_mean"), (4, "running_var"))


# -- ReadOnlyMemory --------------------------------------------------------------------------------------
def test_readonly_memory_overlaps_by_byte_range():
    w = torch.arange(12.0)
    mem = ReadOnlyMemory.of([w])
    assert mem.aliases(w) and mem.aliases(w[3:].view(3, 3)) and mem.aliases(w.view(3, 4).T)
    assert mem.aliases(torch.from_numpy(w.numpy()[5:7]))  # another storage object on the same bytes
    assert not mem.aliases(w.clone()) and not mem.aliases(torch.zeros(3)) and not mem.aliases(torch.empty(0))
    assert not mem.aliases(torch.empty(12, device="meta"))
    assert mem.private(w) is not w and torch.equal(mem.private(w), w)
    x = torch.ones(2)
    assert mem.private(x) is x
    with pytest.raises(WeightWriteRefused, match="an edit would write into a weight's storage"):
        mem.refuse_write(w[2:4], "an edit")
    mem.refuse_write(x, "an edit")
    mem.track(w, +1)   # a second weight on the same storage: it stays read-only until both go
    mem.track(w, -1)
    assert mem.aliases(w) and len(mem) == 1
    mem.track(w, -1)
    assert not mem.aliases(w) and len(mem) == 0


def test_readonly_memory_with_many_ranges_finds_an_enclosing_one():
    big = torch.zeros(1000)
    small = [torch.zeros(4) for _ in range(20)]
    mem = ReadOnlyMemory.of([big, *small])
    assert all(mem.aliases(t) for t in small) and mem.aliases(big[500:501])
    inner = torch.from_numpy(big.numpy()[10:20])  # starts after `big` and before ranges that start later
    assert mem.aliases(inner)
    assert not mem.aliases(torch.zeros(7))


# -- many random graphs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("as_inputs,expected", [
    (False, {"refused": 613, "ran": 182, "failed": 5}),
    (True, {"refused": 623, "ran": 160, "failed": 17}),
], ids=["weights", "weights-as-inputs"])
def test_random_graphs_never_change_a_weight(one_thread, as_inputs, expected):
    """800 random graphs of 8 ops over three weights: views of every kind, in-place and mutating ops on
    anything in reach, outputs picked from everything; each output is then written (as a tenant's edit
    would). No weight byte ever changes, no output aliases a weight, and the checks do refuse."""
    ws = _weights(seed=3)
    before = _digest(ws)
    weights = {n: (f"h:{n}", t) for n, t in ws.items()}
    rng = np.random.default_rng(7 + as_inputs)
    outcome = Counter()
    for _ in range(800):
        b, outs, _ = random_graph(rng, weights)
        try:
            results = _run(b, outs, ws, as_inputs=as_inputs)
        except WeightWriteRefused:
            outcome["refused"] += 1
            continue
        except (InvalidRequest, RemoteExecutionError):
            outcome["failed"] += 1
            continue
        outcome["ran"] += 1
        for t in results:
            assert not any(t.untyped_storage().data_ptr() == w.untyped_storage().data_ptr() for w in ws.values())
            if t.is_floating_point():
                t.add_(1.0)
        assert _digest(ws) == before
    assert _digest(ws) == before
    assert outcome == expected  # "failed": shapes the server's dry run refuses, and the like


# -- the module path: handles, stops and edits (server/sessions.py, breakpoints.py, runs.py) --------------
class Leaky(torch.nn.Module):
    """A module whose submodule returns its own weight: a breakpoint after `inner` would expose it."""

    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Linear(3, 3)
        self.inner.forward = lambda x: self.inner.weight  # the call's output *is* the weight

    def forward(self, x):
        return self.inner(x) @ x


def _session_over(weights) -> "Session":
    from djinn.server.sessions import SessionTable

    text = TextSegment()
    for k, t in enumerate(weights):
        text.add(f"h{k}", t)
    return SessionTable(text.readonly).open("client", None)


def test_a_handle_never_aliases_a_weight():
    w = torch.arange(6.0)
    s = _session_over([w])
    hid = s.add_tensor(w.view(2, 3))
    assert torch.equal(s.tensor(hid), w.view(2, 3)) and not s.readonly.aliases(s.tensor(hid))
    mine = torch.zeros(2)
    assert s.tensor(s.add_tensor(mine)) is mine


def test_an_edit_into_a_weight_refuses_the_whole_batch():
    """Defense in depth: even a handle that did alias a weight (put there by a bug) cannot be edited."""
    from djinn.server.execution.runs import RunTable

    w = torch.arange(6.0)
    s = _session_over([w])
    mine = s.add_tensor(torch.zeros(3))
    s.tensors["leak"] = w[1:4]
    with pytest.raises(WeightWriteRefused, match="edit add into leak would write into a weight"):
        RunTable().apply_edits(s, [{"h": mine, "i": [], "op": "add", "v": 1.0},
                                   {"h": "leak", "i": [], "op": "add", "v": 1.0}])
    assert torch.equal(w, torch.arange(6.0)) and torch.equal(s.tensor(mine), torch.zeros(3))  # nothing applied


def test_a_stop_that_exposes_a_weight_is_a_read_only_copy():
    from djinn.server.execution.breakpoints import BreakpointSpec, Call
    from djinn.server.execution.runs import RunTable

    torch.manual_seed(0)
    m = Leaky().eval()
    w = m.inner.weight
    before = w.detach().clone()
    s = _session_over([w.data])
    runs = RunTable()
    x = torch.randn(3, 3)
    run = runs.start(s, "m", Call(m, "forward", [x], {}, None, CPU), [BreakpointSpec("inner")])
    stop = run.stop
    assert stop.readonly == frozenset({0}) and torch.equal(stop.activation, w)
    assert stop.activation.untyped_storage().data_ptr() != w.untyped_storage().data_ptr()
    reply = runs.reply(s, run, 0.0)
    assert reply["stop"]["outputs"] == reply["stop"]["activation"]  # the copy's handle stands for the output
    with pytest.raises(WeightWriteRefused, match=r"stop tensor 0 at inner \(after\) is a weight"):
        runs.apply_edits(s, [{"h": run.stop_hids[0], "i": [], "op": "add", "v": 5.0}])
    runs.resume(run)
    with torch.no_grad():
        assert torch.equal(run.output, before @ x) and torch.equal(w, before)
