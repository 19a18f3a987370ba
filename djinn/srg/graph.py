"""The SRG: a small IR shared by client and server (DESIGN.md section 4, "Graph path").

A graph is a list of nodes in execution order. Node opcodes (Note [SRG opcodes]):

    "$in"   a graph input (the k-th "$in" node is input k): a tensor sent with the call or a handle
    "$w"    a weight, by content hash (the Text segment's key); args = [hash], kwargs = {"name": ...,
            "grad": true when a kernel that reads requires_grad reads it (Note [RNNs recorded whole])}
    "$c"    a small constant tensor made during capture; args = [tensor]
    other   an aten overload by name ("aten.addmm.default"), allowed only if it is in srg.ops.ALLOWED

Every node has `outs` (shape, dtype, strides of each tensor it returns) and annotations: the module
path active when it ran, the phase of the call, its lifecycle and its cost class. An argument is a
plain value, a `Ref(node, k)` (output k of an earlier node), a list, or a tagged dtype / device /
memory format / layout. `outputs` are Refs; the client keeps the structure around them (the template).

Note [SRG wire form]
    {"v": 1, "phase": str, "random": bool, "paths": [module paths],
     "nodes": [[op, args, kwargs, outs, [path index, lifecycle, cost, where]], ...],
     "outputs": [[node, k], ...],
     "calls": [[path index, start, end, [[node, k], ...], [[node, k], ...], opened, closed], ...],
                                                                                  (optional)
     "expects": [[node, k, value], ...]}                                          (optional)
    outs entries are [dtype name, shape, strides]. Refs are {"$n": [node, k]}; a dtype {"$dt": name};
    a device {"$dev": 0} (always the server's device: graphs are captured device-free); a memory format
    {"$mf": name}; a layout {"$ly": name}. `from_wire` checks all of it (limits, types, refs to earlier
    nodes only, known dtypes) before anything is built; the server then checks ops and shapes.
    `expects` are the Python values a capture read from tensors through a graph break (Note [Graph
    breaks] in srg/capture.py): output k of the node must hold `value` when it runs (its `.item()`, a
    bool, int or float; or its `.tolist()`, nested lists of them), or the run stops there with GuardFailed.

Note [Module calls]
    `calls` records each submodule call of a module capture: its path, the nodes it ran (start <= i <
    end), the tensors it was called with and the tensors it returned, and when it opened and closed on
    one counter of hook events. Node ranges alone cannot order calls that open or close with no node
    between them (a wrapper and its first child); the counter is the order nn.Module hooks fire in.
    The server fires breakpoints at these boundaries on the graph path (server/execution/graph_runs.py); they
    carry no computation, so a graph without them runs the same.
"""
from __future__ import annotations

import enum
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch

from ..protocol.errors import InvalidRequest
from ..protocol.tensors import DTYPES, dtype_name

VERSION = 1
MAX_NODES = 200_000
MAX_ARGS = 64
MAX_LIST = 4096
MAX_DIMS = 16
MAX_ELEMENTS = 1 << 36          # per tensor; bigger than any device this runs on
MAX_STR = 64
MAX_CONST_BYTES = 1 << 20       # a constant larger than this should be a buffer (Text)
IN, WEIGHT, CONST = "$in", "$w", "$c"
SPECIAL = (IN, WEIGHT, CONST)


class Lifecycle(enum.IntEnum):
    """Where a node's output lives (DESIGN.md section 3): ordered, longest-lived first."""
    TEXT = 0   # weights and views of weights: shared, read-only
    DATA = 1   # session state: handles the session holds, KV caches, the graph's outputs
    STACK = 2  # everything else: freed when the step ends


PREFILL, DECODE, NONE = "prefill", "decode", "-"
COMPUTE, MEMORY = "compute", "memory"


@dataclass(frozen=True)
class Ref:
    node: int
    k: int = 0


@dataclass(frozen=True)
class TensorMeta:
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @classmethod
    def of(cls, t: torch.Tensor) -> "TensorMeta":
        return cls(t.dtype, tuple(t.shape), tuple(t.stride()))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


@dataclass
class Node:
    op: str
    args: tuple
    kwargs: dict
    outs: list[TensorMeta]
    module: str = ""
    lifecycle: Lifecycle = Lifecycle.STACK
    cost: str = MEMORY
    where: str = ""  # the user's source line (lazy ops); "" for module captures


