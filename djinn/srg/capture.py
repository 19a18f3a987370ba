"""Capture: run code once over meta tensors under a dispatch mode and record its aten ops as an SRG.

`Recorder` is the one mechanism for both the graph path (`capture_module`: a module's forward, once per
input signature) and lazy ops (djinn/frontend/lazy.py: ops on RemoteTensors). It is a
`TorchDispatchMode` (every aten op, after autograd and composite decomposition) plus a
`TorchFunctionMode` that records a few composites whole (Note [Composite ops] in srg/ops.py), plus
global module hooks for the module path each op ran under. Parameters and buffers are meta tensors
named by their content hash; nothing is computed on real data except known values.

Note [Known values]
    Meta tensors have no data, so `t.item()`, `bool(t)` and `if t.all():` cannot be answered, and code
    like transformers' mask helpers does exactly that (`padding_mask.all()` to skip the causal mask).
    A value that depends only on constants and shapes (arange, ones, a literal) is the same on every
    call with this input signature, so the recorder also computes such small tensors for real on the
    CPU and answers `.item()` from them; Python control flow on them is then captured correctly.
    Small integer inputs (masks, ids) are known too, and a value read from them is a guard on the
    capture (Note [Input values] in srg/guards.py). A value that depends on a weight or a float
    input is not known: reading it is a CaptureError naming the op and the module path.

Note [Graph breaks]
    Some shapes and values exist only on the server: the shape of `nonzero`, `unique`, `masked_select`
    or a boolean-mask read of a tensor computed from weights, and a Python value read from one
    (`.item()`, `bool(t)`, `int(t)`, `.tolist()`, `if t.sum() > 0:`). torch.compile splits its graph there and runs Python
    between the pieces; a capture cannot, since it runs before anything runs on the server. It probes
    instead: at such an op (an "event") it sends the graph recorded so far, ending in that op or
    reading that tensor, as a probe (run_graph with probe: true: run, report dtype, shape, strides and
    values, keep nothing), and goes on with the answer, there and then, from inside the op: k events
    cost k probes, each running the graph up to its event (at most MAX_BREAKS a capture). The
    graph holds each answer as a check the interpreter makes where the node runs: a data-dependent
    node must give the shape its probe found, and a value read must hold (`Graph.expects`); otherwise
    the run stops there with GuardFailed before anything recorded after it runs, so a capture reused for
    another input can never compute with a stale shape. A graph-path call then captures again and
    retries once, and stops reusing captures with events for that input signature. A probe and the
    run that follows it draw from the same seeded stream, so a random op before an event agrees.
    Ops whose inputs are all known values (Note [Known values]) need no probe: they are computed here.
    Lazy ops (frontend/lazy.py) probe the same way, over the session's pending graph.

Note [Weights are read-only]
    An in-place op whose target is a weight, or a view of one, would change the Text segment that
    other tenants share. The recorder refuses it at capture (naming the weight and the module), and
    the server refuses it again when it checks a graph (srg/graph.py is not trusted to be honest).
"""
from __future__ import annotations

import os
import sys
import threading
import time
from types import FunctionType
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.nn.modules import module as nn_module
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from ..protocol.errors import CaptureError
from ..protocol.tensors import is_remote
from . import fastpaths
from . import ops as srg_ops
from .graph import (CONST, DECODE, IN, MAX_ARGS, MAX_CONST_BYTES, PREFILL, WEIGHT, Graph, Lifecycle, ModuleCall, Node,
                    Ref, TensorMeta)
from .guards import Guards, ValueGuard
from .layout import InputLayout, layout_of
from .tree import flatten, is_cache, tensor_leaves, unflatten

_KNOWN_MAX_ELEMENTS = 1 << 16   # Note [Known values]: bigger tensors are never computed on the client
_META = torch.device("meta")
_CPU = torch.device("cpu")
_ITEM = torch.ops.aten._local_scalar_dense.default
_UNKNOWN = object()
MAX_BREAKS = 256  # Note [Graph breaks]: probes per capture
MAX_VALUES = 4096  # values a probe reads back for `.tolist()`


def probe_answer(kind: str, reply: Any, site: str, n_out: int) -> Any:
    """Note [Graph breaks]: what a capture takes from the server's probe report (one [dtype, shape,
    strides, values] per output it asked about): a "shape" event's output metas, a "value"'s scalar or
    a "values"' `.tolist()`."""
    from ..protocol.tensors import DTYPES
    try:
        if kind == "values":  # `.tolist()`: every value, as torch gives them
            if reply[0][3] is None:
                raise CaptureError(f"{site}: `.tolist()` of a tensor of shape {list(reply[0][1])} reads more "
                                   f"than {MAX_VALUES} values from the server; fetch it after the call instead")
            return reply[0][3]
        if kind == "value":
            value = reply[0][3]
            while isinstance(value, list) and len(value) == 1:  # tolist() of a one-element tensor
                value = value[0]
            if type(value) not in (bool, int, float):
                raise CaptureError(f"{site}: a tensor of shape {list(reply[0][1])} has no single value to read")
            return value
        if len(reply) != n_out:
            raise ValueError(f"{len(reply)} outputs for {n_out}")
        return [(DTYPES[d], tuple(shape), tuple(stride)) for d, shape, stride, _ in reply]
    except CaptureError:
        raise
    except Exception as e:
        raise CaptureError(f"{site}: the server's probe answer is malformed ({e})") from None


@dataclass(frozen=True)
class OpInfo:
    name: str
    allowed: bool
    cost: str
    random: bool
    mutable: bool
    view_of: tuple      # per return: index of the positional argument it aliases, or None
    writes: tuple       # positional argument indices the op writes to
    refused: str | None = None  # why the graph path does not run it (Note [Op table] in srg/ops.py)


_INFO: dict[Any, OpInfo] = {}


