"""RemoteTensor: a handle to a tensor that lives in a server session.

Shape, dtype and device are known locally (no round trip). Data crosses the wire only when it is
materialized: `.cpu()` (or `.to("cpu")`), `.tolist()`, `.item()`, `.numpy()`, `np.asarray(t)`,
`format(t, ".3f")` of a 0-d tensor (frontend/lazy.py, as torch.Tensor does). `.device` is the
server's device as a torch.device; `.to(that device)` keeps the tensor there (LazyOps.to in
frontend/lazy.py). A RemoteTensor is a torch.Tensor subclass without storage (Note [Remote tensors
are Tensors] in frontend/lazy.py), so torch's unbound C methods (`torch.Tensor.sum(t)`) take it as
they take a local tensor. The server copy is freed when the handle is garbage-collected (queued in
the session's outbox, frontend/outbox.py, and sent with its next request). In-place edits (`add_`,
`t[idx] = v`, `t[idx] += v`, `copy_`) and views (`t[:, -1]`) come from `edits.Editable`.
"""
from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch

from ..protocol.errors import HandleNotFound
from . import lazy
from .edits import Editable

if TYPE_CHECKING:
    from .session import Session


class Scope:
    """The lifetime of handles the server frees by itself: a Stop's tensors live only while its run is
    paused there (frontend/run.py ends the scope when the run moves on). A handle of an ended scope
    raises `gone` at its next use, instead of sending an id the server answers with HandleNotFound."""

    __slots__ = ("gone", "ended")

    def __init__(self, gone: str):
        self.gone = gone
        self.ended = False

    def end(self) -> None:
        self.ended = True


class RemoteTensor(Editable):
    """A server tensor handle, or a pending one: the result of lazy ops not yet run (frontend/lazy.py),
    which gets its handle when the session's pending graph is flushed."""

    __slots__ = ("_hid", "_meta", "_scope", "_session")

    def __new__(cls, session: "Session", hid: str, dtype: torch.dtype, shape, device: "str | torch.device"):
        # shape, dtype and the server's device live in the storage-less tensor itself (Note [Remote
        # tensors are Tensors] in frontend/lazy.py): `.device` is a torch.device, as torch code expects
        return cls._shell(shape, dtype, device)

    def __init__(self, session: "Session", hid: str, dtype: torch.dtype, shape, device: "str | torch.device"):
        self._hid = hid
        self._meta = None
        self._scope: Scope | None = None
        self._session = session
        weakref.finalize(self, session.outbox.free, hid)

    @classmethod
    def pending(cls, session: "Session", meta: torch.Tensor) -> "RemoteTensor":
        t = cls._shell(meta.shape, meta.dtype, session.conn.device, meta.stride())
        t._hid, t._meta, t._session, t._scope = None, meta, session, None
        return t

    def _bind(self, hid: str) -> None:
        self._hid, self._meta = hid, None
        weakref.finalize(self, self._session.outbox.free, hid)

    @property
    def hid(self) -> str:
        """The server handle; a pending tensor's graph is flushed first (one request)."""
        if self._meta is not None:
            lazy.flush(self._session)
        self.check_live()
        return self._hid

    def check_live(self) -> None:
        """Raise HandleNotFound, saying why, if the server freed this tensor with its scope."""
        if self._scope is not None and self._scope.ended:
            raise HandleNotFound(self._scope.gone)

    def _target(self):
        return self, ()

    # -- metadata without a round trip --
    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return len(self.shape)

    ndim = property(dim)

    def numel(self) -> int:
        return self.shape.numel()

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    # -- materialization: the only points where data crosses the wire --
    def cpu(self) -> torch.Tensor:
        if self._meta is not None:
            return lazy.materialize(self)  # the pending chain and this fetch: one round trip
        return self._session.fetch([self])[0]

    def numpy(self):
        return self.cpu().numpy()

    def tolist(self):
        return self.cpu().tolist()

    def item(self):
        return self.cpu().item()

    def __repr__(self, *, tensor_contents=None) -> str:  # torch.Tensor's signature; never fetches
        state = "pending" if self._meta is not None else "gone" if self._scope and self._scope.ended else "remote"
        return f"RemoteTensor(shape={list(self.shape)}, dtype={self.dtype}, device='{self.device}', {state})"
