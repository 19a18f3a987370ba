"""Weight upload into the server's Text segment: hash, ask what is missing, send only that, in chunks.

Hashes are cached per tensor object (invalidated by torch's version counter), so remoting the same
module again costs one small message. Chunks are ~32 MiB uint8 views of the weights (no copies on the
client) with a window of messages in flight so the link stays busy.
"""
from __future__ import annotations

import weakref
from collections import deque
from dataclasses import dataclass

import torch
from torch import nn

from ..protocol.hashing import weight_hash
from ..protocol.messages import Limits
from ..protocol.tensors import dtype_name, flat_bytes

_PROGRESS_BYTES = 256 << 20  # show a progress bar above this much to upload
_MAX_ITEMS = 1024  # per message, well under the server's max_frames (one frame per tensor piece)


class HashCache:
    """tensor -> weight hash, valid while the tensor object lives and is not modified in place."""

    def __init__(self) -> None:
        self._cache: dict[int, tuple[weakref.ref, int, str]] = {}

    def __call__(self, t: torch.Tensor) -> str:
        key = id(t)
        hit = self._cache.get(key)
        if hit is not None and hit[0]() is t and hit[1] == t._version:
            return hit[2]
        h = weight_hash(t)
        self._cache[key] = (weakref.ref(t, lambda _, k=key: self._cache.pop(k, None)), t._version, h)
        return h


@dataclass
class UploadReport:
    tensors: int
    unique: int
    uploaded: int
    bytes_uploaded: int


def named_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer, tied ones under each name (the server rebuilds the tying).

    The Parameter objects themselves (not `.detach()` views, which are new objects on every call):
    HashCache keys on the tensor object, so this is what lets a second remote of a module skip hashing.
    """
    out = [(n, p) for n, p in module.named_parameters(remove_duplicate=False)]
    out += [(n, b) for n, b in module.named_buffers(remove_duplicate=False)]
    return out


def upload_tensors(session, tensors: list[tuple[str, torch.Tensor]], hashes: HashCache,
                   chunk_bytes: int, window: int, stage: str | None = None) -> tuple[dict[str, str], UploadReport]:
    """Make every tensor present on the server (pinned to `session`); return name -> hash.

    stage="host": the server keeps what arrives in host memory (a model with a GPU weight budget).
    """
    by_name = {name: hashes(t) for name, t in tensors}
    unique: dict[str, torch.Tensor] = {}
    for name, t in tensors:
        unique.setdefault(by_name[name], t)
    missing = session.call("has_weights", {"hashes": list(unique)}, idempotent=True)["missing"]
    total = sum(unique[h].numel() * unique[h].element_size() for h in missing)
    bar = _progress(total)
    in_flight: deque = deque()
    for items, nbytes in _chunks([(h, unique[h]) for h in missing], chunk_bytes, _piece_bytes(session.conn.info)):
        args = {"items": items, "stage": stage} if stage else {"items": items}
        in_flight.append((session.submit("upload", args), nbytes))
        if len(in_flight) >= window:
            _wait_one(in_flight, bar)
    while in_flight:
        _wait_one(in_flight, bar)
    if bar is not None:
        bar.close()
    return by_name, UploadReport(len(tensors), len(unique), len(missing), total)


def _wait_one(in_flight: deque, bar) -> None:
    fut, nbytes = in_flight.popleft()
    fut.result()
    if bar is not None:
        bar.update(nbytes)


def _piece_bytes(server_info: dict) -> int:
    """Largest upload item: one wire frame of the server's (Note [Small frames] in protocol/codec.py), so
    the server copies each item into place as it came, with no join of a tensor split over frames."""
    size = (server_info.get("limits") or {}).get("wire_frame_bytes")
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else Limits().wire_frame_bytes


def _chunks(tensors: list[tuple[str, torch.Tensor]], chunk_bytes: int, piece_bytes: int):
    """Yield (items, nbytes) messages of about chunk_bytes, each item at most piece_bytes; big tensors
    are split across items and messages."""
    items, size = [], 0
    for h, t in tensors:
        raw = flat_bytes(t)  # the bytes weight_hash hashed, whatever t's layout (Note [Any layout travels])
        total = raw.numel()
        offset = 0
        while True:
            n = min(chunk_bytes - size, total - offset, piece_bytes)
            items.append({"hash": h, "dtype": dtype_name(t.dtype), "shape": list(t.shape),
                          "offset": offset, "total": total, "data": raw[offset:offset + n]})
            size += n
            offset += n
            if size >= chunk_bytes or len(items) >= _MAX_ITEMS:
                yield items, size
                items, size = [], 0
            if offset >= total:
                break
    if items:
        yield items, size


def _progress(total: int):
    if total < _PROGRESS_BYTES:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="B", unit_scale=True, desc="djinn upload")