def op_info(func) -> OpInfo:
    info = _INFO.get(func)
    if info is None:
        name = str(func)
        schema = func._schema
        sets = [a.alias_info for a in schema.arguments]
        view_of = []
        for r in schema.returns:
            idx = None
            if r.alias_info is not None:
                for i, a in enumerate(sets):
                    if a is not None and a.before_set == r.alias_info.before_set:
                        idx = i
                        break
            view_of.append(idx)
        writes = tuple(i for i, a in enumerate(sets) if a is not None and a.is_write)
        entry = srg_ops.lookup(name)
        info = OpInfo(name, entry is not None and entry.refused is None, srg_ops.cost_class(name),
                      entry is not None and entry.kind == srg_ops.RANDOM, schema.is_mutable, tuple(view_of), writes,
                      entry.refused if entry is not None else "not an aten op this torch registers")
        _INFO[func] = info
    return info


class Recorder:
    """Records aten ops on meta tensors into `self.graph`. Use as a context manager (reentrant per op
    for lazy recording). Inputs and weight slots are declared before the code runs."""

    def __init__(self, *, lazy: bool = False):
        self.graph = Graph()
        self.lazy = lazy                      # real tensors become inputs (uploaded) instead of constants
        self.refs: dict[int, tuple[Ref, torch.Tensor]] = {}   # id(meta tensor) -> (ref, tensor kept alive)
        self.known: dict[int, torch.Tensor] = {}              # Note [Known values]
        self.from_input: set[int] = set()     # ids of known metas that depend on an input (Note [Input values])
        self.known_nodes: list[int] = []      # nodes whose outputs were computed for real, in order
        self.guards: list[ValueGuard] = []    # Note [Input values]
        self.roots: list[int] = []            # node -> the node whose storage it views (itself if none)
        self.slots: dict[int, tuple[str, str, torch.Tensor]] = {}  # id(meta weight) -> (name, hash, meta)
        self.input_values: list[Any] = []     # what the k-th input is (a tensor, a handle, ...)
        self.module_paths: dict[int, str] = {}
        self.stack: list[str] = []
        self.where = ""
        self.muted = 0
        self.ops_recorded = 0
        self.record_calls = False             # Note [Module calls] (module captures)
        self._open_calls: list[tuple[str, int, tuple, int]] = []
        self._hook_events = 0                 # one counter for pre-hooks and hooks (ModuleCall order)
        self._thread = threading.get_ident()
        self._modes: list = []
        self.probe: Callable[[dict], Any] | None = None  # Note [Graph breaks]: asks the server; None: no breaks
        self.events = 0                       # events probed so far

    # -- declarations ------------------------------------------------------------------------------
    def add_input(self, meta: torch.Tensor, value: Any, lifecycle: Lifecycle = Lifecycle.STACK,
                  known: torch.Tensor | None = None) -> Ref:
        """`known`: the input's value, for small integer inputs (Note [Input values])."""
        ref = self._node(IN, (), {}, [meta], lifecycle)
        self.input_values.append(value)
        if known is not None:
            self.known[id(meta)] = known
            self.from_input.add(id(meta))
            self.known_nodes.append(ref.node)
        return ref

    def add_weight_slot(self, meta: torch.Tensor, name: str, h: str) -> None:
        self.slots[id(meta)] = (name, h, meta)

    def ref_of(self, t: torch.Tensor) -> Ref | None:
        e = self.refs.get(id(t))
        if e is not None and e[1] is t:
            return e[0]
        return None

    # -- context ---------------------------------------------------------------------------------
    def __enter__(self) -> "Recorder":
        fm, dm = _FunctionMode(self), _DispatchMode(self)
        fm.__enter__()
        dm.__enter__()
        hooks = [nn_module.register_module_forward_pre_hook(self._pre_hook),
                 nn_module.register_module_forward_hook(self._post_hook, always_call=True)]
        self._modes.append((fm, dm, hooks))
        return self

    def __exit__(self, *exc) -> None:
        fm, dm, hooks = self._modes.pop()
        for h in hooks:
            h.remove()
        dm.__exit__(*exc)
        fm.__exit__(*exc)

    def _pre_hook(self, module, args):
        if threading.get_ident() == self._thread:
            parent = self.stack[-1] if self.stack else ""
            self.stack.append(self.module_paths.get(id(module), f"{parent}.<{type(module).__name__}>".lstrip(".")))
            if self.record_calls:
                self._hook_events += 1
                self._open_calls.append((self.stack[-1], len(self.graph.nodes), self._refs_in(args), self._hook_events))

    def _post_hook(self, module, args, output):
        if threading.get_ident() == self._thread and self.stack:
            path = self.stack.pop()
            if self.record_calls and self._open_calls:
                p, start, ins, opened = self._open_calls.pop()
                self._hook_events += 1
                if p and p == path and id(module) in self.module_paths:  # named submodules only
                    self.graph.calls.append(ModuleCall(p, start, len(self.graph.nodes), ins, self._refs_in(output),
                                                       opened, self._hook_events))

    def _refs_in(self, obj) -> tuple:
        """Refs of the recorded tensors in a module's arguments or output, in the order a breakpoint
        sees them (tree.tensor_leaves), at most MAX_ARGS // 2 a side so that from_wire's bound on a
        call's ins and outs together always holds (a stop exposes the first ones)."""
        refs = (self.ref_of(t) for t in tensor_leaves(obj))
        return tuple(r for r in refs if r is not None)[:MAX_ARGS // 2]

    @property
    def path(self) -> str:
        return self.stack[-1] if self.stack else ""

    def _site(self, op: str) -> str:
        """Where an op ran, for errors: module path and the user's line (a lazy op carries its own)."""
        where = f"module '{self.path}'" if self.path else "the top-level module" if not self.lazy else ""
        line = self.where or user_site(_INTERNAL)
        if line != "?":
            where = f"{where} at {line}".strip()
        return f"{op} in {where}" if where else op

    # -- recording -------------------------------------------------------------------------------
    def _node(self, op: str, args: tuple, kwargs: dict, outs: list[torch.Tensor], lifecycle: Lifecycle,
              cost: str = "memory", view_of: tuple = ()) -> Ref:
        idx = len(self.graph.nodes)
        self.graph.nodes.append(Node(op, args, kwargs, [TensorMeta.of(t) for t in outs], self.path,
                                     lifecycle, cost, self.where))
        root = idx
        for k, src in enumerate(view_of):
            if src is not None:
                root = self.roots[src]
        self.roots.append(root)
        for k, t in enumerate(outs):
            self.refs[id(t)] = (Ref(idx, k), t)
        return Ref(idx, 0)

    def _convert(self, v: Any, consts_ok: bool = True):
        """One argument -> (wire value, meta value, known value or _UNKNOWN)."""
        if is_remote(v):  # Note [Remote tensors are not data]: lazy.apply and capture_module give their metas
            raise CaptureError(f"{self._site('a remote tensor')} reached the recorder itself; it has no data here")
        if isinstance(v, torch.Tensor):
            e = self.refs.get(id(v))
            if e is not None and e[1] is v:
                return e[0], v, self.known.get(id(v), _UNKNOWN)
            slot = self.slots.get(id(v))
            if slot is not None and slot[2] is v:
                name, h, meta = slot
                ref = self._node(WEIGHT, (h,), {"name": name}, [meta], Lifecycle.TEXT)
                return ref, meta, _UNKNOWN
            if v.device.type == "meta":
                if v.numel() == 0:  # e.g. a cache layer's torch.tensor([]) placeholder: no data to miss
                    ref = self._node(CONST, (torch.empty_strided(v.shape, v.stride(), dtype=v.dtype),), {}, [v],
                                     Lifecycle.STACK)
                    return ref, v, _UNKNOWN
                raise CaptureError(f"{self._site('a meta tensor')} was not produced by the capture (a tensor made "
                                   "without an aten op the capture sees; make it with torch.tensor, or on the CPU)")
            real = v.detach()
            meta = torch.empty_strided(real.shape, real.stride(), dtype=real.dtype, device=_META)
            if self.lazy:  # a local tensor mixed into remote ones: it is uploaded with the flush
                ref = self.add_input(meta, real.to(_CPU, copy=True), Lifecycle.STACK)
                return ref, meta, _UNKNOWN
            nbytes = real.numel() * real.element_size()
            if nbytes > MAX_CONST_BYTES:
                raise CaptureError(f"{self._site('a tensor')} of {nbytes} bytes is neither a parameter nor a buffer; "
                                   "register it as a buffer so it is uploaded once with the weights")
            ref = self._node(CONST, (real.to(_CPU).contiguous(),), {}, [meta], Lifecycle.STACK)
            self.known[id(meta)] = real.to(_CPU)
            self.known_nodes.append(ref.node)
            return ref, meta, real.to(_CPU)
        if isinstance(v, (list, tuple)):
            parts = [self._convert(x) for x in v]
            known = [p[2] for p in parts]
            return ([p[0] for p in parts], type(v)(p[1] for p in parts) if isinstance(v, tuple) else [p[1] for p in parts],
                    _UNKNOWN if any(k is _UNKNOWN for k in known) else known)
        if isinstance(v, torch.device):
            return v, _META, _CPU
        return v, v, v

    def dispatch(self, func, args: tuple, kwargs: dict):
        if func.namespace != "aten":  # prim.device and friends: metadata queries, not ops
            if any("Tensor" in str(r.type) for r in func._schema.returns):  # a custom op (torch_nn::, a library's)
                raise CaptureError(f"{self._site(str(func))}: the graph path runs aten ops only, and this op is "
                                   f"outside aten (namespace {func.namespace!r}) (Note [Op table])")
            return func(*args, **kwargs)
        if func in _BOOL_READS and self.probe is not None and not self.muted:
            return _BOOL_READS[func](self, *args, **kwargs)
        if func is _ITEM:
            known = self.known.get(id(args[0]), _UNKNOWN)
            if known is _UNKNOWN and self.probe is not None:
                return self._value_break(args[0])
            if known is _UNKNOWN:
                ref = self.ref_of(args[0])
                made_by = f" of the result of {self.graph.nodes[ref.node].op}" if ref is not None else ""
                raise CaptureError(
                    f"control flow on a tensor's value ({self._site('.item() / bool(tensor)' + made_by)}): the value "
                    "depends on a weight or a float input, so it is not known until the graph runs and cannot be "
                    "captured")
            value = known.item()
            if id(args[0]) in self.from_input:  # Note [Input values]: reused only while this holds
                self.guards.append(ValueGuard(self.ref_of(args[0]), value))
            return value
        info = op_info(func)
        if self.muted:
            margs = [self._convert_muted(a) for a in args]
            mkw = {k: self._convert_muted(v) for k, v in kwargs.items()}
            return func(*margs, **mkw)
        if not info.allowed:
            raise CaptureError(f"{self._site(info.name)}: the graph path does not run this op: {info.refused} "
                               "(Note [Op table])")
        conv = [self._convert(a) for a in args]
        kconv = {k: self._convert(v) for k, v in kwargs.items()}
        for i in info.writes:
            self._check_write(info.name, conv[i][0] if i < len(conv) else None)
        try:
            out = self._meta_call(func, info, conv, kconv)
        except CaptureError:
            raise
        except Exception as e:
            if torch.Tag.dynamic_output_shape not in func.tags:
                raise CaptureError(f"{self._site(info.name)} failed: {type(e).__name__}: {e}") from None
            out = self._shape_break(func, info, conv, kconv, e)  # `x[mask]`: the mask's values set the shape
        outs = _tensor_outputs(out, info.name, self)
        view_of = tuple(conv[i][0].node if (i is not None and i < len(conv) and isinstance(conv[i][0], Ref))
                        else None for i in info.view_of) if info.view_of else ()
        life = Lifecycle.STACK
        if view_of and all(v is not None for v in view_of):
            life = min(self.graph.nodes[self.roots[v]].lifecycle for v in view_of)
            life = Lifecycle.TEXT if life == Lifecycle.TEXT else Lifecycle.STACK
        self._node(info.name, tuple(c[0] for c in conv), {k: c[0] for k, c in kconv.items()}, outs, life,
                   info.cost, view_of)
        self.ops_recorded += 1
        if info.random:
            self.graph.random = True
        self._propagate(func, info, conv, kconv, out, outs)
        return out

    # -- graph breaks (Note [Graph breaks]) ---------------------------------------------------------
    def _ask(self, kind: str, refs: list[Ref], site: str) -> Any:
        """Probe the server about `refs` (the graph recorded so far, up to them) and return the answer."""
        if self.events >= MAX_BREAKS:
            raise CaptureError(f"{site}: more than {MAX_BREAKS} data-dependent shapes or values in one capture "
                               "(Note [Graph breaks]); each costs a probe")
        self.events += 1
        self.graph.outputs = refs
        wire = self.graph.to_wire()
        self.graph.outputs = []
        with _outside_capture():
            reply = self.probe(wire)
        return probe_answer(kind, reply, site, len(refs))

    def _value_break(self, t: torch.Tensor, kind: str = "value"):
        ref = self._convert(t)[0]
        value = self._ask(kind, [ref], self._site(".item() / bool(tensor)" if kind == "value" else ".tolist()"))
        self.graph.expects.append((ref, value))
        return value

    def tolist(self, t: torch.Tensor):
        """`t.tolist()` of a recorded tensor: its known values, else a graph break (Note [Graph breaks])."""
        known = self.known.get(id(t), _UNKNOWN)
        if known is not _UNKNOWN:
            if id(t) in self.from_input:  # Note [Input values]
                self.guards.append(ValueGuard(self.ref_of(t), known.tolist()))
            return known.tolist()
        if self.probe is None:
            raise CaptureError(f"{self._site('.tolist()')}: the values depend on a weight or a float input, so they "
                               "are not known until the graph runs and cannot be captured")
        return self._value_break(t, "values")

    def _shape_break(self, func, info: OpInfo, conv, kconv, err: Exception):
        """The outputs of a data-dependent op: computed here from known values, else a probe's answer."""
        tensor_args = [c for c in list(conv) + list(kconv.values()) if _has_tensor(c[1])]
        if tensor_args and all(c[2] is not _UNKNOWN for c in tensor_args) and not info.random:
            try:
                real = func(*[c[2] for c in conv], **{k: c[2] for k, c in kconv.items()})
            except Exception as e:
                raise CaptureError(f"{self._site(info.name)} failed: {type(e).__name__}: {e}") from None
            for c in tensor_args:  # Note [Input values]: the shape came from these values
                for t in (c[1] if isinstance(c[1], (list, tuple)) else (c[1],)):
                    if isinstance(t, torch.Tensor) and id(t) in self.from_input:
                        self.guards.append(ValueGuard(self.ref_of(t), self.known[id(t)].tolist()))
            return _metas_like(real)
        if self.probe is None:
            raise CaptureError(f"{self._site(info.name)}: its output's shape depends on tensor values here, and this "
                               f"capture cannot probe the server for it (Note [Graph breaks]); {type(err).__name__}: "
                               f"{str(err)[:200]}")
        n = len(func._schema.returns)
        holders = [torch.empty((0,), device=_META) for _ in range(n)]  # placeholders the probe reports on
        ref = self._node(info.name, tuple(c[0] for c in conv), {k2: c[0] for k2, c in kconv.items()}, holders,
                         Lifecycle.STACK, info.cost)
        try:
            answer = self._ask("shape", [Ref(ref.node, j) for j in range(n)], self._site(info.name))
        finally:  # the caller records the op again, with the real shapes
            del self.graph.nodes[ref.node:], self.roots[ref.node:]
        outs = [torch.empty_strided(shape, stride, dtype=dtype, device=_META) for dtype, shape, stride in answer]
        return outs[0] if n == 1 else tuple(outs)

    def _meta_call(self, func, info: OpInfo, conv, kconv):
        """Run the op on meta tensors. Note [Meta memo]: many meta kernels are Python (torch._refs) and
        cost ~100 us; an op that neither aliases nor writes gives outputs fully determined by its
        arguments' dtypes, shapes and strides and its other arguments, so repeated layers reuse them."""
        margs = [c[1] for c in conv]
        mkw = {k: c[1] for k, c in kconv.items()}
        if info.mutable or info.random or any(v is not None for v in info.view_of):
            return srg_ops.meta_call(func, margs, mkw)
        try:
            key = (func, _memo_key(margs), _memo_key(mkw))
            hash(key)
        except TypeError:
            return srg_ops.meta_call(func, margs, mkw)
        hit = _MEMO.get(key)
        if hit is None:
            out = srg_ops.meta_call(func, margs, mkw)
            outs = out if isinstance(out, (list, tuple)) else (out,)
            if all(isinstance(t, torch.Tensor) for t in outs):
                _MEMO[key] = (type(out) if isinstance(out, (list, tuple)) else None,
                              [(tuple(t.shape), tuple(t.stride()), t.dtype) for t in outs])
                if len(_MEMO) > 100_000:
                    _MEMO.clear()
            return out
        kind, metas = hit
        outs = [torch.empty_strided(sh, st, dtype=dt, device=_META) for sh, st, dt in metas]
        return outs[0] if kind is None else kind(outs)

    def _convert_muted(self, v):
        if isinstance(v, torch.Tensor) and v.device.type != "meta":
            return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=_META)
        if isinstance(v, torch.device):
            return _META
        if isinstance(v, (list, tuple)):
            return type(v)(self._convert_muted(x) for x in v)
        return v

    def _check_write(self, op: str, target: Any) -> None:
        if isinstance(target, Ref):
            root = self.graph.nodes[self.roots[target.node]]
            if root.op == WEIGHT:
                raise CaptureError(f"{self._site(op)} writes to the weight '{root.kwargs.get('name')}' in place: "
                                   "weights are read-only on the graph path (Note [Weights are read-only]); "
                                   "use module.eval() or clone it first")

    def _propagate(self, func, info: OpInfo, conv, kconv, out, outs: list) -> None:
        """Note [Known values]: compute small shape-only values for real."""
        tensor_args = [c for c in list(conv) + list(kconv.values()) if _has_tensor(c[1])]
        all_known = all(c[2] is not _UNKNOWN for c in tensor_args) and not info.random
        if all_known and sum(t.numel() for t in outs) <= _KNOWN_MAX_ELEMENTS:
            try:
                real = func(*[c[2] for c in conv], **{k: c[2] for k, c in kconv.items()})
            except Exception:
                real = None
            if real is not None:
                reals = real if isinstance(real, (list, tuple)) else [real]
                inputs = any(i in self.from_input for c in tensor_args for i in _ids(c[1]))
                for m, r in zip(outs, reals):
                    if isinstance(r, torch.Tensor):
                        self.known[id(m)] = r
                        if inputs:
                            self.from_input.add(id(m))
                self.known_nodes.append(len(self.graph.nodes) - 1)
                return
        if info.writes and self.known:  # an unknown write: every alias of the target is unknown now
            for i in info.writes:
                ref = conv[i][0] if i < len(conv) else None
                if isinstance(ref, Ref):
                    root = self.roots[ref.node]
                    for tid, (r, _) in list(self.refs.items()):
                        if tid in self.known and self.roots[r.node] == root:
                            del self.known[tid]

    def factory(self, func, args: tuple, kwargs: dict):
        """Note [Tensors made in a forward]: data made into a tensor on the capture's device."""
        kwargs = dict(kwargs)
        if func is torch.Tensor.new_tensor:
            src, data = args[0], args[1]
            device = kwargs.pop("device", None) or src.device
            kwargs.setdefault("dtype", src.dtype)
            make, margs = torch.tensor, (data,)
        else:
            data, device = args[0] if args else kwargs.get("data"), kwargs.pop("device", None)
            make, margs = func, args
        if self.muted or device is None or torch.device(device).type != "meta" or _has_tensor_in(data):
            return func(*args, **kwargs) if func is not torch.Tensor.new_tensor else func(*args, device=device,
                                                                                       **kwargs)
        with _disable_current_modes():  # the dispatch mode is still on in a function-mode handler
            try:
                real = make(*margs, **kwargs)  # on the CPU: the values the capture must keep
            except Exception as e:
                raise CaptureError(f"{self._site(getattr(func, '__name__', str(func)))} failed: "
                                   f"{type(e).__name__}: {e}") from None
            return self._convert(real)[1]  # a constant in the graph, and a known value

    def index(self, func, args: tuple, kwargs: dict):
        """Note [Tensors made in a forward]: `x[[0, 2]]` indexes by a tensor torch makes from the list
        on x's device, outside any op the capture sees; made on the CPU here, it becomes a constant."""
        idx = args[1]
        if isinstance(idx, list) and _int_list(idx):
            idx = _cpu_index(idx)
        elif isinstance(idx, tuple) and any(isinstance(i, list) and _int_list(i) for i in idx):
            idx = tuple(_cpu_index(i) if isinstance(i, list) and _int_list(i) else i for i in idx)
        return func(args[0], idx, *args[2:], **kwargs)

    def function(self, func, args: tuple, kwargs: dict):
        """Note [Composite ops]: record these calls whole."""
        name = srg_ops.composite(func)
        if name is None or self.muted or (name in srg_ops.RNN_OPS and not srg_ops.rnn_input_overload(args, kwargs)):
            return func(*args, **kwargs)
        pos, kw = srg_ops.composite_args(name, func, args, kwargs)
        if name == srg_ops._DROPOUT and (not pos[2] or pos[1] == 0.0 or dict(zip(
                ("input", "p", "training", "inplace"), args), **kwargs).get("inplace")):
            return func(*args, **kwargs)  # the identity, or in place: recorded op by op
        conv = [self._convert(a) for a in pos]
        kconv = {k: self._convert(v) for k, v in kw.items()}
        if name in srg_ops.RNN_OPS:  # Note [RNNs recorded whole]: the server gives the kernel the same flags
            for r, m in zip(conv[2][0], conv[2][1]):
                if isinstance(r, Ref) and self.graph.nodes[r.node].op == WEIGHT and m.requires_grad:
                    self.graph.nodes[r.node].kwargs["grad"] = True
        if name.endswith("batch_norm.default") and pos[5]:
            for i in (3, 4):
                self._check_write(name, conv[i][0])
        try:  # Note [Meta memo], for composites: SDPA's meta path alone was half of a GPT-2 capture
            key = (name, _memo_key([c[1] for c in conv]), _memo_key({k: c[1] for k, c in kconv.items()}))
            hash(key)
        except TypeError:
            key = None
        hit = _COMPOSITE_MEMO.get(key) if key is not None else None
        self.muted += 1
        try:
            if hit is not None:
                out = torch.empty_strided(hit[0], hit[1], dtype=hit[2], device=_META)
            else:
                out = func(*args, **kwargs)
                if key is not None and isinstance(out, torch.Tensor) and out.device.type == "meta":
                    if len(_COMPOSITE_MEMO) > 10_000:
                        _COMPOSITE_MEMO.clear()
                    _COMPOSITE_MEMO[key] = (tuple(out.shape), tuple(out.stride()), out.dtype)
        except Exception as e:
            raise CaptureError(f"{self._site(name)} failed: {type(e).__name__}: {e}") from None
        finally:
            self.muted -= 1
        outs = _tensor_outputs(out, name, self)
        self._node(name, tuple(c[0] for c in conv), {k: c[0] for k, c in kconv.items()}, outs,
                   Lifecycle.STACK, srg_ops.cost_class(name))
        self.ops_recorded += 1
        if ((name.endswith("scaled_dot_product_attention.default") and pos[4]) or name == srg_ops._DROPOUT
                or (name in srg_ops.RNN_OPS and pos[5] and pos[6])):  # an RNN's dropout between layers
            self.graph.random = True
        return out


