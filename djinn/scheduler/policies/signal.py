"""`signal`: the application says when a session waits and for how long; the scheduler uses it
(DESIGN.md sections 3 and 5, the paper's first claim).

- Swap-out on IO_WAIT: while GPU memory is wanted (free plus what in-flight swap-outs will free is
  below `headroom` of the capacity), sessions in IO_WAIT are swapped out, the one returning last first,
  until it no longer is; with `always`, every one is. A session whose wait is shorter than a round trip
  (out, back, margin) stays: moving it would cost more than it frees.
- Prefetch by ETA: a swapped session that announced its wait is copied back so it is on the GPU when
  it returns: the copy starts at eta - bytes/bw - margin, earlier by the time to swap out whatever
  must make room for it (Note [Prefetch start]). The copy's due time is in `Decision.planned`.
- A request that finds its session swapped swaps it in at once (a miss).
- A request that does not fit swaps out idle sessions in signal order: waiting sessions that return
  last first, then idle sessions with no signal (least recently used first), then waiting sessions about
  to return. When the host pool cannot take them, it drops them in that order instead (Note [Drop when
  the host is full]).

Note [Drop when the host is full]
    The host pool is finite (64 GiB holds ~36 13B agents at 2k tokens): with more agents than the GPU
    and the host hold together, a request that swapping cannot make room for would wait, first come
    first served, until some agent ends, which at tens of agents is longer than any turn may wait. A
    dropped session keeps its token ids and re-prefills them at its next request (as under
    `recompute`): one prefill of its context, about what its first turn cost. So when the victims'
    bytes cannot go to the host, the same victims, in the same order (the one returning last first),
    are dropped, and the request runs now. Only when dropping every victim would not be enough does it
    queue (NO_MEMORY). Reason: MAKE_ROOM with the request as its cause, as for a swap-out. A due
    prefetch that swapping cannot make room for drops the same way, among the sessions that return
    after it or sent no signal, and is copied back now rather than missed at its request.

Note [Prefetch start]
    start = returns_at - kv/bw - margin - short/bw, with short = the bytes of room missing for the KV
    (kv minus free, in-flight swap-outs and earlier prefetches' promises). When start comes and the room
    is still missing, the policy swaps out for it (victims that return later than it, then idle ones by
    LRU) and issues the prefetch once those copies are done; the engine calls `schedule` again on every
    completed copy, request, signal and at `Decision.wake_at`.
"""
from __future__ import annotations

import math

from ..types import Reason, SessionState, SessionView
from .base import Plan, PolicyBase, lru_order, pick, swap_out_for


class SignalPolicy(PolicyBase):
    name = "signal"
    swaps = True

    @classmethod
    def from_config(cls, cfg) -> "SignalPolicy":
        return cls(margin_s=cfg.prefetch_margin_s, always=cfg.swap_on_io_wait)

    def __init__(self, margin_s: float = 0.05, headroom: float = 0.1, always: bool = False):
        if not margin_s >= 0:
            raise ValueError(f"margin_s={margin_s!r} must be >= 0 seconds")
        if not 0 <= headroom <= 1:
            raise ValueError(f"headroom={headroom!r} must be a fraction of GPU capacity in [0, 1]")
        self.margin_s = margin_s
        self.headroom = headroom
        self.always = always

    # -- requests ----------------------------------------------------------------------------------------
    def make_room(self, plan: Plan, s: SessionView, need: int) -> None:
        far, idle, near = self._victim_groups(plan)
        victims = far + idle + near
        swap_out_for(plan, s, need, victims)
        if need <= plan.gpu_free + plan.freeing:
            return
        # Note [Drop when the host is full]: swapping could not make room
        chosen = pick([v for v in victims if v.sid not in plan.taken], need - plan.gpu_free - plan.freeing)
        for v in chosen or ():  # None: dropping every victim would not be enough either
            plan.drop(v, Reason.MAKE_ROOM, s.sid)

    # -- ahead of requests -------------------------------------------------------------------------------
    def ahead(self, plan: Plan) -> None:
        far, _, _ = self._victim_groups(plan)
        target = self.headroom * plan.view.memory.gpu_capacity
        for v in far:
            if self.always:
                plan.swap_out(v, Reason.IO_WAIT_ALWAYS)
            elif plan.gpu_free + plan.freeing < target:
                plan.swap_out(v, Reason.IO_WAIT)
        self._prefetch(plan)

    def _prefetch(self, plan: Plan) -> None:
        leaving = set(plan.sids("swap_out"))  # swapped out by this decision
        away = [s for s in plan.view.sessions if not s.pending and s.returns_at is not None and (
            s.sid in leaving
            or (s.sid not in plan.taken and s.state in (SessionState.SWAPPING_OUT, SessionState.SWAPPED)))]
        promised = 0
        for s in sorted(away, key=lambda s: (s.returns_at, s.sid)):
            kv = s.host_bytes or s.gpu_bytes
            short = max(0, kv - max(0, plan.gpu_free + plan.freeing - promised))
            at = s.returns_at - (kv + short) / plan.view.swap_bw - self.margin_s
            if at > plan.now:
                plan.plan_prefetch(s, at)
                promised += kv
            elif s.state == SessionState.SWAPPED and plan.blocked is None:  # due; requests go first
                if kv <= plan.gpu_free:
                    plan.take("prefetch", s, kv, Reason.ETA)
                else:
                    far, idle, _ = self._victim_groups(plan)
                    later = [v for v in far if v.returns_at is None or v.returns_at > s.returns_at]
                    swap_out_for(plan, s, kv, later + idle)
                    promised += kv
                    if kv > plan.gpu_free + plan.freeing:  # Note [Drop when the host is full]
                        chosen = pick([v for v in later + idle if v.sid not in plan.taken],
                                      kv - plan.gpu_free - plan.freeing)
                        for v in chosen or ():
                            plan.drop(v, Reason.MAKE_ROOM, s.sid)
                        if chosen and kv <= plan.gpu_free:
                            plan.take("prefetch", s, kv, Reason.ETA)
            # else: still leaving; the completed swap-out calls schedule again

    def _victim_groups(self, plan: Plan) -> tuple[list[SessionView], list[SessionView], list[SessionView]]:
        """(waiting sessions worth a round trip, last to return first; idle sessions without a signal,
        least recently used first; waiting sessions about to return, last to return first)."""
        far, idle, near = [], [], []
        for v in plan.idle():
            if v.state != SessionState.IO_WAIT:
                idle.append(v)
                continue
            ret = v.returns_at
            trip = 2 * v.gpu_bytes / plan.view.swap_bw + self.margin_s
            (far if ret is None or ret - plan.now > trip else near).append(v)
        last_first = lambda v: (-(v.returns_at if v.returns_at is not None else math.inf), v.sid)  # noqa: E731
        return sorted(far, key=last_first), lru_order(idle), sorted(near, key=last_first)
