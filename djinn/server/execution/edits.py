"""In-place edits of session tensors: `stop.activation[:, -1] += v`, `.add_(v)`, `.copy_(local)`.

The client records edits and ships them with its next resume, fetch or fork (DESIGN.md section 10);
the engine thread applies them in order, each through a basic-indexing view of the target, so the edit
lands in the tensor itself: a paused activation is edited where the forward will read it on resume.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ...protocol.errors import InvalidRequest, ProtocolError
from ...protocol.indexing import apply_chain, decode_chain

#: wire op -> the in-place torch method it runs on the view
METHODS = {"add": "add_", "sub": "sub_", "mul": "mul_", "copy": "copy_"}
MAX_EDITS = 4096


@dataclass(frozen=True)
class Ref:
    """An edit's value that is itself a session tensor (or a view of one), read when the edit applies."""

    hid: str
    chain: tuple


@dataclass(frozen=True)
class Edit:
    hid: str               # the target tensor's handle
    chain: tuple           # basic indices into it, applied in turn; () for the whole tensor
    op: str                # a key of METHODS
    value: Any             # int | float | bool | torch.Tensor (from the wire, on the CPU) | Ref

    def describe(self) -> str:
        return f"{self.op} into {self.hid}" + "".join(f"{list(i)}" for i in self.chain)


def decode(records: Any) -> list[Edit]:
    """Check the shape of every record before any is applied (Note [Validate before allocate])."""
    if not isinstance(records, list) or len(records) > MAX_EDITS:
        raise InvalidRequest(f"edits must be a list of at most {MAX_EDITS} records")
    out = []
    for r in records:
        if not isinstance(r, dict) or not isinstance(r.get("h"), str) or r.get("op") not in METHODS:
            raise InvalidRequest(f"an edit is {{h: handle, i: index chain, op: {sorted(METHODS)}, v: value}}, "
                                 f"got {r!r:.120}")
        try:
            chain = decode_chain(r.get("i", []))
            value = r.get("v")
            if isinstance(value, dict):
                if not isinstance(value.get("h"), str):
                    raise ProtocolError("a tensor-valued edit refers to {h: handle, i: index chain}")
                value = Ref(value["h"], decode_chain(value.get("i", [])))
            elif not isinstance(value, (int, float, bool, torch.Tensor)):
                raise ProtocolError(f"an edit's value is a number, a tensor or a handle, got {type(value).__name__}")
        except ProtocolError as e:
            raise InvalidRequest(f"bad edit: {e.message}") from None
        out.append(Edit(r["h"], chain, r["op"], value))
    return out


def apply(edit: Edit, target: torch.Tensor, resolve: Callable[[str], torch.Tensor]) -> Any:
    """Apply one edit to `target`; returns the value it used, as the run's edit log keeps it."""
    value = edit.value
    if isinstance(value, Ref):
        src = resolve(value.hid)
        value = _view(src, value.chain, edit).clone()  # a snapshot: a later edit may change the source
    elif isinstance(value, torch.Tensor):
        value = value.to(target.device, copy=True)
    apply_value(target, edit.chain, edit.op, value, edit)
    return value


def apply_value(target: torch.Tensor, chain: tuple, op: str, value: Any, edit: Edit | None = None) -> None:
    view = _view(target, chain, edit)
    with torch.no_grad():
        try:
            getattr(view, METHODS[op])(value)
        except RuntimeError as e:
            what = edit.describe() if edit else op
            raise InvalidRequest(f"edit {what} of shape {list(view.shape)} failed: {str(e).splitlines()[0]}") from None


def _view(t: torch.Tensor, chain: tuple, edit: Edit | None) -> torch.Tensor:
    try:
        return apply_chain(t, chain)
    except (IndexError, TypeError, RuntimeError) as e:
        what = edit.describe() if edit else "edit"
        raise InvalidRequest(f"{what}: index does not fit shape {list(t.shape)}: {e}") from None
