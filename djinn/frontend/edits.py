"""In-place edits of remote tensors, recorded on the client: `stop.activation[:, -1] += steer`.

`t.add_(v)`, `t[idx] += v`, `t[idx] = local`, `t.copy_(local)` append an edit record to the session's
outbox (frontend/outbox.py). The session ships the queue with its next resume, fork, fetch or run_graph,
or as an `edit` op before any other request, so edits apply on the server in the order they were written, and before anything reads
or runs on from the edited tensor. `t[idx]` is a RemoteView: a basic-indexing view descriptor whose
shape is known locally, which can be edited or fetched (`t[:, -1].cpu()` moves only that slice).
Indices by value (`t[idx_tensor]`, `t[mask] = 0`) are lazy ops instead (Note [Advanced indices]).
This is a small explicit record, not lazy ops: arbitrary ops on RemoteTensors (`t.norm(dim=-1)`)
belong to the lazy-op SRG (DESIGN.md section 4.3).
"""
from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Any

import torch

from ..protocol.errors import InvalidRequest
from ..protocol.indexing import encode_chain, normalize
from . import lazy
from .lazy import LazyOps

if TYPE_CHECKING:
    from .session import Session
    from .tensor import RemoteTensor


class Editable(LazyOps):
    """In-place edit methods shared by RemoteTensor and RemoteView (both return self, like torch).
    Other tensor ops come from LazyOps (frontend/lazy.py): they are recorded and run at materialization."""

    __slots__ = ()

    # Subclasses provide `_target() -> (RemoteTensor, index chain)`; shape, dtype and device are the
    # storage-less tensor's own (Note [Remote tensors are Tensors] in frontend/lazy.py).

    def __getitem__(self, index):
        if _by_value(index):  # Note [Advanced indices]
            return lazy.apply(torch.Tensor.__getitem__, (self, _as_tensors(index, read=True)))
        items = normalize(index)
        base, chain = self._target()
        return RemoteView(base, chain + (items,), _view_shape(self.shape, index))

    def __setitem__(self, index, value) -> None:
        if _by_value(index):  # Note [Advanced indices]
            lazy.apply(torch.Tensor.__setitem__, (self, _as_tensors(index), value))
            self._flush_if_concrete()
            return
        view = self[index]
        if isinstance(value, RemoteView) and value._same_as(view):
            return  # `t[i] += v` ends with `t[i] = t[i]`: the add was recorded already
        view.copy_(value)

    def add_(self, other):
        return self._record("add", other)

    def sub_(self, other):
        return self._record("sub", other)

    def mul_(self, other):
        return self._record("mul", other)

    def copy_(self, src):
        return self._record("copy", src)

    def fill_(self, value):
        if not isinstance(value, numbers.Number):
            raise TypeError(f"fill_ takes a number, got {type(value).__name__}")
        return self._record("copy", value)

    def zero_(self):
        return self._record("copy", 0)

    __iadd__ = add_
    __isub__ = sub_
    __imul__ = mul_
    # the other in-place operators (`t /= v`) are set below the class, from _INPLACE_OPERATORS


    def _record(self, op: str, value: Any):
        base, chain = self._target()
        if base._meta is not None or _is_pending(value):  # in place on a pending tensor: part of its graph
            return self._lazy_inplace(op, value)
        lazy.before_edit(base._session)  # Note [Lazy order]
        record = {"h": base.hid, "i": encode_chain(chain), "op": op, "v": _wire_value(base._session, value, self.shape)}
        base._session.outbox.edit(record)
        return self

    def _lazy_inplace(self, op: str, value: Any):
        fn = {"add": torch.Tensor.add_, "sub": torch.Tensor.sub_, "mul": torch.Tensor.mul_, "copy": _copy_}[op]
        lazy.apply(fn, (self, value))
        self._flush_if_concrete()
        return self

    def _flush_if_concrete(self) -> None:
        """After a lazily recorded in-place op: on a concrete tensor it runs now, so a plain fetch of the
        tensor sees it (on a pending one it stays part of the pending graph)."""
        base, _ = self._target()
        if base._meta is None:
            lazy.flush(base._session)

    def _ref(self) -> dict:
        base, chain = self._target()
        return {"h": base.hid, "i": encode_chain(chain)}


# torch's in-place operators beyond the edit table's add, sub and mul. Tensor subclasses inherit them
# (Note [Remote tensors are Tensors] in frontend/lazy.py), so `t /= v` would otherwise be a lazy op whose
# pending result replaces `t`'s name while `t` itself waits for a flush; as torch does, it acts in place
# on this object: recorded lazily and, on a concrete tensor, run at once, as `_lazy_inplace` runs
# in-place ops whose value is pending.
_INPLACE_OPERATORS = ("__itruediv__", "__idiv__", "__ifloordiv__", "__imod__", "__ipow__", "__iand__", "__ior__",
                      "__ixor__", "__ilshift__", "__irshift__")


