"""Wire protocol: message kinds, tensor framing, codec, typed errors and authentication.

The names below load their submodule on first use (djinn/__init__.py, Note [Lazy package]): the
server's supervisor reads `messages` and must not load torch through `codec`.
"""
from __future__ import annotations

import importlib

_FROM = {
    "decode": "codec", "encode": "codec",
    "Limits": "messages", "Message": "messages", "MsgType": "messages", "PROTOCOL_VERSION": "messages",
    "CAPABILITIES": "messages",
    "DjinnError": "errors", "ProtocolError": "errors", "AuthError": "errors", "SessionNotFound": "errors",
    "HandleNotFound": "errors", "OutOfMemory": "errors", "ModelNotSupported": "errors", "InvalidRequest": "errors",
    "RemoteExecutionError": "errors", "ServerUnavailable": "errors", "RequestTimeout": "errors",
}
__all__ = list(_FROM)


def __getattr__(name: str):
    module = _FROM.get(name)
    if module is None:
        raise AttributeError(f"module 'djinn.protocol' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
