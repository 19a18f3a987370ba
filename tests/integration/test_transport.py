"""Tier 2: the client transport's waiting (frontend/transport.py, Note [Callers do their own IO]) against
a real server: a waiting caller polls in rounds, not millisecond slices (RELIABILITY.md finding J);
a send from another thread ends the round at once; many threads on one Connection get their own replies."""
from __future__ import annotations

import threading
import time


def _count_polls(t):
    calls = [0]
    orig = t._poll

    def counted(timeout_s):
        calls[0] += 1
        return orig(timeout_s)

    t._poll = counted
    return calls, lambda: setattr(t, "_poll", orig)


def test_a_waiting_caller_polls_in_rounds(conn):
    """Waiting 1 s for something that never comes: ~20 rounds of 50 ms (the 2 ms slices made ~500)."""
    t = conn.transport
    calls, restore = _count_polls(t)
    try:
        t0 = time.monotonic()
        t.pump_until(lambda: False, timeout=1.0)
        waited = time.monotonic() - t0
    finally:
        restore()
    assert 0.9 <= waited < 3.0
    assert calls[0] <= 60 * waited, calls[0]


def test_a_send_does_not_wait_for_the_poll_round(conn):
    """While one thread waits (polling), another sends and gets its replies: the wake pipe ends the
    round at once, so 50 pings take nowhere near 50 rounds (2.5 s)."""
    t = conn.transport
    stop = threading.Event()
    waiter = threading.Thread(target=lambda: t.pump_until(stop.is_set, timeout=30), daemon=True)
    waiter.start()
    try:
        time.sleep(0.1)  # the waiter is in a round now
        t0 = time.monotonic()
        for _ in range(50):
            assert conn.ping() > 0
        took = time.monotonic() - t0
    finally:
        stop.set()
        waiter.join(5)
    assert not waiter.is_alive()
    assert took < 1.5, f"50 pings took {took:.2f}s while another thread waited"


def test_threads_sharing_a_connection_get_their_own_replies(conn):
    """Eight threads open, use and close their own sessions on one Connection at once: each reply goes
    to the call that asked (the one polling routes the others' replies and wakes them)."""
    errors: list = []

    def worker(k: int) -> None:
        try:
            for j in range(15):
                s = conn.session(f"t{k}-{j}")
                assert s.name == f"t{k}-{j}"
                assert conn.stats()["sessions"][s.sid]["name"] == f"t{k}-{j}"
                s.close()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors, errors[0]
    assert not any(th.is_alive() for th in threads)
