"""Basic tensor indices (`t[:, -1]`, `t[0, 2:5, ...]`) as plain msgpack values, both ways.

An index is a list of items, one per Python index item:
  int n           -> n
  slice(a, b, c)  -> ["s", a, b, c]   (each an int or None)
  Ellipsis        -> ["..."]
  None            -> ["new"]          (a new axis)
A chain (`t[0][:, -1]`) is a list of such indices, applied one after the other.
Only basic indexing crosses the wire: the result is always a view of the indexed tensor, which is
what makes an in-place edit through it land in the tensor itself. Tensor and bool indices are refused.
"""
from __future__ import annotations

from typing import Any

from .errors import ProtocolError

MAX_ITEMS = 32
MAX_CHAIN = 8
_INT64 = (-(2**63), 2**63 - 1)


def normalize(index: Any) -> tuple:
    """A user's index as a tuple of basic items, or TypeError naming what is not supported."""
    items = index if isinstance(index, tuple) else (index,)
    for item in items:
        if item is None or item is Ellipsis or isinstance(item, slice):
            continue
        if isinstance(item, bool) or not isinstance(item, int):
            raise TypeError(f"index item {item!r} is not supported on a remote tensor: use ints, slices, "
                            "... and None (tensor indices need the lazy-op path)")
    return items


def encode_index(index: Any) -> list:
    out: list = []
    for item in normalize(index):
        if item is None:
            out.append(["new"])
        elif item is Ellipsis:
            out.append(["..."])
        elif isinstance(item, slice):
            out.append(["s", item.start, item.stop, item.step])
        else:
            out.append(item)
    if len(out) > MAX_ITEMS:
        raise ProtocolError(f"index has {len(out)} items, at most {MAX_ITEMS} are allowed")
    return out


def decode_index(wire: Any) -> tuple:
    """Wire index -> tuple usable as `tensor[...]`, or ProtocolError for anything else."""
    if not isinstance(wire, list) or len(wire) > MAX_ITEMS:
        raise ProtocolError(f"an index must be a list of at most {MAX_ITEMS} items, got {wire!r:.80}")
    items: list = []
    for item in wire:
        if _is_int(item):
            items.append(item)
        elif item == ["new"]:
            items.append(None)
        elif item == ["..."]:
            items.append(Ellipsis)
        elif isinstance(item, list) and len(item) == 4 and item[0] == "s" and all(
                v is None or _is_int(v) for v in item[1:]):
            if item[3] is not None and item[3] <= 0:
                raise ProtocolError(f"slice step must be positive, got {item[3]}")
            items.append(slice(*item[1:]))
        else:
            raise ProtocolError(f"unknown index item {item!r:.80}")
    if items.count(Ellipsis) > 1:
        raise ProtocolError("an index can have only one ellipsis (...)")
    return tuple(items)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and _INT64[0] <= v <= _INT64[1]


def encode_chain(chain: tuple) -> list:
    return [encode_index(index) for index in chain]


def decode_chain(wire: Any) -> tuple:
    if not isinstance(wire, list) or len(wire) > MAX_CHAIN:
        raise ProtocolError(f"an index chain must be a list of at most {MAX_CHAIN} indices, got {wire!r:.80}")
    return tuple(decode_index(index) for index in wire)


def apply_chain(t, chain: tuple):
    """`t[i0][i1]...`: a view of t (basic indexing only)."""
    for index in chain:
        t = t[index]
    return t