_MEMO: dict = {}  # Note [Meta memo]
_COMPOSITE_MEMO: dict = {}  # composite name and argument metas -> the output's (shape, stride, dtype)


def _memo_key(v):
    if isinstance(v, torch.Tensor):
        return (v.dtype, tuple(v.shape), tuple(v.stride()))
    if isinstance(v, (list, tuple)):
        return tuple(_memo_key(x) for x in v)
    if isinstance(v, dict):
        return tuple((k, _memo_key(x)) for k, x in v.items())
    if isinstance(v, float):
        return ("f", v)  # 1 and 1.0 pick different overload behaviour (dtype promotion)
    return v


_A = torch.ops.aten


def _equal(rec: Recorder, a: torch.Tensor, b: torch.Tensor) -> bool:
    """Note [Graph breaks]: `torch.equal` returns a Python bool, so it is recorded as what it computes,
    `eq(a, b).all()`, and its value read (an event, unless known): False without a read for other shapes."""
    if tuple(a.shape) != tuple(b.shape):
        return False
    t = rec.dispatch(_A.all.default, (rec.dispatch(_A.eq.Tensor, (a, b), {}),), {})
    return bool(rec.dispatch(_ITEM, (t,), {}))


def _allclose(rec: Recorder, a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-05, atol: float = 1e-08,
              equal_nan: bool = False) -> bool:
    """`torch.allclose` as ATen's isclose computes it (TensorCompare.cpp), then `.all()` read as a value."""
    if a.dtype != b.dtype:
        raise CaptureError(f"{rec._site('allclose')}: {a.dtype} and {b.dtype} differ (torch.allclose needs one dtype)")
    d = rec.dispatch
    close = d(_A.eq.Tensor, (a, b), {})
    if equal_nan and (a.is_floating_point() or a.is_complex()):
        close = d(_A.bitwise_or.Tensor, (close, d(_A.bitwise_and.Tensor, (d(_A.isnan.default, (a,), {}),
                                                                            d(_A.isnan.default, (b,), {})), {})), {})
    if rtol != 0 or atol != 0:
        if not (a.is_floating_point() or a.is_complex()):
            a = d(_A._to_copy.default, (a,), {"dtype": torch.get_default_dtype()})
            b = d(_A._to_copy.default, (b,), {"dtype": torch.get_default_dtype()})
        allowed = d(_A.add.Tensor, (d(_A.abs.default, (d(_A.mul.Tensor, (b, rtol), {}),), {}), atol), {})
        actual = d(_A.abs.default, (d(_A.sub.Tensor, (a, b), {}),), {})
        within = d(_A.bitwise_and.Tensor, (d(_A.ne.Scalar, (actual, float("inf")), {}),
                                           d(_A.le.Tensor, (actual, allowed), {})), {})  # isfinite: NaN fails le
        close = d(_A.bitwise_or.Tensor, (close, within), {})
    return bool(d(_ITEM, (d(_A.all.default, (close,), {}),), {}))


