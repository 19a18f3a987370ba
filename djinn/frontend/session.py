"""Client-side session: a name for server-side state (KV caches, tensors) that outlives one call."""
from __future__ import annotations

import queue
from collections import deque
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

import torch

from ..protocol import structure
from ..protocol.errors import DjinnError, InvalidRequest, SessionLost
from ..protocol.indexing import encode_chain
from ..protocol.tensors import dtype_from_name
from .stats_view import html_card
from .tensor import RemoteTensor

if TYPE_CHECKING:
    from .connection import Connection
    from .remote import RemoteModel
    from .run import Run

#: Ops that take the queued edits along and apply them before anything else.
_CARRY_EDITS = frozenset({"resume", "fork", "fetch"})


class Session:
    def __init__(self, conn: "Connection", name: str | None = None, *, checkpoint: bool = False,
                 max_kv_tokens: int | None = None, _restored: dict | None = None):
        self.conn = conn
        self.name = name
        self._generation = conn.transport.generation  # the server boot it lives in (transport.py)
        if _restored is None:
            args = {"name": name, "checkpoint": True} if checkpoint else {"name": name}
            if max_kv_tokens is not None:
                args["max_kv_tokens"] = max_kv_tokens
            reply = conn.transport.call("open_session", args)
        else:
            reply = _restored
        self.sid: str = reply["sid"]
        #: With checkpoint=True: the token that restores this session after a server restart.
        self.checkpoint_token: str | None = reply.get("checkpoint_token")
        self.kv_tokens: dict[str, int] = {}            # a restored session: tokens of KV per model id
        self.restored_tensors: dict[str, RemoteTensor] = {}   # a restored session: its tensors by handle
        self.forked_tensors: dict[str, RemoteTensor] = {}     # a forked session: its copies of the parent's
        self.fork_info: dict = {}                             # a forked session: blocks shared, server ms
        self.closed = False
        self._frees: deque[str] = deque()  # append/popleft are atomic: safe from GC finalizers
        self._edits: list[dict] = []       # in-place edits of remote tensors, in order (frontend/edits.py)

    # -- calls -----------------------------------------------------------------------------------
    @property
    def lost(self) -> bool:
        """The server restarted since this session was opened: its server-side state is gone."""
        return self.conn.transport.generation != self._generation

    def _check_alive(self) -> None:
        if self.closed:
            raise DjinnError(f"session {self.name or self.sid[:8]} is closed")
        if self.lost:
            raise SessionLost(f"session {self.name or self.sid[:8]} was lost when the server at "
                              f"{self.conn.address} restarted (its KV caches, tensors and runs are gone); "
                              "open a new session and remote the model again")

    def call(self, op: str, args: dict | None = None, **kw) -> Any:
        self._check_alive()
        self._flush_frees()
        args = dict(args or {}, sid=self.sid)
        if self._edits:
            if op in _CARRY_EDITS:  # applied first, in the same request: no extra round trip
                args["edits"] = self._take_edits()
                kw["idempotent"] = False  # a retry would apply them twice
            else:
                self._flush_edits()
        return self.conn.transport.call(op, args, **kw)

    def submit(self, op: str, args: dict, **kw):
        self._check_alive()
        self._flush_edits()
        return self.conn.transport.submit(op, dict(args, sid=self.sid), **kw)

    def start(self, rm: "RemoteModel", *args, breakpoints=(), method: str = "forward", seed: int | None = None,
              **kwargs) -> "Run":
        """Start `rm(*args, **kwargs)` (or `rm.generate(input_ids, **kwargs)` with method="generate") as a
        run that pauses at `breakpoints`: module paths, layer numbers, or `djinn.Breakpoint`s.

        Returns at once; `run.wait()` gives the first Stop (or None if the run ended without one).
        """
        from .run import Breakpoint, Run

        if method not in ("forward", "generate"):
            raise InvalidRequest(f"method must be 'forward' or 'generate', got {method!r}")
        if isinstance(breakpoints, (str, int, Breakpoint)):
            breakpoints = [breakpoints]
        specs = [Breakpoint.of(b).to_wire() for b in breakpoints]
        rm._attach(self)
        self._flush_frees()
        if getattr(rm, "path", None) == "graph":
            if method != "forward":
                raise InvalidRequest("the graph path runs forward only: start(rm, *args) without method")
            return rm._start(self, args, kwargs, specs, seed)
        fut = self.submit("start", {
            "model_id": rm.model_id, "method": method, "breakpoints": specs, "seed": seed,
            "args": structure.pack(list(args), self._leaf), "kwargs": structure.pack(kwargs, self._leaf),
        })
        return Run(self, rm, method, fut)

    def generate(self, rm: "RemoteModel", input_ids: torch.Tensor, *, stream: bool = False,
                 seed: int | None = None, **kwargs):
        """Generate on the server, continuing from (and keeping) this session's KV cache for `rm`.

        `input_ids` are the tokens that follow everything this session has seen with `rm`. Returns the
        whole sequence so far, as one long `generate` over the concatenation would.
        """
        rm._attach(self)
        return self._generate(rm, input_ids, stream=stream, seed=seed, use_session_kv=True, **kwargs)

    def fork(self, name: str | None = None) -> "Session":
        """A new session that continues from exactly where this one is: the same KV caches (shared
        block by block on the server, copied only where either session writes next), token ids,
        models and a copy of its tensors (in `forked_tensors`, by handle). Generating in one never
        changes the other: branch an agent, try two continuations, keep the better."""
        from ..protocol.tensors import dtype_from_name
        from .tensor import RemoteTensor

        reply = self.call("fork_session", {"name": name})
        child = Session(self.conn, name, _restored=reply)
        child.kv_tokens = dict(reply["kv_tokens"])
        child.forked_tensors = {hid: RemoteTensor(child, hid, dtype_from_name(m["dtype"]), m["shape"],
                                                  self.conn.info["device"]) for hid, m in reply["tensors"].items()}
        child.fork_info = {"shared_blocks": reply["shared_blocks"], "fork_ms": reply["fork_ms"]}
        return child

    def checkpoint_on_shutdown(self, on: bool = True) -> str | None:
        """Ask the server to write this session (KV caches, token ids, tensors) to host memory if it
        shuts down; returns the token for `conn.restore_session(token)` after the restart."""
        self.checkpoint_token = self.call("set_checkpoint", {"on": on})["token"]
        return self.checkpoint_token

    def signal(self, kind: str, eta_s: float | None = None) -> str:
        """Tell the server what this session does next: "IO_WAIT" (it waits on a tool or a user, for
        about `eta_s` seconds if known) or "COMPUTE" (it is back). While it waits the server may move
        its KV cache to host memory and bring it back before `eta_s` is up. Returns the KV's state."""
        kind = kind.upper() if isinstance(kind, str) else kind
        if kind not in ("IO_WAIT", "COMPUTE"):
            raise InvalidRequest(f"signal kind must be 'IO_WAIT' or 'COMPUTE', got {kind!r}")
        return self.call("signal", {"kind": kind, "eta_s": eta_s})["state"]

    @contextmanager
    def io_wait(self, eta_s: float | None = None):
        """`with session.io_wait(eta_s=12): run_tool()`: IO_WAIT on entry, COMPUTE on exit."""
        self.signal("IO_WAIT", eta_s)
        try:
            yield self
        finally:
            if not self.closed and self.conn.transport.dead is None:
                self.signal("COMPUTE")

    def reset(self, rm: "RemoteModel") -> None:
        """Forget this session's KV cache for `rm`."""
        self.call("reset_kv", {"model_id": rm.model_id})

    def stats(self) -> dict:
        return self.conn.stats()["sessions"].get(self.sid, {})

    def close(self) -> None:
        if self.closed:
            return
        if self.lost:  # nothing left to close on the server
            self.closed = True
            return
        try:
            self.call("close_session")
        finally:
            self.closed = True

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        if self.conn.transport.dead is None or self.lost:
            self.close()

    def _repr_html_(self) -> str:
        state = "closed" if self.closed else "lost (the server restarted)" if self.lost else "open"
        rows = [("state", state), ("id", self.sid[:8]), ("server", str(self.conn.address)),
                ("checkpoint on shutdown", "yes" if self.checkpoint_token else "no")]
        return html_card(f"Session {self.name or self.sid[:8]}", rows)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"Session({self.name or self.sid[:8]!r}, {state}, server={self.conn.address})"

    # -- used by RemoteModel / RemoteTensor ------------------------------------------------------
    def _generate(self, rm, input_ids, *, stream, seed, use_session_kv, deterministic: bool = False, **kwargs):
        # deterministic=True: the eager path, bitwise-equal to a local generate, never the batched fast path.
        if not isinstance(input_ids, torch.Tensor):
            raise InvalidRequest("input_ids must be a torch.Tensor")
        args = {"model_id": rm.model_id, "input_ids": input_ids, "kwargs": structure.pack(kwargs, self._leaf),
                "seed": seed, "use_session_kv": use_session_kv, "stream": stream}
        if deterministic:
            args["deterministic"] = True
        if not stream:  # interrupted (Ctrl-C), the server stops it and the session keeps none of it
            return self.call("generate", args, on_interrupt=lambda rid: self._cancel_generate(rid, 0))["sequences"]
        if input_ids.shape[0] != 1:
            raise InvalidRequest("stream=True supports batch size 1 (like transformers' TextStreamer)")
        self._flush_frees()
        q: queue.Queue = queue.Queue()
        fut = self.conn.transport.submit("generate", dict(args, sid=self.sid), stream=q)
        return TokenStream(q, fut, self)

    def _cancel_generate(self, rid: int, keep: int):
        """Stop generate `rid` on the server, the session keeping its first `keep` new tokens (those the
        caller consumed). Not waited for: the server serves it before this client's next request."""
        if self.closed or self.lost or self.conn.transport.dead is not None:
            return None
        try:
            return self.conn.transport.submit("cancel_generate", {"sid": self.sid, "rid": rid, "keep": keep})
        except DjinnError:
            return None

    def _leaf(self, obj: Any):
        if isinstance(obj, RemoteTensor):
            if obj._session is not self:
                raise InvalidRequest("a RemoteTensor can only be used in the session that holds it")
            return {"$h": obj.hid}
        return NotImplemented

    def _unpack(self, value: Any) -> Any:
        def tag(name: str, v: Any):
            if name == "$t":
                hid, dt, shape, device = v
                return RemoteTensor(self, hid, dtype_from_name(dt), shape, device)
            raise InvalidRequest(f"unexpected {name} value from server")

        return structure.unpack(value, tag, _model_output)

    def _fetch(self, tensors: list) -> list[torch.Tensor]:
        """Fetch RemoteTensors and RemoteViews (only a view's elements cross the wire)."""
        handles, chains = [], []
        for t in tensors:
            base, chain = t._target()
            handles.append(base.hid)
            chains.append(encode_chain(chain) if chain else None)
        args = {"handles": handles}
        if any(c is not None for c in chains):
            args["indices"] = chains
        return self.call("fetch", args, idempotent=True)["tensors"]

    def _queue_edit(self, record: dict) -> None:
        if self.closed:
            raise DjinnError(f"session {self.name or self.sid[:8]} is closed")
        self._edits.append(record)

    def _take_edits(self) -> list[dict]:
        edits, self._edits = self._edits, []
        return edits

    def _flush_edits(self) -> None:
        if self._edits:
            self.conn.transport.call("edit", {"sid": self.sid, "edits": self._take_edits()})

    def _release_handle(self, hid: str) -> None:
        # Called from a GC finalizer, possibly while this thread holds a lock: only queue the id
        # here; the session's next request sends the batch.
        self._frees.append(hid)

    def _flush_frees(self) -> None:
        frees = []
        while self._frees:
            frees.append(self._frees.popleft())
        if frees and not self.closed and self.conn.transport.dead is None:
            try:
                self.conn.transport.submit("free", {"sid": self.sid, "handles": frees})  # no wait
            except DjinnError:
                pass


