"""The memory no tenant may write: every storage a weight of the Text segment lives in.

Note [Weights are read-only at run time]
    Weights are shared by every tenant, so no tenant may write into their bytes, through any view.
    Capture and compile_graph refuse the writes they can see through alias annotations, but annotations
    are not a boundary: `aten._unsafe_view` aliases its input without saying so, `split`'s list outputs
    were not followed, `native_batch_norm` writes `running_mean` with no annotation at all, and a graph
    or a breakpoint can hand the weight itself to a tenant. So the server checks storage identity when
    the write would happen. `ReadOnlyMemory` holds the byte range of every storage a Text entry lives in
    (TextSegment keeps it as entries come, move and go), and
      - every tensor an op is about to write (server/execution/interpreter.py: in-place outputs and mutated
        arguments) and every edit target (server/execution/runs.py) that overlaps one is refused with
        WeightWriteRefused before anything is written;
      - every tensor a tenant gets a handle to (Session.add_tensor: forward, run_graph and run outputs;
        a breakpoint's stop tensors, server/execution/breakpoints.py) that overlaps one is copied first, so no
        handle ever aliases a weight, whatever op a later request runs on it.
    Ranges, not pointers: a PINNED entry is a view into a streaming model's buffer, and storages made
    from raw memory can share bytes with another storage; an overlap of byte ranges catches every case.
    A check is one bisect over the sorted ranges, cheap enough to run on every write and every handle.
"""
from __future__ import annotations

from bisect import bisect_left

import torch

from ..protocol.errors import WeightWriteRefused


class ReadOnlyMemory:
    """Byte ranges of weight storages, per device. `track` is the Text segment's alone; everyone else
    asks `aliases`, `private` or `refuse_write`."""

    def __init__(self) -> None:
        self._ranges: dict[tuple[torch.device, int], list[int]] = {}  # (device, start) -> [end, entries]
        self._index: dict[torch.device, tuple[list[int], list[int]]] | None = None  # built on demand

    @classmethod
    def of(cls, tensors) -> "ReadOnlyMemory":
        """The storages of these tensors (an interpreter run outside a server: the graph's own weights)."""
        mem = cls()
        for t in tensors:
            mem.track(t, +1)
        return mem

    def __len__(self) -> int:
        return len(self._ranges)

    def track(self, t: torch.Tensor, k: int) -> None:
        """Count one more (k=+1) or one fewer (k=-1) weight in t's storage."""
        r = _storage_range(t)
        if r is None:
            return
        key, end = r
        slot = self._ranges.get(key)
        if slot is None:
            if k <= 0:
                return
            slot = self._ranges[key] = [end, 0]
        slot[1] += k
        if slot[1] <= 0:
            del self._ranges[key]
        self._index = None

    def aliases(self, t: torch.Tensor) -> bool:
        """Whether t's storage shares any byte with a weight's storage."""
        r = _storage_range(t)
        if r is None:
            return False
        (device, start), end = r
        index = self._index if self._index is not None else self._build()
        starts_ends = index.get(device)
        if starts_ends is None:
            return False
        starts, max_end = starts_ends
        j = bisect_left(starts, end) - 1  # the ranges that start before t's storage ends
        return j >= 0 and max_end[j] > start

    def private(self, t: torch.Tensor) -> torch.Tensor:
        """t, or a copy of it when it lives in a weight's storage (what a tenant may hold a handle to)."""
        return t.clone() if self.aliases(t) else t

    def refuse_write(self, t: torch.Tensor, what: str) -> None:
        if self.aliases(t):
            raise WeightWriteRefused(f"{what} would write into a weight's storage (shared by every tenant, "
                                     "read-only; Note [Weights are read-only at run time]): nothing was "
                                     "written. Write into a copy (clone it first)")

    def _build(self) -> dict[torch.device, tuple[list[int], list[int]]]:
        per: dict[torch.device, list[tuple[int, int]]] = {}
        for (device, start), (end, _) in self._ranges.items():
            per.setdefault(device, []).append((start, end))
        index = {}
        for device, ranges in per.items():
            ranges.sort()
            starts, max_end, m = [], [], 0
            for s, e in ranges:  # max_end[j]: the furthest any of the first j+1 ranges reaches
                m = max(m, e)
                starts.append(s)
                max_end.append(m)
            index[device] = (starts, max_end)
        self._index = index
        return index


def _storage_range(t: torch.Tensor) -> tuple[tuple[torch.device, int], int] | None:
    """((device, first byte), one past the last byte) of t's storage; None if it has no bytes."""
    if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.device.type == "meta":
        return None
    s = t.untyped_storage()
    start, n = s.data_ptr(), s.nbytes()
    if n == 0 or start == 0:
        return None
    return (t.device, start), start + n
