"""Wire protocol: message kinds, tensor framing, codec, typed errors and authentication."""
from .codec import decode, encode
from .errors import (
    AuthError, DjinnError, HandleNotFound, InvalidRequest, ModelNotSupported, OutOfMemory,
    ProtocolError, RemoteExecutionError, RequestTimeout, ServerUnavailable, SessionNotFound,
)
from .messages import CAPABILITIES, PROTOCOL_VERSION, Limits, Message, MsgType

__all__ = [
    "decode", "encode", "Limits", "Message", "MsgType", "PROTOCOL_VERSION", "CAPABILITIES",
    "DjinnError", "ProtocolError", "AuthError", "SessionNotFound", "HandleNotFound", "OutOfMemory",
    "ModelNotSupported", "InvalidRequest", "RemoteExecutionError", "ServerUnavailable", "RequestTimeout",
]