class TokenStream:
    """Iterator of token ids as the server produces them; `.sequences` holds the result at the end.

    Leaving the loop early (`break`, an exception, Ctrl-C) or calling `cancel()` stops the generate on
    the server; the session then holds exactly the tokens this iterator yielded (`consumed`)."""

    def __init__(self, q: queue.Queue, fut, session: "Session | None" = None):
        self._q, self._fut, self._session = q, fut, session
        self.sequences: torch.Tensor | None = None
        self.consumed = 0
        self._ended = False
        self._cancel_reply = None

    def __iter__(self) -> Iterator[int]:
        try:
            while True:
                item = self._fut.transport.next_stream_item(self._q)
                if item is None:
                    self._ended = True
                    self.sequences = self._fut.result()["sequences"]  # raises the typed error, if any
                    return
                for tok in item["tokens"]:
                    self.consumed += 1
                    yield tok
        finally:
            if not self._ended:
                self.cancel()

    def cancel(self) -> None:
        """Stop the generate now, keeping the tokens consumed so far in the session."""
        if self._ended:
            return
        self._ended = True
        if self._session is not None:
            self._cancel_reply = self._session._cancel_generate(self._fut.rid, self.consumed)

    close = cancel

    def __repr__(self) -> str:
        done = "done" if self.sequences is not None else "cancelled" if self._ended else "streaming"
        return f"TokenStream({done})"


def _model_output(name: str, fields: dict):
    """Rebuild a transformers ModelOutput by class name, only from transformers.modeling_outputs."""
    try:
        from transformers import modeling_outputs
        from transformers.utils import ModelOutput
    except ImportError:
        return fields
    cls = getattr(modeling_outputs, name, None)
    if isinstance(cls, type) and issubclass(cls, ModelOutput):
        try:
            return cls(**fields)
        except TypeError:  # a field this transformers version lacks (client/server version skew)
            return fields
    return fields
