"""Scheduler policies on scripted scenarios: fake sizes, a fake clock, exact decisions and orders.

`Sim` below plays the engine around the pure scheduler (DESIGN.md section 10, "Scheduler and swap"):
it executes each decision with copies that take bytes/bw and requests that take `compute_s`, and calls
`schedule` again on every event, exactly as the engine will. Every decision it gets is checked against
Note [Decision contract].
"""
from __future__ import annotations

import ast
import pathlib
import random
from dataclasses import dataclass, replace

import pytest

import djinn.scheduler as sched
from djinn.scheduler import (
    Action, Decision, DecisionError, MemoryView, Reason, SessionState as S, SessionView, View, check_decision,
    get_policy, schedule,
)

K = 500_000_000          # one session's KV, bytes
BW = 1e9                 # swap bandwidth, bytes/s: one KV moves in 0.5 s
MARGIN = 0.25


def signal(**kw):
    return get_policy("signal", margin_s=MARGIN, **kw)


# -- the engine model ------------------------------------------------------------------------------
@dataclass
class Rec:
    sid: str
    state: S
    gpu: int = 0
    host: int = 0
    last_active: float = 0.0
    pending: bool = False
    arrival: int = 0
    need: int = 0
    io_since: float | None = None
    eta: float | None = None
    running_until: float | None = None
    since: float | None = None    # when the pending request arrived
    dropped: bool = False


class Sim:
    def __init__(self, policy, recs, capacity, host_capacity=8 * K, compute_s=1.0, reprefill_s=2.0):
        self.policy, self.capacity, self.host_capacity = policy, capacity, host_capacity
        self.compute_s, self.reprefill_s = compute_s, reprefill_s
        self.recs = {r.sid: r for r in recs}
        self.copies: list[tuple[float, str, str]] = []  # (done at, kind, sid)
        self.log: list[tuple] = []
        self.latency: dict[str, float] = {}
        self.decisions: list[tuple[float, Decision]] = []
        self._queued: dict[str, tuple] = {}
        self._seq = 0

    def view(self, t: float) -> View:
        used = sum(r.gpu for r in self.recs.values())
        host = sum(r.host for r in self.recs.values())
        sessions = tuple(SessionView(r.sid, r.state, r.gpu, r.host, r.last_active, r.pending, r.arrival, r.need,
                                     r.io_since, r.eta) for r in self.recs.values())
        return View(t, sessions, MemoryView(self.capacity, used, self.host_capacity, host, self.host_capacity - host), BW)

    def run(self, events: list[tuple], until: float = 100.0) -> list[tuple]:
        events = sorted(events, key=lambda e: e[0])
        t, wake = 0.0, None
        while True:
            self._complete(t)
            while events and events[0][0] <= t:
                self._event(*events.pop(0))  # (t, kind, sid, {args})
            d = schedule(self.policy, self.view(t))
            self.decisions.append((t, d))
            self._apply(t, d)
            times = [e[0] for e in events[:1]] + [c[0] for c in self.copies]
            times += [r.running_until for r in self.recs.values() if r.running_until is not None]
            if d.wake_at is not None:
                times.append(d.wake_at)
            if not times or min(times) > until:
                return self.log
            assert min(times) > t, (t, times)
            t = min(times)

    def _event(self, t, kind, sid, kw):
        r = self.recs.get(sid)
        if kind == "request":
            self._seq += 1
            r.pending, r.arrival, r.need, r.since = True, self._seq, kw["need"], t
            r.io_since = r.eta = None  # a request implies COMPUTE
            if r.state == S.IO_WAIT:
                r.state = S.ACTIVE
        elif kind == "io_wait":
            r.io_since, r.eta = t, kw["eta"]
            if r.state == S.ACTIVE:
                r.state = S.IO_WAIT
        elif kind == "close":
            del self.recs[sid]
            self.copies = [c for c in self.copies if c[2] != sid]

    def _complete(self, t):
        for c in sorted(c for c in self.copies if c[0] <= t):
            self.copies.remove(c)
            r = self.recs[c[2]]
            if c[1] == "out":
                r.gpu, r.state = 0, S.SWAPPED
            else:
                r.host, r.state = 0, S.IO_WAIT if r.io_since is not None else S.ACTIVE
        for r in self.recs.values():
            if r.running_until is not None and r.running_until <= t:
                self.latency[r.sid] = r.running_until - r.since
                r.pending, r.last_active, r.running_until = False, r.running_until, None

    def _apply(self, t, d: Decision):
        for kind in ("swap_out", "drop", "prefetch", "admit", "run", "queue"):
            for a in getattr(d, kind):
                r = self.recs[a.sid]
                if kind == "run" and r.running_until is not None:
                    continue  # a request in progress: the engine steps it, nothing new to log
                if kind == "queue":
                    if self._queued.get(a.sid) == (a.reason, a.cause):
                        continue
                    self._queued[a.sid] = (a.reason, a.cause)
                    if r.state in (S.NEW, S.DROPPED):
                        r.state = S.QUEUED
                else:
                    self._queued.pop(a.sid, None)
                self.log.append((t, kind, a.sid, a.reason, a.cause))
                if kind == "swap_out":
                    r.state, r.host = S.SWAPPING_OUT, r.gpu
                    self.copies.append((t + r.gpu / BW, "out", r.sid))
                elif kind == "drop":
                    r.gpu, r.state, r.dropped = 0, S.DROPPED, True
                elif kind == "prefetch":
                    r.state, r.gpu = S.PREFETCHING, r.host
                    self.copies.append((t + r.host / BW, "in", r.sid))
                elif kind in ("admit", "run"):
                    cost = self.compute_s + (self.reprefill_s if r.dropped and kind == "admit" else 0.0)
                    r.state, r.gpu, r.dropped = S.ACTIVE, r.gpu + a.nbytes, False
                    r.running_until, r.last_active = t + cost, t


