"""Tier 2: data-dependent shapes and values on the graph path and on lazy ops (Note [Graph breaks] in
srg/capture.py), against a real server, each bitwise-equal to local execution.

Before graph breaks every forward here was a CaptureError ("control flow on a tensor's value", "its
output's shape depends on tensor values") and a read through a remote boolean mask a TypeError."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import djinn
from djinn.frontend.graph_model import GraphModel
from djinn.protocol.errors import CaptureError, GuardFailed


class KeepPositive(nn.Module):
    """x[mask] with a mask computed from weights: the row count exists only on the server."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = self.lin(x)
        keep = h[h.sum(-1) > 0]                    # boolean-mask read: (rows kept, 8)
        idx = torch.nonzero(h > 0.1)               # (n, 2)
        return self.out(keep), idx, keep.shape[0] * 2 + idx.shape[0]


class Branchy(nn.Module):
    """Python control flow on a value computed from weights."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        h = self.lin(x)
        if h.mean() > 0:
            return h * 2, int(h.argmax())
        return h - 1, int(h.argmax())


class Router(nn.Module):
    """A mixture-of-experts loop in the style older MoE code writes: each expert runs on the tokens
    routed to it (torch.where on the router's choice), a shape per expert."""

    def __init__(self, experts: int = 3):
        super().__init__()
        self.gate = nn.Linear(8, experts)
        self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(experts))

    def forward(self, x):  # (tokens, 8)
        choice = self.gate(x).argmax(-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows = torch.where(choice == e)[0]
            if rows.numel():
                out = out.index_add(0, rows, expert(x[rows]))
        return out


def _local(model, *args):
    with torch.no_grad():
        return model(*args)


def _same(got, want):
    if isinstance(want, torch.Tensor):
        assert torch.equal(got.cpu(), want), (got, want)
    elif isinstance(want, (tuple, list)):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            _same(g, w)
    else:
        assert got == want


@pytest.fixture
def session(conn):
    s = conn.session()
    yield s
    s.close()


def test_masked_reads_and_nonzero_bitwise(session):
    torch.manual_seed(0)
    model = KeepPositive()
    rg = djinn.remote(model, session=session, path="graph")
    assert isinstance(rg, GraphModel)
    x = torch.randn(6, 8)
    _same(rg(x), _local(model, x))
    assert rg.counters["probes"] == 2 and rg.counters["captures"] == 1
    _same(rg(x), _local(model, x))  # the same input: the capture is reused, no probe
    assert rg.counters["probes"] == 2 and rg.counters["captures"] == 1


def test_changed_shapes_fail_the_guard_and_recapture(session):
    """Another input of the same signature keeps other rows: the server stops the cached graph at the
    check (GuardFailed, nothing after it ran), and the call captures again with new probes."""
    torch.manual_seed(0)
    model = KeepPositive()
    rg = djinn.remote(model, session=session, path="graph")
    xs = [torch.randn(6, 8) for _ in range(4)]
    counts = {int((model.lin(x).sum(-1) > 0).sum()) for x in xs}
    assert len(counts) > 1  # the inputs really keep different row counts
    for x in xs:
        _same(rg(x), _local(model, x))
    assert rg.counters["captures"] >= 2


def test_branch_on_a_weight_value(session):
    torch.manual_seed(3)
    model = Branchy()
    rg = djinn.remote(model, session=session, path="graph")
    for _ in range(3):
        x = torch.randn(4, 8)
        _same(rg(x), _local(model, x))


def test_expert_loop(session):
    torch.manual_seed(1)
    model = Router()
    rg = djinn.remote(model, session=session, path="graph")
    x = torch.randn(10, 8)
    _same(rg(x), _local(model, x))
    assert rg.counters["probes"] >= 3


def test_breakpoint_run_over_a_graph_break(session):
    torch.manual_seed(0)
    model = KeepPositive()
    rg = djinn.remote(model, session=session, path="graph")
    x = torch.randn(6, 8)
    run = session.start(rg, x, breakpoints=[djinn.Breakpoint("out", where="before")])
    stop = run.wait()
    with torch.no_grad():
        h = model.lin(x)
        keep = h[h.sum(-1) > 0]
    assert torch.equal(stop.activation.cpu(), keep)
    assert run.resume() is None
    _same(run.output, _local(model, x))


def test_random_op_before_a_break_agrees_with_its_probe(session):
    """dropout then a mask read: the probe and the run draw the same numbers (one seeded stream)."""

    class DropThenSelect(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            h = nn.functional.dropout(self.lin(x), 0.5, training=True)
            return h[h != 0]

    torch.manual_seed(0)
    model = DropThenSelect()
    rg = djinn.remote(model, session=session, path="graph")
    x = torch.randn(5, 8)
    out = rg(x, seed=7)
    torch.manual_seed(7)
    _same(out, _local(model, x))
    assert rg(x).shape[0] > 0  # unseeded: a fresh stream of its own, probes included


def test_lazy_mask_read_and_nonzero(session):
    torch.manual_seed(0)
    model = nn.Linear(8, 8)
    rm = djinn.remote(model, session=session, path="graph")
    x = torch.randn(5, 8)
    h = rm(x)
    want = _local(model, x)
    _same(h[h > 0], want[want > 0])                 # a remote boolean mask (was a TypeError)
    _same(torch.nonzero(h > 0.2), torch.nonzero(want > 0.2))
    _same((h * 2)[(h * 2).sum(-1) > 0].sum(0), (want * 2)[(want * 2).sum(-1) > 0].sum(0))  # pending inputs
    vals, counts = torch.unique((h > 0).sum(-1), return_counts=True)
    wv, wc = torch.unique((want > 0).sum(-1), return_counts=True)
    _same((vals, counts), (wv, wc))


def test_unbounded_sizes_stay_refused(session):
    """bincount's size is a value (the max), which a kernel allocates before any check: refused by name."""

    class Counts(nn.Module):
        def forward(self, x):
            return torch.bincount(x)

    rg = djinn.remote(Counts(), session=session, path="graph")
    with pytest.raises(CaptureError, match="bincount"):
        rg(torch.tensor([1, 5, 2]))


def test_forged_shape_is_refused_before_later_nodes(session):
    """A graph that declares a nonzero shape other than what the server computes stops at that node
    with GuardFailed (a typed error), and the session goes on."""
    from djinn.srg.capture import Recorder
    from djinn.srg.graph import Lifecycle, Ref, signature

    rec = Recorder(lazy=True)
    x = torch.empty(4, device="meta")
    rec.add_input(x, torch.tensor([1.0, 0.0, 2.0, 0.0]), Lifecycle.STACK)
    g = rec.graph
    from djinn.srg.graph import Node, TensorMeta
    g.nodes.append(Node("aten.nonzero.default", (Ref(0),), {}, [TensorMeta(torch.int64, (3, 1), (1, 1))]))
    g.outputs = [Ref(1)]
    w = g.to_wire()
    with pytest.raises(GuardFailed, match=r"nonzero.*\[2, 1\].*\[3, 1\]"):
        session.call("run_graph", {"sig": signature(w), "graph": w, "inputs": rec.input_values})
    assert session.call("run_graph", {"sig": "x" * 32, "inputs": []}).get("missing")  # still serving


def test_a_run_after_a_call_probes_its_own_inputs(session):
    """A start cannot retry after a failed check (it may pause and be edited first), so it never reuses a
    capture with graph breaks that another input made."""
    torch.manual_seed(0)
    model = KeepPositive()
    rg = djinn.remote(model, session=session, path="graph")
    xs = [torch.randn(6, 8) for _ in range(6)]
    rows = [int((model.lin(x).sum(-1) > 0).sum()) for x in xs]
    a, b = next((i, j) for i in range(6) for j in range(6) if rows[i] != rows[j])
    _same(rg(xs[a]), _local(model, xs[a]))           # caches a capture with xs[a]'s row count
    run = session.start(rg, xs[b])
    assert run.wait() is None
    _same(run.output, _local(model, xs[b]))


def test_a_probe_counts_its_last_node_at_its_real_size(module_server):
    """A probe's last node declares placeholder outputs; where a meta kernel gives the real shapes, the
    cost budget counts those, so a forged probe cannot slip a large op past it."""
    from djinn.frontend.connection import Connection
    from djinn.srg.capture import Recorder
    from djinn.srg.graph import Lifecycle, Node, Ref, TensorMeta

    conn = Connection(module_server("--graph-max-flops", "1e9").address, secret=None)
    try:
        s = conn.session()

        def probe(n: int) -> dict:  # (n, n) @ (n, n): 2 n^3 operations, declared as one element
            rec = Recorder(lazy=True)
            rec.add_input(torch.empty(n, n, device="meta"), torch.ones(n, n), Lifecycle.STACK)
            rec.graph.nodes.append(Node("aten.mm.default", (Ref(0), Ref(0)), {},
                                        [TensorMeta(torch.float32, (1,), (1,))]))
            rec.graph.outputs = [Ref(1)]
            return s.call("run_graph", {"probe": True, "graph": rec.graph.to_wire(), "inputs": rec.input_values})

        assert probe(64)["probe"][0][:3] == ["float32", [64, 64], [64, 1]]
        with pytest.raises(djinn.CostBudgetExceeded):
            probe(1024)  # 2.1e9 operations
    finally:
        conn.close()


def test_python_values_read_in_a_forward(session):
    """int(t), float(t) and t.tolist() of tensors computed from weights (tolist raised torch's
    "unallocated storage" RuntimeError from inside the capture)."""

    class Reads(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 4)

        def forward(self, x):
            s = self.lin(x)
            a, f, rows = int(s.argmax()), float(s.max()), s.argmax(-1).tolist()
            return s[:, a % 4] * f, rows, sum(rows)

    torch.manual_seed(0)
    model = Reads()
    rg = djinn.remote(model, session=session, path="graph")
    for _ in range(3):
        x = torch.randn(3, 8)
        _same(rg(x), _local(model, x))


def test_eager_experts_mixture_of_experts_model(session):
    """transformers' eager experts loop (`experts_implementation="eager"`: a nonzero of the experts hit,
    then a torch.where per expert) on the graph path: 42 events in one capture, bitwise to local."""
    from ..models import tiny_mixtral

    model = tiny_mixtral(seed=1)
    model.set_experts_implementation("eager")
    rg = djinn.remote(model, session=session, path="graph")
    ids = torch.tensor([[1, 17, 42, 99, 5, 250, 7, 64]])
    assert torch.equal(rg(ids).logits.cpu(), _local(model, ids).logits)
    assert rg.counters["captures"] == 1 and rg.counters["probes"] > 32
