"""Values on the wire for one session: what goes up as arguments and what comes back as results.

A RemoteTensor goes up as its handle (`{"$h": hid}`), and only in the session that holds it: handles
are per session on the server. Results come back with tensors the server kept as `$t` tags, made
into RemoteTensors of that session here, and transformers ModelOutputs rebuilt by class name.
Everything else is protocol/structure.py's nested values. Session, RemoteModel, GraphModel and Run
all pack and unpack through these functions, so the rules live in one place.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..protocol import structure
from ..protocol.errors import InvalidRequest
from ..protocol.tensors import dtype_from_name
from .tensor import RemoteTensor

if TYPE_CHECKING:
    from .session import Session


def pack(session: "Session", value: Any) -> Any:
    """`value` (nested lists, tuples, dicts, tensors, RemoteTensors) as the server reads it."""
    def leaf(obj: Any):
        if isinstance(obj, RemoteTensor):
            if obj._session is not session:
                raise InvalidRequest("a RemoteTensor can only be used in the session that holds it")
            return {"$h": obj.hid}
        return NotImplemented

    return structure.pack(value, leaf)


def unpack(session: "Session", value: Any) -> Any:
    """A server result, its kept tensors as RemoteTensors of `session`."""
    def tag(name: str, v: Any):
        if name == "$t":
            hid, dt, shape, device = v
            return RemoteTensor(session, hid, dtype_from_name(dt), shape, device)
        raise InvalidRequest(f"unexpected {name} value from server")

    return structure.unpack(value, tag, model_output)


def handles(session: "Session", metas: dict[str, dict], device: str) -> dict[str, RemoteTensor]:
    """RemoteTensors for the handles a restored or forked session holds ({hid: {"dtype", "shape"}})."""
    return {hid: RemoteTensor(session, hid, dtype_from_name(m["dtype"]), m["shape"], device)
            for hid, m in metas.items()}


def model_output(name: str, fields: dict):
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
