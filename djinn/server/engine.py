"""The engine thread: the only thread that touches the device (DESIGN.md section 2).

It polls the router's socket (Note [One thread on the request path]), serves short requests at once,
hands generates to the dispatcher (djinn/server/dispatch.py), which schedules sessions' KV memory and
steps every running generate one decode step per loop, and replies on the same socket. Every failure
becomes a typed ERROR for that request; the loop goes on.
"""
from __future__ import annotations

import logging
import threading
import time
import traceback

import torch
from ..config import ServerConfig
from ..protocol import codec
from ..protocol.auth import is_loopback
from ..protocol.errors import DjinnError, InvalidRequest, OutOfMemory, RemoteExecutionError
from ..protocol.messages import MsgType
from ..scheduler.policies import get_policy
from ..vmu.data import GIB, DataSegment
from ..vmu.text import TextSegment
from ..vmu.uploads import Uploads
from . import init_ops, ops, run_ops  # noqa: F401  (run_ops and init_ops register their ops)
from .dispatch import CONTROL_OPS, Dispatcher, Job
from .models import ModelRegistry
from .router import ClientGone, Request, Router
from .runs import RunTable
from .sessions import Session, SessionTable

log = logging.getLogger("djinn.engine")


class Engine(threading.Thread):
    def __init__(self, router: Router, cfg: ServerConfig, device: torch.device, stop: threading.Event):
        super().__init__(name="djinn-engine", daemon=True)
        self.router, self.cfg, self.device, self.stop = router, cfg, device, stop
        self.loopback = is_loopback(cfg.bind)
        self.text = TextSegment()
        self.uploads = Uploads(device)
        self.models = ModelRegistry(self.text, device, cfg.architectures)
        self.sessions = SessionTable()
        self.runs = RunTable()
        self.data = DataSegment(
            device, int(cfg.host_pool_gb * GIB),
            None if cfg.data_budget_gb is None else int(cfg.data_budget_gb * GIB),
            (cfg.swap_bw_gbps or (25.0 if device.type == "cuda" else 4.0)) * 1e9)
        options = {"margin_s": cfg.prefetch_margin_s, "always": cfg.swap_on_io_wait} if cfg.policy == "signal" else {}
        self.policy = get_policy(cfg.policy, **options)
        self.dispatch = Dispatcher(self, self.policy)
        self.requests_served = 0

    # -- loop ------------------------------------------------------------------------------------
    def run(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        next_reap = time.monotonic() + 1.0
        try:
            while not self.stop.is_set():
                try:
                    next_reap = self._turn(next_reap)
                except Exception:  # a bug in scheduling must not take every session down with the server
                    log.exception("engine loop step failed; serving on")
                    time.sleep(0.01)
        finally:
            for s in list(self.sessions):
                self.close_session(s, "server shutting down")
            self.data.close_all()
            self.router.close()

    def _turn(self, next_reap: float) -> float:
        """One turn of the loop: take requests, finish swaps, schedule, step every running generate."""
        for item in self.router.poll(timeout_s=self._poll_timeout()):
            if isinstance(item, Request):
                self.serve(item)
            elif isinstance(item, ClientGone):
                for s in self.sessions.of_client(item.client_id):
                    self.close_session(s, f"client {item.reason}")
        if self.data.poll():
            self.dispatch.dirty = True
        now = time.monotonic()
        if self.dispatch.due(now):
            self.dispatch.schedule(now)
        self.dispatch.step()
        if now >= next_reap:
            self._reap_idle()
            next_reap = now + 1.0
        return next_reap

    def _poll_timeout(self) -> float:
        """0 while generates step; 1 ms while swaps are in flight; else up to a planned wake-up."""
        if self.dispatch.runnable() or self.dispatch.dirty:
            return 0.0
        if self.data.busy():
            return 0.001
        if self.dispatch.wake_at is not None:
            return min(0.1, max(0.0, self.dispatch.wake_at - time.monotonic()))
        return 0.1

    def serve(self, req: Request, in_order: bool = False) -> None:
        """One request: served now, handed to the dispatcher as a job, or deferred behind its session's job."""
        rid, op = req.header["rid"], req.header["op"]
        args = req.header.get("args", {})
        if (not in_order and op not in CONTROL_OPS and isinstance(args, dict)
                and self.dispatch.busy(args.get("sid"))):
            self.dispatch.defer(args["sid"], req)  # Note [Per-session order]
            return
        try:
            handler = ops.OPS.get(op)
            if handler is None:
                raise InvalidRequest(f"unknown op {op!r}; known: {sorted(ops.OPS)}")
            if not isinstance(args, dict):
                raise InvalidRequest(f"args of {op} must be a map")
            result = handler(self, req.client_id, rid, args)
        except Exception as e:
            self.reply_exception(req, e, traceback.format_exc())
        else:
            if isinstance(result, Job):
                self.dispatch.submit(result, req)
            else:
                self.reply(req, result)
        finally:
            self.requests_served += 1

    # -- replies ---------------------------------------------------------------------------------
    def send(self, client_id: str, kind: MsgType, header: dict) -> None:
        self.router.send(client_id, codec.encode(kind, header))

    def reply(self, req: Request, result) -> None:
        self.send(req.client_id, MsgType.REPLY, {"rid": req.header["rid"], "result": result})

    def reply_error(self, req: Request, e: DjinnError) -> None:
        rid = req.header["rid"]
        header = {"rid": rid, "code": e.code, "message": e.message, "traceback": e.remote_traceback}
        try:
            self.send(req.client_id, MsgType.ERROR, header)
        except Exception:  # an error message that cannot be encoded must not kill the loop
            self.send(req.client_id, MsgType.ERROR, {"rid": rid, "code": e.code, "message": repr(e.message)})

    def reply_exception(self, req: Request, e: BaseException, tb: str | None) -> None:
        op = req.header["op"]
        if isinstance(e, DjinnError):
            err = e
        elif isinstance(e, torch.OutOfMemoryError):
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            err = OutOfMemory(f"{op}: {str(e).splitlines()[0]}")
        elif isinstance(e, Exception):
            log.debug("op %s failed: %s", op, tb)
            err = RemoteExecutionError(f"{op} failed: {type(e).__name__}: {e}", remote_traceback=tb)
        else:  # a generate unwound because its session closed: nobody waits for the reply
            err = RemoteExecutionError(f"{op} was cancelled")
        self.reply_error(req, err)

    # -- helpers for ops -------------------------------------------------------------------------
    def session(self, client_id: str, args: dict) -> Session:
        return self.sessions.get(args.get("sid"), client_id)

    def fresh_cache(self, s: Session):
        """For the Data segment's drop: an empty cache for each of the session's models."""
        from transformers import DynamicCache

        return lambda mid: DynamicCache(config=self.models.get(mid).module.config)

    def close_session(self, s: Session, reason: str) -> None:
        if self.sessions.remove(s.sid) is None:
            return
        self.dispatch.drop_session(s.sid, reason)                  # unwinds its generate, fails what waits
        self.runs.cancel_session(s, f"session closed ({reason})")  # unwinds their threads, frees the Stack
        counters = self.data.close(s)                              # waits for a swap in flight, frees host
        for mid in s.models:
            self.models.release(mid, s.sid)
        for h in s.text_pins:
            self.text.release(h)
        self.uploads.drop_session(s.sid)
        freed = s.data_bytes
        s.tensors.clear()
        s.kv.clear()
        s.models.clear()
        s.text_pins.clear()
        log.info("session %s closed (%s), freed %.1f MB of data; swaps out/in %d/%d", s.sid[:8], reason,
                 freed / 1e6, counters["swaps_out"], counters["swaps_in"])

    def _reap_idle(self) -> None:
        self.runs.reap(time.monotonic(), self.cfg.paused_run_timeout_s)
        for s in self.sessions.idle(self.cfg.session_idle_timeout_s, time.monotonic()):
            self.close_session(s, f"idle for {self.cfg.session_idle_timeout_s:.0f}s")
