"""`recompute`: what vLLM V1 does under memory pressure. When a request does not fit, the KV caches of
the least recently used idle sessions are dropped (freed at once, so the request runs in the same step);
a dropped session's next request re-prefills its whole context from the token ids it kept. Nothing
ever goes to the host; signals are ignored (DESIGN.md section 5)."""
from __future__ import annotations

from ..types import Reason, SessionView
from .base import Plan, PolicyBase, lru_order, pick


class RecomputePolicy(PolicyBase):
    name = "recompute"

    def make_room(self, plan: Plan, s: SessionView, need: int) -> None:
        chosen = pick(lru_order(plan.idle()), need - plan.gpu_free)
        for v in chosen or ():  # None: dropping everyone would not be enough, so drop no one
            plan.drop(v, Reason.MAKE_ROOM, s.sid)