_BOOL_READS = {_A.equal.default: _equal, _A.allclose.default: _allclose}


class _outside_capture:
    """No capture mode while a probe goes over the wire: packing its inputs runs torch code of its own."""

    def __enter__(self):
        self._fmodes = [torch._C._pop_torch_function_stack() for _ in range(torch._C._len_torch_function_stack())]
        self._dmodes = _disable_current_modes()
        self._dmodes.__enter__()

    def __exit__(self, *exc):
        self._dmodes.__exit__(*exc)
        for m in reversed(self._fmodes):
            torch._C._push_on_torch_function_stack(m)


def _metas_like(real: Any) -> Any:
    if isinstance(real, torch.Tensor):
        return torch.empty_strided(real.shape, real.stride(), dtype=real.dtype, device=_META)
    return type(real)(_metas_like(t) for t in real)


def _ids(v) -> list[int]:
    if isinstance(v, torch.Tensor):
        return [id(v)]
    return [i for x in v for i in _ids(x)] if isinstance(v, (list, tuple)) else []


def _has_tensor(v) -> bool:
    if isinstance(v, torch.Tensor):
        return True
    return isinstance(v, (list, tuple)) and any(_has_tensor(x) for x in v)


def _tensor_outputs(out: Any, name: str, rec: Recorder) -> list[torch.Tensor]:
    if out is None and name in srg_ops.NO_RESULT_OK:
        return []
    outs = out if isinstance(out, (list, tuple)) else [out]
    if not all(isinstance(t, torch.Tensor) for t in outs):
        raise CaptureError(f"{rec._site(name)} returned a non-tensor value; it cannot be captured")
    return list(outs)


