"""Runs: a forward or generate call that pauses at module breakpoints (DESIGN.md section 7).

Note [Run hand-off]: a Run executes its model call on a worker thread of its own (`WORKERS`), so the
call's Python stack, and with it the step's activations and KV cache, survives a pause where it is: no
copy, no recompute. The engine thread and a run thread never run at the same time. The engine passes the baton
(`start`, `resume`, `cancel`) and blocks until the run thread parks at its next breakpoint or ends;
a parked run thread blocks until the engine passes the baton back. So only one thread drives the
device at any moment (section 2), and every other session is served while a run is parked.

Breakpoints are forward (pre-)hooks registered on the target modules for the life of one run; the
executor has no breakpoint branches. The module is shared by every session using the model, so a
hook acts only on the thread of the run that registered it (`_current`): another session's forward
through the same module passes through it untouched.
"""
from __future__ import annotations

import enum
import queue
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...protocol.errors import InvalidRequest, OutOfMemory, RemoteExecutionError
from ...srg.layers import decoder_stack, layer_path
from ...srg.tree import tensor_leaves
from . import edits, executor
from .rng import Stream

WHERE = ("before", "after")
MAX_BREAKPOINTS = 256

_current = threading.local()  # .run: the Run whose worker thread this is (None elsewhere)


class RunState(enum.IntEnum):
    RUNNING = 1    # its thread holds the baton (only ever seen from inside the run)
    PAUSED = 2     # parked at a breakpoint: its stop's tensors are readable and editable
    FINISHED = 3
    FAILED = 4
    CANCELLED = 5  # by the client, a closed session, a dead client or the paused-run timeout


class _Cancelled(BaseException):
    """Raised out of a breakpoint hook to unwind a cancelled run's forward. A BaseException so that
    model code catching Exception cannot swallow it; it never leaves the run thread."""


@dataclass(frozen=True)
class BreakpointSpec:
    path: str                 # module path; "" is the model itself
    where: str = "after"      # "after": the module's output; "before": its input
    step: int | None = None   # forward call of the model to stop in (0 = prefill); None: every one


@dataclass
class StopPoint:
    """Where a paused run stands: what the client sees as a Stop."""

    spec: BreakpointSpec
    step: int
    hit: int                      # this run's n-th pause (0-based); fork replays up to it
    tensors: list[torch.Tensor]   # every tensor the stop exposes, the activation first; edits address them
    outputs: Any                  # the module's output ("after"), or None ("before")
    origin: tuple[int, ...]       # id() of each tensor as the module gave it (as found in `outputs`)
    readonly: frozenset[int]      # positions that were weights: exposed as copies, never edited

    @property
    def activation(self) -> torch.Tensor:
        return self.tensors[0]


@dataclass
class Call:
    """What a run executes: all a fork needs to execute it again."""

    module: nn.Module
    method: str               # "forward" | "generate"
    args: list                # device tensors and values; never mutated by the call
    kwargs: dict
    seed: int | None
    device: torch.device
    kv_pool: Any = None       # generate: the model's KV pool; each execution reserves a scratch table
    full_kwargs: dict | None = None  # generate: its own kwargs where `kwargs` end it at its last stop (Note [The tail of a run])


@dataclass(frozen=True)
class LoggedEdit:
    """An edit applied at a stop, kept so that a fork can apply it at the same point."""

    position: int  # index into StopPoint.tensors
    chain: tuple
    op: str
    value: Any


@dataclass
class Replay:
    """For a fork: the parent's edits by hit, and the hit where the parent is parked.

    Note [Fork replays the prefix]: a parked run's state is a Python call stack on its own thread,
    which cannot be cloned. A fork is therefore lazy: it returns at once, a run paused at a snapshot
    of the parent's stop (copies of its tensors, which may be read and edited; edits are logged), and
    executes only when it is resumed. It then re-executes the call, applies the logged edits at each
    stop up to the fork point without parking there, and goes on. A generate paused in a decode step
    k >= 1 does not start over: it starts from a copy-on-write fork of the parent's KV blocks (every
    position before step k, shared, nothing copied) and the token ids fed so far, and re-executes
    only step k (`ResumePoint`); a forward, or a generate paused in its prefill, re-executes the
    prefix from its parent's random stream as it was at the start. (On CUDA the forked step runs as the
    first forward of a new generate call, and an H100 fp16 run, `OSDI_Evaluation/micro/results/
    fork_h100.json`, gave other tokens than the parent's: that step's attention there is not the same
    kernel call as inside the parent's decode loop. So on CUDA forks re-execute from the start unless
    `run_fork_from_kv` says otherwise; on the CPU the KV path is bitwise, tested.) Execution on one
    device is deterministic, so the fork's state at the fork point equals
    the parent's, bitwise; one that does not reach that stop again fails (not deterministic).
    """

    log: dict[int, list[LoggedEdit]]
    pause_hit: int
    rng: Stream  # the parent's random stream at its start
    spec: "BreakpointSpec | None" = None  # the stop the re-execution must reach at pause_hit ...
    step: int | None = None              # ... in this model call


