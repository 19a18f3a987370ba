"""The pinned host pool: one buffer allocated at start, carved into swap regions (DESIGN.md section 3).

Nothing is pinned on the request path: the server pins `capacity` bytes once and swaps copy into and
out of regions of it. Regions are handed out as `HostAlloc(offset, nbytes)` handles by a first-fit
allocator over a free list kept sorted by offset and coalesced on release (Note [Host free list]).
A request that does not fit gets None, which the scheduler acts on; a broken invariant (releasing a
region twice, a handle the pool never gave) is an exception.

Note [Host free list]
    `_free` is a list of (offset, nbytes) blocks sorted by offset, no two overlapping or touching
    (touching blocks are merged on release). Live regions are `_live` {offset: nbytes}. Every region
    starts and ends on a multiple of `align`, so tensors of any dtype can be viewed at region offsets.
    Together, live regions and free blocks tile [0, capacity) exactly (`check()` verifies it).

Note [Pinning the pool]
    On a CUDA machine the buffer is pageable memory registered with cudaHostRegister: torch's pinned
    allocator (`pin_memory=True`) rounds every allocation up to a power of two (a 40 GiB pool would pin
    64 GiB) and pins slower than registering (BASELINES.md: 0.5 s vs 0.05 s per GiB). Where the runtime
    refuses to register, it falls back to `pin_memory=True`. On a CPU-only machine nothing is pinned
    and swaps are plain copies (same code path).
"""
from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass

import torch

log = logging.getLogger("djinn.vmu.host_pool")


@dataclass(frozen=True)
class HostAlloc:
    offset: int
    nbytes: int
    """Bytes reserved: the request rounded up to the pool's alignment."""


class HostPool:
    def __init__(self, capacity: int, *, pin: bool | None = None, align: int = 512):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"host pool capacity {capacity!r} must be a whole number of bytes >= 0")
        if align <= 0 or align & (align - 1):
            raise ValueError(f"align={align} must be a power of two")
        self.capacity = capacity - capacity % align
        self.align = align
        self.pin = torch.cuda.is_available() if pin is None else pin
        self._registered = False
        self.buffer = self._make_buffer(self.capacity)  # [capacity] uint8
        self._free: list[tuple[int, int]] = [(0, self.capacity)] if self.capacity else []
        self._live: dict[int, int] = {}
        self.used = 0

    def _make_buffer(self, n: int) -> torch.Tensor:
        if not self.pin or n == 0:
            return torch.empty(n, dtype=torch.uint8)
        buf = torch.empty(n, dtype=torch.uint8)
        err = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), n, 0)
        if int(err) == 0:
            self._registered = True
            return buf
        log.warning("cudaHostRegister of %d bytes failed (%s); pinning with torch's allocator instead", n, err)
        return torch.empty(n, dtype=torch.uint8, pin_memory=True)

    @property
    def pinned(self) -> bool:
        return self.pin and self.capacity > 0 and self.buffer.is_pinned()

    # -- allocation --------------------------------------------------------------------------------------
    def allocate(self, nbytes: int) -> HostAlloc | None:
        """A region of at least `nbytes` (rounded up to `align`), first fit; None when none is free."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
            raise ValueError(f"cannot allocate {nbytes!r} bytes: need a whole number > 0")
        size = -(-nbytes // self.align) * self.align
        for i, (off, n) in enumerate(self._free):
            if n >= size:
                if n == size:
                    del self._free[i]
                else:
                    self._free[i] = (off + size, n - size)
                self._live[off] = size
                self.used += size
                return HostAlloc(off, size)
        return None

    def release(self, a: HostAlloc) -> None:
        if self._live.get(a.offset) != a.nbytes:
            raise RuntimeError(f"release of {a}, which this pool has not handed out (or released already)")
        del self._live[a.offset]
        self.used -= a.nbytes
        off, n = a.offset, a.nbytes
        i = bisect.bisect_left(self._free, (off, 0))
        if i < len(self._free) and off + n == self._free[i][0]:  # merge with the block after
            n += self._free.pop(i)[1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == off:  # and the one before
            off, n = self._free[i - 1][0], self._free[i - 1][1] + n
            i -= 1
            del self._free[i]
        self._free.insert(i, (off, n))

    def view(self, a: HostAlloc) -> torch.Tensor:
        """The region's bytes: [a.nbytes] uint8, a view into the pinned buffer."""
        return self.buffer[a.offset:a.offset + a.nbytes]

    # -- accounting --------------------------------------------------------------------------------------
    @property
    def free(self) -> int:
        return self.capacity - self.used

    @property
    def largest_free(self) -> int:
        return max((n for _, n in self._free), default=0)

    @property
    def free_blocks(self) -> list[tuple[int, int]]:
        """(offset, nbytes) of every free block, by offset (a copy: for stats and tests)."""
        return list(self._free)

    def __len__(self) -> int:
        return len(self._live)

    def check(self) -> None:
        """Verify Note [Host free list]; raises AssertionError naming what is broken."""
        spans = sorted([(o, n, "free") for o, n in self._free] + [(o, n, "live") for o, n in self._live.items()])
        pos = 0
        for o, n, kind in spans:
            assert o == pos, f"{kind} block at {o}, expected {pos}: gap or overlap in {spans}"
            assert n > 0 and o % self.align == 0 and n % self.align == 0, f"unaligned {kind} block {(o, n)}"
            pos = o + n
        assert pos == self.capacity, f"blocks end at {pos}, capacity {self.capacity}"
        assert self._free == sorted(self._free), "free list out of order"
        for (o1, n1), (o2, _) in zip(self._free, self._free[1:]):
            assert o1 + n1 < o2, f"free blocks {(o1, n1)} and {o2} touch: not coalesced"
        assert self.used == sum(self._live.values()), f"used {self.used} != live {sum(self._live.values())}"

    def close(self) -> None:
        """Unpin and drop the buffer (the pool is unusable afterwards)."""
        if self._registered:
            torch.cuda.cudart().cudaHostUnregister(self.buffer.data_ptr())
            self._registered = False
        self.buffer = torch.empty(0, dtype=torch.uint8)
        self._free, self._live, self.used, self.capacity = [], {}, 0, 0
