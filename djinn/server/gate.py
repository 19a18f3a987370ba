"""The gate: which peers may finish a ZMTP handshake with the router's socket, and how many connections
the socket keeps. It runs on a thread of its own (libzmq asks its ZAP handler in the middle of a
handshake, whatever the engine thread is doing) and owns the socket's monitor and the ZAP socket.

Note [Credentials before any message]
    With ZMTP's NULL mechanism a peer may send whatever it likes as soon as it connects, and libzmq
    buffers a multipart message it has not finished without any bound (ZMQ_MAXMSGSIZE limits each
    frame, the high-water marks count whole messages). A HELLO checked by the router comes too late
    for that: a stranger's bytes are already held. So credentials are checked in the handshake, before
    libzmq accepts a single message frame: CurveZMQ keys (CURVE mechanism) or, with only a shared
    secret, the secret as the PLAIN mechanism's password, compared here in constant time. A peer
    without them gets as far as one handshake command, of at most wire_frame_bytes (Note [Small frames]
    in djinn/protocol/codec.py), for at most handshake_timeout_s. HELLO still checks the secret: with
    Curve on, the handshake proves the key and HELLO the secret. On loopback with neither, every local
    user is trusted (docs/SECURITY.md) and the mechanism stays NULL.

Note [Connection limit]
    libzmq neither caps the connections of a socket nor closes one peer of a ROUTER on request. The
    gate counts them from the socket monitor (ACCEPTED and DISCONNECTED carry the connection's file
    descriptor, in order) and closes a connection accepted beyond max_connections + HANDSHAKE_HEADROOM
    at the TCP level: shutdown(2) on a duplicate of its descriptor, after which libzmq sees the peer
    hang up and cleans up as for any closed connection. The duplicate is checked to be a socket on the
    server's port, in case libzmq closed the descriptor and the number was reused in between. Below
    that, the router refuses a HELLO beyond max_connections with ServerBusy, a typed answer the client
    can show; the headroom is there so that such a client gets as far as being told.
"""
from __future__ import annotations

import hmac
import logging
import os
import socket
import threading

import zmq
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from ..config import ServerConfig
from ..protocol.auth import allowed_client_keys, curve_available, load_secret_cert

log = logging.getLogger("djinn.zap")

HANDSHAKE_HEADROOM = 64  # connections beyond max_connections kept long enough to be refused at HELLO
ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # where libzmq sends ZAP requests (RFC 27), per context
ZAP_DOMAIN = b"djinn"


class Gate:
    """Sets the socket's security mechanism and answers its ZAP requests; counts its connections.
    Build it on the socket before bind, give it the bound port, stop it after the socket is closed."""

    def __init__(self, ctx: zmq.Context, sock: zmq.Socket, cfg: ServerConfig):
        self.port: int | None = None  # the router sets it once bound; connections are checked against it
        self._limit = cfg.max_connections + HANDSHAKE_HEADROOM
        self._live: set[int] = set()  # descriptors of the socket's connections (this thread only)
        self._secret: bytes | None = None
        self._keys: set[bytes] = set()
        self._stop = threading.Event()
        self._zap: zmq.Socket | None = None
        self._sock = sock
        if cfg.curve_secret_key:
            if not curve_available():
                raise zmq.ZMQError(zmq.EPROTONOSUPPORT, "this libzmq was built without CURVE support")
            public, secret = load_secret_cert(cfg.curve_secret_key, "curve_secret_key")
            self._keys = set(allowed_client_keys(cfg.curve_allowed_dir))
            sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            logging.getLogger("djinn.router").info("CurveZMQ on: %d allowed client key(s) from %s",
                                                   len(self._keys), cfg.curve_allowed_dir)
        elif cfg.secret:
            self._secret = cfg.secret.encode()
            sock.setsockopt(zmq.PLAIN_SERVER, 1)  # Note [Credentials before any message]
        try:
            if cfg.curve_secret_key or cfg.secret:
                self._zap = ctx.socket(zmq.REP)
                self._zap.setsockopt(zmq.LINGER, 0)
                self._zap.bind(ZAP_ENDPOINT)  # before the router binds: no handshake may pass unasked
                sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
            address = f"inproc://djinn-gate-{id(self):x}"
            sock.monitor(address, zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
            self._monitor = ctx.socket(zmq.PAIR)
            self._monitor.setsockopt(zmq.LINGER, 0)
            self._monitor.setsockopt(zmq.RCVHWM, 0)  # no event is ever dropped: the count must stay true
            self._monitor.connect(address)
        except BaseException:
            if self._zap is not None:
                self._zap.close()
            raise
        self._thread = threading.Thread(target=self._run, name="djinn-gate", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    # -- the gate thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._monitor, zmq.POLLIN)
        if self._zap is not None:
            poller.register(self._zap, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(100))
                # Monitor events first: a ZAP request must see its own connection counted.
                while self._monitor.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    self._event(parse_monitor_message(self._monitor.recv_multipart()))
                if self._zap is not None and self._zap in ready:
                    self._answer(self._zap.recv_multipart())
        except zmq.ZMQError as e:  # the context is going away
            if e.errno != zmq.ETERM:
                log.exception("the gate stopped")
        finally:
            self._monitor.close()
            if self._zap is not None:
                self._zap.close()

    def _event(self, ev: dict) -> None:
        fd = ev["value"]
        if ev["event"] == zmq.EVENT_ACCEPTED:
            self._live.add(fd)
            if len(self._live) > self._limit:
                log.warning("%d connections: closing the newest (max_connections + %d handshakes in flight)",
                            len(self._live), HANDSHAKE_HEADROOM)
                self._drop(fd)
        elif ev["event"] == zmq.EVENT_DISCONNECTED:
            self._live.discard(fd)

    def _drop(self, fd: int) -> None:
        """Close one connection under libzmq's feet (Note [Connection limit])."""
        try:
            dup = os.dup(fd)
        except OSError:
            return
        try:
            s = socket.socket(fileno=dup)
        except OSError:  # not a socket (any more)
            os.close(dup)
            return
        try:
            if s.getsockname()[1] == self.port:
                s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            s.close()

    def _answer(self, request: list[bytes]) -> None:
        """One ZAP request (RFC 27: version, id, domain, address, identity, mechanism, credentials...)."""
        if len(request) < 6:
            log.error("malformed ZAP request of %d frames", len(request))
            self._zap.send_multipart([b"1.0", request[1] if len(request) > 1 else b"", b"500", b"malformed", b"", b""])
            return
        rid, address, mechanism, creds = request[1], request[3], request[5], request[6:]
        user = b""
        if mechanism == b"PLAIN" and self._secret is not None and len(creds) == 2:
            ok = hmac.compare_digest(creds[1], self._secret)
        elif mechanism == b"CURVE" and self._keys and len(creds) == 1 and len(creds[0]) == 32:
            user = z85.encode(creds[0])  # the message's User-Id (router.py, Note [Client id and key])
            ok = user in self._keys
        else:
            ok = False
        if ok:
            log.debug("allowed %s from %s%s", mechanism.decode(errors="replace"), address.decode(errors="replace"),
                      f" key {user.decode()}" if user else "")
        else:
            log.debug("denied %s from %s%s", mechanism.decode(errors="replace"), address.decode(errors="replace"),
                      f" key {user.decode()}" if user else "")
        self._zap.send_multipart([b"1.0", rid, b"200" if ok else b"400", b"OK" if ok else b"denied", user, b""])
