"""Multi-tenant dispatch: which session's generate runs, waits or moves, one decode step at a time.

DESIGN.md section 5. The engine hands every generate to the `Dispatcher`. Each one becomes a `Job`: a
request of one session with the GPU bytes its KV will need. The scheduler policy (djinn/scheduler)
decides from a `View` of all sessions which jobs start, which wait, and which idle sessions' caches go
to host memory (or are dropped) to make room; the dispatcher executes that through the Data segment
(djinn/vmu/data.py) and then steps every started job by one decode step, round robin
(djinn/server/execution/tasks.py). So a session waits for memory, never for another session's tool call, swap,
prefetch or whole generate.

Note [Per-session order]
    A client may pipeline requests on one session. Everything but the control ops (ping, stats,
    signal, closing) that arrives while the session has a job waits in the session's `deferred`
    queue and is served, in order, when the job ends: a fetch after a generate sees its result, and a
    second generate continues from the first's cache.

Note [Queue quota and ownership]
    Only the session's own client may queue behind its job: a request naming another client's session
    is answered at once (SessionNotFound, as for any session it does not own), so it can neither wait
    in, nor fill, nor learn anything from that session's queue. With `quota_queued_requests` (N), a
    session holds at most N requests here, its job included; one more fails at once with
    QuotaExceeded, and the ones already queued go on. A free only releases memory: it is never refused.

Note [Cancel]
    `cancel_generate {rid, keep}` (a control op, served at once, between two steps) ends the session's
    generate with that rid. Queued, it never starts. Running, its task is cancelled as a failure is
    (the table goes back to its length before the call: the KV of what the session had seen is
    untouched), then `Job.truncate(keep)` puts back the first `keep` generated tokens the client
    consumed, whose KV the call already wrote: the session holds exactly the tokens its client saw,
    and its next request starts from there at once. The generate's own reply is GenerateCancelled.
    A generate that already ended is not touched (its reply is on the way).

Note [When to schedule]
    `schedule` is pure and cheap, but it is called only when its inputs changed (`dirty`): a job
    arrived or ended, a swap completed, a signal came, a session closed, or the time a policy asked
    to be woken at (`Decision.wake_at`, a planned prefetch) has come.
"""
from __future__ import annotations

import itertools
import logging
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from ..protocol.errors import GenerateCancelled, OutOfMemory, QuotaExceeded, SessionNotFound
from ..scheduler import schedule
from ..scheduler.types import MemoryView, SessionState, SessionView, View
from ..vmu.data import GIB
from .execution.fast_task import PrefillBudget, prefill_together
from .execution.rng import Stream
from .execution.tasks import StepTask
from .router import Request

log = logging.getLogger("djinn.dispatch")

#: Ops served at once, even while the session has a job (Note [Per-session order]).
CONTROL_OPS = frozenset({"ping", "stats", "signal", "open_session", "close_session", "cancel_generate"})

#: Ops that queue behind a job without counting against quota_queued_requests: they only free memory.
UNCOUNTED_OPS = frozenset({"free"})


@dataclass(frozen=True)
class Quotas:
    """Limits from the server config (None: no limit). Per session: Data-segment bytes on the GPU,
    swapped KV bytes in the host pool, requests queued behind (and including) the session's job. Per
    principal: GPU bytes of all its sessions together (Note [Principal GPU quota] in quotas.py)."""

    gpu_bytes: int | None = None
    host_bytes: int | None = None
    queued_requests: int | None = None
    principal_gpu_bytes: int | None = None

    @classmethod
    def from_config(cls, cfg) -> "Quotas":
        def nbytes(gb):
            return None if gb is None else int(gb * GIB)

        return cls(nbytes(getattr(cfg, "quota_gpu_gb", None)), nbytes(getattr(cfg, "quota_host_gb", None)),
                   getattr(cfg, "quota_queued_requests", None), nbytes(getattr(cfg, "quota_principal_gpu_gb", None)))


