"""Runs and stops: a forward or generate on the server that pauses at breakpoints (DESIGN.md section 7).

    run = s.start(rm, ids, breakpoints=["model.layers.1", djinn.Breakpoint(layer=3, step=2)])
    stop = run.wait()                      # Stop while paused, None once the run has ended
    stop.activation[:, -1] += steer        # queued, applied on the server before the run continues
    while stop is not None:
        stop = run.resume()
    out = run.output                       # what rm(...) / rm.generate(...) would have returned
"""
from __future__ import annotations

from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ..protocol.errors import DjinnError, InvalidRequest, RequestTimeout
from . import lazy, wire
from .stats_view import fmt_bytes, html_card
from .tensor import RemoteTensor, Scope

if TYPE_CHECKING:
    from .remote import RemoteModel
    from .session import Session

WHERE = ("before", "after")

STOP_GONE = ("this stop is gone (the run resumed or ended): a stop's tensors live on the server only while its "
             "run is paused there; read them (.cpu()) or edit them before run.resume()")


@dataclass(frozen=True)
class Breakpoint:
    """Where a run pauses: a module path ("model.layers.6", "" for the model itself) or `layer=N`, a
    decoder layer the server resolves ("model.layers.N" for Llama, "transformer.h.N" for GPT-2).

    where: "after" pauses on the module's output, "before" on its input.
    step: only at this forward call of the model (generate: 0 is the prefill, k the k-th decode
    step); None pauses at every call.
    """

    path: str | None = None
    where: str = "after"
    step: int | None = None
    layer: int | None = None

    def __post_init__(self):
        if (self.path is None) == (self.layer is None):
            raise ValueError("a Breakpoint needs exactly one of path and layer")
        if self.path is not None and not isinstance(self.path, str):
            raise TypeError(f"path must be a module path string, got {self.path!r}")
        if self.layer is not None and (not isinstance(self.layer, int) or isinstance(self.layer, bool)):
            raise TypeError(f"layer must be an int, got {self.layer!r}")
        if self.where not in WHERE:
            raise ValueError(f"where must be one of {WHERE}, got {self.where!r}")
        if self.step is not None and (not isinstance(self.step, int) or isinstance(self.step, bool) or self.step < 0):
            raise ValueError(f"step must be an int >= 0 (0 is the prefill), got {self.step!r}")

    @classmethod
    def of(cls, b: "Breakpoint | str | int") -> "Breakpoint":
        """A module path string, a layer number, or a Breakpoint."""
        if isinstance(b, Breakpoint):
            return b
        if isinstance(b, str):
            return cls(path=b)
        if isinstance(b, int) and not isinstance(b, bool):
            return cls(layer=b)
        raise TypeError(f"a breakpoint is a module path, a layer number or a djinn.Breakpoint, got {b!r}")

    def to_wire(self) -> dict:
        return {"path": self.path, "layer": self.layer, "where": self.where, "step": self.step}


class Stop:
    """A paused run. `activation` is the module's output (its first tensor, for tuple outputs) or, for
    where="before", its input. Its tensors live only while the run is paused here."""

    def __init__(self, run: "Run", info: dict):
        s = run.session
        self.run = run
        self.path: str = info["path"]
        self.where: str = info["where"]
        self.step: int = info["step"]
        self.hit: int = info["hit"]                  # the run's n-th pause, from 0
        self.paused_bytes: int = info["paused_bytes"]
        self.activation: RemoteTensor = wire.unpack(s, info["activation"])
        self.module_outputs: Any = wire.unpack(s, info["outputs"]) if info["outputs"] is not None else None
        first = _first_remote(self.module_outputs)
        if first is not None and first.hid == self.activation.hid:
            self.activation = first  # one handle object for one server tensor
        # The server frees these tensors when the run moves on; the Run ends this scope then.
        self.scope = Scope(STOP_GONE)
        for t in (self.activation, *_remotes(self.module_outputs)):
            t._scope = self.scope

    @property
    def live(self) -> bool:
        """True while the run is paused at this stop (its tensors can be read and edited)."""
        return self.run.stop is self

    def resume(self) -> "Stop | None":
        return self.run.resume()

    def fork(self) -> "Run":
        """A copy of the paused run, paused here too, to try another edit from the same point.

        Edits queued so far apply to this run first, and the copy starts from them. The fork returns at
        once with a copy of this stop (read and edit it freely) and executes when resumed: from this
        run's KV blocks when paused in a decode step (shared copy-on-write), else by re-executing the
        prefix (Note [Fork replays the prefix] in djinn/server/execution/breakpoints.py).
        """
        if not self.live:
            raise InvalidRequest(f"{self!r} is not where its run is paused; fork from run.wait()'s stop")
        reply = self.run.session.call("fork", {"run": self.run.run_id})
        return Run(self.run.session, self.run.model, self.run.method, reply=reply, rebuild=self.run._rebuild)

    def _repr_html_(self) -> str:
        a = self.activation
        rows = [("at", f"{self.path or '<model>'} ({self.where})"), ("step", str(self.step)), ("hit", str(self.hit)),
                ("activation", f"{str(a.dtype).replace('torch.', '')}{list(a.shape)}"),
                ("paused bytes", fmt_bytes(self.paused_bytes)),
                ("state", "live: read and edit, then resume()" if self.live else "gone (the run moved on)"),
                ("run", str(self.run.run_id))]
        return html_card("Stop", rows)

    def __repr__(self) -> str:
        a = self.activation
        state = "" if self.live else ", gone"
        return (f"Stop({self.path or '<model>'} {self.where}, step {self.step}, hit {self.hit}: activation "
                f"{str(a.dtype).replace('torch.', '')}{list(a.shape)}, run {self.run.run_id}{state})")


