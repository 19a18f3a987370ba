"""Client-side session: a name for server-side state (KV caches, tensors) that outlives one call."""
from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from ..protocol.errors import DjinnError, InvalidRequest, SessionLost
from ..protocol.indexing import encode_chain
from . import wire
from .generate import request as generate_request
from .outbox import Outbox
from .run import Breakpoint
from .stats_view import html_card

if TYPE_CHECKING:
    from .connection import Connection
    from .generate import TokenStream
    from .remote import RemoteModel
    from .run import Run
    from .tensor import RemoteTensor

#: Ops that take the queued edits along and apply them before anything else (run_graph: a lazy flush,
#: such as the one before a resume, Note [Lazy ops on a stop] in frontend/run.py).
_CARRY_EDITS = frozenset({"resume", "fork", "fetch", "run_graph"})


class Session:
    def __init__(self, conn: "Connection", name: str | None = None, *, checkpoint: bool = False,
                 max_kv_tokens: int | None = None, tp: int | None = None, _restored: dict | None = None):
        self.conn = conn
        self.name = name
        self.tp = tp if tp not in (None, 1) else None
        self._generation = conn.transport.generation  # the server boot it lives in (transport.py)
        if _restored is None:
            args = {"name": name, "checkpoint": True} if checkpoint else {"name": name}
            if max_kv_tokens is not None:
                args["max_kv_tokens"] = max_kv_tokens
            if self.tp is not None:
                args["tp"] = self.tp
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
        #: Handles to free and in-place edits, sent before (or with) the next request (frontend/outbox.py).
        self.outbox = Outbox(name or self.sid[:8])

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
        if self.outbox.has_edits:
            if op in _CARRY_EDITS:  # applied first, in the same request: no extra round trip
                args["edits"] = self.outbox.take_edits()
                kw["idempotent"] = False  # a retry would apply them twice
            else:
                self._flush_edits()
        return self.conn.transport.call(op, args, **kw)

    def submit(self, op: str, args: dict, **kw):
        """As `call`, but returns the Future at once (kw `stream=queue` for a streamed reply)."""
        self._check_alive()
        self._flush_frees()
        self._flush_edits()
        return self.conn.transport.submit(op, dict(args, sid=self.sid), **kw)

    def fetch(self, tensors: list) -> list[torch.Tensor]:
        """The data of RemoteTensors and RemoteViews, in one request (only a view's elements cross the
        wire). `t.cpu()` is `s.fetch([t])[0]`."""
        handles, chains = [], []
        for t in tensors:
            base, chain = t._target()
            handles.append(base.hid)
            chains.append(encode_chain(chain) if chain else None)
        args = {"handles": handles}
        if any(c is not None for c in chains):
            args["indices"] = chains
        return self.call("fetch", args, idempotent=True)["tensors"]

    def start(self, rm: "RemoteModel", *args, breakpoints=(), method: str = "forward", seed: int | None = None,
              **kwargs) -> "Run":
        """Start `rm(*args, **kwargs)` (or `rm.generate(input_ids, **kwargs)` with method="generate") as a
        run that pauses at `breakpoints`: module paths, layer numbers, or `djinn.Breakpoint`s.

        Returns at once; `run.wait()` gives the first Stop (or None if the run ended without one).
        A generate run none of whose breakpoints can fire (none, or every step past its last model call)
        runs as a plain generate, on the decode fast path where that applies; `deterministic=True` keeps
        it eager and bitwise, as for `generate`.
        The model starts it (`rm.start_run`): each path knows its own start request.
        """
        if method not in ("forward", "generate"):
            raise InvalidRequest(f"method must be 'forward' or 'generate', got {method!r}")
        if isinstance(breakpoints, (str, int, Breakpoint)):
            breakpoints = [breakpoints]
        bps = [Breakpoint.of(b) for b in breakpoints]  # a bad one raises here, before any request
        rm.attach(self)
        return rm.start_run(self, args, kwargs, method=method, breakpoints=bps, seed=seed)

    def generate(self, rm: "RemoteModel", input_ids: torch.Tensor, *, stream: bool = False,
                 seed: int | None = None, **kwargs) -> "torch.Tensor | TokenStream":
        """Generate on the server, continuing from (and keeping) this session's KV cache for `rm`.

        `input_ids` are the tokens that follow everything this session has seen with `rm`. Returns the
        whole sequence so far, as one long `generate` over the concatenation would.
        """
        rm.attach(self)
        return generate_request(self, rm, input_ids, stream=stream, seed=seed, use_session_kv=True, **kwargs)

    def fork(self, name: str | None = None) -> "Session":
        """A new session that continues from exactly where this one is: the same KV caches (shared
        block by block on the server, copied only where either session writes next), token ids,
        models and a copy of its tensors (in `forked_tensors`, by handle). Generating in one never
        changes the other: branch an agent, try two continuations, keep the better."""
        reply = self.call("fork_session", {"name": name})
        child = Session(self.conn, name, _restored=reply)
        child.kv_tokens = dict(reply["kv_tokens"])
        child.forked_tensors = wire.handles(child, reply["tensors"], self.conn.info["device"])
        child.fork_info = {"shared_blocks": reply["shared_blocks"], "fork_ms": reply["fork_ms"]}
        return child

    def migrate(self, worker: int | None = None) -> dict:
        """Move this session, between requests, to another worker of a server with several (`--gpus
        0,1`): its KV, token ids, tensors and models go with it and it continues exactly as if it had
        stayed. `worker`: its rank (`djinn.stats()["workers"]`); None lets the server pick the one
        with the most free KV. Returns {"worker", "moved", "seconds", "bytes"}."""
        return self.call("migrate", {"worker": worker})

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
            self._mark_closed()
            return
        try:
            self.call("close_session")
        finally:
            self._mark_closed()

    def _mark_closed(self) -> None:
        self.closed = True
        self.outbox.close()  # an edit queued from now on would never be sent: refused instead

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

    # -- sending what the outbox holds ---------------------------------------------------------------
    def _flush_edits(self) -> None:
        if self.outbox.has_edits:
            self.conn.transport.call("edit", {"sid": self.sid, "edits": self.outbox.take_edits()})

    def _flush_frees(self) -> None:
        frees = self.outbox.take_frees()
        if frees and not self.closed and self.conn.transport.dead is None:
            try:
                self.conn.transport.submit("free", {"sid": self.sid, "handles": frees})  # no wait
            except DjinnError:
                pass
