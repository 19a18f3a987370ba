"""The run table: every live Run, who owns it, what its pause holds, and when it is given up.

Owned by the engine thread. A paused run's stop tensors are handles in its session's Stack map
(`Session.stack`) while it is parked there, and only then: resuming, cancelling or ending the run
drops them. An ended run leaves a short tombstone, so a late resume is told why it cannot continue.
Every live run (running or paused: either way it holds an OS thread) is charged to its session's
principal in the Ledger from before its thread starts until it leaves the table (Note [One ledger] in
djinn/server/principals.py): the caps are per principal and server-wide, not per session.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any

import torch

from ...protocol import structure
from ...protocol.errors import InvalidRequest, RemoteExecutionError, WeightWriteRefused
from ...protocol.tensors import dtype_name
from ..principals import Ledger, Resource
from ..sessions import Session, SessionState
from . import edits
from .breakpoints import BreakpointSpec, Call, LoggedEdit, Replay, ResumePoint, Run, RunState

log = logging.getLogger("djinn.runs")

MAX_TOMBSTONES = 1024


class RunTable:
    def __init__(self, ledger: Ledger | None = None) -> None:
        self._runs: dict[str, Run] = {}
        self._ended: OrderedDict[str, tuple[str, str]] = OrderedDict()  # run id -> (session id, why)
        self._ledger = ledger if ledger is not None else Ledger()

    def __iter__(self):
        return iter(list(self._runs.values()))

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self, s: Session, model_id: str, call: Call, specs: list[BreakpointSpec],
              resume_from: ResumePoint | None = None, run_id: str | None = None,
              log: dict | None = None) -> Run:
        """`resume_from`: the run starts at that step over that table, which it owns from here on, after
        steps that ran as generate jobs; `run_id` and `log`: the id and the logged edits of the run
        whose next stop this is (Notes [The head of a run] and [Between stops] in
        server/handlers/run_ops.py), its id no longer ended."""
        if run_id is not None:
            self._ended.pop(run_id, None)
        run = Run(run_id or s.new_id(12), s, model_id, call, specs, resume_from=resume_from)
        run.batched = resume_from is not None
        run.log.update(log or {})
        try:
            self._add(run)
            run.start()
        except BaseException:  # refused, or its hooks did not register or no thread could start: it never ran
            self._remove(run)
            if resume_from is not None and "wake" not in run.timing:
                resume_from.pool.release(resume_from.table)
            raise
        self._settle(run)
        return run

    def adopt(self, run: Run, stop_hids: list[str]) -> None:
        """A paused run that moved here from another worker (Note [Migration] in cluster/migrate.py):
        its stop's tensors keep the handles its client holds."""
        self._add(run)
        run.stop_hids = list(stop_hids)
        s = run.session
        s.stack.update(zip(run.stop_hids, run.stop.tensors))
        s.state = SessionState.PAUSED

    def resume(self, run: Run) -> None:
        self._leave_stop(run)
        run.resume()
        self._settle(run)

    def fork(self, parent: Run, from_kv: bool = True) -> Run:
        """A run paused at a copy of the parent's stop, executed only when resumed, from the parent's
        KV when it can and `from_kv` (Note [Fork replays the prefix]). No model compute and no KV
        block here."""
        stop = parent.stop
        log_copy = {hit: list(es) for hit, es in parent.log.items()}
        # A run that started from a head's KV (Note [The head of a run]) forks from its KV: re-executed
        # from the prompt, its first steps would be eager ones, not the head's.
        from_kv = from_kv or parent.resume_from is not None
        child = Run(parent.session.new_id(12), parent.session, parent.model_id, parent.call, parent.specs,
                    Replay(log_copy, stop.hit, parent.rng0, stop.spec, stop.step),
                    resume_from=parent.resume_point() if from_kv else None, snapshot=parent.snapshot())
        child.batched = parent.batched
        try:
            self._add(child)
        except BaseException:
            child.cancel()  # gives its KV fork back
            raise
        self._settle(child)
        return child

    def cancel(self, run: Run, why: str) -> None:
        if run.run_id not in self._runs:
            return
        self._leave_stop(run)
        run.cancel()
        self._settle(run, why)

    def cancel_session(self, s: Session, why: str) -> None:
        for run in self.of_session(s.sid):
            self.cancel(run, why)

    def reap(self, now: float, timeout_s: float) -> None:
        """Cancel runs parked longer than timeout_s. Their Stack state is freed, not swapped: moving
        paused state to host memory belongs to the VMU (DESIGN.md section 3)."""
        for run in self:
            if run.paused_since is not None and now - run.paused_since > timeout_s:
                log.info("run %s paused for more than %.0fs: cancelled, %.1f MB freed", run.run_id, timeout_s,
                         self.paused_bytes_of(run) / 1e6)
                self.cancel(run, f"paused for more than {timeout_s:g}s without a resume (paused_run_timeout_s)")

    def get(self, s: Session, run_id: Any) -> Run:
        run = self._runs.get(run_id) if isinstance(run_id, str) else None
        if run is not None and run.session is s:
            return run
        why = self.ended(s, run_id)
        if why is not None:
            raise InvalidRequest(f"run {run_id} has ended: {why}")
        raise InvalidRequest(f"run {run_id!r} does not exist in session {s.sid[:8]}")

    def ended(self, s: Session, run_id: Any) -> str | None:
        """Why this session's run ended, if it did (recently)."""
        ended = self._ended.get(run_id) if isinstance(run_id, str) else None
        return ended[1] if ended is not None and ended[0] == s.sid else None

    def tombstone(self, s: Session, run_id: str, why: str) -> None:
        """Remember that this session's run ended and why (a late resume or cancel_run is told), also
        for a run that never entered the table (Note [A run that cannot stop is a generate])."""
        self._ended[run_id] = (s.sid, why)
        while len(self._ended) > MAX_TOMBSTONES:
            self._ended.popitem(last=False)

    def paused(self, run: Run) -> Run:
        if run.state != RunState.PAUSED:
            raise InvalidRequest(f"run {run.run_id} is not paused (it is {run.state.name.lower()})")
        return run

    # -- edits -------------------------------------------------------------------------------------
    def apply_edits(self, s: Session, records: Any) -> None:
        """Apply edit records in order. Edits of a paused stop's tensors are logged for forks. An edit
        that would write a weight refuses the whole batch before any applies (Note [Weights are
        read-only at run time])."""
        if not records:
            return
        owners = {hid: (run, pos) for run in self.of_session(s.sid) if run.stop is not None
                  for pos, hid in enumerate(run.stop_hids)}
        batch = edits.decode(records)
        for e in batch:
            run, pos = owners.get(e.hid, (None, None))
            if run is not None and pos in run.stop.readonly:
                raise WeightWriteRefused(f"edit {e.describe()}: stop tensor {pos} at {run.stop.spec.path or '<model>'} "
                                         f"({run.stop.spec.where}) is a weight, shared and read-only; its handle is "
                                         "a copy, so the edit could not reach the forward. Nothing was written")
            s.readonly.refuse_write(s.tensor(e.hid), f"edit {e.describe()}")
        for e in batch:
            value = edits.apply(e, s.tensor(e.hid), s.tensor)
            if e.hid in owners:
                run, pos = owners[e.hid]
                run.log.setdefault(run.stop.hit, []).append(LoggedEdit(pos, e.chain, e.op, value))

    # -- replies and accounting --------------------------------------------------------------------
    def reply(self, s: Session, run: Run, t0: float, edits_done: float | None = None) -> dict:
        """The result of start, resume and fork: where the run stands, with server-side timings."""
        out: dict[str, Any] = {"run": run.run_id, "state": run.state.name.lower()}
        if run.state == RunState.PAUSED:
            st = run.stop
            hids = dict(zip(st.origin, run.stop_hids))

            def leaf(obj: Any):
                if isinstance(obj, torch.Tensor):
                    return _handle(hids[id(obj)], obj) if id(obj) in hids else None
                if any(c.__name__ == "Cache" for c in type(obj).__mro__):
                    return None
                return NotImplemented

            out["stop"] = {
                "path": st.spec.path, "where": st.spec.where, "step": st.step, "hit": st.hit,
                "activation": _handle(run.stop_hids[0], st.activation),
                "outputs": structure.pack(st.outputs, leaf) if st.outputs is not None else None,
                "paused_bytes": self.paused_bytes_of(run),
            }
        elif run.state == RunState.FINISHED:
            out["output"] = _pack_output(s, run.output, run.call.method)
            run.output = None
        t = run.timing
        now = time.perf_counter()
        out["timing"] = {
            "server_us": round((now - t0) * 1e6, 1),
            "edits_us": round(((edits_done or t0) - t0) * 1e6, 1),
            # engine -> run thread and back: the cost of a pause on top of the model's own compute
            "handoff_us": round(((t["wake"] - t["release"]) + (t["back"] - t["park"])) * 1e6, 1),
            "compute_us": round((t["park"] - t["wake"]) * 1e6, 1),
        }
        return out

    def per_principal(self) -> dict[str, int]:
        """Live runs per principal, counted from the table (Ledger.check)."""
        out: dict[str, int] = {}
        for r in self._runs.values():
            out[r.session.principal] = out.get(r.session.principal, 0) + 1
        return out

    def of_session(self, sid: str) -> list[Run]:
        return [r for r in self._runs.values() if r.session.sid == sid]

    def paused_bytes_of(self, run: Run, exclude: frozenset | set = frozenset()) -> int:
        """Bytes a paused run keeps: its stop tensors' storages (less those in `exclude`, data pointers
        counted elsewhere) and its cache's KV."""
        if run.stop is None:
            return 0
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in run.stop.tensors}
        return sum(n for p, n in storages.items() if p not in exclude) + _cache_bytes(run.cache)

    def paused_bytes(self, sid: str, exclude: frozenset | set = frozenset()) -> int:
        return sum(self.paused_bytes_of(r, exclude) for r in self.of_session(sid))

    def stack_bytes(self) -> int:
        return sum(self.paused_bytes_of(r) for r in self._runs.values())

    def describe(self, sid: str, now: float) -> dict:
        out = {}
        for r in self.of_session(sid):
            d: dict[str, Any] = {"state": r.state.name, "method": r.call.method, "model_id": r.model_id,
                                 "executed": not r.lazy}
            if r.resume_from is not None:  # a fork that starts from the parent's KV at this step
                d["from_kv_at_step"] = r.resume_from.step
            if r.stop is not None:
                d.update(path=r.stop.spec.path, where=r.stop.spec.where, step=r.stop.step, hit=r.stop.hit,
                         paused_s=round(now - r.paused_since, 3), paused_bytes=self.paused_bytes_of(r))
            out[r.run_id] = d
        return out

    # -- internals ---------------------------------------------------------------------------------
    def _settle(self, run: Run, why: str | None = None) -> None:
        """After the run thread handed the baton back: expose a new stop, or retire an ended run."""
        s = run.session
        if run.state == RunState.PAUSED:
            run.stop_hids = [s.new_id() for _ in run.stop.tensors]
            s.stack.update(zip(run.stop_hids, run.stop.tensors))
        else:
            self._remove(run)
            self.tombstone(s, run.run_id, why or run.state.name.lower())
            if run.kept is None:  # else its next stop's run takes the log (Note [Between stops])
                run.log.clear()
        if s.state != SessionState.CLOSED:
            paused = any(r.state == RunState.PAUSED for r in self.of_session(s.sid))
            s.state = SessionState.PAUSED if paused else SessionState.ACTIVE
        if run.state == RunState.FAILED and why is None:
            err, run.error = run.error, None
            if isinstance(err, Exception):
                raise err
            raise RemoteExecutionError(f"run {run.run_id} failed: {err!r}", remote_traceback=run.error_traceback)

    def _add(self, run: Run) -> None:
        """Before its thread starts: charged to the session's principal (QuotaExceeded past a cap)."""
        self._ledger.take(Resource.RUNS, run.session.principal)
        self._runs[run.run_id] = run

    def _remove(self, run: Run) -> None:
        if self._runs.pop(run.run_id, None) is not None:
            self._ledger.give(Resource.RUNS, run.session.principal)

    def _leave_stop(self, run: Run) -> None:
        for hid in run.stop_hids:
            run.session.stack.pop(hid, None)
        run.stop_hids = []


