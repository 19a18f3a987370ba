"""Content addresses of tensors: the Text segment's keys (DESIGN.md section 3).

A weight's address covers its dtype, shape and bytes, so two tensors with the same bytes but another
shape are different weights. Client and server compute it the same way; the server recomputes it for
every upload, so no client can plant wrong bytes under a hash another tenant will use.

Note [Tree hash]: the bytes are cut into LEAF_BYTES leaves; the address is
sha256(b"{dtype}:{shape}:" + sha256(leaf 0) + sha256(leaf 1) + ...). Leaves hash independently, so
both sides hash a large tensor on several cores (hashlib releases the GIL), and the server can verify
chunks as they arrive in any split.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from .tensors import dtype_name, tensor_bytes

LEAF_BYTES = 8 << 20

_pool: ThreadPoolExecutor | None = None


def pool() -> ThreadPoolExecutor:
    """Threads for leaf hashing, shared by the process (created on first use)."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2)), thread_name_prefix="djinn-hash")
    return _pool


def prefix(dtype: torch.dtype, shape) -> bytes:
    return f"{dtype_name(dtype)}:{list(shape)}:".encode()


def leaf_digest(data) -> bytes:
    return hashlib.sha256(data).digest()


def combine(dtype: torch.dtype, shape, digests: list[bytes]) -> str:
    return hashlib.sha256(prefix(dtype, shape) + b"".join(digests)).hexdigest()


def weight_hash(t: torch.Tensor) -> str:
    data = tensor_bytes(t)
    leaves = [data[i:i + LEAF_BYTES] for i in range(0, data.nbytes, LEAF_BYTES)]
    if len(leaves) > 1:
        digests = list(pool().map(leaf_digest, leaves))
    else:
        digests = [leaf_digest(v) for v in leaves]
    return combine(t.dtype, t.shape, digests)
