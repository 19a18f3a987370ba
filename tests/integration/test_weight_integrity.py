"""Tier 2: no tenant can write into the weights other tenants use (issue 15, item 1), against a real server.

A victim client runs a tiny GPT-2 on the module path. An attacker, another client, remotes the same
module on the graph path, so both use the same Text entries, and sends hand-written graphs
(tests/srg_builder.py) through the routes the issue found: a view with no alias annotation then an
in-place op, a list-returning view then add_, batch norm in training mode with a weight as its running
mean, a graph output that aliases a weight then edited, a module call whose output is a weight exposed
at a breakpoint and edited. Each write is refused with WeightWriteRefused (the output and the stop come
back as copies), and the victim's logits stay bitwise what they were. Then random graphs over the wire.
(Note [Weights are read-only at run time] in djinn/vmu/readonly.py.)
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

import djinn
from djinn.frontend.connection import Connection
from djinn.frontend.remote import RemoteModel

from ..conftest import ServerProcess
from ..models import tiny_gpt2
from ..srg_builder import Builder, random_graph

IDS = torch.tensor([[1, 17, 42, 99, 5, 250, 7, 64]])


@pytest.fixture(scope="module")
def srv():
    """A server of its own: if a write ever got through, it would not leak into other suites' weights."""
    s = ServerProcess()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def model(device):
    return tiny_gpt2(seed=21, device=device)


@pytest.fixture(scope="module")
def victim(srv, model):
    conn = Connection(srv.address, secret=None)
    s = conn.session("victim")
    rm = RemoteModel.from_module(s, model)
    v = type("Victim", (), {})()
    v.conn, v.s, v.rm = conn, s, rm
    v.ref = rm(IDS).logits.cpu()
    with torch.no_grad():
        assert torch.equal(v.ref, model(IDS.to(model.device)).logits.cpu())
    yield v
    conn.close()


class Attacker:
    def __init__(self, address: str, model):
        self.conn = Connection(address, secret=None)
        self.s = self.conn.session("attacker")
        self.gm = djinn.remote(model, session=self.s, path="graph")  # the same weights, by content hash
        self.w = {name: (self.gm.hashes[name], t) for name, t in model.state_dict(keep_vars=True).items()
                  if name in self.gm.hashes}

    def weight(self, b: Builder, name: str):
        h, t = self.w[name]
        return b.weight(h, t, name)

    def send(self, b: Builder, *outs, op: str = "run_graph", **extra) -> dict:
        sig, wire = b.wire(*outs)
        return self.s.call(op, {"sig": sig, "graph": wire, "model_id": self.gm.model_id, "inputs": [], **extra})

    def edit(self, hid: str, v: float = 1.0) -> None:
        self.s.call("edit", {"edits": [{"h": hid, "i": [], "op": "add", "v": v}]})

    def fetch(self, hid: str) -> torch.Tensor:
        return self.s.call("fetch", {"handles": [hid]})["tensors"][0]


@pytest.fixture
def attacker(srv, model):
    a = Attacker(srv.address, model)
    yield a
    a.conn.close()


def _hid(handle: dict) -> str:
    return handle["$t"][0]


def _unchanged(victim) -> None:
    assert torch.equal(victim.rm(IDS).logits.cpu(), victim.ref)


# -- the routes of the issue -----------------------------------------------------------------------------
def test_unsafe_view_then_add_is_refused(victim, attacker):
    b = Builder()
    w = attacker.weight(b, "transformer.wte.weight")
    (v,) = b.op("aten._unsafe_view.default", w, [256 * 64])  # aliases the weight, no alias annotation
    (o,) = b.op("aten.add_.Scalar", v, 1.0)
    with pytest.raises(djinn.WeightWriteRefused, match=r"graph node 2 \(aten.add_.Scalar\) would write"):
        attacker.send(b, o)
    _unchanged(victim)


def test_split_then_add_is_refused(victim, attacker):
    b = Builder()
    w = attacker.weight(b, "transformer.wpe.weight")
    parts = b.op("aten.split.Tensor", w, 16)                 # a list of views of the weight
    (o,) = b.op("aten.add_.Scalar", parts[3], 0.5)
    with pytest.raises(djinn.WeightWriteRefused, match="would write its argument 'self'"):
        attacker.send(b, o)
    _unchanged(victim)


@pytest.mark.parametrize("op", ["native_batch_norm", "batch_norm_by_keyword"])
def test_batch_norm_with_a_weight_as_running_mean_is_refused(victim, attacker, op):
    b = Builder()
    w = attacker.weight(b, "transformer.ln_f.weight")
    (rm,) = b.op("aten._unsafe_view.default", w, [64])       # compile_graph cannot tell it is a weight
    x, var = b.const(torch.randn(4, 64)), b.const(torch.ones(64))
    if op == "native_batch_norm":
        outs = b.op("aten.native_batch_norm.default", x, None, None, rm, var, True, 0.9, 1e-5)
    else:
        outs = b.op("aten.batch_norm.default", x, None, None, running_mean=rm, running_var=var, training=True,
                    momentum=0.9, eps=1e-5, cudnn_enabled=False)
    with pytest.raises(djinn.WeightWriteRefused, match="would write its argument 'running_mean'"):
        attacker.send(b, outs[0])
    _unchanged(victim)