@dataclass
class StepMark:
    """What a generate run had at the start of one of its model calls (for forks from its KV)."""

    hits: int                    # stops hit before this call
    fed: torch.Tensor | None     # the token ids this call feeds ([batch, n]; None: not given as input_ids)
    rng: Stream | None           # the run's random stream as this call starts


@dataclass
class ResumePoint:
    """Where a forked generate starts instead of the beginning (Note [Fork replays the prefix])."""

    pool: Any
    table: Any                   # a copy-on-write fork of the parent's block table
    ids: torch.Tensor            # every token id fed up to and including step `step`'s input
    step: int
    hits: int
    rng: Stream | None


class Run:
    def __init__(self, run_id: str, session, model_id: str, call: Call, specs: list[BreakpointSpec],
                 replay: Replay | None = None, resume_from: ResumePoint | None = None,
                 snapshot: StopPoint | None = None):
        self.run_id, self.session, self.model_id, self.call, self.specs = run_id, session, model_id, call, specs
        self.state = RunState.RUNNING
        self.stop: StopPoint | None = None
        self.resume_from = resume_from
        self.marks: list[StepMark] = []  # generate runs: one per model call (forks start from the KV)
        self.stop_hids: list[str] = []  # the stop's tensors as Stack handles (set by the run table)
        self.output: Any = None
        self.error: BaseException | None = None
        self.error_traceback: str | None = None
        self.calls = 0                  # forward calls of the model so far; the current step is calls - 1
        self.hits = 0
        self.cache: Any = None          # the KV cache generate passes to the model (accounted while paused)
        self.kept: Any = None           # a cut generate that did not end: its KVState, for its tail job to continue
        self.log: dict[int, list[LoggedEdit]] = {}
        self.paused_since: float | None = None
        self.timing: dict[str, float] = {}
        self._replay = replay
        # Note [Random streams]: the run draws from a stream of its own, swapped in while its thread
        # runs, so others' draws while it is parked change nothing. A fork re-executing from the start
        # starts from its parent's stream at the start; one starting from the parent's KV at step k,
        # from the stream as step k began.
        self.rng0 = replay.rng.copy() if replay else Stream.new(call.seed, call.device)
        start = resume_from.rng if resume_from is not None and resume_from.rng is not None else self.rng0
        self.rng = start.copy()
        if resume_from is not None:
            self.calls, self.hits = resume_from.step, resume_from.hits
        self.lazy = snapshot is not None  # a fork that has not executed yet (Note [Fork replays the prefix])
        # Steps of this run (or of the run it was forked from) ran as fast generate jobs (Notes [The head
        # of a run] and [Between stops]): re-executed from the prompt they would be eager steps.
        self.batched = False
        if self.lazy:  # paused at the snapshot; edits on it add to the parent's log (the fork's own copy)
            self.state, self.stop, self.paused_since = RunState.PAUSED, snapshot, time.monotonic()
            now = time.perf_counter()
            self.timing = {"release": now, "wake": now, "park": now, "back": now}
            self.log = replay.log if replay is not None else {}
        self._cancel = False
        self._to_run = threading.Semaphore(0)
        self._to_engine = threading.Semaphore(0)
        self._hooks: list = []

    # -- engine thread -----------------------------------------------------------------------------
    def start(self) -> None:
        """Run until the first stop or the end. With no breakpoint there is nothing to park: the call
        runs on the engine thread itself, at the cost of a plain forward or generate."""
        if not self.specs:
            self.timing = {"release": time.perf_counter()}
            with self.rng.active():
                self._main()
                self._to_engine.acquire()
            self.timing["back"] = time.perf_counter()
            return
        self._register_hooks()
        self._advance(lambda: WORKERS.submit(self._main, keep=self.call.device.type == "cuda"))

    def resume(self) -> None:
        assert self.state == RunState.PAUSED, self.state
        if self.lazy:  # a fork's first execution: up to its fork point without parking, then on
            self.lazy = False
            self._replay = Replay(self.log, self.stop.hit, self.rng0, self.stop.spec, self.stop.step)
            self.log = {}
            self._register_hooks()
            self._advance(lambda: WORKERS.submit(self._main, keep=self.call.device.type == "cuda"))
            return
        self._advance(self._to_run.release)

    def cancel(self) -> None:
        """Unwind a parked run's thread (it raises _Cancelled out of its hook) and wait until it ended."""
        if self.state == RunState.PAUSED and self.lazy:  # no thread yet: only its KV fork to give back
            self.lazy, self.stop, self.state = False, None, RunState.CANCELLED
            if self.resume_from is not None:
                self.resume_from.pool.release(self.resume_from.table)
            return
        if self.state == RunState.PAUSED:
            self._cancel = True
            self._advance(self._to_run.release)

    def resume_point(self) -> ResumePoint | None:
        """Where a fork of this paused generate may start from its KV (None: it re-executes the prefix)."""
        stop, c = self.stop, self.call
        if self.lazy:
            r = self.resume_from
            return None if r is None else ResumePoint(r.pool, r.pool.fork(r.table), r.ids, r.step, r.hits, r.rng)
        table = getattr(self.cache, "table", None)
        first = self.resume_from.step if self.resume_from is not None else 0
        k = stop.step if stop is not None else 0
        if (c.method != "generate" or c.kv_pool is None or table is None or k < 1 or k < first
                or len(self.marks) <= k - first):
            return None
        marks = self.marks[:k - first + 1]
        if any(m.fed is None for m in marks):
            return None
        # A run that started at a step (a fork, a head's run) fed the tail of its ResumePoint's ids first:
        # those ids up to that tail came before its first call.
        r = self.resume_from
        before = [r.ids[:, :r.ids.shape[1] - marks[0].fed.shape[1]]] if r is not None else []
        ids = torch.cat(before + [m.fed for m in marks], dim=1)
        if table.length < ids.shape[1] - 1:
            return None
        fork = c.kv_pool.fork(table)
        fork.length = int(ids.shape[1]) - 1  # step k's own positions are recomputed by the fork
        return ResumePoint(c.kv_pool, fork, ids, k, marks[-1].hits, marks[-1].rng)

    def _advance(self, release) -> None:
        self.state, self.stop, self.paused_since = RunState.RUNNING, None, None
        self.timing = {"release": time.perf_counter()}
        with self.rng.active():  # Note [Random streams]
            release()
            self._to_engine.acquire()  # Note [Run hand-off]: the run thread has the device until here
        self.timing["back"] = time.perf_counter()
        if self.state == RunState.PAUSED:
            self.paused_since = time.monotonic()

    # -- run thread --------------------------------------------------------------------------------
    def _main(self) -> None:
        self.timing["wake"] = time.perf_counter()
        _current.run = self
        try:
            if self.call.device.type == "cuda":
                torch.cuda.set_device(self.call.device)
            self.output = self._execute()
            self.state = RunState.FINISHED
        except _Cancelled:
            self.state = RunState.CANCELLED
        except BaseException as e:  # handed to the engine, which raises it as the request's error
            self.error, self.error_traceback = e, traceback.format_exc()
            self.state = RunState.FAILED
        finally:
            for h in self._hooks:
                h.remove()
            self._hooks.clear()
            self.stop, self.cache = None, None
            _current.run = None
            self.timing["park"] = time.perf_counter()
            self._to_engine.release()

    def _execute(self) -> Any:
        if self.resume_from is not None:
            out = self._execute_from_kv(self.resume_from)
        else:
            out = self._execute_call()
        if self._replay is not None:  # never came back to the fork point
            raise RemoteExecutionError(f"fork did not reach its parent's stop (hit {self._replay.pause_hit}): "
                                       "the model call is not deterministic")
        return out

    def _execute_from_kv(self, r: ResumePoint) -> Any:
        """A fork of a generate paused in step r.step: that step and the rest, over the forked KV."""
        from .paged_cache import PagedCache
        from ..sessions import KVState

        c = self.call
        prompt = int(c.args[0].shape[1])
        total = prompt + executor.new_tokens(c.module, prompt, c.kwargs)
        kwargs = {k: v for k, v in c.kwargs.items() if k != "max_length"}
        done = int(r.ids.shape[1]) - prompt  # tokens generated before step r.step
        kwargs["max_new_tokens"] = total - prompt - done
        if kwargs.get("min_new_tokens"):
            kwargs["min_new_tokens"] = max(0, int(kwargs["min_new_tokens"]) - done)
        fed = r.table.length
        state = KVState(PagedCache(r.pool, r.table), r.ids[:, :fed])
        try:
            if not r.pool.reserve(r.table, total):
                raise OutOfMemory(f"a forked generate run needs {total} tokens of KV x batch {r.ids.shape[0]}; "
                                  "the model's KV pool has too few free blocks now")
            out = executor.generate(c.module, state, r.ids[:, fed:], kwargs, None, continues=True)
            self._keep_for_tail(state, out, prompt)
            return out
        finally:
            if self.kept is None:
                r.pool.release(r.table)  # on the run thread, while the engine waits (Note [Run hand-off])

    def _execute_call(self) -> Any:
        c = self.call
        if c.method == "forward":
            return executor.forward(c.module, c.args, c.kwargs)
        if c.kv_pool is None:
            return executor.generate(c.module, None, c.args[0], c.kwargs, None, continues=False)
        from ..sessions import KVState

        ids = c.args[0]
        state = KVState.empty(c.kv_pool, executor.empty_ids(ids))
        prompt = executor.decoder_prompt(c.module, int(ids.shape[1]))  # Note [Encoder-decoder generate]
        tokens = prompt + executor.new_tokens(c.module, prompt, c.kwargs)
        if not c.kv_pool.reserve(state.table, tokens):
            raise OutOfMemory(f"a generate run needs {tokens} tokens of KV x batch {ids.shape[0]}; the model's "
                              "KV pool has too few free blocks now")
        try:
            out = executor.generate(c.module, state, ids, c.kwargs, None, continues=False)
            self._keep_for_tail(state, out, prompt)
            return out
        finally:
            if self.kept is None:
                c.kv_pool.release(state.table)  # on the run thread, while the engine waits (Note [Run hand-off])

    def _keep_for_tail(self, state, out: torch.Tensor, prompt: int) -> None:
        """A generate cut at its last stop (Note [The tail of a run]) that did not end there (eos, or
        fewer tokens than the cut allowed) keeps its KV for its tail job, which owns it from then on."""
        c = self.call
        if c.full_kwargs is None:
            return
        cut = int(c.kwargs["max_new_tokens"])
        if int(out.shape[1]) - prompt < cut or int(out[0, -1]) in eos_ids(c.module, c.full_kwargs):
            return
        self.kept = state

    def _register_hooks(self) -> None:
        root = self.call.module
        # First of all pre-hooks, so that a "before" breakpoint on the model itself sees the new step.
        self._hooks.append(root.register_forward_pre_hook(self._count_call, with_kwargs=True, prepend=True))
        for spec in self.specs:
            target = root.get_submodule(spec.path)
            if spec.where == "before":
                self._hooks.append(target.register_forward_pre_hook(self._before_hook(spec), with_kwargs=True))
            else:
                self._hooks.append(target.register_forward_hook(self._after_hook(spec)))

    def _count_call(self, module, args, kwargs):
        if getattr(_current, "run", None) is self:
            self.calls += 1
            for v in kwargs.values():
                if _is_cache(v):
                    self.cache = v
            if self.call.method == "generate":
                fed = kwargs.get("input_ids", args[0] if args else None)
                rng = Stream.current(self.call.device)  # the stream this step draws from
                self.marks.append(StepMark(self.hits, fed if isinstance(fed, torch.Tensor) else None, rng))
        return None

    def _before_hook(self, spec: BreakpointSpec):
        def hook(module, args, kwargs):
            if getattr(_current, "run", None) is self:
                first = tensor_leaves((args, kwargs))[:1]
                self._hit(spec, first, None)
            return None  # edits are in place: the module reads the edited tensor
        return hook

    def snapshot(self) -> StopPoint:
        """A copy of this run's stop for a fork: its tensors copied (the fork's own, to read and edit),
        the module's output structure pointing at the copies."""
        st = self.stop
        copies = [t.clone() for t in st.tensors]
        by_id = dict(zip(st.origin, copies))
        return StopPoint(st.spec, st.step, st.hit, copies, _map_tensors(st.outputs, lambda t: by_id.get(id(t))),
                         tuple(id(c) for c in copies), st.readonly)

    def _after_hook(self, spec: BreakpointSpec):
        def hook(module, args, output):
            if getattr(_current, "run", None) is self:
                self._hit(spec, tensor_leaves(output), output)
            return None
        return hook

    def _hit(self, spec: BreakpointSpec, tensors: list[torch.Tensor], outputs: Any) -> None:
        if self._cancel:
            raise _Cancelled()  # model code swallowed the first one (a bare except): raise again
        step = self.calls - 1
        if spec.step is not None and spec.step != step:
            return
        if not tensors:
            side = "input" if spec.where == "before" else "output"
            raise InvalidRequest(f"breakpoint at {spec.path or '<model>'} ({spec.where}): the module's {side} holds no tensor")
        hit = self.hits
        self.hits += 1
        # Note [Weights are read-only at run time]: a stop tensor in a weight's storage is exposed as a copy
        # (so no handle aliases a weight) and marked read-only (an edit could not reach the forward).
        exposed = [self.session.private(t) for t in tensors]
        readonly = frozenset(k for k, (t, e) in enumerate(zip(tensors, exposed)) if e is not t)
        stop = StopPoint(spec, step, hit, exposed, outputs, tuple(map(id, tensors)), readonly)
        if self._replay is not None and hit <= self._replay.pause_hit:
            for e in self._replay.log.get(hit, []):
                edits.apply_value(stop.tensors[e.position], e.chain, e.op, e.value)
                self.log.setdefault(hit, []).append(e)
            if hit < self._replay.pause_hit:
                return  # the parent stopped here earlier; the fork only re-applies its edits
            want, want_step, self._replay = self._replay.spec, self._replay.step, None
            if want is not None:  # the fork point, resumed before the fork executed: do not park, go on
                if (want, want_step) != (spec, step):
                    raise RemoteExecutionError(f"fork did not reach its parent's stop at {want.path} (hit {hit}): "
                                               "the model call is not deterministic")
                return
        self.stop, self.state = stop, RunState.PAUSED
        self.timing["park"] = time.perf_counter()
        self._to_engine.release()
        self._to_run.acquire()  # parked: the engine serves others until it passes the baton back
        self.timing["wake"] = time.perf_counter()
        if self._cancel:
            raise _Cancelled()


