"""What the scheduler sees and what it decides (DESIGN.md sections 5 and 10, "Scheduler and swap").

Pure data: no torch, no CUDA, no state kept between calls. Each engine step builds a `View` from its
session table and the VMU; a policy turns it into one `Decision`; the engine executes the decision, and
the next `View` shows the outcome (a swap in flight, then done). So a policy is tested on the CPU with
fake sizes and a fake clock, and two policies given the same view can be compared decision for decision.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class SessionState(enum.IntEnum):
    """Where a session's KV cache is, as seen by the scheduler.

    Note [State bands]
        The order is the lifecycle of one tool call (ACTIVE -> IO_WAIT -> SWAPPING_OUT -> SWAPPED ->
        PREFETCHING -> back to ACTIVE) followed by the states that have no KV anywhere. Policies and
        `check_decision` rely on three bands, so a new state goes into the band it belongs to:
        ACTIVE..IO_WAIT          the KV is on the GPU and usable (`resident`);
        SWAPPING_OUT..PREFETCHING the KV is in the host tier or moving between tiers (`in_host_tier`);
        DROPPED..QUEUED          no KV anywhere: the next request prefills it again (`needs_prefill`).
    """

    ACTIVE = 1        # KV on the GPU; running a request or idle between requests
    IO_WAIT = 2       # KV on the GPU; the application signalled it waits (tool, user) until COMPUTE or a request
    SWAPPING_OUT = 3  # GPU -> host copy in flight: the GPU bytes are freed when it completes
    SWAPPED = 4       # KV only in the host pool
    PREFETCHING = 5   # host -> GPU copy in flight: the GPU bytes were taken at issue, the host bytes go on completion
    DROPPED = 6       # KV discarded (recompute policy); the token ids are kept, a request re-prefills them
    NEW = 7           # opened, no KV yet
    QUEUED = 8        # a request waits for admission (no KV on the GPU; was NEW or DROPPED)

    @property
    def resident(self) -> bool:
        return self <= SessionState.IO_WAIT

    @property
    def in_host_tier(self) -> bool:
        return SessionState.SWAPPING_OUT <= self <= SessionState.PREFETCHING

    @property
    def needs_prefill(self) -> bool:
        return self >= SessionState.DROPPED


class Reason:
    """Why an action was chosen: plain strings, so decisions print readably and compare in tests."""

    IO_WAIT = "io_wait"                # swap-out: the session waits on I/O and GPU memory is wanted
    IO_WAIT_ALWAYS = "io_wait_always"  # swap-out: the session waits on I/O (policy configured to always swap)
    MAKE_ROOM = "make_room"            # swap-out or drop of an idle session, for `cause`
    ETA = "eta"                        # prefetch: back on the GPU by the session's announced return
    MISS = "miss"                      # prefetch: a request arrived while the KV was in the host tier
    FITS = "fits"                      # admit / run: the memory it needs is free
    WAITING_FOR_ROOM = "waiting_for_room"  # queue: swap-outs in flight (or just decided) will make room
    NO_MEMORY = "no_memory"            # queue: not even evicting every candidate would make room
    BEHIND = "behind"                  # queue: first come first served; `cause` is the request it waits behind
    SWAP_OUT_IN_FLIGHT = "swap_out_in_flight"  # queue: its KV is leaving; it comes back once the copy is done
    PREFETCH_IN_FLIGHT = "prefetch_in_flight"  # queue: its KV is coming back


@dataclass(frozen=True)
class SessionView:
    """One session, read-only, as the engine reports it to the scheduler. Bytes are exact."""

    sid: str
    state: SessionState
    gpu_bytes: int = 0
    """Bytes charged to it on the GPU: its KV, plus the reservation of a request it is running."""
    host_bytes: int = 0
    """Bytes it holds in the pinned host pool (its swapped KV)."""
    last_active: float = 0.0
    """Clock time its last request finished (or started, while it runs)."""
    pending: bool = False
    """A request of this session is waiting or running (a running request stays pending until done)."""
    arrival: int = 0
    """Arrival sequence number of the pending request: first come, first served."""
    need_bytes: int = 0
    """GPU bytes the pending request needs in total (its KV after the request; the engine reserves it)."""
    io_wait_since: float | None = None
    """Clock time of its IO_WAIT signal; None when it has not signalled (or a request/COMPUTE ended it)."""
    io_eta_s: float | None = None
    """The wait it announced, in seconds; None when unknown."""

    @property
    def returns_at(self) -> float | None:
        """Clock time it said it would be back, or None when it did not say."""
        if self.io_wait_since is None or self.io_eta_s is None:
            return None
        return self.io_wait_since + self.io_eta_s

    @property
    def idle(self) -> bool:
        """Its KV is on the GPU and nothing of it runs or waits: a candidate to swap out or drop."""
        return self.state.resident and not self.pending and self.gpu_bytes > 0


@dataclass(frozen=True)
class MemoryView:
    """The Data segment's GPU budget and the pinned host pool, in bytes."""

    gpu_capacity: int
    """Bytes the Data segment (KV caches, session tensors) may use on the GPU."""
    gpu_used: int
    """Bytes charged to sessions on the GPU, swaps in flight included."""
    host_capacity: int = 0
    """Size of the pinned host pool (0: no pool, nothing can be swapped)."""
    host_used: int = 0
    host_largest_free: int = 0
    """Largest contiguous free block of the pool: one swap-out needs one block."""

    @property
    def gpu_free(self) -> int:
        return self.gpu_capacity - self.gpu_used

    @property
    def host_free(self) -> int:
        return self.host_capacity - self.host_used


