"""The engine thread: the only thread that touches the device (DESIGN.md section 2).

It polls the router's socket (Note [One thread on the request path]), serves short requests at once,
hands generates to the dispatcher (djinn/server/dispatch.py), and replies on the same socket. One turn
of its loop (`_turn`) reads as vLLM's step: take requests -> decision = schedule(view) -> the Data
segment applies it (swaps, drops, prefetches) and the dispatcher starts or queues jobs -> step the
running batch (one decode step of every started generate) -> send the replies of those that ended and
serve the requests queued behind them. The dispatcher never calls back into the engine: it returns
what is to be sent or served, and the engine does it. Every failure becomes a typed ERROR for that
request; the loop goes on.

Note [Every request is answered]
    A request gets exactly one REPLY or ERROR, whatever fails, encoding the reply included: a result
    the codec cannot encode (it raises ProtocolError for anything it refuses) is answered with a
    ProtocolError naming the op and the cause. Otherwise the client would wait out its whole timeout
    for a reply that names no cause, and the exception, raised outside the op's handler, would end the
    engine's turn (the rest of the requests it had taken) or a finishing job's bookkeeping (its
    session's queued requests).
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
from ..protocol.errors import (
    AuthError, DjinnError, InvalidRequest, OutOfMemory, ProtocolError, RemoteExecutionError, ShuttingDown, clip,
    wire_error,
)
from ..protocol.messages import MsgType
from ..scheduler.policies import policy_from_config
from ..vmu import device_memory
from ..vmu.data import GIB, DataSegment
from ..vmu.text import TextSegment
from ..vmu.uploads import Uploads
from .cluster import migrate
from .dispatch import CONTROL_OPS, Answer, Dispatcher, Job, Quotas, Then
from .execution.kv_pools import cpu_pool_bytes
from .execution.runs import RunTable
from .handlers import checkpoint, fork, graph_ops, init_ops, model_ops, ops, run_ops
from .handlers.registry import OPS
from .metrics import Metrics
from .models.registry import ModelRegistry
from .principals import Caps, Ledger, Resource
from .router import ClientGone, Request, Router
from .sessions import Session, SessionTable

log = logging.getLogger("djinn.engine")

#: The op modules the engine serves: importing each registers its ops in OPS (handlers/registry.py).
HANDLERS = (checkpoint, fork, graph_ops, init_ops, model_ops, ops, run_ops)

#: Ops a draining server still serves: they start no new device work.
DRAIN_OPS = frozenset({"ping", "stats", "signal", "close_session", "free"})

#: CUDA errors after which the context is unusable (every later call fails the same way).
_STICKY = ("device-side assert", "illegal memory access", "unspecified launch failure",
           "illegal instruction", "misaligned address", "uncorrectable ECC")


def _sticky_device_error(e: BaseException) -> bool:
    text = str(e)
    return any(s in text for s in _STICKY)


FAULTS = ("oom", "device_error", "unencodable_reply")


def _inject(fault: object) -> None:
    """config.fault_injection: fail as the real fault would, where it would be seen (before the op runs;
    "unencodable_reply" acts after it, in `serve`)."""
    if fault == "oom":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
    if fault == "device_error":
        raise RuntimeError("CUDA error: device-side assert triggered (injected)")
    if fault not in FAULTS:
        raise InvalidRequest(f"unknown fault {fault!r}; fault_injection knows {list(FAULTS)}")


class Engine(threading.Thread):
    def __init__(self, router: Router, cfg: ServerConfig, device: torch.device, stop: threading.Event):
        super().__init__(name="djinn-engine", daemon=True)
        self.router, self.cfg, self.device, self.stop = router, cfg, device, stop
        self.loopback = is_loopback(cfg.bind)
        self.text = TextSegment()
        self.ledger = Ledger(Caps.from_config(cfg))  # Note [One ledger] in principals.py
        self.uploads = Uploads(device, self.ledger.account(Resource.UPLOAD_BYTES))
        self.models = ModelRegistry(self.text, device, cfg.architectures)
        self.sessions = SessionTable(self.text.readonly, self.ledger)  # Note [Weights are read-only at run time]
        self.runs = RunTable(self.ledger)
        self.data = DataSegment(device, int(cfg.host_pool_gb * GIB),
                                (cfg.swap_bw_gbps or (25.0 if device.type == "cuda" else 4.0)) * 1e9)
        self.policy = policy_from_config(cfg)
        self.dispatch = Dispatcher(self.policy, self.data, self.sessions, Quotas.from_config(cfg),
                                   cfg.prefill_step_tokens, cfg.max_prefill_tokens)
        self.requests_served = 0
        self.metrics = Metrics()
        self.metrics_port: int | None = None
        if cfg.metrics_port is not None:
            self.metrics_port = self.metrics.serve(cfg.metrics_bind, cfg.metrics_port)
            log.info("metrics at http://%s:%d/metrics", cfg.metrics_bind, self.metrics_port)
        self.draining = False
        self.drain = True  # on stop, let running work finish first (server_main clears it when orphaned)
        self.fatal: str | None = None  # a sticky device error: the process must be replaced
        self.meta: dict = {}  # the request being served's Request.meta (Note [One server, several workers])

    # -- loop ------------------------------------------------------------------------------------
    def run(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            if self.cfg.memory_history:
                device_memory.record_history()
        next_reap = time.monotonic() + 1.0
        try:
            while not self.stop.is_set():
                next_reap = self._guarded_turn(next_reap)
            self._drain()
        finally:
            if self.drain and not self.fatal:  # a graceful stop: sessions that asked are saved first
                from .handlers.checkpoint import save_all

                save_all(self)
            for s in list(self.sessions):
                self.close_session(s, "server shutting down")
            self.data.close_all()
            self.router.bye_all()
            self.router.close()
            self.metrics.close()

    def _guarded_turn(self, next_reap: float) -> float:
        try:
            return self._turn(next_reap)
        except Exception:  # a bug in scheduling must not take every session down with the server
            log.exception("engine loop step failed; serving on")
            time.sleep(0.01)
            return next_reap

    def _drain(self) -> None:
        """Stopping: take no new work, let running and queued generates finish (bounded), then stop."""
        if self.fatal or not self.drain:
            return  # the device is unusable, or nobody is left to wait for
        self.draining = True
        deadline = time.monotonic() + self.cfg.drain_timeout_s
        next_reap = time.monotonic() + 1.0
        while self.dispatch.active() and time.monotonic() < deadline:
            next_reap = self._guarded_turn(next_reap)
        if self.dispatch.active():
            log.warning("drain timed out after %.0f s; cancelling what still runs", self.cfg.drain_timeout_s)

    def _turn(self, next_reap: float) -> float:
        """One turn of the loop: take requests -> decision = schedule(view) -> the Data segment applies it
        -> step the running batch -> send replies."""
        for item in self.router.poll(timeout_s=self._poll_timeout()):
            self._take(item)
        if self.data.poll():  # swaps that completed change the view
            self.dispatch.dirty = True
        now = time.monotonic()
        if self.dispatch.due(now):  # Note [When to schedule] in dispatch.py
            decision = self.dispatch.schedule(now)
            not_prefetched = self.data.apply(decision, self.sessions)
            self.dispatch.start(decision, not_prefetched)
        self._send(self.dispatch.step())
        if now >= next_reap:
            next_reap = now + 1.0
            self._reap_idle()
            self._publish_metrics()
            self.router.report(self.load())
        return next_reap

    def _take(self, item) -> None:
        if isinstance(item, Request):
            self.serve(item)
        elif isinstance(item, ClientGone):
            for s in self.sessions.of_client(item.client_id):
                self.close_session(s, f"client {item.reason}")
        else:  # a front's own message to this worker (cluster/link.py)
            self._control(item)

    def _control(self, item) -> None:
        if item.op == "stats":
            try:
                result = OPS["stats"](self, str(item.fields.get("client")), 0, {})
            except Exception as e:  # the front must still hear from this worker, or its stats call waits
                result = {"error": f"{type(e).__name__}: {e}"}
            self.router.control("stats", gid=item.fields.get("gid"), result=result)
        elif item.op in migrate.CONTROL_OPS:
            migrate.control(self, item.op, item.fields)
        else:
            log.error("unknown control op %r from the front", item.op)

    def load(self) -> dict:
        """What a front places new sessions by (Note [One server, several workers]): free KV bytes
        (free blocks of every pool, and device memory no pool holds; on the CPU, a first pool's
        budget while there is none), and the sessions held."""
        free = sum(p.alloc.free * p.block_bytes for p in self.data.pools.values())
        if self.device.type == "cuda":
            free += torch.cuda.mem_get_info(self.device)[0]
        elif not self.data.pools:  # on the CPU a model's first pool gets a fixed budget
            free += cpu_pool_bytes(self.cfg)
        # Sessions between requests whose KV is on this device, largest first: what a front may move
        # to make room when requests here wait for memory (Note [Balancing] in cluster/front.py).
        idle = (s for s in self.sessions if not s.tp and self.dispatch.job_state(s.sid) is None
                and not self.runs.of_session(s.sid) and not len(s.graphs))
        movable = sorted((m for m in ([s.sid, self.data.gpu_bytes(s.sid)] for s in idle) if m[1] > 0),
                         key=lambda m: -m[1])
        return {"free_kv_bytes": int(free), "sessions": len(self.sessions),
                "queued": self.dispatch.queue_length(), "movable": movable[:16]}

    def _send(self, answers: list[Answer]) -> None:
        """Send the dispatcher's replies, then serve the requests that waited behind the jobs that ended
        (Note [Per-session order] in dispatch.py), until each session has a job again or none is left."""
        for a in answers:
            if a.served:
                self.requests_served += 1
            if a.error is None and isinstance(a.result, Then):
                self._then(a.req, a.result)
            elif a.error is None:
                self.reply(a.req, a.result)
            else:
                self.reply_exception(a.req, a.error, a.traceback)
        while (req := self.dispatch.next_deferred()) is not None:
            self.serve(req, in_order=True)

    def _then(self, req: Request, then: Then) -> None:
        """A job's continuation (dispatch.Then): run like an op, its Job submitted, its reply sent."""
        try:
            result = then.fn()
        except Exception as e:
            self.reply_exception(req, e, traceback.format_exc())
            return
        if isinstance(result, Job):
            self.dispatch.submit(result, req)
        else:
            self.reply(req, result)

    def _publish_metrics(self) -> None:
        seg = self.data.acct.segments()
        totals = self.data.totals
        self.metrics.publish(
            gauges={"sessions": len(self.sessions), "requests_queued": self.dispatch.queue_length(),
                    "generates_running": self.dispatch.running(), "models": sum(1 for _ in self.models),
                    "data_bytes": seg["data"], "host_swapped_bytes": seg["host"],
                    "stack_bytes": self.runs.stack_bytes(), "host_pool_capacity_bytes": self.data.pool.capacity,
                    "data_budget_bytes": self.data.capacity(), "swap_bandwidth_bytes_per_second": self.data.swap_bw},
            counters={"requests_total": self.requests_served, "swaps_out_total": totals.swaps_out,
                      "swaps_in_total": totals.swaps_in, "swap_bytes_total": totals.bytes_moved,
                      "prefetch_hits_total": totals.prefetch_hits, "prefetch_misses_total": totals.prefetch_misses,
                      "kv_drops_total": totals.drops, "queue_seconds_total": totals.queue_s})

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
        if not in_order:
            req.t0 = time.perf_counter()  # for the latency histogram (metrics.py)
        if self.draining and op not in DRAIN_OPS:
            self.reply_error(req, ShuttingDown(f"the server is stopping: {op} not started"))
            return
        if (not in_order and op not in CONTROL_OPS and isinstance(args, dict)
                and self.dispatch.busy(args.get("sid"), req.client_id)):
            refused = self.dispatch.defer(args["sid"], req)  # Note [Per-session order]
            if refused is not None:
                self._send([refused])
            return
        self.meta = req.meta  # what a front added: the id of a session it placed here
        try:
            handler = OPS.get(op)
            if handler is None:
                raise InvalidRequest(f"unknown op {op!r}; known: {sorted(OPS)}")
            if not isinstance(args, dict):
                raise InvalidRequest(f"args of {op} must be a map")
            fault = args.get("_fault") if self.cfg.fault_injection else None
            if fault:
                _inject(fault)
            result = handler(self, req.client_id, rid, args)
            if fault == "unencodable_reply" and not isinstance(result, Job):  # the op ran; its reply
                result = {"result": result, "unencodable": object()}           # holds what no codec sends
        except Exception as e:
            self.reply_exception(req, e, traceback.format_exc())
        else:
            if isinstance(result, Job):
                self.dispatch.submit(result, req)
            else:
                self.reply(req, result)
        finally:
            self.requests_served += 1
            self.meta = {}

    # -- replies ---------------------------------------------------------------------------------
    def send(self, client_id: str, kind: MsgType, header: dict) -> None:
        self.router.send(client_id, codec.encode(kind, header))

    def reply(self, req: Request, result) -> None:
        try:
            frames = codec.encode(MsgType.REPLY, {"rid": req.header["rid"], "result": result})
        except ProtocolError as e:  # Note [Every request is answered]
            op = req.header["op"]
            log.warning("the reply to %s could not be encoded: %s", op, e.message)
            self.reply_error(req, ProtocolError(f"{op}: the server could not encode its reply: {e.message}"))
            return
        self.router.send(req.client_id, frames)
        self._observe(req, None)

    def _observe(self, req: Request, code: str | None) -> None:
        if req.t0 is not None:
            self.metrics.observe(str(req.header["op"]), time.perf_counter() - req.t0, code)

    def reply_error(self, req: Request, e: DjinnError) -> None:
        self._observe(req, e.code)
        rid = req.header["rid"]
        try:  # bounded: Note [Errors echo little] in protocol/errors.py
            self.send(req.client_id, MsgType.ERROR, wire_error(rid, e))
        except Exception:  # an error message that cannot be encoded must not kill the loop
            self.send(req.client_id, MsgType.ERROR, {"rid": rid, "code": e.code, "message": clip(repr(e.message))})

    def reply_exception(self, req: Request, e: BaseException, tb: str | None) -> None:
        op = req.header["op"]
        if isinstance(e, DjinnError):
            err = e
        elif ((self.device.type == "cuda" or self.cfg.fault_injection) and isinstance(e, RuntimeError)
              and _sticky_device_error(e)):
            # The CUDA context is broken for every later call: fail this request, then stop so the
            # supervisor replaces the process (clients get SessionLost and reconnect).
            self.fatal = str(e).splitlines()[0][:300]
            log.critical("sticky device error in %s: %s; stopping for a restart", op, self.fatal)
            self.stop.set()
            err = RemoteExecutionError(f"{op} failed with a fatal device error; the server restarts: {self.fatal}")
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

    def principal(self, client_id: str) -> str:
        """Who a new session of this client is charged to (Note [Principals] in principals.py)."""
        p = self.router.principal(client_id)
        if p is None:  # it said goodbye after sending the request: nobody waits for the reply
            raise AuthError("this client has disconnected; connect again")
        return p

    def cancel_generate(self, sid: str, rid: object, keep: int) -> dict:
        """Note [Cancel] in dispatch.py: the cancelled generate's reply goes out before the cancel's."""
        result, answers = self.dispatch.cancel(sid, rid, keep)
        self._send(answers)
        return result

    def release_model(self, mid: str, sid: str) -> None:
        """The session lets go of a model; the last one out frees it, and its KV pool with it."""
        self.models.release(mid, sid)
        if mid not in {m.model_id for m in self.models}:
            self.data.drop_pool(mid)

    def close_session(self, s: Session, reason: str) -> None:
        if self.sessions.remove(s.sid) is None:
            return
        self.router.session_closed(s.sid)
        self._send(self.dispatch.drop_session(s.sid, reason))      # unwinds its generate, fails what waits
        self.runs.cancel_session(s, f"session closed ({reason})")  # unwinds their threads, frees the Stack
        counters = self.data.close(s)                              # waits for a swap in flight, frees its KV
        for mid in s.models:
            self.release_model(mid, s.sid)
        for h in s.text_pins:
            self.text.release(h)
        self.uploads.drop_session(s.sid)
        freed = s.data_bytes
        s.tensors.clear()
        s.graphs.clear()
        s.models.clear()
        s.text_pins.clear()
        log.info("session %s closed (%s), freed %.1f MB of data; swaps out/in %d/%d", s.sid[:8], reason,
                 freed / 1e6, counters["swaps_out"], counters["swaps_in"])

    def _reap_idle(self) -> None:
        self.runs.reap(time.monotonic(), self.cfg.paused_run_timeout_s)
        for s in self.sessions.idle(self.cfg.session_idle_timeout_s, time.monotonic()):
            self.close_session(s, f"idle for {self.cfg.session_idle_timeout_s:.0f}s")
