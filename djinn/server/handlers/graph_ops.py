"""Graph-path ops (DESIGN.md section 4.2-4.3): register_graph, run_graph, graph_stats.

Registered in the op registry (registry.py) like every other op. A graph arrives once per (session, signature) and is checked
and compiled then (djinn/server/execution/interpreter.py); later calls send the signature and their inputs only.

Note [Graph cache]
    Compiled graphs are cached per session and signature (`Session.graphs`, LRU, at most
    MAX_GRAPHS_PER_SESSION), not shared: a graph carries its sender's constants, and the signature is
    the client's own claim (a client that lies about it only confuses its own cache). The session owns
    them: their constants are device memory charged to its Data segment and GPU quota (a new graph
    whose constants would pass the quota is refused before they are copied in), `stats` shows them
    per session, and they are freed with the session. A graph over the cost budget (Note [Graph cost]
    in interpreter.py) is refused when it is compiled and never cached. A call naming a signature the
    session does not hold (evicted, another session, or a restarted server) is answered {"missing":
    true} and the client sends it again with the graph: no error, one extra round trip (clients
    remember which session holds which graph, so a graph's first call in a session carries it).
"""
from __future__ import annotations

import time
import weakref

import torch

from ...protocol.errors import CostBudgetExceeded, InvalidRequest
from ...protocol.tensors import dtype_name
from ...srg.capture import MAX_VALUES
from ...srg.graph import from_wire
from .. import quotas
from ..execution.interpreter import Compiled, Interpreter, compile_graph, const_bytes
from ..execution.rng import Stream
from ..models.registry import GRAPH_ARCH
from .args import model_of, seed_of
from .model_ops import adopt, model_info, pinned_tensors
from .registry import op
from .values import pack_outputs, read, unpack_inputs


class GraphCounters:
    """Per client id: graphs compiled (received), hits, missing, runs (`graph_stats`)."""

    def __init__(self) -> None:
        self.counters: dict[str, dict[str, int]] = {}

    def count(self, client_id: str, what: str) -> None:
        c = self.counters.setdefault(client_id, {"compiled": 0, "hits": 0, "missing": 0, "runs": 0})
        c[what] += 1


# One per engine, kept beside it so the engine needs no field for it.
_COUNTERS: "weakref.WeakKeyDictionary[object, GraphCounters]" = weakref.WeakKeyDictionary()


def graph_counters(engine) -> GraphCounters:
    c = _COUNTERS.get(engine)
    if c is None:
        c = _COUNTERS[engine] = GraphCounters()
    return c


@op
def register_graph(engine, client_id, rid, args):
    """A graph-path model: its weights (uploaded and pinned by this session), no code."""
    s = engine.session(client_id, args)
    tensors = pinned_tensors(s, args, "register_graph")
    entry, created = engine.models.register_weights(tensors)
    adopt(engine, s, entry, tensors)
    return model_info(entry, created)


@op
def run_graph(engine, client_id, rid, args):
    """{sig, graph?, model_id?, inputs, seed?, fetch?, edits?} -> {outputs: [$t], tensors, graph} or {missing};
    with probe: true, {graph, model_id?, inputs, seed?} -> {probe: [[dtype, shape, strides, value]]}."""
    t0 = time.perf_counter()
    s = engine.session(client_id, args)
    engine.runs.apply_edits(s, args.get("edits"))  # queued edits first: read-your-writes
    if args.get("probe") is True:
        return _probe(engine, s, args)
    compiled, status, weights, inputs = graph_call(engine, client_id, s, args, "run_graph")
    if compiled is None:
        return {"missing": True}
    rng = Stream.new(seed_of(args), engine.device)  # Note [Random streams]: as a local manual_seed, or fresh
    fetch = args.get("fetch") or []
    n_out = len(compiled.graph.outputs)
    if not isinstance(fetch, list) or not all(type(k) is int and 0 <= k < n_out for k in fetch):
        raise InvalidRequest(f"fetch must list output indices below {n_out}")
    held = set(s.tensors)
    t1 = time.perf_counter()
    with rng.active():
        outs = Interpreter(compiled, engine.text.readonly).run(inputs, weights)
    t2 = time.perf_counter()
    graph_counters(engine).count(client_id, "runs")
    result = {"outputs": pack_outputs(s, outs), "tensors": [read(outs[k], None) for k in fetch],
              "graph": status, "timing": {"interpret_us": round((t2 - t1) * 1e6), "server_us": 0}}
    engine.data.sync(s)
    err = quotas.over_gpu(engine, s, held, "run_graph")
    if err is not None:
        del outs, result
        raise err
    result["timing"]["server_us"] = round((time.perf_counter() - t0) * 1e6)
    return result


def _probe(engine, s, args: dict) -> dict:
    """Note [Graph breaks] (srg/capture.py): run a capture's prefix and report its outputs' dtype, shape,
    strides and values (`.tolist()`, for at most MAX_VALUES elements). Nothing is kept: the graph is not cached, no handle is
    made, and handle inputs are copies, so a write the prefix records lands in the real run only."""
    wire = args.get("graph")
    if wire is None:
        raise InvalidRequest("a probe carries its graph")
    compiled = _compile(engine, s, wire, "this probe", probe=True)
    weights, inputs = _bind(engine, s, args, compiled, "this probe", alias_handles=False)
    with Stream.new(seed_of(args), engine.device).active():
        outs = Interpreter(compiled, engine.text.readonly).run(inputs, weights)
    return {"probe": [[dtype_name(t.dtype), list(t.shape), list(t.stride()),
                       t.tolist() if t.numel() <= MAX_VALUES and not t.is_complex() else None] for t in outs]}


