"""Multi-tenant dispatch: which session's generate runs, waits or moves, one decode step at a time.

DESIGN.md section 5. The engine hands every generate to the `Dispatcher`. Each one becomes a `Job`: a
request of one session with the GPU bytes its KV will need. The scheduler policy (djinn/scheduler)
decides from a `View` of all sessions which jobs start, which wait, and which idle sessions' caches go
to host memory (or are dropped) to make room; the Data segment (djinn/vmu/data.py) carries out the
moves, the dispatcher starts and queues the jobs, and then steps every started job by one decode step,
round robin (djinn/server/execution/tasks.py). So a session waits for memory, never for another
session's tool call, swap, prefetch or whole generate.

The dispatcher never calls back into the engine: it gets the session table, the Data segment and its
config values when it is made, and its methods return what the engine must do (`Answer`s to send, the
next deferred request to serve, `next_deferred`). The engine's turn carries them out (engine.py).

Note [Per-session order]
    A client may pipeline requests on one session. Everything but the control ops (ping, stats,
    signal, closing) that arrives while the session has a job waits in the session's `deferred`
    queue and is served, in order, when the job ends: a fetch after a generate sees its result, and a
    second generate continues from the first's cache. The engine serves them (`next_deferred`) right
    after it sent the ended job's reply, one at a time until one of them is a job again.

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
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from ..protocol.errors import GenerateCancelled, OutOfMemory, QuotaExceeded, SessionNotFound
from ..scheduler import schedule
from ..scheduler.types import Decision, MemoryView, SessionState, SessionView, View
from ..vmu.data import GIB
from .execution.fast_task import PrefillBudget, fast_turn
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
    op: str = "generate"            # what stats call it: "generate", or "start" for a run that cannot stop


@dataclass(frozen=True)
class Then:
    """A job's reply that is one more piece of work on the engine thread, done once the job has ended
    (its blocks released or handed back, its session free of it): `fn()` returns the reply, or a Job
    that answers the same request (Note [The head of a run] in handlers/run_ops.py). The engine runs it
    as it runs an op, so its errors reach the client as the request's."""

    fn: Callable[[], Any]


@dataclass(frozen=True)
class Answer:
    """A reply the engine sends for the dispatcher: `result`, or `error` (a DjinnError as it is, any other
    exception as the engine types it, with its traceback). `served`: answered without reaching the
    engine's `serve` (refused or cancelled while queued), so the engine counts it as a request served."""

    req: Request
    result: Any = None
    error: BaseException | None = None
    traceback: str | None = None
    served: bool = False


@dataclass
class _SessionQueue:
    job: Job | None = None
    deferred: deque = field(default_factory=deque)