def test_output_aliasing_a_weight_is_a_copy_that_edits_and_graphs_write_alone(victim, attacker, model):
    b = Builder()
    w = attacker.weight(b, "transformer.wte.weight")
    (v,) = b.op("aten._unsafe_view.default", w, [256 * 64])
    res = attacker.send(b, v)
    hid = _hid(res["outputs"][0])
    attacker.edit(hid, 1.0)                                    # lands in the attacker's copy
    wte = model.transformer.wte.weight.detach().cpu().reshape(-1)
    assert torch.equal(attacker.fetch(hid), wte + 1.0)
    b2 = Builder()                                             # a lazy op on the handle: an aliased input
    x = b2.input(wte)
    (o,) = b2.op("aten.mul_.Tensor", x, 0.0)
    sig, wire = b2.wire(o)
    attacker.s.call("run_graph", {"sig": sig, "graph": wire, "inputs": [{"$h": hid}]})
    assert torch.equal(attacker.fetch(hid), torch.zeros_like(wte))
    _unchanged(victim)


@pytest.mark.parametrize("where", ["after", "before"])
def test_stop_exposing_a_weight_is_a_read_only_copy(victim, attacker, model, where):
    b = Builder()
    w = attacker.weight(b, "transformer.wte.weight")
    (y,) = b.op("aten.mul.Tensor", w, 2.0)
    if where == "after":
        b.call("leak", 1, 1, [], [w])                          # a module call that "returned" the weight
    else:
        b.call("leak", 1, 2, [w], [y])                         # one that was called with it
    res = attacker.send(b, y, op="start", breakpoints=[{"path": "leak", "where": where}])
    assert res["state"] == "paused"
    act = _hid(res["stop"]["activation"])
    wte = model.transformer.wte.weight.detach().cpu()
    assert torch.equal(attacker.fetch(act), wte)
    with pytest.raises(djinn.WeightWriteRefused, match=rf"stop tensor 0 at leak \({where}\) is a weight"):
        attacker.edit(act, 1.0)
    res = attacker.s.call("resume", {"run": res["run"]})        # the run is still paused, and goes on
    assert res["state"] == "finished"
    assert torch.equal(attacker.fetch(_hid(res["output"][0] if isinstance(res["output"], list)
                                           else res["output"]["$tu"][0])), wte * 2.0)
    _unchanged(victim)


# -- many random graphs over the wire --------------------------------------------------------------------
def test_random_graphs_over_the_wire_never_change_a_weight(victim, attacker, model):
    """500 random graphs over four of GPT-2's weights (tests/srg_builder.random_graph): views of every kind,
    in-place and batch-norm writes, outputs picked from everything, each output then edited; every fifth
    one started as a run that stops at a module call returning a random tensor, whose stop is edited. No
    weight byte changes (read back through a graph) and the victim's logits stay bitwise."""
    names = ["transformer.wpe.weight", "transformer.ln_f.weight", "transformer.h.0.ln_1.bias",
             "transformer.h.1.mlp.c_proj.weight"]
    weights = {n: attacker.w[n] for n in names}
    rng = np.random.default_rng(15)
    outcome = Counter()
    for i in range(500):
        start = i % 5 == 0
        b, outs, path = random_graph(rng, weights, calls=start)
        try:
            if start:
                res = attacker.send(b, *outs, op="start", breakpoints=[{"path": path}])
                try:
                    attacker.edit(_hid(res["stop"]["activation"]), 1.0)
                    outcome["stop_edited"] += 1
                except djinn.WeightWriteRefused:
                    outcome["stop_refused"] += 1
                attacker.s.call("cancel_run", {"run": res["run"]})
                continue
            res = attacker.send(b, *outs)
        except djinn.WeightWriteRefused:
            outcome["refused"] += 1
            continue
        except djinn.DjinnError as e:  # a shape the op does not take on the server's dry run, and the like
            outcome[type(e).__name__] += 1
            continue
        outcome["ran"] += 1
        hids = [_hid(o) for o in res["outputs"]]
        for hid in hids:
            attacker.edit(hid, 1.0)
        attacker.s.call("free", {"handles": hids})
    b = Builder()
    refs = [attacker.weight(b, n) for n in names]
    got = [t for t in attacker.send(b, *refs, fetch=list(range(len(refs))))["tensors"]]
    state = model.state_dict()
    for n, t in zip(names, got):
        assert torch.equal(t, state[n].cpu()), n
    _unchanged(victim)
    # InvalidRequest: graphs whose declared shapes the server's meta dry run does not reproduce (the
    # builder declares what its own tensors gave, e.g. an eval-mode native_batch_norm's empty save stats).
    assert outcome == {"refused": 401, "ran": 65, "stop_refused": 11, "stop_edited": 10, "InvalidRequest": 13}
