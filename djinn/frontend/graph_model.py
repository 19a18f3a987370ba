"""The graph path on the client (DESIGN.md section 4.2): any nn.Module, captured once per input signature.

`GraphModel.from_module` uploads the module's weights through the usual path (content-addressed, shared
in the Text segment) and registers them as a graph-path model. A call flattens its arguments, looks up
its signature (srg/tree.py, Note [Input signature]); a new signature is captured (srg/capture.py), and
the graph travels once: the server caches it by signature (Note [Graph cache] in server/handlers/graph_ops.py),
so a repeated call ships only its inputs and the signature. A forward with data-dependent shapes or
values probes the server while it is captured (Note [Graph breaks] in srg/capture.py).
"""
from __future__ import annotations

import inspect
import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..protocol.errors import GuardFailed, InvalidRequest, ModelNotSupported
from ..protocol.tensors import is_remote
from ..srg.capture import Captured, capture_module, is_leaf_spec
from ..srg.layers import layer_path
from ..srg.layout import layout_of
from .guards import attribute_guard, weight_versions
from ..srg.render import render
from ..srg.tree import flatten, unflatten
from . import wire
from .generate import graph_path_why
from .remote import RemoteModel
from .run import Breakpoint, Run
from .tensor import RemoteTensor
from .upload import named_tensors, upload_tensors

if TYPE_CHECKING:
    from .session import Session


def leaf_key(x: Any):
    if isinstance(x, RemoteTensor):  # first: a RemoteTensor is a torch.Tensor too (Note [Remote tensors are not data])
        return ("$R", x.dtype, tuple(x.shape))
    if isinstance(x, torch.Tensor) and not is_remote(x):  # a RemoteView is not a call argument (wire.pack says so)
        return ("$T", x.dtype, tuple(x.shape))
    return None


