"""The SRG interpreter (DESIGN.md section 4, graph path): check a graph once, then run it per call.

`compile_graph` turns a decoded graph (srg.from_wire has checked its structure) into a plan: every op
resolved through the op table (srg.ops.ALLOWED, Note [Op table]: never a lookup by an arbitrary name), no in-place
write reaching a weight that alias annotations can show (Note [Weights are read-only] in
srg/capture.py: an early refusal, not the boundary), then a dry run over meta tensors that checks every
node's declared shapes and dtypes before any device memory is touched. A graph that passes runs with
real tensors on the engine thread; `Interpreter.run_node` is the one override point per node
(breakpoints and streaming hook in there, as with torch.fx's Interpreter). The boundary is at run time
(Note [Weights are read-only at run time] in vmu/readonly.py): before a node that writes runs, every
tensor it writes is checked against the weights' storages, and outputs in a weight's storage are copied.

Note [Graph peak memory]
    A graph's intermediates live on the device only while it runs, but one node can ask for gigabytes,
    so what a run will hold is estimated before it starts, from the SRG's declared shapes alone: the
    dry run gives every node's outputs as meta tensors, whose storages are shared exactly where the
    real ones will be (views, in-place ops, `_unsafe_view`, split's list outputs). Walking the nodes in
    order, a storage no input, weight or constant owns is counted (whole, ALIGN-rounded) from the node
    that makes it until the last node holding it is freed (`frees`, the interpreter's own schedule:
    outputs are never freed), and `peak_bytes` is the most counted at once. A data-dependent node
    (Note [Graph breaks] in srg/capture.py) is counted at the most its kernel may allocate (its output
    count x its largest input's elements x its dims x 8 bytes), since its declared shape is checked
    only after the kernel ran; a probe's last node at the real shapes its meta kernel gives. Kernels' internal
    workspaces are not in the SRG and not counted. Constants (`const_bytes`) are held with the compiled
    graph, by the session that sent it (Note [Graph cache] in graph_ops.py). Both are checked against
    the session's GPU quota before they are allocated (Note [Session quotas] in quotas.py).

Note [Graph cost]
    The engine thread runs one graph at a time, and every other tenant's next step waits for it, so a
    graph-path request has a cost budget (graph_max_flops), checked like its peak memory: estimated
    once from the dry run's shapes, when the graph is compiled, before any of it runs (`flops`).
    Matmul-like ops (mm, addmm, bmm, baddbmm, matmul, linear) cost 2 x their output's elements x the
    contracted dim; a convolution 2 x its output's elements (its input's, transposed) x the weight's
    elements per output channel; attention 2 x batch x heads x L x S x (E + Ev), for QK^T and the
    product with V (the counts of torch.utils.flop_counter). Every other op costs one per element of
    its largest tensor, argument or output (a floor for what it reads or writes: without it a long
    chain of pointwise ops or reductions over a large tensor would be free), and views, which move
    nothing, cost none. Kernels' own extra work (softmax inside attention, a convolution's im2col) is
    not counted: the estimate bounds a graph's work by its shapes, not its time, and the budget's
    default is far above any single forward so that only runaway graphs meet it. A graph over it is
    CostBudgetExceeded, never cached (graph_ops.compiled_for); the session and the server go on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ...protocol.errors import GuardFailed, InvalidRequest, RemoteExecutionError, WeightWriteRefused
from ...srg import ops as srg_ops
from ...srg.capture import op_info
from ...srg.graph import CONST, DEVICE, IN, WEIGHT, Graph, Ref
from ...vmu.data import aligned
from ...vmu.readonly import ReadOnlyMemory

_META = torch.device("meta")


@dataclass
class Compiled:
    graph: Graph
    fns: list                        # per node: OpOverload, or None for $in / $w / $c
    args: list                       # per node: positional args with the device substituted
    kwargs: list
    inputs: list[int]                # "$in" node indices, in input order
    weights: list[tuple[int, str]]   # ("$w" node, hash)
    consts: dict[int, torch.Tensor]  # "$c" node -> tensor on the device
    frees: list[list[int]]           # after node i, drop these nodes' outputs (last use)
    writes: list[tuple]              # per node: (position, name) of each argument it may write
    ops: list[int] = field(default_factory=list)  # the op nodes in order
    const_bytes: int = 0             # device bytes of `consts` (Note [Graph peak memory])
    peak_bytes: int = 0              # most bytes of op outputs alive at once while it runs
    flops: int = 0                   # estimated operations of one run (Note [Graph cost])
    expects: dict[int, list[tuple[int, Any]]] = field(default_factory=dict)  # node -> (k, value) (Note [Graph breaks])
    dynamic: frozenset[int] = frozenset()  # data-dependent nodes whose declared shapes the run checks (not a probe's last)


def const_bytes(g: Graph) -> int:
    """Device bytes a graph's constants take once compiled (known before they are copied there)."""
    return sum(aligned(node.args[0].numel() * node.args[0].element_size()) for node in g.nodes
               if node.op == CONST and isinstance(node.args[0], torch.Tensor))


