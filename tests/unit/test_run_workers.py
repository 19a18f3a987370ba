"""The run-thread pool (djinn/server/execution/breakpoints._Workers): CUDA runs reuse threads, CPU runs do not."""
from __future__ import annotations

import threading

from djinn.server.execution.breakpoints import _Workers


def run(workers: _Workers, keep: bool) -> threading.Thread:
    done = threading.Event()
    box: list[threading.Thread] = []

    def job():
        box.append(threading.current_thread())
        done.set()

    workers.submit(job, keep=keep)
    assert done.wait(5)
    return box[0]


def wait_idle(workers: _Workers, n: int) -> None:
    for _ in range(500):
        if workers._idle.qsize() == n:
            return
        threading.Event().wait(0.01)
    raise AssertionError(f"expected {n} idle workers, have {workers._idle.qsize()}")


def test_kept_workers_are_reused_and_capped():
    w = _Workers()
    first = run(w, keep=True)
    wait_idle(w, 1)
    assert run(w, keep=True) is first  # the same thread: its per-thread CUDA set-up is paid once
    wait_idle(w, 1)
    assert w._count == 1
    w.MAX_IDLE = 0
    assert run(w, keep=True) is first
    first.join(5)
    assert not first.is_alive() and w._idle.qsize() == 0  # beyond MAX_IDLE it exits


def test_cpu_workers_exit_after_their_run():
    w = _Workers()
    t = run(w, keep=False)
    t.join(5)
    assert not t.is_alive() and w._idle.qsize() == 0
    assert run(w, keep=False) is not t and w._count == 2