class _DispatchMode(TorchDispatchMode):
    def __init__(self, rec: Recorder):
        super().__init__()
        self.rec = rec

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self.rec.dispatch(func, args, kwargs or {})


class _FunctionMode(TorchFunctionMode):
    def __init__(self, rec: Recorder):
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func, types, args=(), kwargs=None):
        body = _REENTRANT.get(func)
        if body is not None and not self.rec.muted:  # Note [Nested composites]
            with self:
                return body(*args, **(kwargs or {}))
        if func is torch.Tensor.tolist and not self.rec.muted and args and isinstance(args[0], torch.Tensor) \
                and args[0].device.type == "meta":
            return self.rec.tolist(args[0])
        if func in _COMPOSITES:
            return self.rec.function(func, args, kwargs or {})
        if func in _FACTORIES:
            return self.rec.factory(func, args, kwargs or {})
        if func in _VALUE_ARGS and len(args) > 1 and isinstance(args[1], torch.Tensor):
            known = self.rec.known.get(id(args[1]))  # Note [Known values]: tensor_split reads its indices on the CPU
            if known is not None:
                if id(args[1]) in self.rec.from_input:  # Note [Input values]: reused only while they are the same
                    self.rec.guards.append(ValueGuard(self.rec.ref_of(args[1]), known.tolist()))
                return func(args[0], known.tolist(), *args[2:], **(kwargs or {}))  # 0-d: sections, 1-d: indices
        if func in _INDEXING and len(args) >= 2 and isinstance(args[1], (list, tuple)) and not self.rec.lazy:
            return self.rec.index(func, args, kwargs or {})
        return func(*args, **(kwargs or {}))


