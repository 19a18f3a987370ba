"""The scheduler's one interface: `schedule(policy, view) -> Decision` (DESIGN.md section 5).

A policy is any object with a `name` and a pure `schedule(view)`; the four shipped ones live in
`policies/`, one file each. This module also states what every decision must satisfy, whatever the
policy (Note [Decision contract]); `schedule` checks it, so a policy bug is an exception at the step
that made it, never a silent over-commit of GPU memory.

Note [Decision contract]
    For a view V and a decision D:
    - every action names a session of V, and no session is in two of swap_out, drop, prefetch, admit,
      run, queue;
    - swap_out and drop take idle resident sessions (KV on the GPU, no request) and free all their GPU
      bytes; prefetch takes SWAPPED sessions and moves all their host bytes;
    - admit takes sessions with no KV and a request (needs_prefill), with their whole need; run takes
      resident sessions with a request, with the growth they still need (need - held, at least 0);
    - every session with a request is in exactly one of prefetch, admit, run, queue;
    - GPU: free now + dropped - prefetched - admitted - run growth >= 0 (swap-outs free nothing yet);
    - host: the swap-outs fit the pool's free bytes, each one its largest free block;
    - planned prefetches are due after now and name sessions whose KV is (or is going) to the host.
"""
from __future__ import annotations

from typing import Protocol

from .types import ACTION_KINDS, Decision, SessionState, View


class DecisionError(RuntimeError):
    """A view or a decision broke Note [Decision contract]: a bug in the engine or the policy."""


class Policy(Protocol):
    name: str
    swaps: bool  # makes room by moving KV to the host pool (so a session over its host quota is no victim)

    def schedule(self, view: View) -> Decision:
        """The whole decision for this step. Pure: the same view gives the same decision."""
        ...


def schedule(policy: Policy, view: View, *, check: bool = True) -> Decision:
    if check:
        check_view(view)
    decision = policy.schedule(view)
    if check:
        check_decision(view, decision)
    return decision


def check_view(view: View) -> None:
    seen: set[str] = set()
    for s in view.sessions:
        if s.sid in seen:
            raise DecisionError(f"session {s.sid} appears twice in the view")
        seen.add(s.sid)
        if s.gpu_bytes < 0 or s.host_bytes < 0 or s.need_bytes < 0:
            raise DecisionError(f"session {s.sid}: negative bytes {s}")
        if s.state == SessionState.QUEUED and not s.pending:
            raise DecisionError(f"session {s.sid} is QUEUED without a request")
        if s.state.needs_prefill and (s.gpu_bytes or s.host_bytes):
            raise DecisionError(f"session {s.sid} is {s.state.name} but holds bytes {s.gpu_bytes}/{s.host_bytes}")
        if s.state == SessionState.SWAPPED and s.gpu_bytes:
            raise DecisionError(f"session {s.sid} is SWAPPED but holds {s.gpu_bytes} GPU bytes")
        if s.state.resident and s.host_bytes:
            raise DecisionError(f"session {s.sid} is {s.state.name} but holds {s.host_bytes} host bytes")
    m = view.memory
    if m.gpu_used > m.gpu_capacity or m.host_used > m.host_capacity or m.host_largest_free > m.host_free:
        raise DecisionError(f"memory view is inconsistent: {m}")
    if not view.swap_bw > 0:
        raise DecisionError(f"swap_bw={view.swap_bw} must be > 0 bytes/s")


def check_decision(view: View, d: Decision) -> None:
    sessions = {s.sid: s for s in view.sessions}
    where: dict[str, str] = {}
    for kind in ACTION_KINDS:
        for a in getattr(d, kind):
            if a.sid not in sessions:
                raise DecisionError(f"{kind} names unknown session {a.sid}")
            if a.sid in where:
                raise DecisionError(f"session {a.sid} is in both {where[a.sid]} and {kind}")
            where[a.sid] = kind
            _check_action(kind, sessions[a.sid], a)
    for s in view.sessions:
        if s.pending and where.get(s.sid) not in ("prefetch", "admit", "run", "queue"):
            raise DecisionError(f"session {s.sid} has a request but the decision puts it in {where.get(s.sid)}")
    gpu = (view.memory.gpu_free + sum(a.nbytes for a in d.drop)
           - sum(a.nbytes for kind in ("prefetch", "admit", "run") for a in getattr(d, kind)))
    if gpu < 0:
        raise DecisionError(f"decision over-commits the GPU by {-gpu} bytes: {d}")
    out = [a.nbytes for a in d.swap_out]
    if sum(out) > view.memory.host_free or any(n > view.memory.host_largest_free for n in out):
        raise DecisionError(f"swap-outs {out} do not fit the host pool {view.memory}")
    leaving = {a.sid for a in d.swap_out}
    for a in d.planned:
        s = sessions.get(a.sid)
        if s is None or a.at is None or not a.at > view.now:
            raise DecisionError(f"planned {a} is not a future action on a known session (now={view.now})")
        if s.state not in (SessionState.SWAPPING_OUT, SessionState.SWAPPED) and a.sid not in leaving:
            raise DecisionError(f"planned prefetch of {a.sid}, whose KV is not going to the host ({s.state.name})")


def _check_action(kind: str, s, a) -> None:
    if kind in ("swap_out", "drop"):
        ok = s.idle and a.nbytes == s.gpu_bytes
    elif kind == "prefetch":
        ok = s.state == SessionState.SWAPPED and a.nbytes == s.host_bytes
    elif kind == "admit":
        ok = s.state.needs_prefill and s.pending and a.nbytes == s.need_bytes
    elif kind == "run":
        ok = s.state.resident and s.pending and a.nbytes == max(0, s.need_bytes - s.gpu_bytes)
    else:
        ok = s.pending
    if not ok:
        raise DecisionError(f"{kind} {a} does not fit session {s}")
