"""Step tasks: a generate that gives the device back to the engine after every decode step.

DESIGN.md section 5: many sessions' requests interleave at decode-step granularity, so no session
waits for another's whole generate. Hugging Face `generate` is one long call, so it runs on a worker
thread (breakpoints.WORKERS, which keeps CUDA threads warm) and parks after each step in a stopping
criterion that never stops anything; the engine lets one task take one step at a time
(Note [Step hand-off]). Every task draws from its own random stream (Note [Random streams] in rng.py),
so a seeded generate gives the same tokens whatever runs between its steps, and an unseeded one is
fresh.

Note [Step hand-off]
    Exactly one thread runs at a time: the engine blocks in `advance` while the task's thread runs a
    step, and the task thread blocks in the criterion while the engine runs. So the device, the
    session's cache and the router socket (a streaming task sends its tokens itself) are never touched
    by two threads at once, as with breakpoint runs (Note [Run hand-off]).
"""
from __future__ import annotations

import threading
import traceback
from typing import Any, Callable

import torch

from .breakpoints import WORKERS
from .rng import Stream


class Cancelled(BaseException):
    """Raised inside a task's thread to unwind it (session closed, server stopping)."""


class StepTask:
    """Runs `body(step_hook)` on a worker thread, one step per `advance()`.

    `body` must call `step_hook()` between steps (executor.generate passes it to HF generate as a
    stopping criterion). When it returns, `result` holds its value; when it raises, `error` and
    `error_traceback` hold the exception.
    """

    def __init__(self, body: Callable[[Callable[[], None]], Any], device: torch.device, rng: Stream):
        self.body, self.device, self.rng = body, device, rng
        self.done = False
        self.steps = 0
        self.result: Any = None
        self.error: BaseException | None = None
        self.error_traceback: str | None = None
        self._cancel = False
        self._started = False
        self._to_task = threading.Semaphore(0)
        self._to_engine = threading.Semaphore(0)

    # -- engine thread ---------------------------------------------------------------------------
    def advance(self) -> bool:
        """Let the task run one step (the first call also runs its set-up and prefill). True when done."""
        if self.done:
            return True
        with self.rng.active():  # Note [Random streams]: the step draws from this task's stream only
            if not self._started:
                self._started = True
                WORKERS.submit(self._main, keep=self.device.type == "cuda")
            else:
                self._to_task.release()
            self._to_engine.acquire()  # Note [Step hand-off]
        return self.done

    def cancel(self) -> None:
        """Unwind the task (it raises Cancelled at its next step) and wait until its thread let go."""
        if self.done:
            return
        if not self._started:
            self.done = True
            self.error = Cancelled()
            return
        self._cancel = True
        while not self.advance():
            pass

    # -- task thread -----------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            self.result = self.body(self._step)
        except BaseException as e:  # handed to the engine, which replies with it
            self.error, self.error_traceback = e, traceback.format_exc()
        finally:
            self.done = True
            self._to_engine.release()

    def _step(self) -> None:
        self.steps += 1
        if self._cancel:
            raise Cancelled()
        self._to_engine.release()
        self._to_task.acquire()
        if self._cancel:
            raise Cancelled()


class InstantTask:
    """A job that needs its session's KV on the device and no decode step: `fn()` runs at its first
    advance (a session fork of a swapped parent, djinn/server/handlers/fork.py)."""

    path = "none"
    steps = 0

    def __init__(self, fn: Callable[[], Any]):
        self.fn = fn
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None
        self.error_traceback: str | None = None

    def advance(self) -> bool:
        if not self.done:
            try:
                self.result = self.fn()
            except Exception as e:  # handed to the engine, which replies with it
                self.error, self.error_traceback = e, traceback.format_exc()
            self.done = True
        return True

    def cancel(self) -> None:
        self.done = True