def graph_call(engine, client_id: str, s, args: dict, what: str) -> tuple[Compiled | None, str, list, list]:
    """What run_graph and a graph-path start share: (compiled graph, cache status, its weights, its
    inputs, handles aliased); the graph None when the server holds none with `sig` and none was sent."""
    sig = args.get("sig")
    if not isinstance(sig, str) or not 0 < len(sig) <= 64:
        raise InvalidRequest(f"{what} needs sig, the graph's signature string")
    compiled, status = compiled_for(engine, client_id, s, sig, args.get("graph"))
    if compiled is None:
        return None, status, [], []
    weights, inputs = _bind(engine, s, args, compiled, what, alias_handles=True)
    return compiled, status, weights, inputs


def _bind(engine, s, args: dict, compiled: Compiled, what: str, alias_handles: bool) -> tuple[list, list]:
    """A compiled graph's weights and this call's inputs, after its peak fits the session's quota."""
    weights = _weights(engine, s, args, compiled)
    # Note [Graph peak memory]: what the run will hold at its peak, before anything is allocated.
    quotas.check_gpu(engine, s, quotas.gpu_used(engine, s) + compiled.peak_bytes, what,
                     f"the graph's intermediates and outputs peak at {compiled.peak_bytes} bytes")
    inputs = unpack_inputs(engine, s, args.get("inputs", []), alias_handles=alias_handles)
    _check_inputs(compiled, inputs)
    return weights, inputs


def _compile(engine, s, wire, what: str, probe: bool = False) -> Compiled:
    """A wire graph checked and compiled, its constants within the session's quota and its cost within the
    server's budget (a probe's last node, if an op, declares placeholders: Note [Graph breaks])."""
    g = from_wire(wire)
    consts = const_bytes(g)  # checked before compile_graph copies them to the device
    quotas.check_gpu(engine, s, quotas.gpu_used(engine, s) + consts, what, f"{consts} bytes of graph constants")
    compiled = compile_graph(g, engine.device, probe=probe and bool(g.nodes) and not g.nodes[-1].op.startswith("$"))
    _check_cost(engine, compiled)  # before it is cached: the budget does not change, so a cached graph fits it
    return compiled


def compiled_for(engine, client_id: str, s, sig: str, wire) -> tuple[Compiled | None, str]:
    """The session's compiled graph for `sig` (Note [Graph cache]), compiling `wire` if it is new;
    (None, "missing") when the session holds no such graph and none was sent."""
    counters = graph_counters(engine)
    compiled = s.graphs.get(sig)
    if compiled is not None:
        counters.count(client_id, "hits")
        return compiled, "cached"
    if wire is None:
        counters.count(client_id, "missing")
        return None, "missing"
    compiled = _compile(engine, s, wire, "this graph")
    s.graphs.put(sig, compiled)
    engine.data.sync(s)  # its constants are the session's now (and an evicted graph's are not)
    counters.count(client_id, "compiled")
    return compiled, "compiled"


def _check_cost(engine, compiled: Compiled) -> None:
    """Note [Graph cost]: a graph over the per-request budget fails before any of it runs."""
    limit = engine.cfg.graph_max_flops
    if limit is not None and compiled.flops > limit:
        raise CostBudgetExceeded(f"this graph's estimated cost is {compiled.flops} operations, over the server's "
                                 f"per-request budget of {limit:g} (graph_max_flops); nothing ran. Split the "
                                 "work into smaller graphs (fewer layers, a smaller batch or sequence per call)")


@op
def graph_stats(engine, client_id, rid, args):
    """This client's graph cache: graphs held (in all its sessions), compiled (graphs received), hits,
    missing, runs."""
    c = dict(graph_counters(engine).counters.get(client_id, {"compiled": 0, "hits": 0, "missing": 0, "runs": 0}))
    return dict(c, held=sum(len(s.graphs) for s in engine.sessions.of_client(client_id)))


def _weights(engine, s, args, compiled: Compiled) -> list[torch.Tensor]:
    if not compiled.weights:
        return []
    if args.get("model_id") is None:
        raise InvalidRequest("this graph uses weights: name the graph model (model_id) that holds them")
    entry = model_of(engine, s, args)  # attached to this session (Note [Isolation] in args.py)
    if entry.arch != GRAPH_ARCH:
        raise InvalidRequest(f"model {entry.model_id[:12]} is not a graph-path model")
    table = entry.module.by_hash
    try:
        return [table[h] for _, h in compiled.weights]
    except KeyError as e:
        raise InvalidRequest(f"the graph uses weight {str(e.args[0])[:12]}, which model "
                             f"{entry.model_id[:12]} does not hold") from None


def _check_inputs(c: Compiled, inputs) -> None:
    if not isinstance(inputs, list) or len(inputs) != len(c.inputs):
        raise InvalidRequest(f"the graph takes {len(c.inputs)} inputs, got "
                             f"{len(inputs) if isinstance(inputs, list) else type(inputs).__name__}")
    for k, (i, t) in enumerate(zip(c.inputs, inputs)):
        m = c.graph.nodes[i].outs[0]
        if not isinstance(t, torch.Tensor) or t.dtype != m.dtype or tuple(t.shape) != m.shape:
            got = f"{t.dtype}{list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise InvalidRequest(f"graph input {k} must be {m.dtype}{list(m.shape)}, got {got}")