def four_sessions():
    """A waits on a tool (eta 10 s from t=0), B is idle, C and D are new; the GPU holds two KVs."""
    return [Rec("A", S.IO_WAIT, gpu=K, last_active=-2.0, io_since=0.0, eta=10.0),
            Rec("B", S.ACTIVE, gpu=K, last_active=-1.0),
            Rec("C", S.NEW), Rec("D", S.NEW)]


EVENTS = [(3.0, "request", "C", {"need": K}), (5.0, "request", "D", {"need": K}),
          (7.0, "close", "B", {}), (10.0, "request", "A", {"need": K})]


def play(policy):
    sim = Sim(policy, four_sessions(), capacity=2 * K)
    sim.run(EVENTS)
    return sim


def test_signal_swaps_out_on_io_wait_and_prefetches_by_the_eta():
    sim = play(signal())
    assert sim.log == [
        (0.0, "swap_out", "A", "io_wait", None),       # memory is full and A waits 10 s: out at once
        (3.0, "admit", "C", "fits", None),             # into A's room
        (5.0, "swap_out", "B", "make_room", "D"),      # no signal from B: idle, least recently used
        (5.0, "queue", "D", "waiting_for_room", None),
        (5.5, "admit", "D", "fits", None),
        (8.75, "swap_out", "C", "make_room", "A"),     # room for A's prefetch: 10 - 0.5 - 0.25 - 0.5
        (9.25, "prefetch", "A", "eta", None),          # 10 - bytes/bw - margin
        (10.0, "run", "A", "fits", None),              # back before its request: a hit
    ]
    # At t=0 the prefetch is already planned for 10 - bytes/bw - margin, and the engine told to wake then.
    t0, d0 = sim.decisions[0]
    assert t0 == 0.0 and d0.planned == (Action("A", K, Reason.ETA, at=9.25),) and d0.wake_at == 9.25
    # Once C took A's room the plan moves earlier by the time to swap something out for it.
    assert [(t, d.planned) for t, d in sim.decisions if t == 3.0] == [(3.0, (Action("A", K, Reason.ETA, at=8.75),))]
    assert sim.latency == {"C": 1.0, "D": 1.5, "A": 1.0}


