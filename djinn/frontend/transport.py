"""Client transport: one DEALER socket, per-request futures, liveness from ZMTP heartbeats.

Note [Callers do their own IO]: a thread waiting for its reply takes the socket lock and polls the
DEALER itself, routing whatever arrives (its own reply, other calls' replies, stream tokens) to the
right futures. A call thus costs no thread hand-off on the client (each cross-thread wake costs tens
of microseconds on these virtual machines). Only one waiter polls at a time; the others sleep on a
condition until its round ends (a round ends when input arrives, after at most `_POLL_S`, or at once
when another thread wants the socket to send: it writes to a wake pipe the poll also watches). So a
waiting caller costs ~20 wake-ups a second, not 500 (RELIABILITY.md finding J), and a send waits for
no poll. A keeper thread, which waits on the socket's file descriptor without holding the
lock, routes messages nobody is waiting for, sends app-level HEARTBEATs (how the server knows this
client is alive) and watches the socket monitor: when the connection drops (server killed, or no ZMTP
heartbeat answer for `liveness_s`) every pending call fails with SessionLost (a ServerUnavailable).

Note [Reconnect after a restart]
    The DEALER keeps reconnecting to the address by itself. When the monitor reports the connection
    back, the transport says HELLO again with the same client id; the reply's `boot` id tells whether
    this is the same server process (a network blip) or a new one (a restart by the supervisor). On a
    new boot the `generation` goes up: sessions opened before raise SessionLost on use (their state is
    gone), while the connection itself works again for new sessions. A server that said BYE (a clean
    shutdown) is reconnected to the same way if it comes back.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import queue
import secrets
import select
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

from ..config import ClientConfig
from ..protocol import codec
from ..protocol.auth import (
    apply_client_curve, apply_client_secret, check_client_curve, check_secret_length, handshake_error,
    handshake_failed_events,
)
from ..protocol.errors import (
    DjinnError, ProtocolError, RequestTimeout, ServerUnavailable, SessionLost, error_from_wire,
)
from ..protocol.messages import PROTOCOL_VERSION, Limits, MsgType

log = logging.getLogger("djinn.client")

_POLL_S = 0.05  # longest poll round (Note [Callers do their own IO]); input or a wake ends it sooner


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
        curve = check_client_curve(self.cfg.server_public_key, self.cfg.client_secret_key)  # before any socket
        # How the handshake authenticates (server/gate.py, Note [Credentials before any message]): Curve
        # keys, else the secret as PLAIN's password, else nothing (a loopback server without either).
        self._mode = "curve" if curve is not None else "secret" if secret else "none"
        if self._mode == "secret":
            check_secret_length(secret, "secret")  # before any socket, like the Curve settings
        # Frames this client sends are split to the size the server announces at HELLO (Note [Small
        # frames] in protocol/codec.py); until then the default, which a HELLO is far below.
        self._limits = Limits()
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
        if curve is not None:  # CurveZMQ client (docs/SECURITY.md); a secret then goes in HELLO only
            apply_client_curve(dealer, curve)
        elif secret:
            apply_client_secret(dealer, secret)
        # The DEALER's pipe exists from connect() on and survives reconnects; libzmq drops it only after a
        # refused handshake (a protocol error: it never reconnects then). A send must fail then, not block.
        dealer.setsockopt(zmq.SNDTIMEO, 0)
        self._monitor = dealer.get_monitor_socket(
            zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | handshake_failed_events())
        dealer.connect(address)
        self._poller = zmq.Poller()
        self._poller.register(dealer, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        # Note [Callers do their own IO]: waiters that are not polling sleep on _cv; a thread that wants
        # the socket while a waiter polls it writes to the wake pipe, which ends that poll round.
        self._cv = threading.Condition()
        self._polling = False  # a waiter is in a poll round (guarded by _cv)
        self._want_io = 0      # threads waiting for the socket lock to send (guarded by _cv)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._poller.register(self._wake_r, zmq.POLLIN)
        self._fd = dealer.getsockopt(zmq.FD)
        self._closing = threading.Event()
        self._pumping = 0  # callers driving the socket now (guarded by _lock)
        self.dead: DjinnError | None = None
        self.generation = 0  # Note [Reconnect after a restart]
        self._secret = secret
        self._lost = False
        self._thread = threading.Thread(target=self._keeper, name="djinn-client-keeper", daemon=True)
        self._thread.start()
        self._hello(secret)

    # -- public ----------------------------------------------------------------------------------
    def call(self, op: str, args: dict, *, timeout: float | None = None, idempotent: bool = False,
             on_interrupt: Callable[[int], None] | None = None):
        """Send one request and wait for its result (retrying idempotent calls that time out).
        on_interrupt(rid): called when the wait is interrupted (KeyboardInterrupt), before it propagates."""
        timeout = self.cfg.call_timeout_s if timeout is None else timeout
        attempts = 1 + (self.cfg.retries if idempotent else 0)
        for attempt in range(attempts):
            fut = self.submit(op, args)
            try:
                return fut.result(timeout=timeout)
            except KeyboardInterrupt:
                if on_interrupt is not None:
                    on_interrupt(fut.rid)
                raise
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
        frames = codec.encode(MsgType.REQUEST, {"rid": rid, "op": op, "args": args}, self._limits)
        with self._lock:
            if self.dead is not None:  # declared dead since the check above: _fail_all may be done already
                raise self.dead
            self._pending[rid] = _Pending(call, stream)
        self._send(frames)
        return call

    def pump_until(self, done, timeout: float | None = None) -> None:
        """Drive the socket until done() is true, the timeout passes, or the server is declared dead."""
        deadline = None if timeout is None else time.monotonic() + timeout

        def left() -> float:
            return _POLL_S if deadline is None else min(_POLL_S, deadline - time.monotonic())

        with self._lock:
            self._pumping += 1  # the keeper stays off the socket while someone drives it
        try:
            while True:
                with self._cv:  # wait for a turn: nobody polling and nobody waiting to send
                    while not done() and self.dead is None and (self._polling or self._want_io):
                        if left() <= 0:
                            return
                        self._cv.wait(left())
                    if done() or self.dead is not None or left() <= 0:
                        return
                    self._polling = True
                try:
                    if self._io.acquire(timeout=left()):  # the keeper or a sender holds it briefly
                        try:
                            if not done():
                                self._poll(max(0.0, left()))
                        finally:
                            self._io.release()
                finally:
                    with self._cv:
                        self._polling = False
                        self._cv.notify_all()
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
        with self._locked_io():
            if bye:
                try:
                    self._dealer.send_multipart(codec.encode(MsgType.BYE, {}))
                except zmq.ZMQError:
                    pass
            self._dealer.disable_monitor()
            self._monitor.close(linger=0)
            self._dealer.close(linger=500 if bye else 0)  # let the BYE leave
        self._ctx.term()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    # -- internals -------------------------------------------------------------------------------
    def _hello(self, secret: str | None) -> None:
        rid = next(self._rids)
        fut = Call(self, rid)
        with self._lock:
            self._pending[rid] = _Pending(fut)
        try:
            self._send(codec.encode(MsgType.HELLO, {"rid": rid, "version": PROTOCOL_VERSION, "secret": secret,
                                                    "client_id": self.client_id}))
            self.server_info = fut.result(timeout=self.cfg.connect_timeout_s)
            self.boot = self.server_info.get("boot")
            self._limits = _wire_limits(self.server_info)
        except FutureTimeout:
            dead = self.dead  # declared dead by the keeper just before the HELLO future was failed
            self.close()
            if dead is not None:
                raise dead from None
            hint = ("; with CurveZMQ keys set, a refused Curve handshake can look the same: check "
                    "server_public_key and that this client's .key is in the server's curve_allowed_dir"
                    if self._mode == "curve" else "")
            raise ServerUnavailable(f"no djinn server answered at {self.address} within "
                                    f"{self.cfg.connect_timeout_s:.0f}s (a busy server, or another service on "
                                    f"that port: check the port the server printed){hint}") from None
        except DjinnError:
            self.close()
            raise

    def _locked_io(self):
        """The socket lock, for a send: a waiter polling the socket is woken to let go of it at once."""
        self._take_io()
        return _Held(self)

    def _take_io(self, timeout: float = -1) -> bool:
        """Take the socket lock ahead of waiters' next poll rounds, ending the current round now."""
        if self._io.acquire(blocking=False):
            return True
        with self._cv:
            self._want_io += 1  # no waiter starts a new round until this thread is done
        try:
            try:
                os.write(self._wake_w, b"w")
            except OSError:  # BlockingIOError: the pipe is full, so a wake is pending anyway
                pass
            return self._io.acquire(timeout=timeout)
        finally:
            with self._cv:
                self._want_io -= 1
                self._cv.notify_all()

    def _send(self, frames: list) -> None:
        with self._locked_io():
            try:
                self._dealer.send_multipart(frames, copy=False)
            except zmq.Again:  # no connection left: libzmq gave up on it after a refused handshake
                self._check_monitor()  # says why
                if self.dead is None:
                    self.dead = handshake_error(0, 0, self.address, self._mode)
                    self._fail_all(self.dead)
                raise self.dead from None
            self._drain()  # libzmq's FD is edge-triggered: after any socket op, take what is there

    def _drop(self, fut: Future) -> None:
        with self._lock:
            self._pending.pop(getattr(fut, "rid", -1), None)

    def _poll(self, timeout_s: float) -> None:
        """With the socket lock held: wait up to timeout_s for input and route all of it."""
        # Rounded up: a round of under a millisecond must still wait, not spin until the deadline.
        events = dict(self._poller.poll(max(0, math.ceil(timeout_s * 1000))))
        if self._wake_r in events:
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass
        if self._dealer in events:
            self._drain()
        if self._monitor in events:
            self._check_monitor()

    def _drain(self) -> None:
        routed = False
        while self._dealer.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._route(self._dealer.recv_multipart(copy=False))
            routed = True
        if routed:  # a waiter sleeping on _cv may have its reply now
            with self._cv:
                self._cv.notify_all()

    def _check_monitor(self) -> None:
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)
            if self._closing.is_set():
                continue
            if event["event"] & handshake_failed_events() and not self.server_info and self.dead is None:
                # Refused before HELLO (Curve key or mechanism): no message will ever come, so fail now.
                self.dead = handshake_error(event["event"], event["value"], self.address, self._mode)
                self._fail_all(self.dead)
            elif event["event"] == zmq.EVENT_DISCONNECTED and self.dead is None:
                self._connection_lost(
                    f"the connection to the djinn server at {self.address} dropped (server stopped or "
                    f"restarted, or no heartbeat answer for {self.cfg.liveness_s:.0f}s): calls in flight are "
                    "lost, and the server-side state of this client's sessions may be too")
            elif event["event"] == zmq.EVENT_CONNECTED and self._lost:
                self._rehello()

    def _connection_lost(self, why: str) -> None:
        self._lost = True
        self.dead = SessionLost(why)
        self._fail_all(self.dead)

    def _rehello(self) -> None:
        """With the socket lock held: HELLO again on a restored connection (Note [Reconnect after a restart])."""
        rid = next(self._rids)
        fut = Future()
        with self._lock:
            self._pending[rid] = _Pending(fut)
        fut.add_done_callback(self._rehello_done)
        self._dealer.send_multipart(codec.encode(MsgType.HELLO, {
            "rid": rid, "version": PROTOCOL_VERSION, "secret": self._secret, "client_id": self.client_id}))

    def _rehello_done(self, fut: Future) -> None:
        if fut.cancelled() or fut.exception() is not None:
            log.error("reconnect to %s refused: %s", self.address, fut.exception())
            return
        info = fut.result()
        restarted = info.get("boot") != self.boot
        self.server_info, self.boot = info, info.get("boot")
        self._limits = _wire_limits(info)
        if restarted:
            self.generation += 1
            log.warning("reconnected to %s: the server restarted, sessions opened before are lost", self.address)
        else:
            log.warning("reconnected to %s (same server)", self.address)
        self._lost = False
        self.dead = None

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
            # A heartbeat that is due takes the socket ahead of waiters (their poll rounds would
            # otherwise keep winning the lock); otherwise the keeper only uses a free socket.
            beat_due = time.monotonic() >= next_beat and self.dead is None
            if self._closing.is_set() or not (self._take_io(0.5) if beat_due else self._io.acquire(blocking=False)):
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
        if msg.kind == MsgType.BYE:  # the server is shutting down cleanly
            if self.dead is None:
                self._connection_lost(f"the djinn server at {self.address} shut down "
                                      f"({msg.header.get('reason', 'no reason given')})")
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
        with self._cv:
            self._cv.notify_all()


def _wire_limits(server_info: dict) -> Limits:
    """Encode limits for requests: frames no longer than the server accepts (its HELLO says)."""
    size = (server_info.get("limits") or {}).get("wire_frame_bytes")
    if isinstance(size, int) and not isinstance(size, bool) and size >= 4096:
        return Limits(wire_frame_bytes=size)
    return Limits()


class _Held:
    """Releases the socket lock taken by Transport._locked_io (a context manager)."""

    __slots__ = ("t",)

    def __init__(self, t: Transport):
        self.t = t

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        self.t._io.release()
