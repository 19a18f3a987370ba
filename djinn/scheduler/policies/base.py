"""What the four policies share: a decision under construction (`Plan`) and the request pass.

Every policy serves requests the same way, first come first served (`serve_requests`); they differ
in how they make room when a request does not fit (`make_room`: swap out, drop, or nothing), in the
order they pick victims, and in what they do ahead of requests (the signal policy's swap-outs on
IO_WAIT and prefetches by ETA). Keeping the bookkeeping here keeps each policy file about its policy.
"""
from __future__ import annotations

from typing import Iterable

from ..types import ACTION_KINDS, Action, Decision, Reason, SessionState, SessionView, View


class Plan:
    """A decision being built, with the bytes it leaves: GPU free now, GPU bytes that in-flight and
    chosen swap-outs will free, host pool bytes left. Each session gets at most one action."""

    def __init__(self, view: View):
        self.view = view
        self.now = view.now
        self.gpu_free = view.memory.gpu_free
        self.freeing = sum(s.gpu_bytes for s in view.sessions if s.state == SessionState.SWAPPING_OUT)
        self.host_free = view.memory.host_free
        self.host_largest = view.memory.host_largest_free
        self.taken: set[str] = set()
        self.blocked: str | None = None  # first request that waits for memory: later ones queue behind it
        self._lists: dict[str, list[Action]] = {k: [] for k in ACTION_KINDS}
        self._planned: list[Action] = []

    # -- actions (each one keeps the byte counts right) ----------------------------------------------
    def swap_out(self, s: SessionView, reason: str, cause: str | None = None) -> bool:
        """False (and nothing recorded) when the host pool cannot take it."""
        n = s.gpu_bytes
        if n > self.host_free or n > self.host_largest:
            return False
        self.host_free -= n
        # One block is gone from the pool; the next swap-out may fit only in what the block left.
        self.host_largest = min(self.host_largest - n, self.host_free)
        self.freeing += n
        self._add("swap_out", s, n, reason, cause)
        return True

    def drop(self, s: SessionView, reason: str, cause: str | None = None) -> None:
        self.gpu_free += s.gpu_bytes
        self._add("drop", s, s.gpu_bytes, reason, cause)

    def take(self, kind: str, s: SessionView, n: int, reason: str) -> None:
        """prefetch / admit / run: `n` GPU bytes leave the free pool now."""
        assert n <= self.gpu_free, (kind, s.sid, n, self.gpu_free)
        self.gpu_free -= n
        self._add(kind, s, n, reason)

    def queue(self, s: SessionView, reason: str, cause: str | None = None) -> None:
        self._add("queue", s, 0, reason, cause)

    def plan_prefetch(self, s: SessionView, at: float) -> None:
        self._planned.append(Action(s.sid, s.host_bytes or s.gpu_bytes, Reason.ETA, at=at))

    def _add(self, kind: str, s: SessionView, n: int, reason: str, cause: str | None = None) -> None:
        assert s.sid not in self.taken, (kind, s.sid)
        self.taken.add(s.sid)
        self._lists[kind].append(Action(s.sid, n, reason, cause))

    def decision(self) -> Decision:
        planned = tuple(sorted(self._planned, key=lambda a: (a.at, a.sid)))
        return Decision(**{k: tuple(v) for k, v in self._lists.items()}, planned=planned)

    # -- queries ---------------------------------------------------------------------------------------
    def sids(self, kind: str) -> list[str]:
        return [a.sid for a in self._lists[kind]]

    def idle(self) -> list[SessionView]:
        """Victim candidates: resident, no request, holding GPU bytes, not yet given an action."""
        return [s for s in self.view.sessions if s.idle and s.sid not in self.taken]


def lru_order(sessions: Iterable[SessionView]) -> list[SessionView]:
    """Least recently used first; ties by session id so the order is total."""
    return sorted(sessions, key=lambda s: (s.last_active, s.sid))


