"""Djinn: a semantic tensor operating system for interactive, multi-tenant GPU work.

    import djinn
    djinn.connect()                  # DJINN_SERVER, or an embedded local server (GPU if present)
    rm = djinn.remote(model)         # weights go up once, content-addressed and shared
    rm = djinn.remote(config, seed=0, dtype=torch.float16)   # or built on the server, random weights
    out = rm(input_ids)              # runs on the server; tensors come back as RemoteTensor handles
    with djinn.session() as s:       # server-side state (KV cache) between calls
        ids = s.generate(rm, prompt, max_new_tokens=64)
        run = s.start(rm, ids, breakpoints=["model.layers.6"])   # pause, read and edit, resume
"""
# Note [Lazy package]: `import djinn` loads nothing heavy. The client API (djinn/api.py: torch, zmq,
# transformers) loads on first use of a public name, so processes that only need the package's
# torch-free parts, such as the server's supervisor, stay free of those native libraries.
from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

__all__ = [
    "connect", "disconnect", "connection", "remote", "session", "restore_session", "stats", "explain",
    "supported_architectures",
    "Connection", "Session", "RemoteModel", "GraphModel", "CaptureError", "RemoteTensor", "RemoteView", "TokenStream", "ClientConfig",
    "Breakpoint", "Run", "Stop",
    "DjinnError", "ProtocolError", "AuthError", "SessionNotFound", "HandleNotFound", "OutOfMemory",
    "ModelNotSupported", "InvalidRequest", "RemoteExecutionError", "ServerUnavailable", "RequestTimeout",
    "QuotaExceeded", "CostBudgetExceeded", "WeightWriteRefused", "GenerateCancelled",
    "SessionLost", "ShuttingDown", "ServerBusy", "GuardFailed",
]

if TYPE_CHECKING:
    from .api import *  # noqa: F401,F403


def __getattr__(name: str):
    if name in __all__:
        from . import api

        value = getattr(api, name)
        globals()[name] = value  # later lookups are plain attribute reads
        return value
    raise AttributeError(f"module 'djinn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