@dataclass(frozen=True)
class View:
    """Everything one `schedule` call may look at."""

    now: float
    """The clock, seconds (time.monotonic() on the server, a fake clock in tests)."""
    sessions: tuple[SessionView, ...]
    memory: MemoryView
    swap_bw: float
    """Bytes per second of one direction of swap, as the VMU measured it (a configured default until the
    first swap completes)."""

    def session(self, sid: str) -> SessionView:
        for s in self.sessions:
            if s.sid == sid:
                return s
        raise KeyError(sid)


@dataclass(frozen=True)
class Action:
    sid: str
    nbytes: int
    """Bytes it moves, frees or takes: swap_out/drop the session's GPU bytes, prefetch its host bytes,
    admit its need, run the growth it still needs beyond what it holds."""
    reason: str
    cause: str | None = None
    """The session this action is for (a victim's beneficiary), or waits behind (a queued request)."""
    at: float | None = None
    """Planned actions only: the clock time it is due."""


ACTION_KINDS = ("swap_out", "drop", "prefetch", "admit", "run", "queue")


@dataclass(frozen=True)
class Decision:
    """One step's whole decision. The engine executes the lists in this order:

    swap_out  start GPU -> host copies (the GPU bytes free when each completes, not now);
    drop      discard KV caches now (their GPU bytes free at once);
    prefetch  start host -> GPU copies (GPU bytes taken now);
    admit     give a request of a session without KV its memory and prefill;
    run       step the sessions whose KV is on the GPU and who have a request;
    queue     requests that wait, each with why.
    Every list is in the order the policy chose (requests first come, first served). `planned` lists
    prefetches due later (`at` > now); `wake_at` is when to call `schedule` again if nothing else happens.
    """

    swap_out: tuple[Action, ...] = ()
    drop: tuple[Action, ...] = ()
    prefetch: tuple[Action, ...] = ()
    admit: tuple[Action, ...] = ()
    run: tuple[Action, ...] = ()
    queue: tuple[Action, ...] = ()
    planned: tuple[Action, ...] = ()

    @property
    def wake_at(self) -> float | None:
        return min((a.at for a in self.planned), default=None)

    def sids(self, kind: str) -> list[str]:
        return [a.sid for a in getattr(self, kind)]

    @property
    def empty(self) -> bool:
        return not any(getattr(self, k) for k in ACTION_KINDS)