class _Workers:
    """Run threads, kept between CUDA runs. A thread's first model call pays the CUDA libraries'
    per-thread set-up (handles, workspaces): on an H200 a 7B-shape fp16 generate of 16 tokens took 2.5x
    as long on a fresh thread as on one that had run it before (exp3_whitebox_debugging/results). A
    paused run holds its worker; an ended one hands it back. CPU runs do not keep theirs: an idle thread
    keeps an OpenMP team, and libgomp, seeing more threads than cores, stops spinning, which slows every
    CPU forward of the server (section 10, "Breakpoints")."""

    MAX_IDLE = 64  # every concurrent generate (a StepTask) holds one: keep a warm thread per tenant

    def __init__(self) -> None:
        self._idle: queue.SimpleQueue = queue.SimpleQueue()  # of job queues; SimpleQueue is thread-safe
        self._count = 0

    def submit(self, job, keep: bool) -> None:
        try:
            jobs = self._idle.get_nowait()
        except queue.Empty:
            jobs = queue.SimpleQueue()
            self._count += 1
            threading.Thread(target=self._loop, args=(jobs,), name=f"djinn-run-{self._count}", daemon=True).start()
        jobs.put((job, keep))

    def _loop(self, jobs: queue.SimpleQueue) -> None:
        while True:
            job, keep = jobs.get()
            job()  # never raises: Run._main keeps every error for the engine
            # The job handed the baton back as its last act: from here on this thread runs alongside the
            # engine, so it touches nothing but the idle queue.
            if not keep or self._idle.qsize() >= self.MAX_IDLE:
                return
            self._idle.put(jobs)


