"""Client transport: one DEALER socket, per-request futures, liveness from ZMTP heartbeats.

Note [Callers do their own IO]: a thread waiting for its reply takes the socket lock and polls the
DEALER itself, routing whatever arrives (its own reply, other calls' replies, stream tokens) to the
right futures; it releases the lock every few milliseconds so other threads can send. A call thus
costs no thread hand-off on the client (each cross-thread wake costs tens of microseconds on these
virtual machines). A keeper thread, which waits on the socket's file descriptor without holding the
lock, routes messages nobody is waiting for, sends app-level HEARTBEATs (how the server knows this
client is alive) and watches the socket monitor: when the connection drops (server killed, or no ZMTP
heartbeat answer for `liveness_s`) every pending call fails with ServerUnavailable.
"""
from __future__ import annotations

import itertools
import logging
import queue
import secrets
import select
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import zmq
from zmq.utils.monitor import recv_monitor_message

from ..config import ClientConfig
from ..protocol import codec
from ..protocol.errors import DjinnError, ProtocolError, RequestTimeout, ServerUnavailable, error_from_wire
from ..protocol.messages import PROTOCOL_VERSION, MsgType

log = logging.getLogger("djinn.client")

_SLICE_S = 0.002  # longest a waiting caller holds the socket lock in one go


class Call(Future):
    """A request's future; waiting on it drives the socket (Note [Callers do their own IO])."""

    def __init__(self, transport: "Transport", rid: int):
        super().__init__()
        self.transport, self.rid = transport, rid

    def result(self, timeout: float | None = None):
        self.transport.pump_until(self.done, timeout)
        return super().result(timeout=0)

    def exception(self, timeout: float | None = None):
        self.transport.pump_until(self.done, timeout)
        return super().exception(timeout=0)


@dataclass
class _Pending:
    future: Future
    stream: queue.Queue | None = None