def _handle(hid: str, t: torch.Tensor) -> dict:
    return {"$t": [hid, dtype_name(t.dtype), list(t.shape), str(t.device)]}


def _pack_output(s: Session, out: Any, method: str) -> Any:
    if method == "generate":
        return out.cpu()  # the sequences travel as a local tensor, as rm.generate returns them

    def leaf(obj: Any):
        if isinstance(obj, torch.Tensor):
            return _handle(s.add_tensor(obj), obj)
        if any(c.__name__ == "Cache" for c in type(obj).__mro__):
            return None
        return NotImplemented

    return structure.pack(out, leaf)


def _cache_bytes(cache: Any) -> int:
    """Bytes of KV a paused run's cache holds: its blocks (a paged cache) or its tensors."""
    if cache is None:
        return 0
    if hasattr(cache, "self_attention_cache"):  # an encoder-decoder's (Note [Encoder-decoder generate])
        return _cache_bytes(cache.self_attention_cache) + _cache_bytes(cache.cross_attention_cache)
    table, pool = getattr(cache, "table", None), getattr(cache, "pool", None)
    if table is not None and pool is not None:
        return table.blocks * pool.block_bytes
    return sum(t.numel() * t.element_size() for layer in getattr(cache, "layers", []) or []
               for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
               if isinstance(t, torch.Tensor) and t.device.type != "meta")