def test_lru_swaps_only_when_a_request_does_not_fit_least_recently_used_first():
    sim = play(get_policy("lru"))
    assert sim.log == [
        (3.0, "swap_out", "A", "make_room", "C"),      # the third request: A (used at -2) before B (-1)
        (3.0, "queue", "C", "waiting_for_room", None),
        (3.5, "admit", "C", "fits", None),
        (5.0, "swap_out", "B", "make_room", "D"),
        (5.0, "queue", "D", "waiting_for_room", None),
        (5.5, "admit", "D", "fits", None),
        (10.0, "swap_out", "C", "make_room", "A"),     # A's request finds it swapped, and no room
        (10.0, "queue", "A", "waiting_for_room", None),
        (10.5, "prefetch", "A", "miss", None),
        (11.0, "run", "A", "fits", None),
    ]
    assert all(d.planned == () for _, d in sim.decisions)  # never ahead of a request
    assert sim.latency == {"C": 1.5, "D": 1.5, "A": 2.0}


def test_recompute_drops_least_recently_used_and_reprefills():
    sim = play(get_policy("recompute"))
    assert sim.log == [
        (3.0, "drop", "A", "make_room", "C"),          # dropping frees at once: C runs in the same step
        (3.0, "admit", "C", "fits", None),
        (5.0, "drop", "B", "make_room", "D"),
        (5.0, "admit", "D", "fits", None),
        (10.0, "drop", "C", "make_room", "A"),
        (10.0, "admit", "A", "fits", None),            # A prefills its whole context again
    ]
    assert sim.latency == {"C": 1.0, "D": 1.0, "A": 3.0}


def test_resident_never_moves_a_kv_and_queues_first_come_first_served():
    sim = play(get_policy("resident"))
    assert sim.log == [
        (3.0, "queue", "C", "no_memory", None),
        (5.0, "queue", "D", "behind", "C"),
        (7.0, "admit", "C", "fits", None),             # B closed
        (7.0, "queue", "D", "no_memory", None),
        (10.0, "run", "A", "fits", None),              # A's KV never left; it needs nothing new
    ]
    assert sim.latency == {"C": 5.0, "A": 1.0} and sim.recs["D"].state == S.QUEUED


# -- single decisions ----------------------------------------------------------------------------------
def mem(capacity, used, host=8 * K, host_used=0, largest=None):
    return MemoryView(capacity, used, host, host_used, host - host_used if largest is None else largest)


def view(now, sessions, capacity, **kw):
    used = sum(s.gpu_bytes for s in sessions)
    host_used = sum(s.host_bytes for s in sessions)
    return View(now, tuple(sessions), mem(capacity, used, host_used=host_used, **kw), BW)


def waiting(sid, since, eta, gpu=K, last=0.0):
    return SessionView(sid, S.IO_WAIT, gpu_bytes=gpu, last_active=last, io_wait_since=since, io_eta_s=eta)


def test_signal_keeps_sessions_whose_wait_is_shorter_than_a_round_trip():
    # Round trip of one KV: 0.5 out + 0.5 in + 0.25 margin = 1.25 s.
    v = view(0.0, [waiting("short", 0.0, 1.25), waiting("long", 0.0, 1.3)], capacity=2 * K)
    d = schedule(signal(), v)
    assert d.swap_out == (Action("long", K, Reason.IO_WAIT),)
    assert d.planned == (Action("long", K, Reason.ETA, at=1.3 - 0.5 - MARGIN),)


