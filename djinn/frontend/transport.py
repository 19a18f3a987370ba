"""Client transport: one DEALER socket on its own IO thread, per-request futures, heartbeats.

Callers encode on their own thread and hand frames to the IO thread over an inproc PUSH/PULL pair
(zmq sockets are single-threaded). The IO thread sends, receives, routes replies to futures by
request id, heartbeats every `heartbeat_s`, and declares the server dead when nothing arrived for
`liveness_s`: every pending call then fails with ServerUnavailable instead of hanging.
"""
from __future__ import annotations

import itertools
import logging
import queue
import secrets
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import zmq

from ..config import ClientConfig
from ..protocol import codec
from ..protocol.errors import DjinnError, ProtocolError, RequestTimeout, ServerUnavailable, error_from_wire
from ..protocol.messages import PROTOCOL_VERSION, MsgType

log = logging.getLogger("djinn.client")


@dataclass
class _Pending:
    future: Future
    stream: queue.Queue | None = None
    sent_at: float = field(default_factory=time.monotonic)


class Transport:
    def __init__(self, address: str, secret: str | None, cfg: ClientConfig | None = None):
        self.address = address
        self.cfg = cfg or ClientConfig()
        self.client_id = secrets.token_hex(16)
        self.server_info: dict = {}
        self._ctx = zmq.Context()
        self._rids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()
        self._inproc = f"inproc://djinn-client-{self.client_id}"
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.bind(self._inproc)
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.connect(self._inproc)
        self._push_lock = threading.Lock()
        self._closing = threading.Event()
        self.dead: DjinnError | None = None
        self._heartbeat_s = self.cfg.heartbeat_s
        self._last_recv = time.monotonic()
        self._thread = threading.Thread(target=self._io_loop, name="djinn-client-io", daemon=True)
        self._thread.start()
        self._hello(secret)

    # -- public ----------------------------------------------------------------------------------
    def call(self, op: str, args: dict, *, timeout: float | None = None, idempotent: bool = False):
        """Send one request and wait for its result (retrying idempotent calls that time out)."""
        timeout = self.cfg.call_timeout_s if timeout is None else timeout
        attempts = 1 + (self.cfg.retries if idempotent else 0)
        for attempt in range(attempts):
            fut = self.submit(op, args)
            try:
                return fut.result(timeout=timeout)
            except FutureTimeout:
                self._drop(fut)
                if self.dead is not None:
                    raise self.dead from None
                if attempt + 1 == attempts:
                    raise RequestTimeout(f"{op} got no reply from {self.address} within {timeout:.1f}s") from None
                log.warning("%s timed out, retrying (%d/%d)", op, attempt + 1, attempts - 1)

    def submit(self, op: str, args: dict, *, stream: queue.Queue | None = None) -> Future:
        """Send one request; the Future resolves to its result or raises its typed error."""
        if self.dead is not None:
            raise self.dead
        rid = next(self._rids)
        fut: Future = Future()
        fut.rid = rid  # type: ignore[attr-defined]
        frames = codec.encode(MsgType.REQUEST, {"rid": rid, "op": op, "args": args})
        with self._lock:
            if self.dead is not None:  # declared dead since the check above: _fail_all may be done already
                raise self.dead
            self._pending[rid] = _Pending(fut, stream)
        self._send(frames)
        return fut

    def close(self) -> None:
        if self._closing.is_set():
            return
        if self.dead is None:
            try:
                self._send(codec.encode(MsgType.BYE, {}))
                time.sleep(0.05)  # let the IO thread flush the BYE
            except Exception:
                pass
        self._closing.set()
        if self.dead is None:  # later calls raise this at once instead of using closed sockets
            self.dead = ServerUnavailable(f"the connection to {self.address} was closed")
        self._thread.join(timeout=2)
        self._fail_all(self.dead)
        self._push.close(linger=0)
        self._ctx.term()

    # -- internals -------------------------------------------------------------------------------
    def _hello(self, secret: str | None) -> None:
        rid = next(self._rids)
        fut: Future = Future()
        with self._lock:
            self._pending[rid] = _Pending(fut)
        self._send(codec.encode(MsgType.HELLO, {"rid": rid, "version": PROTOCOL_VERSION, "secret": secret,
                                                "client_id": self.client_id}))
        try:
            self.server_info = fut.result(timeout=self.cfg.connect_timeout_s)
        except FutureTimeout:
            self.close()
            raise ServerUnavailable(f"no djinn server answered at {self.address} within "
                                    f"{self.cfg.connect_timeout_s:.0f}s") from None
        except DjinnError:
            self.close()
            raise
        self._heartbeat_s = min(self._heartbeat_s, float(self.server_info.get("heartbeat_s", self._heartbeat_s)))

    def _send(self, frames: list) -> None:
        with self._push_lock:
            self._push.send_multipart(frames, copy=False)

    def _drop(self, fut: Future) -> None:
        with self._lock:
            self._pending.pop(getattr(fut, "rid", -1), None)

    def _io_loop(self) -> None:
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.SNDHWM, 0)
        dealer.setsockopt(zmq.RCVHWM, 0)
        dealer.connect(self.address)
        poller = zmq.Poller()
        poller.register(dealer, zmq.POLLIN)
        poller.register(self._pull, zmq.POLLIN)
        self._last_recv = time.monotonic()
        next_beat = time.monotonic()
        try:
            while not self._closing.is_set():
                events = dict(poller.poll(timeout=max(1, int(self._heartbeat_s * 250))))
                if self._pull in events:
                    for _ in range(256):
                        try:
                            dealer.send_multipart(self._pull.recv_multipart(zmq.NOBLOCK, copy=False), copy=False)
                        except zmq.Again:
                            break
                if dealer in events:
                    for _ in range(256):
                        try:
                            frames = dealer.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._last_recv = time.monotonic()
                        self._route(frames)
                now = time.monotonic()
                if now >= next_beat:
                    dealer.send_multipart(codec.encode(MsgType.HEARTBEAT, {}))
                    next_beat = now + self._heartbeat_s
                if self.dead is None and now - self._last_recv > self.cfg.liveness_s:
                    self.dead = ServerUnavailable(
                        f"the djinn server at {self.address} stopped answering "
                        f"(no message for {now - self._last_recv:.1f}s); its sessions may be lost"
                    )
                    self._fail_all(self.dead)
        finally:
            dealer.close(linger=0)
            self._pull.close(linger=0)

    def _route(self, frames: list) -> None:
        try:
            msg = codec.decode(frames)
        except ProtocolError as e:
            log.error("undecodable message from server: %s", e)
            return
        if msg.kind == MsgType.HEARTBEAT:
            return
        with self._lock:
            pending = self._pending.get(msg.rid)
            if pending is not None and msg.kind != MsgType.STREAM:
                del self._pending[msg.rid]
        if pending is None:
            if msg.kind == MsgType.ERROR and msg.rid == 0:
                log.error("server error: %s", msg.header.get("message"))
            return
        h = msg.header
        if msg.kind == MsgType.STREAM:
            if pending.stream is not None:
                pending.stream.put(h)
        elif msg.kind == MsgType.ERROR:
            err = error_from_wire(str(h.get("code")), str(h.get("message")), h.get("traceback"))
            pending.future.set_exception(err)
        elif msg.kind == MsgType.HELLO:
            pending.future.set_result(h)
        else:
            pending.future.set_result(h.get("result"))
        if pending.stream is not None and msg.kind != MsgType.STREAM:
            pending.stream.put(None)  # end of stream: the future holds the result or error

    def _fail_all(self, err: DjinnError) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        for p in pending.values():
            if not p.future.done():
                p.future.set_exception(err)
            if p.stream is not None:
                p.stream.put(None)
