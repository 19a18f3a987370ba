"""Exact byte accounting per segment and per session (DESIGN.md section 3).

Segments: text (weights on the device), data (sessions' KV caches and tensors on the device), stack
(activations of paused steps), host (bytes in host memory: swapped KV in the pinned pool, staged
weights). Every byte is charged either to a session or as shared (sid None: weights belong to models,
not sessions). One owner, the engine thread; `snapshot()` gives stats a copy.

Note [Accounting returns to zero]
    Each segment's total is kept equal to its shared bytes plus every open session's bytes, and no
    count goes below zero: a release of more than was charged is a bug and raises at once, where it
    happens. `close_session` releases whatever a session still holds and forgets it, so after every
    session closes the per-session totals are exactly zero; `check()` verifies the sums.
"""
from __future__ import annotations

from ..scheduler.types import MemoryView
from .host_pool import HostPool

TEXT, DATA, STACK, HOST = "text", "data", "stack", "host"
SEGMENTS = (TEXT, DATA, STACK, HOST)


class Accounting:
    def __init__(self) -> None:
        self._totals = dict.fromkeys(SEGMENTS, 0)
        self._shared = dict.fromkeys(SEGMENTS, 0)
        self._sessions: dict[str, dict[str, int]] = {}

    def _bucket(self, segment: str, sid: str | None, create: bool) -> dict[str, int]:
        if segment not in self._totals:
            raise ValueError(f"unknown segment {segment!r}; segments are {SEGMENTS}")
        if sid is None:
            return self._shared
        b = self._sessions.get(sid)
        if b is None:
            if not create:
                raise RuntimeError(f"session {sid} holds no bytes (closed, or never charged)")
            b = self._sessions[sid] = dict.fromkeys(SEGMENTS, 0)
        return b

    def add(self, segment: str, nbytes: int, sid: str | None = None) -> None:
        if nbytes < 0:
            raise ValueError(f"add of {nbytes} bytes: use sub to release")
        self._bucket(segment, sid, True)[segment] += nbytes
        self._totals[segment] += nbytes

    def sub(self, segment: str, nbytes: int, sid: str | None = None) -> None:
        if nbytes < 0:
            raise ValueError(f"sub of {nbytes} bytes: use add to charge")
        b = self._bucket(segment, sid, False)
        if b[segment] < nbytes:
            who = f"session {sid}" if sid is not None else "shared"
            raise RuntimeError(f"release of {nbytes} {segment} bytes, {who} holds only {b[segment]}")
        b[segment] -= nbytes
        self._totals[segment] -= nbytes

    def move(self, sid: str | None, src: str, dst: str, nbytes: int) -> None:
        """`nbytes` of a session go from one segment to another (a swap-out: data -> host)."""
        self.sub(src, nbytes, sid)
        self.add(dst, nbytes, sid)

    def close_session(self, sid: str) -> dict[str, int]:
        """Release everything the session holds; returns what it held per segment."""
        held = self._sessions.pop(sid, None) or dict.fromkeys(SEGMENTS, 0)
        for seg, n in held.items():
            self._totals[seg] -= n
        return held

    # -- reads -------------------------------------------------------------------------------------------
    def segment(self, segment: str) -> int:
        return self._totals[segment]

    def segments(self) -> dict[str, int]:
        return dict(self._totals)

    def session(self, sid: str) -> dict[str, int]:
        return dict(self._sessions.get(sid) or dict.fromkeys(SEGMENTS, 0))

    def shared(self) -> dict[str, int]:
        return dict(self._shared)

    def snapshot(self) -> dict:
        return {"segments": self.segments(), "shared": self.shared(),
                "sessions": {sid: dict(b) for sid, b in self._sessions.items()}}

    def check(self) -> None:
        """Verify Note [Accounting returns to zero]; raises AssertionError naming the segment."""
        for seg in SEGMENTS:
            parts = self._shared[seg] + sum(b[seg] for b in self._sessions.values())
            assert self._totals[seg] == parts, f"{seg}: total {self._totals[seg]} != shared + sessions {parts}"
            assert min([self._shared[seg], *(b[seg] for b in self._sessions.values())]) >= 0, f"{seg} < 0"


def data_memory_view(acct: Accounting, gpu_capacity: int, pool: HostPool | None) -> MemoryView:
    """The scheduler's MemoryView: the Data segment against its GPU budget, and the host pool."""
    if pool is None:
        return MemoryView(gpu_capacity, acct.segment(DATA))
    return MemoryView(gpu_capacity, acct.segment(DATA), pool.capacity, pool.used, pool.largest_free)