class Dispatcher:
    def __init__(self, policy, data, sessions, quotas: Quotas, prefill_step_tokens: int, max_prefill_tokens: int):
        """sessions: the engine's session table, read only (who owns a session, the rows of the view)."""
        self.policy, self.data, self.sessions, self.quotas = policy, data, sessions, quotas
        self.max_prefill_tokens = max_prefill_tokens
        if self.data.host_quota is None:
            self.data.host_quota = self.quotas.host_bytes  # Note [Host quota] in djinn/vmu/data.py
        self._q: dict[str, _SessionQueue] = {}
        self._running: list[Job] = []       # started jobs, in round-robin order
        self._no_blocks: list[Job] = []     # jobs without a session KV that wait for free blocks
        self._ended: list[Answer] = []      # replies of jobs that ended, not yet handed to the engine
        self._released: deque[str] = deque()  # sessions whose job ended with requests queued behind it
        self._arrivals = itertools.count()
        self.prefill = PrefillBudget(prefill_step_tokens)  # Note [Chunked prefill]
        self.dirty = False
        self.wake_at: float | None = None
        self.decisions = 0

    # -- arrivals --------------------------------------------------------------------------------
    def busy(self, sid: Any, client_id: str) -> bool:
        """A request of `client_id` naming session `sid` waits behind the session's job: the session has
        one (or requests queued) and is this client's. Another client's request is served at once, and
        fails as for any session it does not own (Note [Queue quota and ownership])."""
        q = self._q.get(sid) if isinstance(sid, str) else None
        return q is not None and (q.job is not None or bool(q.deferred)) and self._owned(sid, client_id)

    def defer(self, sid: str, req: Request) -> Answer | None:
        """Queue a request behind its session's job; the refusal to send if that passes the session's
        queue quota (Note [Queue quota and ownership])."""
        q = self._q[sid]
        limit = self.quotas.queued_requests
        if limit is not None and req.header.get("op") not in UNCOUNTED_OPS and self.queued(sid) + 1 > limit:
            return Answer(req, error=QuotaExceeded(
                f"session {sid[:8]} already has {self.queued(sid)} request(s) queued or running "
                f"(quota_queued_requests={limit}): {req.header.get('op')} refused; wait for a reply first"),
                served=True)
        q.deferred.append(req)
        return None

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
            self.sessions.get(sid, client_id)
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

    def schedule(self, now: float) -> Decision:
        """The policy's decision over the view of every session (Note [When to schedule]). The Data
        segment carries out its moves (`DataSegment.apply`), then `start` its starts and queues."""
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
        return decision

    def start(self, decision: Decision, not_prefetched: Iterable[str] = ()) -> None:
        """After the Data segment applied the decision's moves: fail the requests whose KV could not come
        back (Note [Blocks in flight] in djinn/vmu/data.py), start the admitted and running jobs (and
        those without session KV that waited for blocks), mark the queued ones."""
        for sid in not_prefetched:
            self._fail_waiting(sid, OutOfMemory(
                f"session {sid[:8]}: its KV could not come back from host memory, the KV pool has too "
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

    def step(self) -> list[Answer]:
        """Every started job takes one step; the replies of those that ended, in the order they ended
        (the engine sends them, then lets each session's next request in: `next_deferred`).
        Fast-path jobs take theirs together, before the tasks look: per model pool one forward with
        its decode rows and this turn's prompt chunks (at most a turn's budget of prompt tokens, first
        started first), or the decode step and then the chunks (Notes [Chunked prefill], [Mixed step])."""
        self.prefill.new_turn()
        fast_turn([j.task for j in self._running], self.max_prefill_tokens)
        for job in list(self._running):
            if job.task.advance():
                self._finish(job)
        return self._take_ended()

    def _take_ended(self) -> list[Answer]:
        """The replies of the jobs that ended since the last call (kept here until then, so a failure later
        in a turn loses none: Note [Every request is answered] in engine.py)."""
        ended, self._ended = self._ended, []
        return ended

    def next_deferred(self) -> Request | None:
        """The next request to serve of a session whose job ended, in arrival order, while that session has
        no job again (Note [Per-session order]); None when there is none."""
        while self._released:
            sid = self._released[0]
            q = self._q.get(sid)
            if q is not None and q.job is None and q.deferred:
                return q.deferred.popleft()
            self._released.popleft()
            if q is not None and q.job is None:
                self._q.pop(sid, None)
        return None

    def running(self) -> int:
        """Jobs started and not yet ended."""
        return len(self._running)

    def view(self, now: float) -> View:
        mem = self.data.memory_view()
        hide = self.data.host_quota is not None and self.policy.swaps
        rows = []
        for s in self.sessions:
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
    def drop_session(self, sid: str, why: str) -> list[Answer]:
        """The session closed: unwind its job; the errors its job and queued requests get."""
        self.dirty = True  # its memory is free for others
        q = self._q.pop(sid, None)
        if q is None:
            return []
        err = SessionNotFound(f"session {sid[:8]} closed ({why}) before this request ran")
        answers = []
        if q.job is not None:
            if q.job.task is not None:
                q.job.task.cancel()
                self._running.remove(q.job)
            if q.job in self._no_blocks:
                self._no_blocks.remove(q.job)
            if q.job.release is not None:
                q.job.release()
            answers.append(Answer(q.job.req, error=err))
        return answers + [Answer(req, error=err) for req in q.deferred]

    def cancel(self, sid: str, rid: Any, keep: int) -> tuple[dict, list[Answer]]:
        """Note [Cancel]: end the session's generate `rid`, keeping its first `keep` generated tokens. The
        cancel's reply, and the replies to send first (the generate's, when it ended here)."""
        q = self._q.get(sid)
        if q is None:
            return {"cancelled": False, "kept": 0}, []
        job = q.job
        if job is not None and job.req is not None and job.req.header.get("rid") == rid:
            if job.task is None:  # still waiting for memory: it never starts
                if job in self._no_blocks:
                    self._no_blocks.remove(job)
                job.task = _Failed(GenerateCancelled("generate cancelled by the client before it started"))
                job.t_start = time.monotonic()
                self._running.append(job)
                self.dirty = True
                return {"cancelled": True, "kept": 0}, []
            if job.task.done:
                return {"cancelled": False, "kept": 0}, []  # it ended: its reply is on the way
            job.task.cancel()
            if job.task.error is None:
                return {"cancelled": False, "kept": 0}, []  # it finished while being cancelled
            kept = job.truncate(keep) if job.truncate is not None and keep > 0 else 0
            job.task.error = GenerateCancelled(f"generate cancelled by the client; the session keeps {kept} "
                                               "of its tokens")
            job.task.error_traceback = None
            self._finish(job)
            return {"cancelled": True, "kept": kept}, self._take_ended()
        for req in list(q.deferred):
            if req.header.get("rid") == rid and req.header.get("op") == "generate":
                q.deferred.remove(req)
                cancelled = GenerateCancelled("generate cancelled by the client before it started")
                return {"cancelled": True, "kept": 0}, [Answer(req, error=cancelled, served=True)]
        return {"cancelled": False, "kept": 0}, []

    def queue_length(self) -> int:
        return sum(1 for q in self._q.values() if q.job is not None and q.job.task is None)

    def job_state(self, sid: str) -> str | None:
        """What any client may see of a session's job (`djinn top`): "generate running", "generate
        queued" or None. Its timings, steps and why it waits stay its owner's (describe)."""
        q = self._q.get(sid)
        if q is None or q.job is None:
            return None
        return f"{q.job.op} queued" if q.job.task is None else f"{q.job.op} running"

    def describe(self, sid: str, now: float) -> dict | None:
        q = self._q.get(sid)
        if q is None or q.job is None:
            return None
        j = q.job
        if j.task is None:
            return {"op": j.op, "waiting_s": round(now - j.t_arrive, 3), "why": j.queued_reason}
        return {"op": j.op, "running_s": round(now - j.t_start, 3), "steps": j.task.steps,
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
        """The job ended: its blocks and its session's queue are free; its reply waits for the engine
        (`_take_ended`), which then serves its session's queued requests (`next_deferred`)."""
        self._running.remove(job)
        if job.release is not None:
            job.release()
        s = job.session
        q = self._q.get(s.sid)
        if q is not None:
            q.job = None
        t = job.task
        self._ended.append(Answer(job.req, t.result) if t.error is None
                           else Answer(job.req, error=t.error, traceback=t.error_traceback))
        s.last_active = time.monotonic()
        if s.sid in self.sessions:
            self.data.sync(s)
        self.dirty = True
        if q is not None:
            if q.deferred:
                self._released.append(s.sid)
            else:
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