def _inplace_operator(name: str):
    fn = getattr(torch.Tensor, name)

    def method(self, other):
        lazy.apply(fn, (self, other))
        self._flush_if_concrete()
        return self

    method.__name__ = name
    return method


for _name in _INPLACE_OPERATORS:
    setattr(Editable, _name, _inplace_operator(_name))


class RemoteView(Editable):
    """`remote[index]`: a view of a RemoteTensor by basic indexing. No server call until it is edited
    (the edit is queued) or read (`.cpu()` fetches just the view)."""

    __slots__ = ("base", "chain")

    def __new__(cls, base: "RemoteTensor", chain: tuple, shape: torch.Size):
        return cls._shell(shape, base.dtype, base.device)  # Note [Remote tensors are Tensors]

    def __init__(self, base: "RemoteTensor", chain: tuple, shape: torch.Size):
        self.base, self.chain = base, chain

    def _target(self):
        return self.base, self.chain

    def _same_as(self, other: "RemoteView") -> bool:
        return self.base is other.base and encode_chain(self.chain) == encode_chain(other.chain)

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return self.shape.numel()

    def cpu(self) -> torch.Tensor:
        if self.base._meta is not None:
            return lazy.materialize_view(self)
        return self.base._session.fetch([self])[0]

    def tolist(self):
        return self.cpu().tolist()

    def item(self):
        return self.cpu().item()

    def numpy(self):
        return self.cpu().numpy()

    def __repr__(self, *, tensor_contents=None) -> str:  # torch.Tensor's signature; never fetches
        idx = "".join(_index_repr(i) for i in self.chain)
        return f"RemoteView(<{(self.base._hid or 'pending')[:8]}>{idx}, shape={list(self.shape)}, dtype={self.dtype}, remote)"


def _by_value(index) -> bool:
    """Note [Advanced indices]: an index with a tensor (local or remote), a bool or a list in it selects
    by value, as in torch: reading gives a copy, not a view, so it is a lazy op (aten.index on the
    server, which checks the indices are in range) rather than a RemoteView. Writing is index_put_,
    recorded in the session's pending graph; on a concrete tensor that graph is flushed at once, the
    same read-your-writes order as a queued edit."""
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, (torch.Tensor, Editable, list, bool)) for i in items)


def _as_tensors(index, read: bool = False) -> tuple:
    """List and bool items as local tensors (uploaded with the flush): torch would make them into
    tensors on the indexed tensor's device, here the capture's meta device, where they have no data.
    A read through a boolean mask has as many rows as the mask has True values: a local mask becomes
    its nonzero() indices here; a remote one is known only on the server, which the read probes for
    (Note [Graph breaks] in srg/capture.py)."""
    items = index if isinstance(index, tuple) else (index,)
    out: list = []
    for i in items:
        if isinstance(i, (list, bool)):
            i = torch.tensor(i)
        if read and isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8):
            out.extend(i.bool().nonzero(as_tuple=True) if i.dim() else (i,))
            continue
        out.append(i)
    return tuple(out)


def _copy_(t: torch.Tensor, v: Any) -> torch.Tensor:
    return t.fill_(v) if not isinstance(v, torch.Tensor) else t.copy_(v)


def _is_pending(v: Any) -> bool:
    if isinstance(v, RemoteView):
        return v.base._meta is not None
    return getattr(v, "_meta", None) is not None and isinstance(v, Editable)


def _view_shape(shape: torch.Size, index) -> torch.Size:
    # A meta tensor computes the view's shape (and raises IndexError for an index that does not fit)
    # exactly as torch would, without data.
    return torch.empty(shape, device="meta")[normalize(index)].shape


def _wire_value(session: "Session", value: Any, shape: torch.Size) -> Any:
    if isinstance(value, Editable):
        base, _ = value._target()
        if base._session is not session:
            raise InvalidRequest("a RemoteTensor can only be used in the session that holds it")
        _check_broadcast(value.shape, shape)
        return value._ref()
    if isinstance(value, torch.Tensor):
        _check_broadcast(value.shape, shape)
        # A snapshot: torch would apply the edit now, so a later change to `value` must not leak in.
        return value.detach().to("cpu", copy=True)
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)  # numpy scalars included: msgpack knows only Python numbers
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"cannot edit a remote tensor with a {type(value).__name__}: use a number, a tensor or a "
                    "RemoteTensor of the same session")


def _check_broadcast(src: torch.Size, dst: torch.Size) -> None:
    try:
        ok = torch.broadcast_shapes(src, dst) == dst
    except RuntimeError:
        ok = False
    if not ok:
        raise InvalidRequest(f"an edit's value of shape {list(src)} does not broadcast to the target's {list(dst)}")


def _index_repr(index: tuple) -> str:
    def one(i):
        if i is Ellipsis:
            return "..."
        if isinstance(i, slice):
            return ":".join("" if v is None else str(v) for v in (i.start, i.stop)) + (
                f":{i.step}" if i.step is not None else "")
        return str(i)
    return "[" + ", ".join(one(i) for i in index) + "]"
