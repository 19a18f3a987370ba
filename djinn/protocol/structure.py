"""Nested Python values (args, kwargs, model outputs) as plain msgpack values.

Tags (one key, starting with "$"):
  {"$tu": [...]}            a tuple (msgpack only has lists)
  {"$d": {str: ...}}        a dict (always tagged, so user keys never collide with tags)
  {"$mo": name, "$d": {}}   a transformers ModelOutput subclass by class name (decoded via an allow-list)
  {"$h": id}                a server-side tensor handle, client -> server
  {"$t": [id, dtype, shape, device]}  a new server-side tensor handle, server -> client
Local tensors travel as themselves (the codec frames them). `leaf` hooks let each side map its own
objects (RemoteTensor, server tensors) without this module knowing them.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .errors import ProtocolError
from .tensors import is_remote

_SCALARS = (type(None), bool, int, float, str, bytes, torch.dtype)
MAX_DEPTH = 64


def pack(obj: Any, leaf: Callable[[Any], Any], _depth: int = 0) -> Any:
    """Python value -> wire value. `leaf(obj)` is tried first; it returns NotImplemented to pass."""
    if _depth > MAX_DEPTH:
        raise ProtocolError(f"value nested deeper than {MAX_DEPTH} levels")
    out = leaf(obj)
    if out is not NotImplemented:
        return out
    if isinstance(obj, _SCALARS) or isinstance(obj, torch.Tensor) and not is_remote(obj):
        return obj  # a remote tensor the leaf hook did not take is refused below (Note [Remote tensors are not data])
    if isinstance(obj, torch.Size):
        return {"$tu": list(obj)}
    if _is_model_output(obj):
        return {"$mo": type(obj).__name__, "$d": {k: pack(v, leaf, _depth + 1) for k, v in obj.items()}}
    if isinstance(obj, tuple):
        return {"$tu": [pack(v, leaf, _depth + 1) for v in obj]}
    if isinstance(obj, list):
        return [pack(v, leaf, _depth + 1) for v in obj]
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise ProtocolError("only dicts with string keys can cross the wire")
        return {"$d": {k: pack(v, leaf, _depth + 1) for k, v in obj.items()}}
    raise ProtocolError(f"cannot send a value of type {type(obj).__name__}")


def unpack(obj: Any, tag: Callable[[str, Any], Any], model_output: Callable[[str, dict], Any] | None = None,
           _depth: int = 0) -> Any:
    """Wire value -> Python value. `tag(name, value)` resolves "$h"/"$t" tags."""
    if _depth > MAX_DEPTH:
        raise ProtocolError(f"value nested deeper than {MAX_DEPTH} levels")
    if isinstance(obj, list):
        return [unpack(v, tag, model_output, _depth + 1) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "$tu" in obj and len(obj) == 1 and isinstance(obj["$tu"], list):
        return tuple(unpack(v, tag, model_output, _depth + 1) for v in obj["$tu"])
    if "$d" in obj and isinstance(obj["$d"], dict) and (
            len(obj) == 1 or (len(obj) == 2 and isinstance(obj.get("$mo"), str))):
        if not all(isinstance(k, str) for k in obj["$d"]):  # msgpack also allows bytes keys
            raise ProtocolError("only dicts with string keys can cross the wire")
        d = {k: unpack(v, tag, model_output, _depth + 1) for k, v in obj["$d"].items()}
        if "$mo" in obj and model_output is not None:
            return model_output(obj["$mo"], d)
        return d
    if len(obj) == 1:
        (name, value), = obj.items()
        if name in ("$h", "$t"):
            return tag(name, value)
    raise ProtocolError(f"unknown tagged value with keys {sorted(obj, key=repr)[:5]}")  # keys: str or bytes


def _is_model_output(obj: Any) -> bool:
    # Checked by base-class name so the protocol does not import transformers.
    return any(c.__name__ == "ModelOutput" for c in type(obj).__mro__[1:])
