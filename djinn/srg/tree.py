"""Nested call arguments and results <-> (tensor leaves, spec).

The spec is hashable and covers everything but the tensors' values: container types, dict keys,
Python scalars, and each tensor's (kind, dtype, shape). Two calls with equal specs run the same
captured graph (Note [Input signature]). Transformers caches (`Cache` objects: `layers[i].keys`,
`.values`) are containers too, so a decode call with a KV cache is captured like any other.

Note [Input signature]
    A graph is valid for every call whose spec is equal: Python control flow in `forward` may read
    shapes, dtypes and non-tensor arguments (all in the spec), never tensor values (capture refuses).
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch

from ..protocol.errors import CaptureError

_SCALARS = (type(None), bool, int, float, str, torch.dtype, torch.device)


def tensor_leaves(obj: Any, out: list | None = None, seen: set | None = None) -> list[torch.Tensor]:
    """Tensors of a module's output (or (args, kwargs)) in order, each once: tuples, lists, dicts and
    ModelOutputs (which are dicts) are walked; caches and other objects are not. What a breakpoint
    exposes at a module call, on the module path and on the graph path alike."""
    out = [] if out is None else out
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        if id(obj) not in seen:
            seen.add(id(obj))
            out.append(obj)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            tensor_leaves(v, out, seen)
    elif isinstance(obj, dict):
        for v in obj.values():
            tensor_leaves(v, out, seen)
    return out


def is_cache(obj: Any) -> bool:
    return hasattr(obj, "layers") and any(c.__name__ == "Cache" for c in type(obj).__mro__)


def _is_model_output(obj: Any) -> bool:
    return any(c.__name__ == "ModelOutput" for c in type(obj).__mro__[1:])


def flatten(obj: Any, leaves: list, is_leaf: Callable[[Any], Any], protos: list) -> Any:
    """Append tensor leaves to `leaves`; return the spec. `is_leaf(x)` returns a hashable leaf key
    (e.g. ("T", dtype, shape)) or None. Cache objects are appended to `protos` for `unflatten`."""
    key = is_leaf(obj)
    if key is not None:
        leaves.append(obj)
        return key
    if isinstance(obj, _SCALARS):
        if type(obj) in (bool, int, str, type(None)):
            return obj
        return ("float", obj) if isinstance(obj, float) else (type(obj).__name__, str(obj))
    if isinstance(obj, (list, tuple)) and not _is_model_output(obj):
        return (type(obj), tuple(flatten(v, leaves, is_leaf, protos) for v in obj))
    if isinstance(obj, dict) or _is_model_output(obj):
        return (type(obj), tuple((k, flatten(v, leaves, is_leaf, protos)) for k, v in obj.items()))
    if is_cache(obj):
        protos.append(obj)
        layers = []
        for layer in obj.layers:
            attrs = tuple((k, flatten(v, leaves, is_leaf, protos)) for k, v in vars(layer).items()
                          if isinstance(v, torch.Tensor) or is_leaf(v) is not None)
            layers.append((type(layer), attrs))
        return ("$cache", type(obj), len(protos) - 1, tuple(layers))
    raise CaptureError(f"cannot capture a call with an argument of type {type(obj).__name__}; graph calls take "
                       "tensors, numbers, strings, and lists, tuples and dicts of them")


def unflatten(spec: Any, leaves: list, protos: list, is_leaf_spec: Callable[[Any], bool]) -> Any:
    """Rebuild a value from its spec, taking tensors from `leaves` in order (consumed)."""
    it = iter(leaves)
    return _build(spec, it, protos, is_leaf_spec)


def _build(spec: Any, it, protos: list, is_leaf_spec) -> Any:
    if is_leaf_spec(spec):
        return next(it)
    if not isinstance(spec, tuple):
        return spec
    if len(spec) == 2 and isinstance(spec[0], str):  # ("float", 1.5), ("dtype", "torch.float32")
        return _scalar(spec)
    if spec and spec[0] == "$cache":
        _, _, idx, layers = spec
        cache = copy.copy(protos[idx])
        cache.layers = []
        for (layer_type, attrs), old in zip(layers, protos[idx].layers):
            layer = copy.copy(old)
            for k, v in attrs:
                setattr(layer, k, _build(v, it, protos, is_leaf_spec))
            cache.layers.append(layer)
        return cache
    cls, items = spec
    if isinstance(cls, type) and (issubclass(cls, dict) or _is_model_output_type(cls)):
        d = {k: _build(v, it, protos, is_leaf_spec) for k, v in items}
        return cls(**d) if _is_model_output_type(cls) else cls(d) if cls is not dict else d
    vals = [_build(v, it, protos, is_leaf_spec) for v in items]
    if cls is list:
        return vals
    if cls is tuple:
        return tuple(vals)
    if hasattr(cls, "_fields"):  # namedtuple
        return cls(*vals)
    return cls(vals)  # torch.return_types structseqs


def _is_model_output_type(cls: type) -> bool:
    return any(c.__name__ == "ModelOutput" for c in cls.__mro__[1:])


def _scalar(spec: tuple) -> Any:
    kind, v = spec
    if kind == "float":
        return v
    if kind == "dtype":
        return getattr(torch, v.split(".")[-1])
    if kind == "device":
        return torch.device(v)
    raise CaptureError(f"bad spec {spec!r}")
