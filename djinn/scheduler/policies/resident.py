"""`resident`: never swap, never drop. A session keeps its KV on the GPU until it closes; requests are
admitted while their memory fits and queue, first come first served, when it does not (DESIGN.md
section 5). The baseline of the agent-density experiment: density is what fits at once."""
from __future__ import annotations

from .base import PolicyBase


class ResidentPolicy(PolicyBase):
    name = "resident"
    # make_room and ahead: the base's, which do nothing.