class Run:
    """A model call on the server that pauses at breakpoints. States: starting, paused, finished,
    cancelled, failed."""

    def __init__(self, session: "Session", rm: "RemoteModel", method: str, future: Future | None = None,
                 reply: dict | None = None, rebuild: Callable[[Any], Any] | None = None):
        self.session, self.model, self.method = session, rm, method
        self._rebuild = rebuild  # graph path: the graph's outputs -> the module's output structure
        self.run_id: str | None = None
        self.state = "starting"
        self.stop: Stop | None = None
        self.timing: dict = {}  # server-side timings of the last start/resume/fork (see DESIGN.md section 10)
        self._future = future
        self._output: Any = None
        self._error: DjinnError | None = None
        if reply is not None:
            self._absorb(reply)

    def wait(self, timeout: float | None = None) -> Stop | None:
        """The Stop the run is paused at, or None once it has ended (then `output` holds the result)."""
        if self._future is not None:
            timeout = self.session.conn.cfg.call_timeout_s if timeout is None else timeout
            try:
                reply = self._future.result(timeout=timeout)
            except FutureTimeout:
                raise RequestTimeout(f"run did not reach a breakpoint or its end within {timeout:.1f}s") from None
            except DjinnError as e:
                self._future, self.state, self._error = None, "failed", e
                raise
            self._future = None
            self._absorb(reply)
        if self._error is not None:
            raise self._error
        return self.stop

    def resume(self) -> Stop | None:
        """Apply the queued edits, continue to the next breakpoint or the end; the next Stop or None."""
        self._require_paused("resume")
        self._settle()
        try:
            reply = self.session.call("resume", {"run": self.run_id})
        except InvalidRequest:
            raise  # refused before the run moved (e.g. an edit that does not fit): still paused here
        except DjinnError as e:
            self._move_to(None)
            self.state, self._error = "failed", e
            raise
        self._absorb(reply)
        return self.stop

    def cancel(self) -> None:
        """End the run now; its paused state on the server is freed. A no-op once it has ended."""
        if self.state == "starting":
            try:
                self.wait()
            except DjinnError:
                return
        if self.state != "paused":
            return
        try:
            if not self.session.closed and self.session.conn.transport.dead is None:
                self._settle()
        finally:
            self._move_to(None)
            self.state = "cancelled"
            if not self.session.closed:
                self.session.call("cancel_run", {"run": self.run_id})

    @property
    def output(self) -> Any:
        """The result, as rm(...) (RemoteTensor handles) or rm.generate(...) (sequences) returns it."""
        if self._future is not None:
            self.wait()
        if self.state != "finished":
            where = f" at {self.stop!r}" if self.stop is not None else ""
            raise InvalidRequest(f"run {self.run_id} is {self.state}{where}; it has no output "
                                 "(resume it until wait() returns None)")
        return self._output

    def _require_paused(self, what: str) -> None:
        if self._future is not None:
            self.wait()
        if self.state != "paused":
            raise InvalidRequest(f"cannot {what} run {self.run_id}: it is {self.state}")

    def _settle(self) -> None:
        """Note [Lazy ops on a stop]: run the session's pending lazy ops while the stop's tensors exist.

        `saved = stop.activation.clone()` is recorded, not run (frontend/lazy.py), and the server frees a
        stop's tensors when the run moves on; so before a resume or a cancel the pending graph is flushed
        (one run_graph, only when something is pending) and `saved` holds the value at the stop, after
        the edits written before it, as locally. A flush that fails raises here and the run stays paused.
        """
        lazy.flush(self.session)

    def _absorb(self, reply: dict) -> None:
        self.run_id = reply["run"]
        self.state = reply["state"]
        self.timing = reply.get("timing", {})
        self._move_to(Stop(self, reply["stop"]) if self.state == "paused" else None)
        if self.state == "finished":
            self._output = wire.unpack(self.session, reply["output"])
            if self._rebuild is not None:
                self._output = self._rebuild(self._output)

    def _move_to(self, stop: Stop | None) -> None:
        """The one place `stop` changes: the stop left behind is gone, and so are its tensors."""
        if self.stop is not None and self.stop is not stop:
            self.stop.scope.end()
        self.stop = stop

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        if self.session.conn.transport.dead is None:
            self.cancel()

    def _repr_html_(self) -> str:
        rows = [("call", f"{self.model.arch}.{self.method}"), ("state", self.state), ("id", str(self.run_id or "?"))]
        if self.stop is not None:
            rows.append(("paused at", f"{self.stop.path or '<model>'} ({self.stop.where}, step {self.stop.step})"))
        return html_card("Run", rows)

    def __repr__(self) -> str:
        where = f" at {self.stop.path or '<model>'} ({self.stop.where}, step {self.stop.step})" if self.stop else ""
        return f"Run({self.run_id or '?'}, {self.model.arch}.{self.method}, {self.state}{where})"


def _remotes(obj: Any):
    """Every RemoteTensor in a module's outputs (tensors, tuples, lists, dicts, ModelOutputs)."""
    if isinstance(obj, RemoteTensor):
        yield obj
        return
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    for v in values:
        yield from _remotes(v)


def _first_remote(obj: Any) -> RemoteTensor | None:
    return next(_remotes(obj), None)