WORKERS = _Workers()


# -- breakpoint specs ------------------------------------------------------------------------------
def parse_breakpoints(module: nn.Module, raw: Any, method: str) -> list[BreakpointSpec]:
    """Wire breakpoints ({path | layer, where, step}) -> specs with resolved, existing module paths."""
    if not isinstance(raw, list) or len(raw) > MAX_BREAKPOINTS:
        raise InvalidRequest(f"breakpoints must be a list of at most {MAX_BREAKPOINTS}")
    specs = []
    for b in raw:
        if not isinstance(b, dict):
            raise InvalidRequest(f"a breakpoint is {{path or layer, where, step}}, got {b!r:.80}")
        path, layer, where, step = b.get("path"), b.get("layer"), b.get("where", "after"), b.get("step")
        if (path is None) == (layer is None):
            raise InvalidRequest("a breakpoint needs exactly one of path and layer")
        if layer is not None:
            path = layer_path(module, layer)  # Note [Layer numbers]
        if not isinstance(path, str) or len(path) > 500:
            raise InvalidRequest(f"breakpoint path must be a module path string, got {path!r:.80}")
        try:
            module.get_submodule(path)
        except AttributeError:
            stack = decoder_layers_path(module)
            hint = f"; its decoder layers are {stack}.0 ..." if stack else ""
            raise InvalidRequest(f"{type(module).__name__} has no module {path!r}{hint}") from None
        if where not in WHERE:
            raise InvalidRequest(f"where must be one of {WHERE}, got {where!r}")
        if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
            raise InvalidRequest(f"step must be an int >= 0 (0 is the prefill), got {step!r}")
        if method == "forward" and step not in (None, 0):
            raise InvalidRequest(f"step={step}: a forward run has only step 0; steps count generate's forward calls")
        specs.append(BreakpointSpec(path, where, step))
    return specs