def test_signal_swaps_out_only_under_pressure_unless_always():
    sessions = [waiting("a", 0.0, 20.0), waiting("b", 0.0, 30.0), waiting("c", 0.0, None)]
    roomy = view(0.0, sessions, capacity=10 * K)   # 70 % free, above the 10 % headroom
    assert schedule(signal(), roomy).empty
    d = schedule(signal(always=True), roomy)
    assert d.sids("swap_out") == ["c", "b", "a"]   # last to return first; no ETA counts as never
    assert {a.reason for a in d.swap_out} == {Reason.IO_WAIT_ALWAYS}
    assert [(a.sid, a.at) for a in d.planned] == [("a", 20.0 - 0.5 - MARGIN), ("b", 30.0 - 0.5 - MARGIN)]
    # Full GPU, 20 % headroom wanted = 0.6 KV: one swap-out (the last to return) is enough.
    tight = view(0.0, sessions, capacity=3 * K)
    d = schedule(signal(headroom=0.2), tight)
    assert d.swap_out == (Action("c", K, Reason.IO_WAIT),) and d.planned == ()


def test_signal_victim_order_for_a_request():
    idle_old = SessionView("idle_old", S.ACTIVE, gpu_bytes=K, last_active=1.0)
    idle_new = SessionView("idle_new", S.ACTIVE, gpu_bytes=K, last_active=2.0)
    sessions = [waiting("near", 0.0, 10.5, last=0.5), idle_new, waiting("far", 0.0, 50.0, last=0.7), idle_old,
                waiting("mid", 0.0, 20.0, last=0.6),
                SessionView("new", S.NEW, pending=True, arrival=1, need_bytes=5 * K)]
    d = schedule(signal(headroom=0.0), view(10.0, sessions, capacity=5 * K))
    # waiting and far from returning (last first), then unsignalled idle (LRU), then about to return.
    assert d.sids("swap_out") == ["far", "mid", "idle_old", "idle_new", "near"]
    assert {(a.reason, a.cause) for a in d.swap_out} == {(Reason.MAKE_ROOM, "new")}
    assert d.queue == (Action("new", 0, Reason.WAITING_FOR_ROOM),)
    assert schedule(get_policy("lru"), view(10.0, sessions, capacity=5 * K)).sids("swap_out") == [
        "near", "mid", "far", "idle_old", "idle_new"]  # least recently used first, signals ignored


def test_a_request_for_a_swapped_session_is_a_miss_swapped_in_at_once():
    sw = SessionView("s", S.SWAPPED, host_bytes=K, pending=True, arrival=1, need_bytes=K)
    for name in ("signal", "lru"):
        d = schedule(get_policy(name), view(0.0, [sw], capacity=2 * K))
        assert d.prefetch == (Action("s", K, Reason.MISS),) and d.run == ()


def test_requests_on_moving_kv_wait_for_the_copy():
    out = SessionView("out", S.SWAPPING_OUT, gpu_bytes=K, host_bytes=K, pending=True, arrival=1, need_bytes=K)
    back = SessionView("back", S.PREFETCHING, gpu_bytes=K, host_bytes=K, pending=True, arrival=2, need_bytes=K)
    d = schedule(get_policy("lru"), view(0.0, [out, back], capacity=4 * K))
    assert d.queue == (Action("out", 0, Reason.SWAP_OUT_IN_FLIGHT), Action("back", 0, Reason.PREFETCH_IN_FLIGHT))


