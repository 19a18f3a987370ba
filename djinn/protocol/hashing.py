"""Content addresses of tensors: the Text segment's keys (DESIGN.md section 3).

A weight's address covers its dtype, shape and bytes, so two tensors with the same bytes but another
shape are different weights. Client and server compute it the same way; the server recomputes it for
every upload, so no client can plant wrong bytes under a hash another tenant will use.
"""
from __future__ import annotations

import hashlib

import torch

from .tensors import dtype_name, tensor_bytes


class WeightHasher:
    def __init__(self, dtype: torch.dtype, shape):
        self._h = hashlib.sha256(f"{dtype_name(dtype)}:{list(shape)}:".encode())

    def update(self, data) -> None:
        self._h.update(data)  # hashlib releases the GIL for large buffers

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def weight_hash(t: torch.Tensor) -> str:
    h = WeightHasher(t.dtype, t.shape)
    h.update(tensor_bytes(t))
    return h.hexdigest()