@dataclass(frozen=True)
class ModuleCall:
    """Note [Module calls]: one submodule call of a captured forward."""
    path: str
    start: int
    end: int
    ins: tuple[Ref, ...]
    outs: tuple[Ref, ...]
    opened: int   # Note [Module calls]: when its pre-hook and its hook fired, on one counter
    closed: int


@dataclass
class Graph:
    nodes: list[Node] = field(default_factory=list)
    outputs: list[Ref] = field(default_factory=list)
    phase: str = NONE
    random: bool = False
    calls: list[ModuleCall] = field(default_factory=list)
    expects: list[tuple[Ref, Any]] = field(default_factory=list)  # Note [Graph breaks]: (tensor, its value)

    @property
    def inputs(self) -> list[int]:
        return [i for i, n in enumerate(self.nodes) if n.op == IN]

    def to_wire(self) -> dict:
        paths: dict[str, int] = {}
        nodes = []
        for n in self.nodes:
            p = paths.setdefault(n.module, len(paths))
            nodes.append([n.op, [_enc(a) for a in n.args], {k: _enc(v) for k, v in n.kwargs.items()},
                          [[dtype_name(m.dtype), list(m.shape), list(m.stride)] for m in n.outs],
                          [p, int(n.lifecycle), n.cost, n.where]])
        calls = [[paths.setdefault(c.path, len(paths)), c.start, c.end, [[r.node, r.k] for r in c.ins],
                  [[r.node, r.k] for r in c.outs], c.opened, c.closed] for c in self.calls]
        return {"v": VERSION, "phase": self.phase, "random": self.random, "paths": list(paths),
                "nodes": nodes, "outputs": [[r.node, r.k] for r in self.outputs],
                **({"calls": calls} if calls else {}),
                **({"expects": [[r.node, r.k, v] for r, v in self.expects]} if self.expects else {})}

    def signature(self) -> str:
        return signature(self.to_wire())


def signature(wire: dict) -> str:
    """A hash of the graph's structure. Constants' bytes are covered through their hash."""
    return hashlib.sha256(msgpack.packb(wire, default=_sig_default, use_bin_type=True)).hexdigest()[:32]


def _sig_default(obj: Any):
    if isinstance(obj, torch.Tensor):
        from ..protocol.hashing import weight_hash

        return weight_hash(obj)
    raise TypeError(f"cannot hash {type(obj).__name__}")


# -- values ----------------------------------------------------------------------------------------
_MF = {str(m).split(".")[-1]: m for m in (torch.contiguous_format, torch.channels_last, torch.preserve_format,
                                         torch.channels_last_3d)}
_LAYOUT = {"strided": torch.strided}


def _enc(v: Any) -> Any:
    if isinstance(v, Ref):
        return {"$n": [v.node, v.k]}
    if isinstance(v, (list, tuple)):
        return [_enc(x) for x in v]
    if isinstance(v, torch.dtype):
        return {"$dt": dtype_name(v)}
    if isinstance(v, torch.device):
        return {"$dev": 0}
    if isinstance(v, torch.memory_format):
        return {"$mf": str(v).split(".")[-1]}
    if isinstance(v, torch.layout):
        return {"$ly": str(v).split(".")[-1]}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, torch.Tensor):  # only inside "$c" nodes; the codec frames it
        return v
    raise InvalidRequest(f"cannot put a {type(v).__name__} in a graph")


def _dec(v: Any, upto: int, nodes_outs: list[int], depth: int = 0) -> Any:
    """Wire value -> Python value, checking it (refs must point to earlier nodes' outputs)."""
    if depth > 4:
        raise InvalidRequest("graph argument nested too deeply")
    if v is None or isinstance(v, (bool, int, float)):
        return v
    if isinstance(v, str):
        if len(v) > MAX_STR:
            raise InvalidRequest(f"graph string argument longer than {MAX_STR}")
        return v
    if isinstance(v, list):
        if len(v) > MAX_LIST:
            raise InvalidRequest(f"graph list argument longer than {MAX_LIST}")
        return [_dec(x, upto, nodes_outs, depth + 1) for x in v]
    if isinstance(v, dict) and len(v) == 1:
        (tag, x), = v.items()
        if tag == "$n":
            if (not isinstance(x, list) or len(x) != 2 or not all(type(i) is int for i in x)
                    or not 0 <= x[0] < upto or not 0 <= x[1] < nodes_outs[x[0]]):
                raise InvalidRequest(f"node {upto} refers to {x!r}, which is not an output of an earlier node")
            return Ref(x[0], x[1])
        if tag == "$dt":
            if x not in DTYPES:
                raise InvalidRequest(f"unknown dtype {x!r} in graph")
            return DTYPES[x]
        if tag == "$dev":
            return DEVICE
        if tag == "$mf" and x in _MF:
            return _MF[x]
        if tag == "$ly" and x in _LAYOUT:
            return _LAYOUT[x]
    raise InvalidRequest(f"graph argument of type {type(v).__name__} is not allowed")


