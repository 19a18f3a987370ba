"""Typed errors shared by client and server.

Every error that crosses the wire is sent as (code, message, remote traceback) and rebuilt on the
other side from the explicit registry below; nothing is looked up by an arbitrary name.
"""
from __future__ import annotations

import reprlib


class DjinnError(Exception):
    """Base class of every error Djinn raises."""

    code = "djinn_error"

    def __init__(self, message: str = "", *, remote_traceback: str | None = None):
        super().__init__(message)
        self.message = message
        #: The server's traceback, for errors raised there; never part of str(): a notebook shows
        #: str() under every failed cell, and a page of server frames buries the one line that matters.
        self.remote_traceback = remote_traceback
        if remote_traceback:
            self.add_note("(the server's traceback is in this error's .remote_traceback)")

    def __str__(self) -> str:
        return self.message


class ProtocolError(DjinnError):
    """A message could not be decoded or breaks the wire contract (DESIGN.md section 8)."""

    code = "protocol"


class AuthError(DjinnError):
    """The HELLO carried no secret or the wrong one."""

    code = "auth"


class SessionNotFound(DjinnError):
    """The session does not exist, was closed or reclaimed, or belongs to another client."""

    code = "session_not_found"


class HandleNotFound(DjinnError):
    """A tensor or model handle is unknown to this session."""

    code = "handle_not_found"


class OutOfMemory(DjinnError):
    """The server could not find device memory for the request; the server keeps serving."""

    code = "out_of_memory"


class ModelNotSupported(DjinnError):
    """The server cannot build this module itself (not on the architecture allow-list)."""

    code = "model_not_supported"


class InvalidRequest(DjinnError):
    """Well-formed message with arguments the operation does not accept."""

    code = "invalid_request"


class WeightWriteRefused(InvalidRequest):
    """The request would write into a shared weight (the Text segment's memory), directly or through any
    view of it: an in-place op or a mutated argument of a graph, an edit. Weights are read-only for every
    tenant (Note [Weights are read-only at run time] in djinn/vmu/readonly.py); nothing was written."""

    code = "weight_write_refused"


class ServerBusy(DjinnError):
    """The server holds as many clients as it may (`max_connections` in its config): this connection was
    refused at HELLO. Nothing of other clients changed; try again later."""

    code = "server_busy"


class RemoteExecutionError(DjinnError):
    """User code failed on the server. str() is the first line of the cause (what failed, and the
    exception's own first line); `message` holds all of it, `remote_traceback` the server's traceback."""

    code = "remote_execution"

    def __str__(self) -> str:
        lines = [line for line in self.message.splitlines() if line.strip()]
        return lines[0] if lines else self.message


class GuardFailed(RemoteExecutionError):
    """A graph's data-dependent shape or value (Note [Graph breaks] in srg/capture.py) came out on the
    server other than the capture's probe found: the run stopped at that node, before anything that
    depends on it ran. A graph-path call captures again and retries once by itself."""

    code = "guard_failed"


class ServerUnavailable(DjinnError):
    """The server stopped answering (no heartbeat within the liveness window) or was never reached."""

    code = "server_unavailable"


class SessionLost(ServerUnavailable):
    """The connection dropped (the server stopped, crashed or restarted): calls in flight are lost, and
    so is the server-side state (KV caches, tensors, runs) of the sessions opened before it."""

    code = "session_lost"


class ShuttingDown(DjinnError):
    """The server is draining before it stops: it finishes what runs but takes no new work."""

    code = "shutting_down"


class QuotaExceeded(DjinnError):
    """The request would take its session past a per-session quota (quota_gpu_gb, quota_host_gb,
    quota_queued_requests in the server config), or its principal past a per-principal cap or quota
    (quota_principal_gpu_gb, max_sessions_per_principal, ...). Only this request fails; the session and
    every other session go on."""

    code = "quota_exceeded"


class CostBudgetExceeded(QuotaExceeded):
    """The request's estimated cost is over the server's per-request budget (graph_max_flops in the
    server config, for graph-path requests): the message names the estimate and the limit. Nothing
    ran; split the work into smaller requests. A QuotaExceeded, so code that handles quotas handles it."""

    code = "cost_budget_exceeded"


class RequestTimeout(DjinnError):
    """A call got no reply within its timeout although the server was alive."""

    code = "timeout"


class GenerateCancelled(DjinnError):
    """The generate was cancelled by its client (`cancel_generate`: an interrupt in `generate`, or
    leaving a `stream=True` loop). The session keeps exactly the tokens the client consumed."""

    code = "cancelled"


class CaptureError(DjinnError):
    """A module's forward or a lazy op could not be recorded as an SRG (DESIGN.md section 4): an op
    outside the allow-list, control flow on tensor values, a write to a weight. The message names the
    op and the module path (or the user's source line)."""

    code = "capture"


ERRORS: dict[str, type[DjinnError]] = {
    cls.code: cls
    for cls in (
        DjinnError, ProtocolError, AuthError, SessionNotFound, HandleNotFound, OutOfMemory,
        ModelNotSupported, InvalidRequest, RemoteExecutionError, ServerUnavailable, RequestTimeout,
        SessionLost, ShuttingDown, QuotaExceeded, CaptureError, WeightWriteRefused, GenerateCancelled,
        ServerBusy, CostBudgetExceeded, GuardFailed,
    )
}


def error_from_wire(code: str, message: str, remote_traceback: str | None) -> DjinnError:
    cls = ERRORS.get(code, DjinnError)
    return cls(message, remote_traceback=remote_traceback)


# -- what an error may carry back over the wire -------------------------------------------------------
# Note [Errors echo little]
#     Error messages name the bad value so the caller can fix it, but the value came from the caller:
#     echoed whole, an 8 MiB field would come back as an 8 MiB error (to a peer that may never read it)
#     and go into the server's log. Values are shown through `short` (a bounded repr that never builds
#     the full one), and every error header the server sends goes through `wire_error`, which bounds
#     the message and the traceback whatever built them.

MAX_MESSAGE_CHARS = 1024
MAX_TRACEBACK_CHARS = 16384

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlong = 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6
_REPR.maxlevel = 3


def short(value: object, limit: int = 60) -> str:
    """A repr of `value` of about `limit` characters at most, for error messages (Note [Errors echo little])."""
    if isinstance(value, str) and len(value) > limit:
        return repr(value[:limit]) + f"... ({len(value)} characters)"
    try:
        text = _REPR.repr(value)
    except Exception:  # a repr that fails (an int past str()'s digit limit): name the type only
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit + 10 else text[:limit] + "..."


def clip(text: str, limit: int = MAX_MESSAGE_CHARS, keep_end: bool = False) -> str:
    """`text` cut to `limit` characters, saying how much was dropped (its end kept for a traceback)."""
    if len(text) <= limit:
        return text
    cut = f"... ({len(text) - limit} characters cut) ..."
    return cut + text[-limit:] if keep_end else text[:limit] + cut


def wire_error(rid: int, e: DjinnError) -> dict:
    """The ERROR header for `e`, its message and traceback bounded (Note [Errors echo little])."""
    tb = e.remote_traceback
    return {"rid": rid, "code": e.code, "message": clip(str(e.message)),
            "traceback": clip(str(tb), MAX_TRACEBACK_CHARS, keep_end=True) if tb is not None else None}
