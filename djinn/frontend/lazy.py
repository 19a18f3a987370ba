"""Lazy tensor ops (DESIGN.md section 4.3): ops on RemoteTensors are recorded, not run.

`(out.logits[:, -1] / t).softmax(-1).topk(5)` records select, div, _softmax and topk into the session's
pending SRG, with the same Recorder as the graph path (srg/capture.py), over meta tensors: shapes and
dtypes are known at once, and a shape error raises where it is written, as in torch. The results are
pending RemoteTensors. Materializing one (`.cpu()`, `.tolist()`, `.item()`, `.numpy()`, `bool()`) flushes
the whole pending graph as one `run_graph` request: one round trip for a whole chain. Every pending
tensor still alive becomes a session handle in that same request; intermediates nobody holds stay on
the server's Stack and are freed. An error while the graph runs on the server (an index out of range,
say) raises at materialization, naming the op and the file:line where the user wrote it.

Note [Lazy order]
    Pending ops read the session's tensors when they run, at the flush. An in-place edit of a concrete
    RemoteTensor (frontend/edits.py) is applied before the next request's work, so writing one while
    ops are pending flushes them first: the ops see the tensor as it was when they were written.
    In-place ops on pending tensors (`y = x * 2; y[:, 0].add_(1)`) are recorded in the graph itself.
    A paused run's resume or cancel flushes them too, while the stop's tensors still exist (Note [Lazy
    ops on a stop] in frontend/run.py).
"""
from __future__ import annotations

import os
import secrets
import weakref
from typing import Any

import torch

from ..protocol.errors import InvalidRequest
from ..srg.capture import Recorder, user_site
from ..srg.graph import Lifecycle, signature

_SKIP = (os.sep + "djinn" + os.sep, os.sep + "torch" + os.sep)
_META = torch.device("meta")


class _Pending:
    """One session's pending lazy graph."""

    def __init__(self) -> None:
        self.rec = Recorder(lazy=True)
        self.seed = secrets.randbits(62)            # a graph with breaks: its probes' and its run's stream
        self.live: list[weakref.ref] = []          # pending RemoteTensors, in creation order
        self.handles: dict[str, torch.Tensor] = {}  # handle id -> its meta input
        self.keep: list = []                        # concrete RemoteTensors used: alive until the flush


_STATE: "weakref.WeakKeyDictionary[Any, _Pending]" = weakref.WeakKeyDictionary()
_KNOWN: "weakref.WeakKeyDictionary[Any, set]" = weakref.WeakKeyDictionary()  # signatures the server holds


def pending(session) -> bool:
    st = _STATE.get(session)
    return st is not None and bool(st.rec.graph.nodes)


def _first_base(obj: Any):
    """The RemoteTensor under the first remote argument (a RemoteView's base), or None.

    Remote arguments are recognized as LazyOps and reached through `_target()`, not by importing
    tensor.py and edits.py, which import this module: that keeps the frontend free of import cycles."""
    if isinstance(obj, LazyOps):
        return obj._target()[0]
    if isinstance(obj, (list, tuple)):
        for x in obj:
            b = _first_base(x)
            if b is not None:
                return b
    if isinstance(obj, dict):
        return _first_base(list(obj.values()))
    return None


