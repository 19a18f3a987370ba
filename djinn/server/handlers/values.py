"""Values between the wire and the device: a request's inputs (host tensors off the message, handles
to the session's own tensors) as device tensors, and a call's outputs as handles in the session
(Data) or as data read back to the client. Shared by forward, generate, graph runs and breakpoint runs."""
from __future__ import annotations

from typing import Any, Callable

import torch

from ...protocol import structure
from ...protocol.errors import InvalidRequest
from ...protocol.indexing import apply_chain, decode_chain
from ...protocol.tensors import dtype_name


def read(t: torch.Tensor, chain: Any) -> torch.Tensor:
    if chain is not None:
        try:
            t = apply_chain(t, decode_chain(chain))
        except (IndexError, RuntimeError) as e:
            raise InvalidRequest(f"index {chain} does not fit shape {list(t.shape)}: {e}") from None
    out = t.cpu()
    # On a CPU server .cpu() is the tensor itself, and its bytes leave later, from the router thread:
    # copy, since an edit or a resumed run may change them in place meanwhile.
    return out.clone() if out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() else out


def unpack_inputs(engine, s, value: Any, alias_handles: bool = False) -> Any:
    """Wire inputs -> device tensors. `alias_handles`: a handle input is the session's tensor itself,
    not a copy, so an in-place op a graph recorded on it (`h[idx] = v`, `h.add_(pending)`) lands in it,
    as it would locally (run_graph); a handle in a weight's storage is still copied (weights are
    read-only for every tenant). Otherwise every input is a copy."""
    handles: set[int] = set()

    def handle(t: torch.Tensor) -> None:
        if alias_handles and not engine.text.holds_storage(t):  # a view of a weight stays a copy
            handles.add(id(t))

    obj = decode_inputs(s, value, handle)
    return to_device(obj, engine.device, handles)


def decode_inputs(s, value: Any, on_handle: Callable[[torch.Tensor], None] | None = None) -> Any:
    """Wire inputs -> tensors where they are: host tensors off the message (aliasing its frames: copy
    them before they outlive the request), the session's own tensors for handles."""
    def tag(name: str, v: Any):
        if name == "$h":
            t = s.tensor(v)
            if on_handle is not None:
                on_handle(t)
            return t
        raise InvalidRequest(f"clients do not send {name} values")

    return structure.unpack(value, tag)


def to_device(obj: Any, device: torch.device, keep: set[int] = frozenset()) -> Any:
    if isinstance(obj, torch.Tensor):
        if id(obj) in keep:
            return obj
        # A copy: tensors decoded from the wire alias the message's frames, which are freed when the
        # request is done, and an output may be a view of an input.
        return obj.to(device, copy=True)
    if isinstance(obj, list):
        return [to_device(v, device, keep) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_device(v, device, keep) for v in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device, keep) for k, v in obj.items()}
    return obj


def pack_outputs(s, out: Any) -> Any:
    def leaf(obj: Any):
        if isinstance(obj, torch.Tensor):
            return {"$t": [s.add_tensor(obj), dtype_name(obj.dtype), list(obj.shape), str(obj.device)]}
        if any(c.__name__ == "Cache" for c in type(obj).__mro__):
            return None  # caches stay server-side (sessions keep them for generate)
        return NotImplemented

    return structure.pack(out, leaf)
