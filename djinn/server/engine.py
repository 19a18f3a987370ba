"""The engine thread: the only thread that touches the device (DESIGN.md section 2).

It polls the router's socket (Note [One thread on the request path]), runs one request at a time, and
replies on the same socket. Every failure becomes a typed ERROR for that request; the loop goes on.
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
from ..vmu.text import TextSegment
from ..vmu.uploads import Uploads
from . import ops, run_ops  # noqa: F401  (run_ops registers the breakpoint ops)
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
        self.requests_served = 0

    # -- loop ------------------------------------------------------------------------------------
    def run(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        next_reap = time.monotonic() + 1.0
        try:
            while not self.stop.is_set():
                for item in self.router.poll(timeout_s=0.1):
                    if isinstance(item, Request):
                        self._serve(item)
                    elif isinstance(item, ClientGone):
                        for s in self.sessions.of_client(item.client_id):
                            self.close_session(s, f"client {item.reason}")
                if time.monotonic() >= next_reap:
                    self._reap_idle()
                    next_reap = time.monotonic() + 1.0
        finally:
            for s in list(self.sessions):
                self.close_session(s, "server shutting down")
            self.router.close()

    def _serve(self, req: Request) -> None:
        rid, op = req.header["rid"], req.header["op"]
        handler = ops.OPS.get(op)
        try:
            if handler is None:
                raise InvalidRequest(f"unknown op {op!r}; known: {sorted(ops.OPS)}")
            args = req.header.get("args", {})
            if not isinstance(args, dict):
                raise InvalidRequest(f"args of {op} must be a map")
            result = handler(self, req.client_id, rid, args)
            self.send(req.client_id, MsgType.REPLY, {"rid": rid, "result": result})
        except DjinnError as e:
            self._send_error(req.client_id, rid, e)
        except torch.OutOfMemoryError as e:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self._send_error(req.client_id, rid, OutOfMemory(f"{op}: {str(e).splitlines()[0]}"))
        except Exception as e:
            log.debug("op %s failed: %s", op, traceback.format_exc())
            err = RemoteExecutionError(f"{op} failed: {type(e).__name__}: {e}", remote_traceback=traceback.format_exc())
            self._send_error(req.client_id, rid, err)
        finally:
            self.requests_served += 1

    # -- helpers for ops -------------------------------------------------------------------------
    def send(self, client_id: str, kind: MsgType, header: dict) -> None:
        self.router.send(client_id, codec.encode(kind, header))

    def _send_error(self, client_id: str, rid: int, e: DjinnError) -> None:
        header = {"rid": rid, "code": e.code, "message": e.message, "traceback": e.remote_traceback}
        try:
            self.send(client_id, MsgType.ERROR, header)
        except Exception:  # an error message that cannot be encoded must not kill the loop
            self.send(client_id, MsgType.ERROR, {"rid": rid, "code": e.code, "message": repr(e.message)})

    def session(self, client_id: str, args: dict) -> Session:
        return self.sessions.get(args.get("sid"), client_id)

    def close_session(self, s: Session, reason: str) -> None:
        if self.sessions.remove(s.sid) is None:
            return
        self.runs.cancel_session(s, f"session closed ({reason})")  # unwinds their threads, frees the Stack
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
        log.info("session %s closed (%s), freed %.1f MB of data", s.sid[:8], reason, freed / 1e6)

    def _reap_idle(self) -> None:
        self.runs.reap(time.monotonic(), self.cfg.paused_run_timeout_s)
        for s in self.sessions.idle(self.cfg.session_idle_timeout_s, time.monotonic()):
            self.close_session(s, f"idle for {self.cfg.session_idle_timeout_s:.0f}s")
