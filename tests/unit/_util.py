"""Helpers shared by the tier-1 unit tests (no server, CPU only)."""
from __future__ import annotations

import math
import warnings

import msgpack
import numpy as np
import torch

from djinn.protocol.tensors import itemsize

# complex32 construction warns that ComplexHalf is experimental; the tests only move its bytes.
warnings.filterwarnings("ignore", message="ComplexHalf support is experimental")


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """A contiguous tensor of `dtype`/`shape` over random bytes, and those bytes as a uint8 array
    of shape (*shape, itemsize). bool gets only 0/1 bytes (other values are not valid bools)."""
    isz = itemsize(dtype)
    n = math.prod(shape)
    rng = np.random.default_rng(seed)
    high = 2 if dtype == torch.bool else 256
    raw = rng.integers(0, high, size=(*shape, isz), dtype=np.uint8)
    if n == 0:
        return torch.empty(shape, dtype=dtype), raw
    t = torch.from_numpy(raw.reshape(-1).copy()).view(dtype).reshape(shape)
    return t, raw


def bits(t: torch.Tensor) -> bytes:
    """The tensor's values as raw bytes in C order (bitwise comparison, NaN-safe)."""
    flat = t.contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    return flat.view(torch.uint8).numpy().tobytes()


def packb(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def ext(code: int, payload) -> msgpack.ExtType:
    """An ext value; payload is packed unless it is already bytes."""
    return msgpack.ExtType(code, payload if isinstance(payload, bytes) else packb(payload))


def raw_ext(code: int, data: bytes) -> bytes:
    """msgpack bytes of an ext value with any code, negative ones included (ExtType refuses those)."""
    assert len(data) < 256
    return bytes([0xC7, len(data), code & 0xFF]) + data


def frame_bytes(frames) -> list[bytes]:
    return [bytes(f) for f in frames]
