"""Chunked weight uploads into the Text segment, verified against their content address.

A tensor of any size arrives as in-order chunks (each well under the frame limit). Chunks are copied
straight into a device buffer of the final size and hashed as they come (whole leaves on the hashing
pool while the copy runs, see Note [Tree hash]), so a multi-GB weight never needs a single huge
message, a second host copy, or a second pass to verify.

A tensor's whole size is reserved at its first chunk, so the bytes of unfinished uploads are charged
to the uploading principal (Note [One ledger] in djinn/server/principals.py) from the first chunk until
the upload finishes, fails or its session closes: a tenant cannot hold more than its cap however many
client ids or sessions it opens.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..protocol.errors import InvalidRequest, ProtocolError
from ..protocol import hashing
from ..protocol.tensors import check_shape, dtype_from_name, expected_nbytes


class Account(Protocol):
    """Where reserved bytes are charged (the server's Ledger, Resource.UPLOAD_BYTES): `take` raises
    QuotaExceeded, having taken nothing, when the owner would pass its cap."""

    def take(self, owner: str, n: int) -> None: ...

    def give(self, owner: str, n: int) -> None: ...


@dataclass
class PartialUpload:
    dtype: torch.dtype
    shape: tuple[int, ...]
    total: int
    owner: str     # who the reserved `total` bytes are charged to
    buffer: torch.Tensor  # uint8 [total] on the device
    digests: list  # per leaf: bytes once hashed
    partial: dict = field(default_factory=dict)  # leaf index -> sha256 of a leaf split across chunks
    received: int = 0


class Uploads:
    """Owns the partial uploads of every session (engine thread only)."""

    def __init__(self, device: torch.device, account: Account | None = None):
        self.device = device
        self.account = account  # None: reservations are not capped (unit tests)
        self._partial: dict[tuple[str, str], PartialUpload] = {}

    @property
    def nbytes(self) -> int:
        return sum(p.total for p in self._partial.values())

    def put(self, sid: str, item: dict, host: bool = False, owner: str | None = None) -> tuple[str, torch.Tensor] | None:
        """Take one chunk; return (hash, finished tensor) when the tensor is complete and verified.

        `host`: assemble a new tensor in (pageable) host memory instead of on the device: weights of a
        model with a GPU weight budget are staged there until the plan says which are resident.
        `owner`: the principal the reservation is charged to (None: the session id itself).
        """
        h, data = item.get("hash"), item.get("data")
        offset, total = item.get("offset"), item.get("total")
        if not isinstance(h, str) or len(h) != 64:
            raise InvalidRequest(f"upload item needs a 64-hex-digit hash, got {h!r}")
        if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() != 1:
            raise InvalidRequest("upload item data must be a 1-d uint8 tensor")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (offset, total)):
            raise InvalidRequest("upload item needs integer offset and total")
        key = (sid, h)
        part = self._partial.get(key)
        if part is None:
            dtype = dtype_from_name(item.get("dtype"))
            shape = check_shape(item.get("shape"))
            if total != expected_nbytes(dtype, shape) or offset != 0:
                raise InvalidRequest(
                    f"upload of {h[:12]}: total={total} offset={offset} but {dtype}{list(shape)} is "
                    f"{expected_nbytes(dtype, shape)} bytes starting at offset 0"
                )
            owner = sid if owner is None else owner
            if self.account is not None:
                self.account.take(owner, total)  # before the buffer: a refused upload allocates nothing
            try:
                n_leaves = -(-total // hashing.LEAF_BYTES)
                device = torch.device("cpu") if host else self.device
                part = PartialUpload(dtype, shape, total, owner, torch.empty(total, dtype=torch.uint8, device=device),
                                     [None] * n_leaves)
            except BaseException:
                if self.account is not None:
                    self.account.give(owner, total)
                raise
            self._partial[key] = part
        if offset != part.received or offset + data.numel() > part.total:
            self._drop(key)
            raise InvalidRequest(
                f"upload of {h[:12]}: chunk at {offset} (+{data.numel()}) does not follow the "
                f"{part.received} bytes received of {part.total}"
            )
        if data.numel():
            pending = _hash_piece(part, offset, memoryview(data.numpy()))
            part.buffer[offset:offset + data.numel()].copy_(data)  # overlaps the leaf hashing
            for fut in pending:
                fut.result()
        part.received += data.numel()
        if part.received < part.total:
            return None
        self._drop(key)
        got = hashing.combine(part.dtype, part.shape, part.digests)
        if got != h:
            raise ProtocolError(f"upload of {h[:12]}: the bytes received hash to {got[:12]}")
        if part.total == 0:
            return h, torch.empty(part.shape, dtype=part.dtype, device=part.buffer.device)
        return h, part.buffer.view(part.dtype).reshape(part.shape)

    def drop_session(self, sid: str) -> None:
        for key in [k for k in self._partial if k[0] == sid]:
            self._drop(key)

    def reserved(self) -> dict[str, int]:
        """Bytes reserved per owner (what the Ledger must hold: Note [One ledger])."""
        out: dict[str, int] = {}
        for p in self._partial.values():
            out[p.owner] = out.get(p.owner, 0) + p.total
        return out

    def _drop(self, key: tuple[str, str]) -> None:
        """The one place a partial upload goes (finished, failed or its session closed): its bytes are given back."""
        part = self._partial.pop(key, None)
        if part is not None and self.account is not None:
            self.account.give(part.owner, part.total)


def _hash_piece(part: PartialUpload, offset: int, data: memoryview) -> list:
    """Hash bytes [offset, offset+len) of a tensor: whole leaves on the pool, split leaves inline."""
    futures = []
    pos, end, leaf_size = offset, offset + data.nbytes, hashing.LEAF_BYTES
    while pos < end:
        leaf = pos // leaf_size
        leaf_end = min((leaf + 1) * leaf_size, part.total)
        seg_end = min(leaf_end, end)
        view = data[pos - offset:seg_end - offset]
        if pos == leaf * leaf_size and seg_end == leaf_end:
            futures.append(hashing.pool().submit(_store_digest, part.digests, leaf, view))
        else:
            h = part.partial.setdefault(leaf, hashlib.sha256())
            h.update(view)
            if seg_end == leaf_end:
                part.digests[leaf] = part.partial.pop(leaf).digest()
        pos = seg_end
    return futures


def _store_digest(digests: list, leaf: int, view: memoryview) -> None:
    digests[leaf] = hashing.leaf_digest(view)
