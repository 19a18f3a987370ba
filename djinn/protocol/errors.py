"""Typed errors shared by client and server.

Every error that crosses the wire is sent as (code, message, remote traceback) and rebuilt on the
other side from the explicit registry below; nothing is looked up by an arbitrary name.
"""
from __future__ import annotations


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


class RemoteExecutionError(DjinnError):
    """User code failed on the server. str() is the first line of the cause (what failed, and the
    exception's own first line); `message` holds all of it, `remote_traceback` the server's traceback."""

    code = "remote_execution"

    def __str__(self) -> str:
        lines = [line for line in self.message.splitlines() if line.strip()]
        return lines[0] if lines else self.message


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
    quota_queued_requests in the server config). Only this request fails; the session and every
    other session go on."""

    code = "quota_exceeded"


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
    )
}


def error_from_wire(code: str, message: str, remote_traceback: str | None) -> DjinnError:
    cls = ERRORS.get(code, DjinnError)
    return cls(message, remote_traceback=remote_traceback)
