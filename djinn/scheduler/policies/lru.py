"""`lru`: reactive swapping. Nothing moves until a request does not fit; then the least recently used
idle sessions are swapped out until it will, and the request waits for those copies. A request of a
swapped session swaps it back in at once (a miss: the KV was away when it was needed). Signals are
ignored: a session in IO_WAIT is just idle (DESIGN.md section 5)."""
from __future__ import annotations

from ..types import SessionView
from .base import Plan, PolicyBase, lru_order, swap_out_for


class LRUPolicy(PolicyBase):
    name = "lru"
    swaps = True

    def make_room(self, plan: Plan, s: SessionView, need: int) -> None:
        swap_out_for(plan, s, need, lru_order(plan.idle()))