class GraphModel(RemoteModel):
    path = "graph"

    def __init__(self, session: "Session", model_id: str, module: nn.Module, hashes: dict[str, str],
                 nbytes: int, upload=None, reason: str = "path='graph' was asked for"):
        super().__init__(session, model_id, type(module).__name__, nbytes, None, upload=upload, source="graph path")
        self.reason = reason  # djinn.remote says why when it chose this path itself
        self.module = module            # the code stays here: captures run it over meta tensors
        self.hashes = hashes
        self._captures: dict[Any, list[Captured]] = {}
        self._unstable: set = set()  # input keys whose captures with graph breaks failed a guard: probe every call
        self._server_has: set[tuple[str, str]] = set()  # (session id, signature): graphs are per session
        self._use_cache = _accepts(module, "use_cache")
        self._versions = weight_versions(named_tensors(module))  # Note [Capture guards]
        #: captures: graphs recorded; calls; graphs_sent: calls that carried their graph; probes: graph breaks
        self.counters = {"captures": 0, "calls": 0, "graphs_sent": 0, "probes": 0}

    @classmethod
    def from_module(cls, session: "Session", module: nn.Module, *, reason: str | None = None, **_) -> "GraphModel":
        hashes, info, report = _register(session, module)
        return cls(session, info["model_id"], module, hashes, info["bytes"], upload=report,
                   **({"reason": reason} if reason else {}))

    def _refresh_weights(self, s: "Session") -> None:
        """Note [Capture guards]: a weight changed in place (or replaced) since it was uploaded goes up
        again, only what changed (content-addressed), as a new weight set; graphs name weights by hash,
        so the cached captures go too."""
        versions = weight_versions(named_tensors(self.module))
        if versions == self._versions:
            return
        self.hashes, info, self.upload = _register(s, self.module)
        self.model_id, self.nbytes = info["model_id"], info["bytes"]
        self._sessions = {s.sid}  # register_graph attached it to this session
        self._captures.clear()
        self._versions = versions

    # -- calls ---------------------------------------------------------------------------------------
    def forward(self, *args, session: "Session | None" = None, seed: int | None = None, **kwargs) -> Any:
        """Run the module's forward on the server through its SRG; tensors come back as RemoteTensors.
        `seed`: torch.manual_seed on the server first (for random ops such as dropout)."""
        s = session or self.session
        self._refresh_weights(s)
        self.attach(s)
        own = _break_seed(seed)
        cap, leaves, key = self._capture(s, args, kwargs, own)
        seed = own if cap.events else seed
        self.counters["calls"] += 1
        inputs = wire.pack(s, cap.layout.values(leaves))
        try:
            res = self._run(s, cap, {"model_id": self.model_id, "inputs": inputs, "seed": seed})
        except GuardFailed:
            if not cap.events:
                raise
            # Note [Graph breaks]: this input's data-dependent shapes or values differ from the capture's;
            # nothing after the failed check ran. Capture again with fresh probes, and keep probing.
            self._unstable.add(key)
            self._captures.pop(key, None)
            cap, leaves, key = self._capture(s, args, kwargs, own)
            seed = own
            res = self._run(s, cap, {"model_id": self.model_id, "inputs": wire.pack(s, cap.layout.values(leaves)),
                                     "seed": seed})
        outs = wire.unpack(s, res["outputs"])
        return unflatten(cap.out_spec, outs, cap.out_protos, is_leaf_spec)

    def start_run(self, s: "Session", args: tuple, kwargs: dict, *, method: str = "forward",
                  breakpoints: Sequence[Breakpoint] = (), seed: int | None = None) -> Run:
        """`s.start(rm, ...)` on the graph path: the capture, run as a Run that pauses at module calls
        (server/execution/graph_runs.py). The graph always travels with a start (a run is rare next to calls)."""
        if method != "forward":
            raise InvalidRequest("the graph path runs forward only: start(rm, *args) without method")
        self._refresh_weights(s)
        self.attach(s)
        own = _break_seed(seed)
        # A run cannot retry after a failed guard (it may have paused and been edited by then): a capture
        # with graph breaks is made for its own inputs (Note [Graph breaks]).
        cap, leaves, _ = self._capture(s, args, kwargs, own, reuse_breaks=False)
        seed = own if cap.events else seed
        self.counters["calls"] += 1
        fut = s.submit("start", {"sig": cap.sig, "graph": cap.wire, "model_id": self.model_id, "seed": seed,
                                 "inputs": wire.pack(s, cap.layout.values(leaves)),
                                 "breakpoints": [self._resolve_layer(b.to_wire()) for b in breakpoints]})
        self._server_has.add((s.sid, cap.sig))
        return Run(s, self, "forward", fut,
                   rebuild=lambda outs: unflatten(cap.out_spec, list(outs), cap.out_protos, is_leaf_spec))

    def _resolve_layer(self, spec: dict) -> dict:
        """A layer number as a module path, resolved here: the server's skeleton has no config, so it
        cannot tell T5's decoder stack from its encoder's (Note [Layer numbers] in srg/layers.py)."""
        if spec.get("layer") is None:
            return spec
        return dict(spec, path=layer_path(self.module, spec["layer"]), layer=None)

    def explain(self, *args, **kwargs) -> str:
        """The SRG this call runs, as text: ops grouped by module with lifecycle, cost class and sizes."""
        cap, _, _ = self._capture(self.session, args, kwargs, None)
        return render(cap.graph, f"SRG {self.arch} {cap.sig[:12]}")

    def generate(self, *args, **kwargs):
        raise ModelNotSupported(graph_path_why(self.arch))

    def _capture(self, s: "Session", args: tuple, kwargs: dict, seed: int | None,
                 reuse_breaks: bool = True) -> tuple[Captured, list, Any]:
        """(the capture for this call, its tensor leaves, its cache key). `reuse_breaks`: a cached
        capture with graph breaks may serve (its checks run on the server)."""
        if self._use_cache and "use_cache" not in kwargs:
            kwargs = dict(kwargs, use_cache=False)  # as on the module path: no cache objects unless asked
        leaves: list = []
        spec = flatten((tuple(args), dict(kwargs)), leaves, leaf_key, [])
        # Note [Input layout], Note [Capture guards] (the training flags are among the attributes)
        key = (spec, layout_of(leaves), attribute_guard(list(self.module.modules())))
        caps = self._captures.setdefault(key, [])
        for cap in caps:  # Note [Input values]: one capture per outcome of the guards
            if (reuse_breaks or not cap.events) and cap.guards.hold(cap.graph, cap.layout.values(leaves)):
                return cap, leaves, key

        def probe(graph: dict):  # Note [Graph breaks]: the graph so far, run on this call's inputs
            self.counters["probes"] += 1
            return s.call("run_graph", {"probe": True, "graph": graph, "model_id": self.model_id, "seed": seed,
                                        "inputs": wire.pack(s, layout_of(leaves).values(leaves))})["probe"]

        cap = capture_module(self.module, args, kwargs, self.hashes, leaf_key,
                             lambda x: isinstance(x, RemoteTensor), probe)
        self.counters["captures"] += 1
        if cap.events and (key in self._unstable or cap.writes_inputs):
            return cap, leaves, key  # used once: its shapes hold for this call's inputs only
        caps.insert(0, cap)
        del caps[_MAX_GUARDED:]  # a guard that fails on every call must not grow this without bound
        return cap, leaves, key

    def _run(self, s: "Session", cap: Captured, args: dict) -> dict:
        send = (s.sid, cap.sig) not in self._server_has
        res = s.call("run_graph", dict(args, sig=cap.sig, **({"graph": cap.wire} if send else {})))
        if res.get("missing"):  # evicted on the server: send it again (Note [Graph cache])
            send = True
            res = s.call("run_graph", dict(args, sig=cap.sig, graph=cap.wire))
        if send:
            self.counters["graphs_sent"] += 1
        self._server_has.add((s.sid, cap.sig))
        return res

    def _card_rows(self) -> list[tuple[str, str]]:
        return [*super()._card_rows(), ("graphs", f"{len(self._captures)} captured, {self.counters['calls']} calls")]

    def __repr__(self) -> str:
        return (f"GraphModel({self.arch}, {self.nbytes / 1e6:.1f} MB, id={self.model_id[:12]}, "
                f"{sum(map(len, self._captures.values()))} graphs, graph path: {self.reason}, server={self.session.conn.address})")


_MAX_GUARDED = 8  # captures kept per input signature, differing only in their guards' values


def _break_seed(seed: int | None) -> int | None:
    """Note [Graph breaks]: a probe and its run must draw the same random numbers, so a call without a
    seed gets a fresh one of its own (as a fresh stream would be); a graph without random ops ignores it."""
    return seed if seed is not None else secrets.randbits(62)


def _register(session: "Session", module: nn.Module) -> tuple[dict[str, str], dict, object]:
    """Upload what the server lacks of the module's weights, register them as a graph model:
    (name -> hash, register_graph's reply, the upload report)."""
    conn = session.conn
    chunk = conn.cfg.upload_chunk_bytes
    limit = (conn.info.get("limits") or {}).get("max_frame_bytes")
    if isinstance(limit, int) and limit > 0:
        chunk = min(chunk, limit)
    hashes, report = upload_tensors(session, named_tensors(module), conn.hashes, chunk, conn.cfg.upload_window)
    return hashes, session.call("register_graph", {"tensors": hashes}), report


def _accepts(module: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params