# Note [Tensors made in a forward]: `torch.tensor(c, device=x.device)` and friends copy Python data into
# a tensor outside any aten op (lift_fresh sees the finished tensor), so on the meta device the values
# are lost and the tensor later looks "not produced by the capture". They are made on the CPU instead
# and recorded as constants (at most MAX_CONST_BYTES, like any tensor a forward holds), which are also
# known values (Note [Known values]). Lists as indices likewise (`_INDEXING`).
_FACTORIES = frozenset({torch.tensor, torch.as_tensor, torch.asarray, torch.Tensor.new_tensor})
_INDEXING = frozenset({torch.Tensor.__getitem__, torch.Tensor.__setitem__})
#: Functions that read a tensor argument's values on the CPU (not an aten op): given its known value.
_VALUE_ARGS = frozenset({torch.tensor_split, torch.Tensor.tensor_split})
_INTERNAL = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,
             os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)  # djinn's and torch's frames


def _int_list(v) -> bool:
    return bool(v) and all(_int_list(x) if isinstance(x, list) else (type(x) is int) for x in v)


def _cpu_index(v: list) -> torch.Tensor:
    with _disable_current_modes():
        return torch.tensor(v, dtype=torch.long)


def _has_tensor_in(v) -> bool:
    if isinstance(v, torch.Tensor):
        return True
    return isinstance(v, (list, tuple)) and any(_has_tensor_in(x) for x in v)