@dataclass
class Job:
    """One generate of one session, from arrival to reply."""

    session: Any
    model_id: str
    need: int                       # GPU bytes of the session's KV once the job is done
    body: Callable                  # body(step_hook) -> reply result
    rng: Stream                     # the random stream its StepTask draws from (Note [Random streams])
    device: Any
    uses_kv: bool = True            # False: no session cache, no memory to schedule; starts at once
    req: Request | None = None      # set by submit
    arrival: int = 0
    t_arrive: float = 0.0
    task: StepTask | None = None
    t_start: float | None = None
    queued_reason: str | None = None
    make_task: Callable | None = None  # the decode fast path's task (fast_task.py); None: a StepTask
    reserve: Callable[[], bool] | None = None  # at start: reserve its KV blocks (False: none free yet)
    release: Callable[[], None] | None = None  # at the end: give back the blocks it did not write
    truncate: Callable[[int], int] | None = None  # cancelled: keep the first n generated tokens (Note [Cancel])
    peak: int = 0                   # device bytes its session may hold while it runs (Note [Principal GPU quota])


@dataclass
class _SessionQueue:
    job: Job | None = None
    deferred: deque = field(default_factory=deque)


class Dispatcher:
    def __init__(self, engine, policy):
        self.engine, self.policy = engine, policy
        self.data = engine.data
        self.quotas = Quotas.from_config(engine.cfg)
        if self.data.host_quota is None:
            self.data.host_quota = self.quotas.host_bytes  # Note [Host quota] in djinn/vmu/data.py
        self._q: dict[str, _SessionQueue] = {}
        self._running: list[Job] = []       # started jobs, in round-robin order
        self._no_blocks: list[Job] = []     # jobs without a session KV that wait for free blocks
        self._arrivals = itertools.count()
        self.prefill = PrefillBudget(engine.cfg.prefill_step_tokens)  # Note [Chunked prefill]
        self.dirty = False
        self.wake_at: float | None = None
        self.decisions = 0

    # -- arrivals --------------------------------------------------------------------------------
    def busy(self, sid: Any) -> bool:
        q = self._q.get(sid) if isinstance(sid, str) else None
        return q is not None and (q.job is not None or bool(q.deferred))

    def defer(self, sid: str, req: Request) -> None:
        """Queue a request behind its session's job (Note [Queue quota and ownership])."""
        if not self._owned(sid, req.client_id):
            self.engine.serve(req, in_order=True)  # fails at once: not a session of this client
            return
        q = self._q[sid]
        limit = self.quotas.queued_requests
        if limit is not None and req.header.get("op") not in UNCOUNTED_OPS and self.queued(sid) + 1 > limit:
            self.engine.requests_served += 1
            self.engine.reply_error(req, QuotaExceeded(
                f"session {sid[:8]} already has {self.queued(sid)} request(s) queued or running "
                f"(quota_queued_requests={limit}): {req.header.get('op')} refused; wait for a reply first"))
            return
        q.deferred.append(req)

    def queued(self, sid: str) -> int:
        """Requests of the session queued or running here, its job included (frees not counted)."""
        q = self._q.get(sid)
        if q is None:
            return 0
        return (q.job is not None) + sum(1 for r in q.deferred if r.header.get("op") not in UNCOUNTED_OPS)

    def promised(self, sid: str) -> int:
        """Device bytes the session's job (queued or running) was admitted to hold at its peak; 0 without
        one. Its blocks are reserved only when it starts (Note [Principal GPU quota] in quotas.py)."""
        q = self._q.get(sid)
        return q.job.peak if q is not None and q.job is not None else 0

    def _owned(self, sid: str, client_id: str) -> bool:
        try:
            self.engine.sessions.get(sid, client_id)
        except SessionNotFound:
            return False
        return True

    def submit(self, job: Job, req: Request) -> None:
        job.req, job.arrival, job.t_arrive = req, next(self._arrivals), time.monotonic()
        q = self._q.setdefault(job.session.sid, _SessionQueue())
        assert q.job is None, "a session runs one job at a time (Note [Per-session order])"
        q.job = job
        if job.uses_kv:
            self.data.request_arrived(job.session.sid)
            self.dirty = True
        else:
            self._start(job)

    # -- the engine's step ---------------------------------------------------------------------------
    def runnable(self) -> bool:
        return bool(self._running)

    def active(self) -> bool:
        """Some job runs or waits."""
        return any(q.job is not None for q in self._q.values())

    def due(self, now: float) -> bool:
        return self.dirty or (self.wake_at is not None and now >= self.wake_at)

    def schedule(self, now: float) -> None:
        view = self.view(now)
        try:
            decision = schedule(self.policy, view)
        except Exception:
            # A bad view is a bug (arguments are checked in ops); retrying every turn would flood the log
            # and slow every other request, so try again in a second, when something may have changed.
            self.dirty, self.wake_at = False, now + 1.0
            raise
        self.decisions += 1
        self.dirty, self.wake_at = False, decision.wake_at
        sessions = {s.sid: s for s in self.engine.sessions}
        for a in decision.swap_out:
            self.data.swap_out(sessions[a.sid])
        for a in decision.drop:
            self.data.drop(sessions[a.sid])
        for a in decision.prefetch:
            if not self.data.prefetch(sessions[a.sid]):
                self._fail_waiting(a.sid, OutOfMemory(
                    f"session {a.sid[:8]}: its KV could not come back from host memory, the KV pool has too "
                    "few free blocks; the session's KV stays in host memory, try again"))
        for a in (*decision.admit, *decision.run):
            job = self._q[a.sid].job
            if job.task is None:
                self._start(job)
        for job in list(self._no_blocks):
            self._no_blocks.remove(job)
            self._start(job)
        for a in decision.queue:
            job = self._q[a.sid].job
            job.queued_reason = a.reason
            m = self.data.mem(a.sid)
            if m.state.needs_prefill:
                m.state = SessionState.QUEUED

    def step(self) -> None:
        """Every started job takes one step; ended ones reply and let their session's next request in.
        Fast-path jobs take theirs together: one batched step per model pool, before the tasks look;
        then prefilling ones run at most a turn's budget of prompt tokens between them, first started
        first (Note [Chunked prefill])."""
        self._step_pools()
        self.prefill.new_turn()
        prefill_together([j.task for j in self._running], self.engine.cfg.max_prefill_tokens)
        for job in list(self._running):
            if job.task.advance():
                self._finish(job)

    def _step_pools(self) -> None:
        pools = {id(j.task.pool): j.task.pool for j in self._running if getattr(j.task, "row", None) is not None}
        for pool in pools.values():
            try:
                pool.step()
            except Exception as e:  # fails the rows of this pool only (e.g. out of memory capturing a graph)
                tb = traceback.format_exc()
                for job in self._running:
                    if getattr(job.task, "pool", None) is pool and job.task.row is not None:
                        job.task.fail(e, tb)

    def view(self, now: float) -> View:
        mem = self.data.memory_view()
        hide = self.data.host_quota is not None and self.policy.swaps
        rows = []
        for s in self.engine.sessions:
            m = self.data.mem(s.sid)
            q = self._q.get(s.sid)
            job = q.job if q is not None and q.job is not None and q.job.uses_kv else None
            gpu = self.data.gpu_bytes(s.sid)
            if job is not None and job.task is not None:
                gpu = max(gpu, job.need)  # a running job holds its reservation
            elif job is None and hide and gpu and m.state.resident and not self.data.swappable(s.sid, gpu):
                gpu = 0  # over its host quota: not a victim (Note [Host quota]); still counted as used
            rows.append(SessionView(
                s.sid, m.state, gpu, self.data.host_bytes(s.sid), s.last_active, job is not None,
                job.arrival if job else 0, job.need if job else 0, m.io_wait_since, m.io_eta_s))
        used = mem.gpu_used + sum(max(0, r.gpu_bytes - self.data.gpu_bytes(r.sid)) for r in rows)
        mem = MemoryView(max(mem.gpu_capacity, used), used, mem.host_capacity, mem.host_used, mem.host_largest_free)
        return View(now, tuple(rows), mem, self.data.swap_bw)

    # -- sessions ----------------------------------------------------------------------------------
    def drop_session(self, sid: str, why: str) -> None:
        """The session closed: unwind its job, fail its queued requests."""
        self.dirty = True  # its memory is free for others
        q = self._q.pop(sid, None)
        if q is None:
            return
        err = SessionNotFound(f"session {sid[:8]} closed ({why}) before this request ran")
        if q.job is not None:
            if q.job.task is not None:
                q.job.task.cancel()
                self._running.remove(q.job)
            if q.job in self._no_blocks:
                self._no_blocks.remove(q.job)
            if q.job.release is not None:
                q.job.release()
            self.engine.reply_error(q.job.req, err)
        for req in q.deferred:
            self.engine.reply_error(req, err)

    def cancel(self, sid: str, rid: Any, keep: int) -> dict:
        """Note [Cancel]: end the session's generate `rid`, keeping its first `keep` generated tokens."""
        q = self._q.get(sid)
        if q is None:
            return {"cancelled": False, "kept": 0}
        job = q.job
        if job is not None and job.req is not None and job.req.header.get("rid") == rid:
            if job.task is None:  # still waiting for memory: it never starts
                if job in self._no_blocks:
                    self._no_blocks.remove(job)
                job.task = _Failed(GenerateCancelled("generate cancelled by the client before it started"))
                job.t_start = time.monotonic()
                self._running.append(job)
                self.dirty = True
                return {"cancelled": True, "kept": 0}
            if job.task.done:
                return {"cancelled": False, "kept": 0}  # it ended: its reply is on the way
            job.task.cancel()
            if job.task.error is None:
                return {"cancelled": False, "kept": 0}  # it finished while being cancelled
            kept = job.truncate(keep) if job.truncate is not None and keep > 0 else 0
            job.task.error = GenerateCancelled(f"generate cancelled by the client; the session keeps {kept} "
                                               "of its tokens")
            job.task.error_traceback = None
            self._finish(job)
            return {"cancelled": True, "kept": kept}
        for req in list(q.deferred):
            if req.header.get("rid") == rid and req.header.get("op") == "generate":
                q.deferred.remove(req)
                self.engine.requests_served += 1
                self.engine.reply_error(req, GenerateCancelled("generate cancelled by the client before it started"))
                return {"cancelled": True, "kept": 0}
        return {"cancelled": False, "kept": 0}

    def queue_length(self) -> int:
        return sum(1 for q in self._q.values() if q.job is not None and q.job.task is None)

    def job_state(self, sid: str) -> str | None:
        """What any client may see of a session's job (`djinn top`): "generate running", "generate
        queued" or None. Its timings, steps and why it waits stay its owner's (describe)."""
        q = self._q.get(sid)
        if q is None or q.job is None:
            return None
        return "generate queued" if q.job.task is None else "generate running"

    def describe(self, sid: str, now: float) -> dict | None:
        q = self._q.get(sid)
        if q is None or q.job is None:
            return None
        j = q.job
        if j.task is None:
            return {"op": "generate", "waiting_s": round(now - j.t_arrive, 3), "why": j.queued_reason}
        return {"op": "generate", "running_s": round(now - j.t_start, 3), "steps": j.task.steps,
                "decode": "fast" if j.make_task is not None else "eager"}

    # -- internals ---------------------------------------------------------------------------------
    def _fail_waiting(self, sid: str, err: Exception) -> None:
        """A request that cannot start (a failed prefetch) fails now, typed, instead of waiting in a loop."""
        q = self._q.get(sid)
        job = q.job if q is not None else None
        if job is None or job.task is not None:
            return
        job.task = _Failed(err)
        job.t_start = time.monotonic()
        self._running.append(job)

    def _start(self, job: Job) -> None:
        if job.reserve is not None and not job.reserve():
            # Its blocks are not free yet (the scheduler's bytes span every model's pool, the blocks are
            # per model; or a job without session KV, which the scheduler does not see): wait.
            job.queued_reason = "no free KV blocks in the model's pool"
            if not job.uses_kv and job not in self._no_blocks:
                self._no_blocks.append(job)
            return
        now = time.monotonic()
        job.t_start = now
        waited = now - job.t_arrive
        if job.uses_kv:
            m = self.data.mem(job.session.sid)
            if m.state.needs_prefill:
                m.state = SessionState.ACTIVE
            self.data.sync(job.session)  # its reservation is charged from now on
            m.counters.queue_s += waited
            self.data.totals.queue_s += waited
        job.task = job.make_task() if job.make_task is not None else StepTask(job.body, job.device, job.rng)
        self._running.append(job)

    def _finish(self, job: Job) -> None:
        self._running.remove(job)
        if job.release is not None:
            job.release()
        s = job.session
        q = self._q.get(s.sid)
        if q is not None:
            q.job = None
        t = job.task
        if t.error is None:
            self.engine.reply(job.req, t.result)
        else:
            self.engine.reply_exception(job.req, t.error, t.error_traceback)
        s.last_active = time.monotonic()
        if s.sid in self.engine.sessions:
            self.data.sync(s)
        self.dirty = True
        if q is not None:
            while q.deferred and q.job is None:
                self.engine.serve(q.deferred.popleft(), in_order=True)
            if q.job is None and not q.deferred:
                self._q.pop(s.sid, None)



class _Failed:
    """The task of a job that failed before it could start: done at once, with its error."""

    path = "none"
    steps = 0
    result = None
    error_traceback = None
    done = True

    def __init__(self, error: Exception):
        self.error = error

    def advance(self) -> bool:
        return True

    def cancel(self) -> None:
        pass