class _ServerDevice:
    """Placeholder for 'the device the graph runs on'; the server substitutes its own."""

    def __repr__(self) -> str:
        return "<device>"


DEVICE = _ServerDevice()


def from_wire(w: Any) -> Graph:
    """Check and decode a wire graph (Note [SRG wire form]). Raises InvalidRequest; allocates nothing
    but the graph's own (small) Python objects."""
    if not isinstance(w, dict) or w.get("v") != VERSION:
        raise InvalidRequest(f"graph must be a map with v={VERSION}")
    nodes, outputs, paths = w.get("nodes"), w.get("outputs"), w.get("paths", [])
    if not isinstance(nodes, list) or not 0 <= len(nodes) <= MAX_NODES:  # none: a forward of Python values only
        raise InvalidRequest(f"graph needs at most {MAX_NODES} nodes")
    if not isinstance(paths, list) or not all(isinstance(p, str) and len(p) < 1024 for p in paths):
        raise InvalidRequest("graph paths must be strings")
    g = Graph(phase=w.get("phase") if w.get("phase") in (PREFILL, DECODE, NONE) else NONE,
              random=bool(w.get("random")))
    n_outs: list[int] = []
    for i, raw in enumerate(nodes):
        if not isinstance(raw, list) or len(raw) != 5:
            raise InvalidRequest(f"graph node {i} must be [op, args, kwargs, outs, annotations]")
        op, args, kwargs, outs, ann = raw
        if not isinstance(op, str) or len(op) > 128:
            raise InvalidRequest(f"graph node {i}: op must be a string")
        if not isinstance(args, list) or not isinstance(kwargs, dict) or len(args) + len(kwargs) > MAX_ARGS:
            raise InvalidRequest(f"graph node {i}: args must be a list and kwargs a map (at most {MAX_ARGS})")
        if not all(isinstance(k, str) and len(k) <= MAX_STR for k in kwargs):
            raise InvalidRequest(f"graph node {i}: kwargs keys must be short strings")
        metas = _metas(i, outs)
        if op == CONST:
            if len(args) != 1 or not isinstance(args[0], torch.Tensor) or kwargs:
                raise InvalidRequest(f"graph node {i}: a constant holds one tensor")
            if args[0].numel() * args[0].element_size() > MAX_CONST_BYTES:
                raise InvalidRequest(f"graph node {i}: constant larger than {MAX_CONST_BYTES} bytes")
            dargs, dkw = (args[0],), {}
        elif op == WEIGHT:
            if len(args) != 1 or not isinstance(args[0], str) or len(args[0]) > 128:
                raise InvalidRequest(f"graph node {i}: a weight is named by its hash")
            name = kwargs.get("name", "")
            dargs, dkw = (args[0],), {"name": name if isinstance(name, str) else ""}
            if kwargs.get("grad") is True:  # its stand-in required grad (Note [RNNs recorded whole])
                dkw["grad"] = True
        else:
            if op == IN and (args or kwargs):
                raise InvalidRequest(f"graph node {i}: an input takes no arguments")
            dargs = tuple(_dec(a, i, n_outs) for a in args)
            dkw = {k: _dec(v, i, n_outs) for k, v in kwargs.items()}
        if op in SPECIAL and len(metas) != 1:
            raise InvalidRequest(f"graph node {i}: {op} has exactly one output")
        path, life, cost, where = _ann(i, ann, paths)
        g.nodes.append(Node(op, dargs, dkw, metas, path, life, cost, where))
        n_outs.append(len(metas))
    if not isinstance(outputs, list) or len(outputs) > MAX_LIST:
        raise InvalidRequest("graph outputs must be a list")
    for o in outputs:
        r = _dec({"$n": o}, len(nodes), n_outs)
        g.outputs.append(r)
    calls = w.get("calls", [])
    if not isinstance(calls, list) or len(calls) > MAX_NODES:
        raise InvalidRequest("graph calls must be a list")
    for k, c in enumerate(calls):
        if not isinstance(c, list) or len(c) != 7:
            raise InvalidRequest(f"graph call {k} must be [path, start, end, ins, outs, opened, closed]")
        p, start, end, ins, outs, opened, closed = c
        if (type(p) is not int or not 0 <= p < len(paths) or type(start) is not int or type(end) is not int
                or not 0 <= start <= end <= len(nodes)):
            raise InvalidRequest(f"graph call {k}: bad path index or node range")
        if type(opened) is not int or type(closed) is not int or not 0 <= opened < closed <= 4 * MAX_NODES:
            raise InvalidRequest(f"graph call {k}: bad hook order")
        if not isinstance(ins, list) or not isinstance(outs, list) or len(ins) + len(outs) > MAX_ARGS:
            raise InvalidRequest(f"graph call {k}: ins and outs must be short lists")
        # A call's inputs exist when it starts; its outputs when it ends.
        g.calls.append(ModuleCall(paths[p], start, end, tuple(_dec({"$n": r}, start, n_outs) for r in ins),
                                  tuple(_dec({"$n": r}, end, n_outs) for r in outs), opened, closed))
    expects = w.get("expects", [])
    if not isinstance(expects, list) or len(expects) > MAX_LIST:
        raise InvalidRequest("graph expects must be a list")
    for e in expects:
        if not isinstance(e, list) or len(e) != 3 or not _plain_values(e[2], [MAX_LIST]):
            raise InvalidRequest(f"a graph expect is [node, k, value]: a bool, int or float, or nested lists of "
                                 f"them (at most {MAX_LIST} in all)")
        g.expects.append((_dec({"$n": e[:2]}, len(nodes), n_outs), e[2]))
    return g