def _no_torch_function(*args) -> bool:
    return False


def _reentrant(fn):
    """Note [Nested composites]: a copy of a torch.nn.functional function written in Python whose
    `has_torch_function*` checks answer no, so its body runs with the capture's function mode on."""
    g = dict(fn.__globals__, has_torch_function=_no_torch_function, has_torch_function_unary=_no_torch_function,
             has_torch_function_variadic=_no_torch_function)
    body = FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__, fn.__closure__)
    body.__kwdefaults__ = fn.__kwdefaults__
    return body


# Note [Nested composites]
#     A TorchFunctionMode is off while its handler runs, so the composites a torch.nn.functional
#     function written in Python calls (F.multi_head_attention_forward calls SDPA and dropout) would
#     reach the dispatch mode decomposed, not recorded whole (Note [Composite ops]). Calling the
#     function again with the mode on would only call the handler again (its first line asks
#     `has_torch_function`). For the functions listed here, the handler runs a copy of the function's
#     body whose `has_torch_function*` names answer False, with the mode re-entered: its nested calls
#     are seen, and it does not recurse. Nothing global is patched (the copy has its own globals).
_REENTRANT = {f: _reentrant(f) for f in (torch.nn.functional.multi_head_attention_forward,)}

_COMPOSITES = frozenset({torch.nn.functional.scaled_dot_product_attention, torch.nn.functional.batch_norm,
                         torch.batch_norm, torch.nn.functional.dropout, *srg_ops._RNNS})


# -- module capture -----------------------------------------------------------------------------------
def leaf_key(x: Any):
    """Tensor leaves of a call's arguments (tree.flatten's is_leaf): local tensors only (Note [Remote
    tensors are not data]; the graph path's own leaf_key takes RemoteTensors as handles)."""
    if isinstance(x, torch.Tensor) and not is_remote(x):
        return ("$T", x.dtype, tuple(x.shape))
    return None


def is_leaf_spec(spec: Any) -> bool:
    return type(spec) is tuple and len(spec) == 3 and spec[0] in ("$T", "$R")


@dataclass
class Captured:
    """One capture: the graph, its wire form and signature, and the output structure around its outputs."""
    graph: Graph
    wire: dict
    sig: str
    out_spec: Any
    out_protos: list
    ops: int
    seconds: float
    layout: InputLayout  # how the call's tensor leaves become the graph's inputs (Note [Input layout])
    guards: Guards       # what this call's input values must give to reuse it (Note [Input values])
    events: int = 0      # Note [Graph breaks]: data-dependent shapes and values the capture probed
    writes_inputs: bool = False  # some node writes an input in place (a retried run would write it twice)