def compile_graph(g: Graph, device: torch.device, probe: bool = False) -> Compiled:
    """`probe`: the graph is a capture's probe (Note [Graph breaks] in srg/capture.py): its last node
    declares placeholder outputs, which the run reports instead of checking."""
    n = len(g.nodes)
    fns: list = [None] * n
    writes: list[tuple] = [()] * n
    roots = list(range(n))
    inputs, weights = [], []
    consts: dict[int, torch.Tensor] = {}
    for i, node in enumerate(g.nodes):
        where = f"node {i} ({node.op}{' in ' + node.module if node.module else ''}{' at ' + node.where if node.where else ''})"
        if node.op == IN:
            inputs.append(i)
            continue
        if node.op == WEIGHT:
            weights.append((i, node.args[0]))
            continue
        if node.op == CONST:
            c = node.args[0]
            m = node.outs[0]
            if c.dtype != m.dtype or tuple(c.shape) != m.shape:
                raise InvalidRequest(f"{where}: constant does not match its declared {m.dtype}{list(m.shape)}")
            consts[i] = c.to(device)
            continue
        fn = srg_ops.ALLOWED.get(node.op)
        if fn is None:
            raise InvalidRequest(f"{where}: op {node.op!r} is not allowed on the graph path: "
                                 f"{srg_ops.refusal(node.op)} (Note [Op table])")
        fns[i] = fn
        info = op_info(fn)
        writes[i] = srg_ops.written_args(fn, node.args, node.kwargs)
        for pos, name in writes[i]:
            a = node.args[pos] if pos < len(node.args) else node.kwargs.get(name)
            if any(g.nodes[roots[r.node]].op == WEIGHT for r in _refs(a)):  # a Tensor[] argument too
                raise WeightWriteRefused(f"{where} writes to a weight in place ({name}); weights are read-only")
        for k, src in enumerate(info.view_of):
            if src is not None and src < len(node.args) and isinstance(node.args[src], Ref):
                roots[i] = roots[node.args[src].node]
    args = [_sub_device(node.args, device) for node in g.nodes]
    kwargs = [_sub_device(node.kwargs, device) for node in g.nodes]
    bounds: dict[int, int] = {}
    env = _dry_run(g, fns, args, kwargs, n - 1 if probe else None, bounds)
    last: dict[int, int] = {}
    for i, node in enumerate(g.nodes):
        for r in _refs(node.args) + _refs(node.kwargs):
            last[r.node] = i
    keep = {r.node for r in g.outputs}
    frees: list[list[int]] = [[] for _ in range(n)]
    for j, i in last.items():
        if j not in keep:
            frees[i].append(j)
    ops = [i for i in range(n) if fns[i] is not None]
    flops = sum(node_flops(fns[i], _resolve(args[i], env, _META), _resolve(kwargs[i], env, _META), env[i])
                for i in ops)
    expects: dict[int, list[tuple[int, Any]]] = {}
    for r, v in g.expects:
        expects.setdefault(r.node, []).append((r.k, v))
    dynamic = frozenset(i for i in ops if torch.Tag.dynamic_output_shape in fns[i].tags and not (probe and i == n - 1))
    return Compiled(g, fns, args, kwargs, inputs, weights, consts, frees, writes, ops, const_bytes(g),
                    peak_bytes(fns, env, frees, bounds), flops, expects, dynamic)