def _plain_values(v: Any, budget: list[int], depth: int = 0) -> bool:
    """A value `.tolist()` gives: numbers or nested lists of them, at most budget[0] items in all."""
    budget[0] -= 1
    if budget[0] < 0 or depth > MAX_DIMS:
        return False
    if isinstance(v, list):
        return all(_plain_values(x, budget, depth + 1) for x in v)
    return type(v) in (bool, int, float)


def _metas(i: int, outs: Any) -> list[TensorMeta]:
    if not isinstance(outs, list) or len(outs) > MAX_LIST:
        raise InvalidRequest(f"graph node {i}: outs must be a list")
    metas = []
    for m in outs:
        if not isinstance(m, list) or len(m) != 3:
            raise InvalidRequest(f"graph node {i}: each out is [dtype, shape, strides]")
        dt, shape, stride = m
        if dt not in DTYPES:
            raise InvalidRequest(f"graph node {i}: unknown dtype {dt!r}")
        for dims in (shape, stride):
            if (not isinstance(dims, list) or len(dims) > MAX_DIMS
                    or not all(type(d) is int and 0 <= d <= MAX_ELEMENTS for d in dims)):
                raise InvalidRequest(f"graph node {i}: bad shape or strides {dims!r}")
        if len(shape) != len(stride) or math.prod(shape) > MAX_ELEMENTS:
            raise InvalidRequest(f"graph node {i}: shape {shape} is too large or does not match its strides")
        metas.append(TensorMeta(DTYPES[dt], tuple(shape), tuple(stride)))
    return metas


def _ann(i: int, ann: Any, paths: list) -> tuple[str, Lifecycle, str, str]:
    if not isinstance(ann, list) or len(ann) != 4:
        raise InvalidRequest(f"graph node {i}: annotations are [path, lifecycle, cost, where]")
    p, life, cost, where = ann
    if type(p) is not int or not 0 <= p < max(1, len(paths)) or (paths == [] and p != 0):
        raise InvalidRequest(f"graph node {i}: bad module path index {p!r}")
    if life not in (0, 1, 2) or cost not in (COMPUTE, MEMORY) or not isinstance(where, str) or len(where) > 512:
        raise InvalidRequest(f"graph node {i}: bad annotations {ann!r}")
    return (paths[p] if paths else ""), Lifecycle(life), cost, where


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()