def apply(func, args: tuple, kwargs: dict | None = None) -> Any:
    """Record `func(*args, **kwargs)` where some arguments are RemoteTensors; return pending results,
    RemoteTensors of the same class as the remote arguments (as torch keeps a subclass)."""
    kwargs = kwargs or {}
    first = _first_base((args, kwargs))
    session = first._session
    st = _STATE.get(session)
    if st is None:
        st = _STATE[session] = _Pending()
        st.rec.probe = _prober(session, st)  # Note [Graph breaks]
    rec = st.rec
    rec.where = user_site(_SKIP)

    def base_meta(x):  # a RemoteTensor's meta stand-in: its pending value, else a graph input
        if x._session is not session:
            raise InvalidRequest("a RemoteTensor can only be used in the session that holds it")
        if x._meta is not None:
            return x._meta
        x.check_live()
        m = st.handles.get(x._hid)
        if m is None:
            m = st.handles[x._hid] = torch.empty(tuple(x.shape), dtype=x.dtype, device=_META)
            rec.add_input(m, {"$h": x._hid}, Lifecycle.DATA)
            st.keep.append(x)
        return m

    def to_meta(x):
        if isinstance(x, LazyOps):  # a RemoteTensor (empty chain) or a RemoteView of one
            base, chain = x._target()
            m = base_meta(base)
            if chain:
                with rec:
                    for index in chain:
                        m = m[index]
            return m
        if isinstance(x, (list, tuple)):
            return type(x)(to_meta(v) for v in x)
        if isinstance(x, dict):
            return {k: to_meta(v) for k, v in x.items()}
        return x

    margs, mkw = to_meta(tuple(args)), to_meta(kwargs)
    with rec:
        out = func(*margs, **mkw)
    return _wrap(out, type(first), session, st)


def _prober(session, st: _Pending):
    """Note [Graph breaks] (srg/capture.py): the session's pending graph so far, run as a probe."""
    def probe(graph: dict):
        return session.call("run_graph", {"probe": True, "graph": graph, "inputs": list(st.rec.input_values),
                                          "seed": st.seed})["probe"]
    return probe


def _wrap(out: Any, tensor_type: type, session, st: _Pending) -> Any:
    if isinstance(out, torch.Tensor):
        if st.rec.ref_of(out) is None:
            raise InvalidRequest("a lazy op returned a tensor the recorder did not produce")
        t = tensor_type.pending(session, out)
        st.live.append(weakref.ref(t))
        return t
    if isinstance(out, tuple) and hasattr(out, "_fields") or type(out).__module__ == "torch.return_types":
        return type(out)([_wrap(v, tensor_type, session, st) for v in out])
    if isinstance(out, (list, tuple)):
        return type(out)(_wrap(v, tensor_type, session, st) for v in out)
    return out


def flush(session, fetch: tuple = ()) -> list[torch.Tensor]:
    """Run the session's pending graph in one request; bind every live pending tensor to a handle and
    return the data of `fetch` (pending RemoteTensors)."""
    st = _STATE.pop(session, None)
    if st is None or not st.rec.graph.nodes:
        return []
    for x in st.keep:  # an input freed by the server since it was recorded (a stop's tensor after resume)
        x.check_live()
    live = [t for t in (r() for r in st.live) if t is not None and t._meta is not None]
    g = st.rec.graph
    g.outputs = [st.rec.ref_of(t._meta) for t in live]
    for r in g.outputs:
        g.nodes[r.node].lifecycle = Lifecycle.DATA
    wire = g.to_wire()
    sig = signature(wire)
    known = _KNOWN.setdefault(session, set())
    index = {id(t): k for k, t in enumerate(live)}
    args = {"sig": sig, "inputs": st.rec.input_values, "fetch": [index[id(t)] for t in fetch]}
    if st.rec.events:  # Note [Graph breaks]: the stream its probes drew from
        args["seed"] = st.seed
    if sig not in known:
        args["graph"] = wire
    res = session.call("run_graph", args)
    if res.get("missing"):
        res = session.call("run_graph", dict(args, graph=wire))
    known.add(sig)
    for t, packed in zip(live, res["outputs"]):
        t._bind(packed["$t"][0])
    return res["tensors"]


def materialize(t) -> torch.Tensor:
    """A pending RemoteTensor's value (flushes the pending graph)."""
    return flush(t._session, (t,))[0]


def materialize_view(view) -> torch.Tensor:
    """A view of a pending tensor: record the indexing, then flush."""
    y = apply(lambda x: x, (view,))
    return materialize(y)


def before_edit(session) -> None:
    """Note [Lazy order]: pending ops run before an edit of a concrete tensor is applied."""
    if pending(session):
        flush(session)