#: Matmul-like ops: the argument whose last dim is contracted (Note [Graph cost]).
_CONTRACTED = {"mm": 0, "bmm": 0, "matmul": 0, "linear": 0, "addmm": 1, "baddbmm": 1, "mv": 0, "addmv": 1,
               "dot": 0, "vdot": 0, "_grouped_mm": 0}
_CONVOLUTIONS = frozenset({"convolution", "_convolution"})


def node_flops(fn, args: tuple, kwargs: dict, outs: tuple) -> int:
    """Note [Graph cost]: the estimated operations of one node, from its meta arguments and outputs."""
    base = srg_ops.base_name(str(fn))
    a = _bind(fn, args, kwargs)
    if base in _CONTRACTED:
        return 2 * outs[0].numel() * a[_CONTRACTED[base]].shape[-1]
    if base in _CONVOLUTIONS:  # (input, weight, bias, stride, padding, dilation, transposed, ...)
        x, w, transposed = a[0], a[1], bool(a[6])
        return 2 * (x.numel() if transposed else outs[0].numel()) * math.prod(w.shape[1:])
    if str(fn) in srg_ops.RNN_OPS:  # Note [RNNs recorded whole]: every weight matrix, once per token
        x, params = a[0], a[2]
        tokens = x.numel() // max(x.shape[-1], 1)
        return 2 * tokens * sum(w.numel() for w in params if w.dim() == 2)
    if base == "scaled_dot_product_attention" or base.startswith("_scaled_dot_product"):
        q, k, v = a[0], a[1], a[2]  # batch and heads as the output has them (broadcast, grouped heads)
        return 2 * math.prod(outs[0].shape[:-2]) * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])
    info = op_info(fn)
    if not info.writes and info.view_of and all(src is not None for src in info.view_of):
        return 0  # a view: moves nothing
    return max((t.numel() for t in _tensors(list(a)) + _tensors(list(outs))), default=0)


def _bind(fn, args: tuple, kwargs: dict) -> list:
    """The call's arguments in schema order, positional or by keyword (None where left to a default)."""
    names = [x.name for x in fn._schema.arguments]
    return [args[i] if i < len(args) else kwargs.get(n) for i, n in enumerate(names)]


def peak_bytes(fns: list, env: list, frees: list[list[int]], bounds: dict[int, int] | None = None) -> int:
    """Note [Graph peak memory]: the most bytes of op outputs alive at once, from the dry run's meta
    tensors (`env`, every node's outputs, all still referenced so no storage key is reused). `bounds`:
    for a data-dependent node, the most its kernel may allocate (its declared shape is checked only
    after the kernel ran), counted while the node's first output lives."""
    def key(t: torch.Tensor) -> int:
        return t.untyped_storage()._cdata  # the StorageImpl: shared by every view of it, meta included

    given: set[int] = set()           # storages of inputs, weights and constants: not the run's to allocate
    size: dict[int, int] = {}         # storage -> bytes, while some live node holds it
    holders: dict[int, set[int]] = {}
    live = peak = 0
    for i, outs in enumerate(env):
        if fns[i] is None:
            given.update(key(t) for t in outs)
            continue
        for n, t in enumerate(outs):
            k = key(t)
            if k in given:
                continue
            if k not in size:
                size[k] = aligned(max(t.untyped_storage().nbytes(), (bounds or {}).get(i, 0) if n == 0 else 0))
                live += size[k]
            holders.setdefault(k, set()).add(i)
        peak = max(peak, live)
        for j in frees[i]:
            for t in env[j]:
                k = key(t)
                h = holders.get(k)
                if h is None:
                    continue
                h.discard(j)
                if not h:
                    del holders[k]
                    live -= size.pop(k)
    return peak