def pick(victims: Iterable[SessionView], shortfall: int) -> list[SessionView] | None:
    """The first victims, in order, whose bytes cover `shortfall`; None when all of them do not."""
    chosen, got = [], 0
    for v in victims:
        if got >= shortfall:
            break
        chosen.append(v)
        got += v.gpu_bytes
    return chosen if got >= shortfall else None


class PolicyBase:
    """The request pass. Subclasses set `name` and override `make_room` (and `ahead`).

    Note [Running sessions go first]
        Requests are first come, first served, except that a session whose KV is already on the GPU
        is never held up behind a request that waits for memory: it may take memory that is free
        even while an earlier admission or prefetch waits. The waiting request may need exactly the
        memory those sessions hold, and only letting them go on ends them (resident) or makes them
        idle victims (lru, signal, recompute); holding them behind it deadlocks (exp1 found it under
        `resident`). vLLM's scheduler does the same: running requests before waiting ones.
    """

    name = "base"
    swaps = False  # makes room by moving idle sessions' KV to the host pool

    @classmethod
    def from_config(cls, cfg) -> "PolicyBase":
        """The policy with the server config's options for it (none by default)."""
        return cls()

    def schedule(self, view: View) -> Decision:
        plan = Plan(view)
        self.serve_requests(plan)
        self.ahead(plan)
        return plan.decision()

    def serve_requests(self, plan: Plan) -> None:
        for s in sorted((s for s in plan.view.sessions if s.pending), key=lambda s: (s.arrival, s.sid)):
            self.serve(plan, s)

    def serve(self, plan: Plan, s: SessionView) -> None:
        st = s.state
        if st == SessionState.SWAPPING_OUT:
            return plan.queue(s, Reason.SWAP_OUT_IN_FLIGHT)
        if st == SessionState.PREFETCHING:
            return plan.queue(s, Reason.PREFETCH_IN_FLIGHT)
        if st.resident:
            kind, need, reason = "run", max(0, s.need_bytes - s.gpu_bytes), Reason.FITS
        elif st == SessionState.SWAPPED:
            kind, need, reason = "prefetch", s.host_bytes, Reason.MISS
        else:
            kind, need, reason = "admit", s.need_bytes, Reason.FITS
        if need == 0:  # takes no memory: never waits, not even behind an earlier request
            return plan.take(kind, s, 0, reason)
        if plan.blocked is not None and kind != "run":
            # Note [Running sessions go first]
            return plan.queue(s, Reason.BEHIND, plan.blocked)
        if need > plan.gpu_free:
            self.make_room(plan, s, need)
        if need <= plan.gpu_free:
            return plan.take(kind, s, need, reason)
        plan.blocked = s.sid
        coming = plan.gpu_free + plan.freeing >= need
        plan.queue(s, Reason.WAITING_FOR_ROOM if coming else Reason.NO_MEMORY)

    def make_room(self, plan: Plan, s: SessionView, need: int) -> None:
        """Free GPU memory for `s`'s `need` bytes, now (drops) or soon (swap-outs); or do nothing."""

    def ahead(self, plan: Plan) -> None:
        """Work ahead of requests, after they were served (the signal policy's)."""


def swap_out_for(plan: Plan, s: SessionView, need: int, victims: list[SessionView]) -> None:
    """Swap out victims, in order, until in-flight and chosen swap-outs cover `need`; nothing if even
    all of them would not (swapping cannot help then, and the request queues as NO_MEMORY)."""
    shortfall = need - plan.gpu_free - plan.freeing
    if shortfall <= 0:
        return  # enough is already on its way out
    fits = [v for v in victims if v.gpu_bytes <= plan.host_largest]
    chosen = pick(fits, shortfall)
    if chosen is None or sum(v.gpu_bytes for v in chosen) > plan.host_free:
        return
    for v in chosen:
        if not plan.swap_out(v, Reason.MAKE_ROOM, s.sid):
            return  # the host pool is fragmented beyond what the view shows; the next step retries