# -- the op surface ---------------------------------------------------------------------------------
_OPERATORS = """__add__ __radd__ __sub__ __rsub__ __mul__ __rmul__ __truediv__ __rtruediv__ __floordiv__
__rfloordiv__ __mod__ __pow__ __rpow__ __matmul__ __rmatmul__ __neg__ __pos__ __abs__ __invert__ __and__
__or__ __xor__ __lt__ __le__ __gt__ __ge__ __eq__ __ne__""".split()


# Note [Remote tensors are Tensors]
#     RemoteTensor and RemoteView are torch.Tensor subclasses without storage: "wrapper subclasses"
#     (torch.Tensor._make_wrapper_subclass, as torch/testing/_internal/logging_tensor.py and FakeTensor
#     make them), whose tensor carries the shape, dtype and the server's device (cuda:0 on a CPU-only
#     client too: no memory is allocated) and nothing else. Being Tensors is what lets torch's own C
#     methods take them: `torch.Tensor.sum(t)` is a method descriptor of torch._C.TensorBase, and
#     CPython refuses a self that is not one before torch sees the call; a subclass passes, and torch
#     then hands the call to `__torch_function__` as it does `t.sum()` and `torch.sum(t)`. Nothing in
#     torch is patched. `__torch_function__` answers every call, in this order:
#       - reading an attribute that is metadata (`.shape`, `.dtype`, `.device`, `.is_cuda`, `.grad`):
#         from the storage-less tensor itself, with subclass torch functions off (_LOCAL_ATTRS); tensor
#         valued attributes (`.T`, `.mT`, `.real`, `.data`) are lazy ops like any other;
#       - torch.equal and allclose (Note [Comparisons answer here]);
#       - a torch.Tensor method this class defines itself (`torch.Tensor.cpu(t)`, `.to`, `.__getitem__`,
#         `.size`, an edit): that method (_own_method), so a conversion fetches and indexing is a view;
#       - anything else: a lazy op (`apply`), recorded on meta stand-ins.
#     So no call reaches torch's dispatcher with a remote tensor; if one did (a C++ path that skips
#     torch functions), `__torch_dispatch__` refuses it by name rather than read memory that is not there.
#     `isinstance(t, torch.Tensor)` is True for them: code that sends or groups local tensors asks
#     `is_remote` first (protocol/tensors.py, Note [Remote tensors are not data]). Python protocols
#     keep their remote meaning: `repr` never fetches, `iter` and `in` are refused, `hash` is by
#     identity, `==` is a lazy op, `operator.index` is refused (no fetch behind `range(t)`), numpy
#     functions see the fetched value and give numpy results (`__array__`, `__array_wrap__`), and
#     pickling or deep-copying a handle is refused (it names a tensor of one live session); `copy.copy`
#     too, since a second handle object would free the tensor twice. torch's in-place operators that
#     the edit table lacks (`t /= v`) act in place on this object (edits.py), as `t += v` does.
class LazyOps(torch.Tensor):
    """Tensor operations on remote tensors, recorded lazily (the base of RemoteTensor and RemoteView).
    Subclasses provide `_target() -> (the RemoteTensor, the index chain)`: `apply` reaches both kinds
    through it."""

    __slots__ = ()
    __hash__ = object.__hash__
    _djinn_remote = True  # Note [Remote tensors are not data] (protocol/tensors.py)

    @classmethod
    def _shell(cls, shape, dtype: torch.dtype, device, strides=None):
        """The storage-less tensor of a new remote tensor (Note [Remote tensors are Tensors])."""
        return torch.Tensor._make_wrapper_subclass(
            cls, tuple(shape), strides=None if strides is None else tuple(strides), dtype=dtype,
            device=torch.device(device), requires_grad=False)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in _LOCAL_ATTRS:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        compare = _COMPARISONS.get(func)
        if compare is not None:  # Note [Comparisons answer here]
            return compare(*args, **(kwargs or {}))
        own = _own_method(func, args)
        if own is not None:  # `torch.Tensor.__format__(t, spec)` means `t.__format__(spec)`: it may fetch
            return own(*args[1:], **(kwargs or {}))
        return apply(func, args, kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise InvalidRequest(f"{func} reached torch's dispatcher with a remote tensor, which has no data on this "
                             "machine: call it through torch (t.op(), torch.op(t)) to record it, or fetch with .cpu()")

    def __getattr__(self, name: str):  # only names torch.Tensor lacks get here
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def to(self, *args, **kwargs):
        """As torch: `.to("cpu")` is this tensor here (a local torch.Tensor, data crosses the wire), the
        server's device (`.to(t.device)`, "cuda" on a CUDA server) keeps it there, a dtype converts it
        there (a lazy op). On a CPU server "cpu" means here: the client is where `.to` moves data to."""
        device, dtype, copy = _to_args(args, kwargs)
        if device is not None and device.type == "cpu":
            local = self.cpu()
            return local if dtype is None else local.to(dtype)
        if device is not None:
            here = self.device
            if device.type != here.type or device.index not in (None, here.index):
                raise InvalidRequest(f".to({str(device)!r}): this tensor lives on the server's {here}; .to('cpu') "
                                     "brings it here, and the server's device is the only other one it can be on")
        if dtype is not None and dtype != self.dtype:
            return apply(torch.Tensor.to, (self, dtype))
        return apply(torch.Tensor.clone, (self,)) if copy else self

    def cuda(self, device=None, non_blocking: bool = False):
        """Stays on the server if it is a CUDA server (as `.to("cuda")`)."""
        if isinstance(device, int):
            device = torch.device("cuda", device)
        return self.to("cuda" if device is None else device)

    def __bool__(self) -> bool:
        return bool(self.item())

    def __format__(self, spec: str) -> str:
        """As torch.Tensor.__format__: a 0-d tensor formats its value (`f"{loss:.3f}"`, one fetch);
        any other falls back to object's (str() for an empty spec, TypeError for another)."""
        if self.dim() == 0:
            return format(self.item(), spec)
        return object.__format__(self, spec)

    def __array__(self, dtype=None, copy=None):
        """`np.asarray(t)`: the value, fetched (a fresh array, so `copy` is moot), as torch converts."""
        a = self.numpy()
        return a if dtype is None else a.astype(dtype, copy=False)

    def __float__(self) -> float:
        return float(self.item())

    def __int__(self) -> int:
        return int(self.item())

    def __complex__(self) -> complex:
        return complex(self.item())

    def __index__(self):
        # as before remote tensors were Tensors: `range(t)`, `lst[t]` do not fetch behind the user's back
        raise TypeError(f"'{type(self).__name__}' object cannot be interpreted as an integer; use int(t) or t.item()")

    def __iter__(self):
        # Not iterable on purpose: iterating would fetch element by element. Materialize first.
        raise TypeError(f"a {type(self).__name__} is not iterable; call .cpu() or .tolist() first")

    def __contains__(self, element):
        raise TypeError(f"a {type(self).__name__} is not iterable; call .cpu() or .tolist() first")

    def __array_wrap__(self, array, context=None, return_scalar=False):
        """A numpy function of a remote tensor (`np.exp(t)`) works on its fetched value (`__array__`)
        and gives numpy's result, as it did before remote tensors were Tensors."""
        return array[()] if return_scalar else array

    def __dir__(self):
        return object.__dir__(self)

    def __reduce_ex__(self, protocol):
        raise TypeError(f"a {type(self).__name__} is a handle to a tensor of a live server session and cannot be "
                        "pickled or copied: .cpu() gives its value, .clone() a new server tensor")

    def __deepcopy__(self, memo):
        return self.__reduce_ex__(4)


# Note [Comparisons answer here]
#     torch.equal and torch.allclose return a Python bool, which no graph can hold (Note [Op table]:
#     a result only the server would know). On remote tensors they are answered as torch answers them:
#     the comparison is recorded as a lazy op that gives a 0-d bool tensor (`(a == b).all()`,
#     `isclose(a, b, rtol, atol, equal_nan).all()`, which is what allclose computes), and its value is
#     fetched: one flush of the pending graph. `equal` of tensors whose shapes or dtypes differ is False
#     without a request, as torch.equal says (it does not broadcast); allclose broadcasts, and raises on
#     mismatched dtypes, as torch does.
def _equal(a, b) -> bool:
    if tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
        return False
    return bool(apply(lambda x, y: torch.eq(x, y).all(), (a, b)).item())


def _allclose(a, b, rtol: float = 1e-05, atol: float = 1e-08, equal_nan: bool = False) -> bool:
    return bool(apply(lambda x, y: torch.isclose(x, y, rtol=rtol, atol=atol, equal_nan=equal_nan).all(),
                      (a, b)).item())


_COMPARISONS = {torch.equal: _equal, torch.Tensor.equal: _equal, torch.allclose: _allclose,
                torch.Tensor.allclose: _allclose}


def _own_method(func, args: tuple):
    """`t.name` bound, when `func` is torch.Tensor's unbound `name` called on a remote tensor `t` whose
    class defines `name` itself (a conversion that fetches, a metadata query, an edit); None for the
    rest, which are lazy ops. C methods (`torch.Tensor.cpu(t)`) get here as those written in Python do
    (Note [Remote tensors are Tensors])."""
    name = getattr(func, "__name__", None)
    if not args or not isinstance(args[0], LazyOps) or not name or getattr(torch.Tensor, name, None) is not func:
        return None
    if any(name in vars(k) for k in type(args[0]).__mro__ if issubclass(k, LazyOps)):  # not torch.Tensor's
        return getattr(args[0], name)
    return None


# Note [Remote tensors are Tensors]: attributes answered by the storage-less tensor itself. Every getter
# of torch._C.TensorBase but those that give a tensor, which are lazy ops like any other.
_LAZY_ATTRS = {"T", "H", "mT", "mH", "real", "imag", "data"}
_LOCAL_ATTRS = frozenset(v.__get__ for n, v in vars(torch._C.TensorBase).items()
                         if type(v).__name__ == "getset_descriptor" and n not in _LAZY_ATTRS)


def _to_args(args: tuple, kwargs: dict) -> tuple[torch.device | None, torch.dtype | None, bool]:
    """(device, dtype, copy) of a Tensor.to call: to(dtype), to(device, dtype), to(other), keywords."""
    kwargs = dict(kwargs)
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    flags = [kwargs.pop("non_blocking", False), kwargs.pop("copy", False)]
    kwargs.pop("memory_format", None)
    if kwargs:
        raise TypeError(f"to() got unexpected keyword arguments {sorted(kwargs)}")
    positional_flags = []
    for a in args:
        if isinstance(a, bool):
            positional_flags.append(a)  # non_blocking, then copy, as in torch
        elif isinstance(a, torch.dtype):
            dtype = a
        elif isinstance(a, (str, torch.device, int)):
            device = a
        elif isinstance(a, LazyOps):  # another remote tensor: its dtype, and it is on the server too
            dtype = a.dtype
        elif isinstance(a, torch.Tensor):
            device, dtype = a.device, a.dtype
        else:
            raise TypeError(f"to() takes a device, a dtype or a tensor, got {type(a).__name__}")
    flags[:len(positional_flags)] = positional_flags
    return (None if device is None else torch.device(device)), dtype, bool(flags[1])


def _operator(name: str):
    fn = getattr(torch.Tensor, name)

    def method(self, *args):
        return apply(fn, (self,) + args)

    method.__name__ = name
    return method


for _name in _OPERATORS:
    setattr(LazyOps, _name, _operator(_name))