def reachable(specs: list[BreakpointSpec], calls: int) -> list[BreakpointSpec]:
    """The specs that can stop a call making at most `calls` forward calls of the model (steps 0 ..
    calls - 1; step=None stops in every one). The others can never fire: a run registers no hook for
    them (Note [A run that cannot stop is a generate] in server/handlers/run_ops.py)."""
    return [b for b in specs if b.step is None or b.step < calls]


def generate_calls(module: nn.Module, prompt: int, kwargs: dict) -> int:
    """The most forward calls of the model a generate can make: the prefill (step 0) and one per new
    token after the first, so one per new token, at least one. `prompt` is what the KV holds before it
    generates (executor.decoder_prompt); `kwargs` the call's, as the server runs it (executor.new_tokens
    reads them over the model's generation_config)."""
    return max(1, executor.new_tokens(module, prompt, kwargs))


def eos_ids(module: nn.Module, kwargs: dict) -> frozenset:
    """The token ids that end a generate with these kwargs (the call's over the model's generation_config)."""
    eos = executor.effective_kwargs(module, kwargs).get("eos_token_id")
    return frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)


def decoder_layers_path(module: nn.Module) -> str | None:
    """The module path of the model's decoder stack ("model.layers", "transformer.h"), or None where
    layer numbers name none (Note [Layer numbers] in srg/layers.py)."""
    try:
        return decoder_stack(module)[0]
    except InvalidRequest:
        return None


# -- helpers ---------------------------------------------------------------------------------------
def _map_tensors(obj: Any, fn) -> Any:
    """obj with each tensor leaf t (in tuples, lists, dicts, ModelOutputs) replaced by fn(t); None
    where fn gives None (a tensor the stop does not expose). Other objects are kept as they are."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and not hasattr(obj, "keys"):
        vals = [_map_tensors(v, fn) for v in obj]
        return type(obj)(*vals) if hasattr(obj, "_fields") else tuple(vals)
    if isinstance(obj, list):
        return [_map_tensors(v, fn) for v in obj]
    if isinstance(obj, dict):
        out = {k: _map_tensors(v, fn) for k, v in obj.items()}
        return type(obj)(**out) if any(c.__name__ == "ModelOutput" for c in type(obj).__mro__[1:]) else out
    return obj


def _is_cache(v: Any) -> bool:
    return any(c.__name__ == "Cache" for c in type(v).__mro__)

