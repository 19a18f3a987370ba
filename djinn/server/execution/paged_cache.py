"""A transformers `Cache` whose keys and values live in the VMU's KV blocks (DESIGN.md section 3).

The eager module path (forward, HF generate, breakpoint runs) hands models a `PagedCache` instead of
a `DynamicCache`: `update` writes the new positions into the session's blocks and returns the keys
and values of every position so far, gathered from the blocks into contiguous tensors, which is
exactly what `DynamicCache.update` returns (`torch.cat` of the old and new states), so attention sees
the same bits and the outputs stay bitwise-equal to local execution. The gathered copies are Stack
memory of one layer's step; the KV itself exists only in the blocks.

Note [Paged layers and the write position]
    Every layer of one forward writes the same positions. A layer writes at `table.length` and the
    table's length advances once, when the last layer has written (`_written` counts the layers that
    wrote this forward), so layer i of the next forward sees the length every layer agreed on. A
    layer that is called twice in one forward (no HF model does) raises instead of corrupting the KV.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ...protocol.errors import InvalidRequest
from ...vmu.kv_pool import KVPool, KVTable


class PagedLayer(DynamicLayer):
    """One layer's view of the session's blocks."""

    def __init__(self, cache: "PagedCache", index: int):
        super().__init__()
        self.cache, self.index = cache, index
        self.is_initialized = True
        shape = cache.pool.shape
        # Shape-only stand-ins: some transformers code reads keys.shape / .device / .dtype of a layer.
        self.keys = torch.empty(cache.table.batch, shape.kv_heads, 0, shape.head_dim, dtype=shape.dtype,
                                device="meta")
        self.values = self.keys
        self.device = cache.pool.device

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self.cache.write(self.index, key_states, value_states)

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.cache.table.length

    def get_max_length(self) -> int:
        return -1

    # Generate never calls these with the arguments the server accepts (check_generate refuses beams
    # and several return sequences); anything else that would copy, drop or reorder rows is refused.
    def reset(self) -> None:
        _refuse("resetting it (reset_kv resets a session's KV)")

    def crop(self, tokens_to_remove: int) -> None:
        _refuse("cropping it")

    def reorder_cache(self, beam_idx) -> None:
        _refuse("reordering its rows (beam search)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        _refuse("repeating its rows")

    def batch_select_indices(self, indices) -> None:
        _refuse("selecting its rows")


def _refuse(what: str) -> None:
    raise InvalidRequest(f"a session's paged KV cache does not support {what}")


class PagedCache(Cache):
    """Note [Paged layers and the write position]."""

    def __init__(self, pool: KVPool, table: KVTable):
        self.pool, self.table = pool, table
        self._written: set[int] = set()
        self._pending = 0  # positions this forward writes (set by the first layer)
        super().__init__(layers=[PagedLayer(self, i) for i in range(pool.shape.layers)])

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = k.shape[-2]
        if not self._written:
            self._pending = n
            self.pool.ensure_private(self.table, self.table.length, self.table.length + n)
        elif layer in self._written or n != self._pending:
            raise RuntimeError(f"layer {layer} wrote the KV twice (or {n} positions, not {self._pending}) "
                               "in one forward: this model's cache use is not supported")
        start = self.table.length
        self.pool.write(self.table, layer, k, v, start)
        if start == 0:
            # Exactly what a fresh DynamicLayer returns for its first update (the states themselves,
            # or a contiguous copy, depending on the transformers version): attention kernels may pick
            # another path for other strides, and outputs must stay bitwise-equal to local runs.
            keys, values = DynamicLayer().update(k, v)
        else:
            keys, values = self.pool.read(self.table, layer, start + n)
        self._written.add(layer)
        if len(self._written) == self.pool.shape.layers:
            self.table.length += n
            self._written.clear()
        return keys, values

    def abort_forward(self) -> None:
        """A forward failed part way: the positions some layers wrote are not part of the sequence."""
        self._written.clear()

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.table.length