def capture_module(module: torch.nn.Module, args: tuple, kwargs: dict, hashes: dict[str, str],
                   leaf: Callable[[Any], Any] = leaf_key, data_leaf: Callable[[Any], bool] = lambda x: False,
                   probe: Callable[[dict], Any] | None = None) -> Captured:
    """Record `module(*args, **kwargs)` as an SRG. `hashes`: parameter/buffer name -> weight hash.
    `leaf(x)` keys a tensor-like leaf (local tensors, RemoteTensors); `data_leaf(x)` says it is
    session state (a handle), which makes its input node Data. `probe(wire)`: runs a probe graph on the
    server and returns its report (Note [Graph breaks]); without it a data-dependent shape or value is
    a CaptureError."""
    t0 = time.perf_counter()
    leaves: list = []
    protos: list = []
    spec = flatten((tuple(args), dict(kwargs)), leaves, leaf, protos)
    cache_leaves = _cache_leaf_ids(args, kwargs, leaf)
    rec = Recorder()
    rec.probe = probe
    rec.record_calls = True
    rec.module_paths = {id(m): name for name, m in module.named_modules()}
    layout = layout_of(leaves)
    values = layout.values(leaves)
    metas: list = [None] * len(leaves)
    storages: dict[int, torch.Tensor] = {}  # group -> its 1-d meta storage (Note [Input layout])
    for kind, k in layout.inputs():
        value = values[len(rec.input_values)]
        if kind == "leaf":
            x = leaves[k]
            metas[k] = torch.empty(tuple(x.shape), dtype=x.dtype, device=_META)
            data = data_leaf(x) or id(x) in cache_leaves
            rec.add_input(metas[k], x, Lifecycle.DATA if data else Lifecycle.STACK, _known_input(value))
        else:
            g = layout.groups[k]
            storages[k] = torch.empty((g.hi - g.lo,), dtype=g.dtype, device=_META)
            data = any(v is not None and v.group == k and id(leaves[i]) in cache_leaves
                       for i, v in enumerate(layout.views))
            rec.add_input(storages[k], leaves[g.first], Lifecycle.DATA if data else Lifecycle.STACK,
                          _known_input(value))
    params: dict[str, torch.Tensor] = {}
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        # Note [Stand-ins]: requires_grad too: at::matmul folds a batched matmul into one mm only when the
        # weight does not require grad, and eager calls see the module's own flag (even under no_grad).
        meta = torch.empty_strided(tuple(t.shape), t.stride(), dtype=t.dtype, device=_META,
                                   requires_grad=t.requires_grad and (t.dtype.is_floating_point or t.dtype.is_complex))
        params[name] = meta
        if name not in hashes:
            raise CaptureError(f"weight {name!r} has no hash (was the module changed after djinn.remote?)")
        rec.add_weight_slot(meta, name, hashes[name])
    with torch.no_grad(), rec:
        for i, v in enumerate(layout.views):  # each argument as a view of its storage, recorded first
            if v is not None:
                metas[i] = torch.as_strided(storages[v.group], v.size, v.stride, v.offset)
    call_args, call_kwargs = unflatten(spec, metas, protos, is_leaf_spec)
    rec.graph.phase = DECODE if _has_past(call_args, call_kwargs) else PREFILL
    with torch.no_grad(), rec, fastpaths.install(module):  # Note [Fast paths]
        out = torch.func.functional_call(module, params, tuple(call_args), call_kwargs, strict=False,
                                         tie_weights=True)
    out_leaves: list = []
    out_protos: list = []
    out_spec = flatten(out, out_leaves, leaf_key, out_protos)
    for t in out_leaves:
        ref = rec.ref_of(t)
        if ref is None:
            raise CaptureError(f"{type(module).__name__} returned a tensor the capture did not produce")
        rec.graph.outputs.append(ref)
        node = rec.graph.nodes[ref.node]
        if node.lifecycle != Lifecycle.TEXT:
            node.lifecycle = Lifecycle.DATA
    wire = rec.graph.to_wire()
    from .graph import signature

    last = max((g.ref.node for g in rec.guards), default=-1)
    guards = Guards(tuple(rec.guards), tuple(i for i in rec.known_nodes if i <= last))
    return Captured(rec.graph, wire, signature(wire), out_spec, out_protos, rec.ops_recorded,
                    time.perf_counter() - t0, layout, guards, rec.events, rec.events > 0 and _writes_inputs(rec))


def _writes_inputs(rec: Recorder) -> bool:
    """Whether a node writes (in place) a graph input or a view of one."""
    for node in rec.graph.nodes:
        fn = srg_ops.ALLOWED.get(node.op) if not node.op.startswith("$") else None
        if fn is None:
            continue
        for pos, name in srg_ops.written_args(fn, node.args, node.kwargs):
            a = node.args[pos] if pos < len(node.args) else node.kwargs.get(name)
            for r in (a if isinstance(a, (list, tuple)) else (a,)):
                if isinstance(r, Ref) and rec.graph.nodes[rec.roots[r.node]].op == IN:
                    return True
    return False


def _known_input(value: Any) -> torch.Tensor | None:
    """Note [Input values]: a small local integer or bool input is a known value (a copy: the
    recorder may run in-place ops on it)."""
    if (isinstance(value, torch.Tensor) and not is_remote(value) and value.device.type != "meta"
            and value.numel() <= _KNOWN_MAX_ELEMENTS
            and not value.dtype.is_floating_point and not value.dtype.is_complex):
        return value.detach().to(_CPU, copy=True)
    return None


def _cache_leaf_ids(args, kwargs, leaf) -> set[int]:
    ids: set[int] = set()
    for v in list(args) + list(kwargs.values()):
        if is_cache(v):
            for layer in v.layers:
                ids.update(id(t) for t in vars(layer).values() if leaf(t) is not None)
    return ids


def _has_past(args, kwargs) -> bool:
    """Phase: a call that continues a KV cache with tokens in it is a decode step; anything else prefill."""
    for v in list(args) + list(kwargs.values()):
        if is_cache(v):
            for layer in v.layers:
                keys = getattr(layer, "keys", None)
                if keys is not None and keys.dim() >= 2 and keys.shape[-2] > 0:
                    return True
    return False


def user_site(skip_prefixes: tuple[str, ...]) -> str:
    """'file.py:12' of the first frame outside djinn and torch (where the user wrote the op)."""
    f = sys._getframe(1)
    while f is not None:
        fn = f.f_code.co_filename
        if not any(p in fn for p in skip_prefixes):
            return f"{fn.rsplit('/', 1)[-1]}:{f.f_lineno}"
        f = f.f_back
    return "?"