def test_first_come_first_served_but_requests_needing_nothing_never_wait():
    big = SessionView("big", S.NEW, pending=True, arrival=1, need_bytes=3 * K)
    small = SessionView("small", S.NEW, pending=True, arrival=2, need_bytes=K // 2)
    going = SessionView("going", S.ACTIVE, gpu_bytes=K, pending=True, arrival=3, need_bytes=K)
    grow = SessionView("grow", S.ACTIVE, gpu_bytes=K, pending=True, arrival=4, need_bytes=K + 10)
    d = schedule(get_policy("resident"), view(0.0, [grow, going, small, big], capacity=3 * K))
    assert d.queue == (Action("big", 0, Reason.NO_MEMORY), Action("small", 0, Reason.BEHIND, "big"))
    # Sessions holding KV are not held up by "big" (Note [Running sessions go first]): "big" can only
    # ever run once they finish, so queueing them behind it would deadlock.
    assert d.run == (Action("going", 0, Reason.FITS), Action("grow", 10, Reason.FITS))
    d = schedule(get_policy("resident"), view(0.0, [grow, going, small], capacity=3 * K))
    assert d.admit == (Action("small", K // 2, Reason.FITS),) and d.run == (
        Action("going", 0, Reason.FITS), Action("grow", 10, Reason.FITS))


def test_no_eviction_when_evicting_everyone_would_not_be_enough():
    sessions = [SessionView("idle", S.ACTIVE, gpu_bytes=K),
                SessionView("huge", S.NEW, pending=True, arrival=1, need_bytes=3 * K)]
    for name in ("signal", "lru", "recompute", "resident"):
        d = schedule(get_policy(name, **({"headroom": 0.0} if name == "signal" else {})),
                     view(0.0, sessions, capacity=2 * K))
        assert d.swap_out == d.drop == () and d.queue == (Action("huge", 0, Reason.NO_MEMORY),), name


def test_a_full_host_pool_means_no_swap():
    sessions = [SessionView("idle", S.ACTIVE, gpu_bytes=K, last_active=1.0),
                SessionView("new", S.NEW, pending=True, arrival=1, need_bytes=K)]
    d = schedule(get_policy("lru"), View(0.0, tuple(sessions), mem(K, K, host=K, host_used=K // 2), BW))
    assert d.swap_out == () and d.queue == (Action("new", 0, Reason.NO_MEMORY),)
    # Free bytes enough in total but split in two blocks: the largest decides.
    d = schedule(get_policy("lru"), View(0.0, tuple(sessions), mem(K, K, host=2 * K, largest=K - 1), BW))
    assert d.swap_out == ()


def test_signal_drops_when_the_host_pool_cannot_take_its_victims():
    """Note [Drop when the host is full]: the victims it would swap, in the same order (the one
    returning last first), are dropped, and the request runs now; with room on the host it swaps."""
    near = SessionView("near", S.IO_WAIT, gpu_bytes=K, last_active=0.0, io_wait_since=0.0, io_eta_s=30.0)
    far = SessionView("far", S.IO_WAIT, gpu_bytes=K, last_active=1.0, io_wait_since=0.0, io_eta_s=60.0)
    idle = SessionView("idle", S.ACTIVE, gpu_bytes=K, last_active=2.0)
    new = SessionView("new", S.NEW, pending=True, arrival=1, need_bytes=2 * K)
    sessions = (near, far, idle, new)
    full = mem(3 * K, 3 * K, host=K, host_used=K // 2)  # the host takes none of them
    d = schedule(signal(headroom=0.0), View(5.0, sessions, full, BW))
    assert d.drop == (Action("far", K, Reason.MAKE_ROOM, "new"), Action("near", K, Reason.MAKE_ROOM, "new"))
    assert d.swap_out == () and d.admit == (Action("new", 2 * K, Reason.FITS),) and d.queue == ()
    roomy = mem(3 * K, 3 * K, host=4 * K)
    d = schedule(signal(headroom=0.0), View(5.0, sessions, roomy, BW))
    assert d.drop == () and [a.sid for a in d.swap_out] == ["far", "near"]
    assert d.queue == (Action("new", 0, Reason.WAITING_FOR_ROOM),)
    # dropping every victim would not be enough: none is dropped, the request queues
    huge = replace(new, need_bytes=5 * K)
    d = schedule(signal(headroom=0.0), View(5.0, (near, far, idle, huge), full, BW))
    assert d.drop == () and d.queue == (Action("new", 0, Reason.NO_MEMORY),)


def test_a_due_prefetch_drops_for_room_when_the_host_pool_is_full():
    """Note [Drop when the host is full]: a session due back whose room swapping cannot make drops a
    session that returns after it (not one that returns before it) and is copied back now."""
    due = SessionView("due", S.SWAPPED, host_bytes=K, io_wait_since=0.0, io_eta_s=10.0)
    before = SessionView("before", S.IO_WAIT, gpu_bytes=K, last_active=0.0, io_wait_since=0.0, io_eta_s=9.8)
    after = SessionView("after", S.IO_WAIT, gpu_bytes=K, last_active=1.0, io_wait_since=0.0, io_eta_s=60.0)
    full = mem(2 * K, 2 * K, host=K, host_used=K)  # the host holds `due` and nothing more
    d = schedule(signal(headroom=0.0), View(9.5, (due, before, after), full, BW))
    assert d.drop == (Action("after", K, Reason.MAKE_ROOM, "due"),) and d.swap_out == ()
    assert d.prefetch == (Action("due", K, Reason.ETA),)
    # with room on the host it swaps instead, and the prefetch waits for the copy
    d = schedule(signal(headroom=0.0), View(9.5, (due, before, after), mem(2 * K, 2 * K, host=4 * K, host_used=K), BW))
    assert d.drop == () and d.swap_out == (Action("after", K, Reason.MAKE_ROOM, "due"),) and d.prefetch == ()


def test_planned_prefetches_account_for_each_other():
    x = SessionView("x", S.SWAPPED, host_bytes=K, io_wait_since=0.0, io_eta_s=10.0)
    y = SessionView("y", S.SWAPPED, host_bytes=K, io_wait_since=0.0, io_eta_s=12.0)
    d = schedule(signal(), view(0.0, [y, x], capacity=K))   # room for one
    # x gets the free room (0.5 s copy); y must first make room (another 0.5 s).
    assert [(a.sid, a.at) for a in d.planned] == [("x", 9.25), ("y", 12.0 - 1.0 - MARGIN)]
    d = schedule(signal(), view(9.25, [y, x], capacity=K))
    assert d.prefetch == (Action("x", K, Reason.ETA),) and d.planned == (Action("y", K, Reason.ETA, at=10.75),)


def test_a_due_prefetch_waits_while_a_request_waits_for_memory():
    x = SessionView("x", S.SWAPPED, host_bytes=K, io_wait_since=0.0, io_eta_s=10.0)
    req = SessionView("r", S.NEW, pending=True, arrival=1, need_bytes=2 * K)
    d = schedule(signal(), view(9.5, [x, req], capacity=K))
    assert d.prefetch == () and d.queue == (Action("r", 0, Reason.NO_MEMORY),)


# -- the contract, whatever the policy --------------------------------------------------------------------
def test_check_decision_rejects_broken_decisions():
    idle = SessionView("i", S.ACTIVE, gpu_bytes=K)
    req = SessionView("r", S.NEW, pending=True, arrival=1, need_bytes=K)
    v = view(0.0, [idle, req], capacity=K)
    ok = Decision(drop=(Action("i", K, Reason.MAKE_ROOM, "r"),), admit=(Action("r", K, Reason.FITS),))
    check_decision(v, ok)
    bad = [
        Decision(admit=(Action("r", K, Reason.FITS),)),                             # over-commits the GPU
        Decision(swap_out=(Action("i", K, "x"),), admit=(Action("r", K, "x"),)),    # swap-out frees nothing yet
        Decision(queue=(Action("r", 0, "x"),), drop=(Action("r", 0, "x"),)),        # two lists
        Decision(),                                                                 # request unanswered
        Decision(drop=(Action("i", K - 1, "x"),), queue=(Action("r", 0, "x"),)),    # wrong bytes
        Decision(run=(Action("r", K, "x"),)),                                       # run without KV
        Decision(queue=(Action("r", 0, "x"),), planned=(Action("i", K, "eta", at=5.0),)),  # KV not leaving
        Decision(queue=(Action("ghost", 0, "x"),)),
    ]
    for d in bad:
        with pytest.raises(DecisionError):
            check_decision(v, d)


def random_view(rng: random.Random, n: int) -> View:
    sessions, used, host_used = [], 0, 0
    for i in range(n):
        st = rng.choice(list(S))
        kv = rng.randint(1, 8) * K // 4
        pending = st == S.QUEUED or rng.random() < 0.4
        gpu = kv if st.resident or st in (S.SWAPPING_OUT, S.PREFETCHING) else 0
        host = kv if st.in_host_tier else 0
        since = rng.choice([None, rng.uniform(0, 20)])
        sessions.append(SessionView(f"s{i}", st, gpu, host, rng.uniform(0, 20), pending, rng.randint(0, 9),
                                    kv + rng.choice([0, K // 8]) if pending else 0,
                                    since, rng.choice([None, rng.uniform(0, 30)]) if since is not None else None))
        used, host_used = used + gpu, host_used + host
    cap = used + rng.randint(0, 6) * K // 2
    hcap = host_used + rng.randint(0, 12) * K // 2
    return View(rng.uniform(0, 30), tuple(sessions),
                MemoryView(cap, used, hcap, host_used, rng.randint(0, hcap - host_used)), rng.choice([BW, 5e10]))


@pytest.mark.parametrize("name", sorted(sched.POLICIES))
def test_random_views_always_give_valid_deterministic_decisions(name):
    rng = random.Random(name)
    opts = [{}] if name != "signal" else [{}, {"always": True}, {"headroom": 0.0, "margin_s": 0.0}]
    kinds = set()
    for i in range(400):
        v = random_view(rng, rng.randint(1, 12))
        for o in opts:
            p = get_policy(name, **o)
            d = schedule(p, v)    # checks Note [Decision contract]
            assert schedule(p, v) == d and p.schedule(replace(v)) == d
            kinds |= {k for k in ("swap_out", "drop", "prefetch", "admit", "run", "queue") if getattr(d, k)}
            if name in ("resident", "recompute"):
                assert d.swap_out == () and d.planned == ()
            if name in ("resident", "lru"):
                assert d.drop == ()
            if d.drop and name == "signal":  # Note [Drop when the host is full]: only for a request
                assert all(a.reason == Reason.MAKE_ROOM and a.cause is not None for a in d.drop)
            if name == "resident":
                assert {a.reason for a in d.prefetch} <= {Reason.MISS}
    common = {"prefetch", "admit", "run", "queue"}  # prefetch: a miss on a swapped session in the view
    moves = {"signal": {"swap_out", "drop"}, "lru": {"swap_out"}, "recompute": {"drop"}, "resident": set()}[name]
    assert kinds == common | moves  # the random views exercise every kind of action the policy has


def test_registry():
    assert sorted(sched.POLICIES) == ["lru", "recompute", "resident", "signal"]
    assert all(get_policy(n).name == n for n in sched.POLICIES)
    with pytest.raises(ValueError, match=r"unknown scheduling policy 'fifo'.*'lru'"):
        get_policy("fifo")
    with pytest.raises(ValueError, match="does not take options"):
        get_policy("lru", margin_s=1.0)
    with pytest.raises(ValueError, match="headroom"):
        get_policy("signal", headroom=2.0)


def test_the_scheduler_is_pure_python():
    """Nothing under djinn/scheduler imports torch, CUDA or anything outside the standard library."""
    allowed = {"__future__", "dataclasses", "enum", "math", "typing"}
    root = pathlib.Path(sched.__file__).parent
    files = sorted(root.rglob("*.py"))
    assert len(files) >= 9
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [] if node.level else [node.module]
            else:
                continue
            assert all(n.split(".")[0] in allowed for n in names), (f, names)


def test_policy_from_config_takes_its_options_and_says_whether_it_swaps():
    from djinn.config import ServerConfig
    from djinn.scheduler.policies import policy_from_config

    sig = policy_from_config(ServerConfig(policy="signal", prefetch_margin_s=0.25, swap_on_io_wait=True))
    assert (sig.name, sig.margin_s, sig.always, sig.swaps) == ("signal", 0.25, True, True)
    assert {n: policy_from_config(ServerConfig(policy=n)).swaps for n in ("lru", "recompute", "resident")} == {
        "lru": True, "recompute": False, "resident": False}
    with pytest.raises(ValueError, match="unknown scheduling policy 'fifo'"):
        policy_from_config(ServerConfig(policy="fifo"))