class Transport:
    def __init__(self, address: str, secret: str | None, cfg: ClientConfig | None = None):
        self.address = address
        self.cfg = cfg or ClientConfig()
        self.client_id = secrets.token_hex(16)
        self.server_info: dict = {}
        self._ctx = zmq.Context()
        self._rids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()  # guards _pending
        self._io = threading.Lock()    # whoever holds it may use the DEALER and its monitor
        dealer = self._dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.SNDHWM, 0)
        dealer.setsockopt(zmq.RCVHWM, 0)
        dealer.setsockopt(zmq.HEARTBEAT_IVL, int(self.cfg.heartbeat_s * 1000))
        dealer.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(self.cfg.liveness_s * 1000))
        self._monitor = dealer.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        dealer.connect(address)
        self._poller = zmq.Poller()
        self._poller.register(dealer, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._fd = dealer.getsockopt(zmq.FD)
        self._closing = threading.Event()
        self._pumping = 0  # callers driving the socket now (guarded by _lock)
        self.dead: DjinnError | None = None
        self._thread = threading.Thread(target=self._keeper, name="djinn-client-keeper", daemon=True)
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

    def submit(self, op: str, args: dict, *, stream: queue.Queue | None = None) -> Call:
        """Send one request; the Call resolves to its result or raises its typed error."""
        if self.dead is not None:
            raise self.dead
        rid = next(self._rids)
        call = Call(self, rid)
        frames = codec.encode(MsgType.REQUEST, {"rid": rid, "op": op, "args": args})
        with self._lock:
            if self.dead is not None:  # declared dead since the check above: _fail_all may be done already
                raise self.dead
            self._pending[rid] = _Pending(call, stream)
        self._send(frames)
        return call

    def pump_until(self, done, timeout: float | None = None) -> None:
        """Drive the socket until done() is true, the timeout passes, or the server is declared dead."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._pumping += 1  # the keeper stays off the socket while someone drives it
        try:
            while not done() and self.dead is None:
                left = _SLICE_S if deadline is None else min(_SLICE_S, deadline - time.monotonic())
                if left <= 0:
                    return
                if self._io.acquire(timeout=left):
                    try:
                        if not done():
                            self._poll(left)
                    finally:
                        self._io.release()
        finally:
            with self._lock:
                self._pumping -= 1

    def next_stream_item(self, q: queue.Queue):
        """The next item of a streamed call (None at its end), driving the socket meanwhile."""
        self.pump_until(lambda: not q.empty())
        return q.get()

    def close(self) -> None:
        if self._closing.is_set():
            return
        bye = self.dead is None
        self._closing.set()
        if self.dead is None:  # later calls raise this at once instead of using closed sockets
            self.dead = ServerUnavailable(f"the connection to {self.address} was closed")
        self._thread.join(timeout=2)
        self._fail_all(self.dead)
        with self._io:
            if bye:
                try:
                    self._dealer.send_multipart(codec.encode(MsgType.BYE, {}))
                except zmq.ZMQError:
                    pass
            self._dealer.disable_monitor()
            self._monitor.close(linger=0)
            self._dealer.close(linger=500 if bye else 0)  # let the BYE leave
        self._ctx.term()

    # -- internals -------------------------------------------------------------------------------
    def _hello(self, secret: str | None) -> None:
        rid = next(self._rids)
        fut = Call(self, rid)
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

    def _send(self, frames: list) -> None:
        with self._io:
            self._dealer.send_multipart(frames, copy=False)
            self._drain()  # libzmq's FD is edge-triggered: after any socket op, take what is there

    def _drop(self, fut: Future) -> None:
        with self._lock:
            self._pending.pop(getattr(fut, "rid", -1), None)

    def _poll(self, timeout_s: float) -> None:
        """With the socket lock held: wait up to timeout_s for input and route all of it."""
        events = dict(self._poller.poll(max(0, int(timeout_s * 1000))))
        if self._dealer in events:
            self._drain()
        if self._monitor in events:
            self._check_monitor()

    def _drain(self) -> None:
        while self._dealer.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._route(self._dealer.recv_multipart(copy=False))

    def _check_monitor(self) -> None:
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)
            if event["event"] == zmq.EVENT_DISCONNECTED and self.dead is None and not self._closing.is_set():
                self.dead = ServerUnavailable(
                    f"the connection to the djinn server at {self.address} dropped (server stopped, "
                    f"or no heartbeat answer for {self.cfg.liveness_s:.0f}s); its sessions may be lost"
                )
                self._fail_all(self.dead)

    def _keeper(self) -> None:
        """Routes what nobody waits for, heartbeats, watches the monitor (Note [Callers do their own IO])."""
        next_beat = time.monotonic()
        while not self._closing.is_set():
            try:
                # Waking on every reply would cost each call a cross-thread wake: while a caller drives
                # the socket, only tick (heartbeats, monitor).
                select.select([] if self._pumping else [self._fd], [], [], 0.05)
            except (OSError, ValueError):
                return  # the socket was closed under us: closing
            if self._closing.is_set() or not self._io.acquire(timeout=0.5):
                continue
            try:
                if self._closing.is_set():
                    return
                self._drain()
                self._check_monitor()
                now = time.monotonic()
                if now >= next_beat and self.dead is None:
                    self._dealer.send_multipart(codec.encode(MsgType.HEARTBEAT, {}))
                    self._drain()
                    next_beat = now + self.cfg.heartbeat_s
            except zmq.ZMQError:
                return
            finally:
                self._io.release()

    def _route(self, frames: list) -> None:
        try:
            msg = codec.decode(frames)
        except ProtocolError as e:
            log.error("undecodable message from server: %s", e)
            return
        if msg.kind == MsgType.HEARTBEAT:  # app-level heartbeats are still answered; we don't need them
            return
        with self._lock:
            pending = self._pending.get(msg.rid)
            if pending is not None and msg.kind != MsgType.STREAM:
                del self._pending[msg.rid]
        if pending is None:
            if msg.kind == MsgType.ERROR and msg.rid == 0:  # e.g. a heartbeat that crossed our BYE
                log.debug("server error: %s", msg.header.get("message"))
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
