"""Swapping a session's Data segment between the GPU and the pinned host pool (DESIGN.md section 3).

A swap moves tensors as one region of the host pool, one coalesced copy per tensor: never a copy per
token (BASELINES.md: many small copies run at 2-8 GB/s, large ones at ~54). The Data segment swaps a
session's KV blocks through `start`, one copy per run of consecutive block ids (djinn/vmu/data.py);
`swap_out` / `swap_in` move a list of whole tensors into and out of a region they lay out. On CUDA the copies run on the swapper's side stream with
non_blocking copies and complete on an event, so the compute stream never stalls; on the CPU the same
code runs with plain copies and a handle that is done at once.

Note [Swap stream ordering]
    Out: the side stream first waits for the compute stream (the KV was written there), then copies
    device -> host. In: the device tensors are allocated on the compute stream, the side stream waits
    for it (their memory may have been in use there) and copies host -> device. Every device tensor the
    side stream touches is `record_stream`-ed on it, so the caching allocator cannot hand its memory to
    anyone before the copy is done, even if every Python reference is dropped early. The compute stream
    may use swapped-in tensors once `done()` is true (the copy completed) or after `wait()`.
    The host region must not be reused before the copy that reads or writes it is done: release it
    only after `done()` / `wait()` (the engine releases a swapped-out copy after the swap-in completes).
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Sequence

import torch

from .host_pool import HostAlloc, HostPool


@dataclass(frozen=True)
class Slot:
    """Where one tensor lives inside a host region."""

    offset: int   # from the region's start, a multiple of the pool's alignment
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class HostCopy:
    """A swapped-out list of tensors: one host pool region and where each tensor is in it."""

    alloc: HostAlloc
    slots: tuple[Slot, ...]

    @property
    def nbytes(self) -> int:
        """Payload bytes (the region may be larger by alignment padding)."""
        return sum(s.nbytes for s in self.slots)


class SwapHandle:
    """One swap in flight. `tensors`: for a swap-in the new device tensors (usable once done); for a
    swap-out the host views holding the copies."""

    def __init__(self, direction: str, host: HostCopy, tensors: tuple[torch.Tensor, ...],
                 sources: tuple[torch.Tensor, ...], start, end, wall_s: float | None):
        self.direction = direction
        self.host = host
        self.tensors = tensors
        self._sources = sources  # device tensors a swap-out reads: kept alive until it is done
        self._start, self._end = start, end
        self._wall_s = wall_s

    @property
    def nbytes(self) -> int:
        return self.host.nbytes

    def done(self) -> bool:
        if self._end is None or self._end.query():
            self._sources = ()
            return True
        return False

    def wait(self) -> None:
        """Block until the copies are done (a host sync on CUDA; nothing on the CPU)."""
        if self._end is not None:
            self._end.synchronize()
        self._sources = ()

    def elapsed_s(self) -> float | None:
        """Seconds the copies took (CUDA events on the side stream), None until done."""
        if self._end is None:
            return self._wall_s
        if not self.done():
            return None
        return self._start.elapsed_time(self._end) / 1e3


class Swapper:
    """Issues swaps between `device` and `pool`. One per engine; owned by the engine thread."""

    def __init__(self, pool: HostPool, device: torch.device | str):
        self.pool = pool
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def _on_side(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()

    def _events(self):
        if self.stream is None:
            return None, None
        return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def swap_out(self, tensors: Sequence[torch.Tensor]) -> SwapHandle | None:
        """Start copying `tensors` (all on `device`) into one host region. None when the pool cannot
        fit them (nothing started). The caller drops its references to `tensors` to free their GPU
        memory; the handle keeps them alive until the copy is done (Note [Swap stream ordering])."""
        for t in tensors:
            if t.device != self.device:
                raise ValueError(f"swap_out of a tensor on {t.device}, swapper device is {self.device}")
        slots, total = self._layout(tensors)
        if total == 0:
            raise ValueError("swap_out of no bytes: nothing to swap")
        alloc = self.pool.allocate(total)
        if alloc is None:
            return None
        region = self.pool.view(alloc)
        host = tuple(_host_view(region, s) for s in slots)
        start, end, wall = self._copy(host, tensors, device_side=tensors)
        return SwapHandle("out", HostCopy(alloc, slots), host, tuple(tensors), start, end, wall)

    def swap_in(self, host: HostCopy) -> SwapHandle | None:
        """Start copying a swapped-out list back into new device tensors of the same shapes and dtypes.
        None when the device cannot allocate them (nothing started). The host region stays allocated:
        `release(host)` once the handle is done."""
        try:
            dst = tuple(torch.empty(s.shape, dtype=s.dtype, device=self.device) for s in host.slots)
        except torch.OutOfMemoryError:
            return None
        region = self.pool.view(host.alloc)
        start, end, wall = self._copy(dst, [_host_view(region, s) for s in host.slots], device_side=dst)
        return SwapHandle("in", host, dst, (), start, end, wall)

    def start(self, direction: str, host: HostCopy, dsts, srcs, keep=()) -> SwapHandle:
        """Copy each src into its dst on the side stream (Note [Swap stream ordering]); the device
        tensors among them are marked used by that stream. For block swaps (djinn/vmu/data.py): the
        caller owns the device blocks and keeps them (`keep` holds them alive) until the handle is done."""
        device_side = [t for t in (*dsts, *srcs) if t.device.type != "cpu"]
        start, end, wall = self._copy(dsts, srcs, device_side=device_side)
        return SwapHandle(direction, host, tuple(dsts), tuple(keep), start, end, wall)

    def _copy(self, dsts, srcs, *, device_side):
        """dst.copy_(src) for each pair on the side stream, after the compute stream's pending work;
        `device_side` tensors are marked used by that stream (Note [Swap stream ordering]).
        Returns (start event, end event, wall seconds when there is no stream)."""
        start, end = self._events()
        t0 = time.perf_counter()
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with self._on_side():
            if start is not None:
                start.record()
            for d, s in zip(dsts, srcs):
                d.copy_(s, non_blocking=True)
            if self.stream is not None:
                for t in device_side:
                    t.record_stream(self.stream)
            if end is not None:
                end.record()
        wall = None if end is not None else time.perf_counter() - t0
        return start, end, wall

    def release(self, host: HostCopy) -> None:
        """Return a swapped-out copy's region to the pool (after its swap-in is done, or to discard it)."""
        self.pool.release(host.alloc)

    def _layout(self, tensors: Sequence[torch.Tensor]) -> tuple[tuple[Slot, ...], int]:
        slots, pos, a = [], 0, self.pool.align
        for t in tensors:
            n = t.numel() * t.element_size()
            slots.append(Slot(pos, n, tuple(t.shape), t.dtype))
            pos += -(-n // a) * a
        return tuple(slots), pos


def _host_view(region: torch.Tensor, s: Slot) -> torch.Tensor:
    return region[s.offset:s.offset + s.nbytes].view(s.dtype).view(s.shape)