def _dry_run(g: Graph, fns: list, args: list, kwargs: list, probe: int | None = None,
             bounds: dict[int, int] | None = None) -> list:
    """Every op over meta tensors, checking declared outputs: shapes are checked before any allocation.
    Returns every node's outputs (meta tensors). An op whose output shape depends on values (Note
    [Data-dependent shapes]) has no meta kernel for its arguments: its declared outputs stand in, and
    the run checks them (a probe's last node reports them instead)."""
    env: list = [None] * len(g.nodes)
    for i, node in enumerate(g.nodes):
        if fns[i] is None:
            m = node.outs[0]
            env[i] = (torch.empty_strided(m.shape, m.stride, dtype=m.dtype, device=_META),)
            continue
        try:
            out = srg_ops.meta_call(fns[i], _resolve(args[i], env, _META), _resolve(kwargs[i], env, _META))
        except Exception as e:
            if i != probe and torch.Tag.dynamic_output_shape not in fns[i].tags:
                raise InvalidRequest(f"graph node {i} ({node.op}{' in ' + node.module if node.module else ''}) does "
                                     f"not run on its inputs: {type(e).__name__}: {str(e)[:300]}") from None
            # Data-dependent: bounded by its inputs (BOUNDED_DYNAMIC); its declared outputs are checked when it runs
            n_returns = len(fns[i]._schema.returns)
            if len(node.outs) != n_returns:
                raise InvalidRequest(f"graph node {i} ({node.op}) declares {len(node.outs)} outputs; it returns "
                                     f"{n_returns}") from None
            env[i] = tuple(torch.empty_strided(m.shape, m.stride, dtype=m.dtype, device=_META) for m in node.outs)
            if bounds is not None:  # Note [Graph peak memory]: what the kernel may allocate before the check
                ins = _tensors(list(_resolve(args[i], env, _META)) + list(_resolve(kwargs[i], env, _META).values()))
                big = max(ins, key=lambda t: t.numel(), default=None)
                bounds[i] = 0 if big is None else n_returns * big.numel() * max(1, big.dim()) * 8
            continue
        if i == probe:  # a probe's placeholders say nothing: its peak and cost count the real shapes
            env[i] = _outs(out)
            continue
        outs = _outs(out)
        if len(outs) != len(node.outs) or any(
                not isinstance(t, torch.Tensor) or t.dtype != m.dtype or tuple(t.shape) != m.shape
                for t, m in zip(outs, node.outs)):
            got = [(str(t.dtype), list(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__ for t in outs]
            raise InvalidRequest(f"graph node {i} ({node.op}) declares outputs "
                                 f"{[(str(m.dtype), list(m.shape)) for m in node.outs]} but gives {got}")
        env[i] = outs
    return env


def _sub_device(v: Any, device: torch.device) -> Any:
    if v is DEVICE:
        return device
    if isinstance(v, (list, tuple)):
        return type(v)(_sub_device(x, device) for x in v)
    if isinstance(v, dict):
        return {k: _sub_device(x, device) for k, x in v.items()}
    return v


def _refs(v: Any) -> list[Ref]:
    if isinstance(v, Ref):
        return [v]
    if isinstance(v, (list, tuple)):
        return [r for x in v for r in _refs(x)]
    if isinstance(v, dict):
        return [r for x in v.values() for r in _refs(x)]
    return []


def _tensors(v: Any) -> list[torch.Tensor]:
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (list, tuple)):
        return [t for x in v for t in _tensors(x)]
    return []


def _resolve(v: Any, env: list, device: torch.device | None = None) -> Any:
    if isinstance(v, Ref):
        return env[v.node][v.k]
    if isinstance(v, torch.device) and device is not None:
        return device
    if isinstance(v, tuple):
        return tuple(_resolve(x, env, device) for x in v)
    if isinstance(v, list):
        return [_resolve(x, env, device) for x in v]
    if isinstance(v, dict):
        return {k: _resolve(x, env, device) for k, x in v.items()}
    return v


class Interpreter:
    """Runs a compiled graph. Subclass and override `run_node` to observe or change one node.

    `readonly`: the memory no node may write (the server's Text segment, Note [Weights are read-only at
    run time]); None: the storages of the weights each run is given."""

    def __init__(self, c: Compiled, readonly: ReadOnlyMemory | None = None):
        self.c = c
        self.readonly = readonly

    def run(self, inputs: list[torch.Tensor], weights: list[torch.Tensor]) -> list[torch.Tensor]:
        c = self.c
        readonly = self.readonly if self.readonly is not None else ReadOnlyMemory.of(weights)
        env: list = [None] * len(c.graph.nodes)
        for i, t in zip(c.inputs, inputs):
            env[i] = (t,)
        for (i, _), t in zip(c.weights, weights):
            env[i] = (t,)
        for i, t in c.consts.items():
            env[i] = (t,)
        frees = self.frees()
        for i in c.expects:  # a value read from an input, a weight or a constant (Note [Graph breaks])
            if c.fns[i] is None:
                _check_break(c, i, env[i])
        with torch.no_grad():
            for i in c.ops:
                self.before_node(i, env)
                if c.writes[i]:
                    self._refuse_weight_writes(i, env, readonly)
                try:
                    env[i] = self.run_node(i, env)
                    if i in c.expects or i in c.dynamic:
                        _check_break(c, i, env[i])
                except (torch.OutOfMemoryError, GuardFailed):
                    raise  # the engine turns an OOM into a typed OutOfMemory
                except Exception as e:
                    node = c.graph.nodes[i]
                    site = (f" in module '{node.module}'" if node.module else "") + (f" at {node.where}" if node.where else "")
                    raise RemoteExecutionError(f"graph node {i} ({node.op}{site}) failed: {type(e).__name__}: "
                                               f"{str(e)[:500]}") from None
                for j in frees[i]:
                    env[j] = None
            self.before_node(len(c.graph.nodes), env)
        return [readonly.private(env[r.node][r.k]) for r in c.graph.outputs]

    def _refuse_weight_writes(self, i: int, env: list, readonly: ReadOnlyMemory) -> None:
        """Before node i runs: none of the tensors it writes may share a byte with a weight."""
        c = self.c
        node = c.graph.nodes[i]
        for pos, name in c.writes[i]:
            v = c.args[i][pos] if pos < len(c.args[i]) else c.kwargs[i].get(name)
            for t in _tensors(_resolve(v, env)):
                if readonly.aliases(t):
                    site = (f" in module '{node.module}'" if node.module else "") + (f" at {node.where}" if node.where else "")
                    raise WeightWriteRefused(f"graph node {i} ({node.op}{site}) would write its argument '{name}' "
                                             "into a weight's storage; weights are shared and read-only (Note "
                                             "[Weights are read-only at run time]): nothing was written")

    def frees(self) -> list:
        """Per op node, the earlier nodes whose outputs are dead after it (dropped from the env)."""
        return self.c.frees

    def before_node(self, i: int, env: list) -> None:
        """Called before op node i runs, and with i = len(nodes) after the last (breakpoints hook here)."""

    def run_node(self, i: int, env: list) -> tuple:
        """The override point: run node i given the outputs of earlier nodes; return its outputs."""
        c = self.c
        args, kwargs = _resolve(c.args[i], env), _resolve(c.kwargs[i], env)
        node = c.graph.nodes[i]
        check_indices(node.op, args)
        if node.op in srg_ops.RNN_OPS:
            args = _rnn_params(c, i, args)
        fix = _ON_DEVICE.get(node.op)
        return _outs(fix(c.fns[i], args, kwargs) if fix is not None else c.fns[i](*args, **kwargs))


def _check_break(c: Compiled, i: int, outs: tuple) -> None:
    """Note [Graph breaks]: a data-dependent shape, or a value the capture read, must be what its probe
    found; otherwise the graph recorded after it is not this input's, and the run stops here."""
    node = c.graph.nodes[i]
    site = f"graph node {i} ({node.op}{' in ' + node.module if node.module else ''}{' at ' + node.where if node.where else ''})"
    if i in c.dynamic:
        for t, m in zip(outs, node.outs):
            if tuple(t.shape) != m.shape or t.dtype != m.dtype:
                raise GuardFailed(f"{site} gave {t.dtype}{list(t.shape)} where its capture found "
                                  f"{m.dtype}{list(m.shape)} (Note [Graph breaks]): nothing after it ran")
    for k, want in c.expects.get(i, ()):
        t = outs[k] if k < len(outs) else None
        if isinstance(want, list):  # `.tolist()`
            got = t.tolist() if isinstance(t, torch.Tensor) else None
            if got != want:
                raise GuardFailed(f"{site} holds other values than its capture read with .tolist() (Note [Graph "
                                  "breaks]): nothing after it ran")
            continue
        got = t.item() if isinstance(t, torch.Tensor) and t.numel() == 1 else None
        if got is None or not (got == want or (got != got and want != want)):  # NaN reads as NaN
            raise GuardFailed(f"{site} holds {got!r} where its capture read {want!r} (Note [Graph breaks]): "
                              "nothing after it ran")


# Note [Device-free captures, device-specific kernels]
#     A graph is captured on meta tensors, so code that picks its ops by device type sees "meta" and
#     takes its non-CPU branch. transformers' MoE experts (Mixtral, Qwen2-MoE: integrations/moe.py)
#     count tokens per expert with histc of the expert ids as int32 off the CPU and as float32 on it,
#     because the CPU histc has no integer kernel. The counts are the same integers either way and the
#     graph casts them to int32 next, so a CPU server runs an integer histc in float64 (exact for every
#     value below 2**53) and casts the counts back to the input's dtype: what the captured op computes
#     on a device that has the kernel, and the same offsets a local CPU run computes.
def _histc(fn, args: tuple, kwargs: dict):
    x = args[0]
    if x.device.type != "cpu" or x.is_floating_point():
        return fn(*args, **kwargs)
    return fn(x.double(), *args[1:], **kwargs).to(x.dtype)


_ON_DEVICE = {"aten.histc.default": _histc}


def _rnn_params(c: Compiled, i: int, args: tuple) -> tuple:
    """Note [RNNs recorded whole]: the CPU kernels of GRU and RNN take another path when a weight
    requires grad, even under no_grad, so a weight whose client stand-in required it (a "$w" node marked
    `grad`) is given to the op as a detached alias that requires grad (no autograd graph: no_grad)."""
    refs = c.args[i][2]
    params = [p.detach().requires_grad_() if isinstance(r, Ref) and c.graph.nodes[r.node].op == WEIGHT
              and c.graph.nodes[r.node].kwargs.get("grad") else p for r, p in zip(refs, args[2])]
    return (*args[:2], params, *args[3:])


def _outs(out: Any) -> tuple:
    """An op's result as a tuple of outputs (an op that only raises, `_linalg_check_errors`, has none)."""
    if out is None:
        return ()
    return tuple(out) if isinstance(out, (list, tuple)) else (out,)


def check_indices(op: str, args: tuple) -> None:
    """Raise IndexError (ValueError for a value a kernel asserts on) before a CUDA kernel would assert on
    it: the checks of srg.ops.INDEX_CHECKS and VALUE_CHECKS (Note [Op table])."""
    base = srg_ops.base_name(op)
    if base == "_grouped_mm":
        return _check_group_offsets(args)
    base = base if base in srg_ops.INDEX_CHECKS or base in srg_ops.VALUE_CHECKS else base.rstrip("_")
    value = srg_ops.VALUE_CHECKS.get(base)
    if value is not None:
        a, lo, hi = value
        t = args[a] if a < len(args) else None
        if isinstance(t, torch.Tensor) and t.numel() and bool((~((t >= lo) & (t <= hi))).any()):
            raise ValueError(f"{base} needs every element of argument {a} in [{lo}, {hi}]")
    spec = srg_ops.INDEX_CHECKS.get(base)
    if spec is None:
        return
    kind, ia, xa, extra = spec
    if len(args) <= max(ia, xa) or not isinstance(args[xa], torch.Tensor):
        return
    x, idx = args[xa], args[ia]
    if kind == "list":  # a list of per-dim indices (None: the whole dim)
        for dim, t in enumerate(idx or ()):
            if isinstance(t, torch.Tensor) and dim < max(1, x.dim()):
                _in_range(t, -_size(x, dim), _size(x, dim), f"dimension {dim}")
        return
    if not isinstance(idx, torch.Tensor):
        return
    if kind == "dim":
        dim = args[extra] if extra < len(args) and isinstance(args[extra], int) else 0
        if -x.dim() <= dim < max(1, x.dim()):
            n = _size(x, dim)
            _in_range(idx, -n, n, f"dimension {dim}")
    elif kind == "rows":
        _in_range(idx, 0, _size(x, 0), "dimension 0")
        offsets = args[extra] if extra is not None and extra < len(args) else None
        if isinstance(offsets, torch.Tensor):
            _in_range(offsets, 0, idx.numel() + 1, "the indices (offsets)")
    elif kind == "flat":
        _in_range(idx, -x.numel(), x.numel(), "the flattened input")
    elif kind in ("class", "last", "multilabel"):
        c = (x.shape[1] if x.dim() >= 2 else _size(x, 0)) if kind == "class" else _size(x, -1)
        ignore = (args[extra] if extra < len(args) and isinstance(args[extra], int) else -100) if kind == "class" else None
        t = idx[idx != ignore] if ignore is not None else idx
        _in_range(t, -1 if kind == "multilabel" else 0, c, "the classes")
    elif kind == "unpool":
        size = args[extra] if extra < len(args) else None
        if isinstance(size, (list, tuple)) and all(isinstance(d, int) for d in size):
            _in_range(idx, 0, math.prod(size), "the output")


def _size(x: torch.Tensor, dim: int) -> int:
    return x.shape[dim] if x.dim() else 1


def _in_range(t: torch.Tensor, lo: int, hi: int, what: str) -> None:
    if t.dtype in (torch.bool, torch.uint8) or t.numel() == 0 or t.dtype.is_floating_point:
        return
    bad = (t < lo) | (t >= hi)
    if bool(bad.any()):
        raise IndexError(f"index {t[bad].flatten()[0].item()} is out of bounds for {what} with size {hi}")


def _check_group_offsets(args: tuple) -> None:
    """`_grouped_mm(a, b, offs)`: the kernel reads the rows (2-d x 3-d), columns (3-d x 2-d) or inner
    dim (2-d x 2-d) of each group between consecutive offsets, unchecked on the device: the offsets
    must rise from 0 and stay within that dim, one per group (a MoE graph computes them with histc and
    cumsum of its router's choices, so they always do)."""
    if len(args) < 3 or not all(isinstance(t, torch.Tensor) for t in args[:2]) or not isinstance(args[2], torch.Tensor):
        return
    a, b, offs = args[:3]
    if a.dim() == 2 and b.dim() == 3:
        n, groups = a.shape[0], b.shape[0]
    elif a.dim() == 3 and b.dim() == 2:
        n, groups = b.shape[1], a.shape[0]
    elif a.dim() == 2 and b.dim() == 2:
        n, groups = a.shape[1], None
    else:
        return
    if offs.dim() != 1 or (groups is not None and offs.numel() != groups):
        raise IndexError(f"_grouped_mm offsets of shape {list(offs.shape)} for {groups} groups")
    if offs.numel() == 0:
        return
    o = offs.long()
    if bool((o < 0).any()) or bool((o > n).any()) or bool((o[1:] < o[:-1]).any()):
        raise IndexError(f"_grouped_mm offsets {o.tolist()[:8]} must rise from 0 to at most {n}")
