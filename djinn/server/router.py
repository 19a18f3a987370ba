"""The router: the server's ROUTER socket, HELLO/auth, client liveness. Driven by the engine thread.

Note [One thread on the request path]: the engine thread polls this socket itself and replies on it,
so a call costs no thread hand-off on the server (each cross-thread wake costs tens of microseconds on
these virtual machines). Clients learn that the server is alive from ZMTP heartbeats, which libzmq's
own IO thread answers even while the engine runs a long op. The server learns that a client is alive
from its app-level HEARTBEAT messages; they wait in the socket while the engine is busy and are
counted when drained, and a client is only declared gone after the socket is drained, so a long op
never makes a live client look dead. A client silent for `client_timeout_s` is reclaimed, at once on
BYE. Replies are addressed by client id (from HELLO), not by socket identity.

Note [Client id and key]
    A HELLO with a live client id takes that client's sessions over (how a client reconnects). With
    CurveZMQ on, the id is bound to the public key that first presented it (libzmq's ZAP handler puts
    the key in each message's User-Id), so a tenant with another allowed key who learned the id is
    refused with AuthError and the holder keeps its sessions. Once the holder is reclaimed (BYE or
    silence) its sessions are closed and the id is free again. Each client also gets the principal its
    HELLO authenticated as (Note [Principals] in djinn/server/principals.py), which caps are charged to.
"""
from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass, field

import msgpack
import zmq

from ..config import ServerConfig
from ..protocol import codec
from ..protocol.auth import check_secret
from ..protocol.errors import AuthError, DjinnError, ProtocolError, ServerBusy, clip, short, wire_error
from ..protocol.messages import CAPABILITIES, PROTOCOL_VERSION, Message, MsgType
from .gate import Gate
from .principals import principal_of

log = logging.getLogger("djinn.router")


@dataclass
class Request:
    client_id: str
    msg: Message
    t0: float | None = None  # when the engine first saw it (perf_counter), for the latency histogram
    meta: dict = field(default_factory=dict)  # what a front adds (Note [One server, several workers])

    @property
    def header(self) -> dict:
        return self.msg.header


@dataclass
class ClientGone:
    client_id: str
    reason: str


@dataclass
class _Client:
    client_id: str
    identity: bytes
    key: str | None = None  # the CurveZMQ public key (z85) its HELLO came with; None without Curve
    principal: str = ""     # who its sessions are charged to (Note [Principals])
    last_seen: float = field(default_factory=time.monotonic)


class Router:
    def __init__(self, ctx: zmq.Context, cfg: ServerConfig, server_info: dict):
        self.cfg, self.server_info = cfg, server_info
        self.limits = cfg.limits()
        self._by_identity: dict[bytes, _Client] = {}
        self._by_id: dict[str, _Client] = {}
        self._events: list = []
        sock = self.sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        # Per frame and fixed for every connection of the listener, handshake included: what a peer
        # that has not authenticated can make the server hold (Note [Small frames] in protocol/codec.py).
        sock.setsockopt(zmq.MAXMSGSIZE, cfg.wire_frame_bytes)
        sock.setsockopt(zmq.HANDSHAKE_IVL, int(cfg.handshake_timeout_s * 1000))
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)  # replies to vanished clients are dropped, not errors
        # A peer that stops reading (its TCP window full) gets at most this many messages queued; the
        # rest are dropped (ROUTER_MANDATORY 0), so it cannot grow the server's memory.
        sock.setsockopt(zmq.SNDHWM, cfg.send_queue_messages)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.HEARTBEAT_IVL, int(cfg.heartbeat_s * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(cfg.client_timeout_s * 1000))
        host = f"[{cfg.bind}]" if ":" in cfg.bind else cfg.bind
        if ":" in cfg.bind:
            sock.setsockopt(zmq.IPV6, 1)
        # The gate (server/gate.py) sets the security mechanism and answers ZAP before bind, so no
        # handshake passes unchecked; refused handshakes never reach poll(). Stopped in close().
        self._gate = None
        try:
            self._gate = Gate(ctx, sock, cfg)
            if cfg.port == 0:
                port = sock.bind_to_random_port(f"tcp://{host}")
            else:
                sock.bind(f"tcp://{host}:{cfg.port}")
                port = cfg.port
            self._gate.port = port
        except BaseException:
            self.close()
            raise
        self.address = f"tcp://{host}:{port}"

    def poll(self, timeout_s: float) -> list:
        """Wait up to timeout_s for input; return the Requests and ClientGone events to act on."""
        self._events = []
        drained = True
        if self.sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            drained = False
            for _ in range(64):  # bounded, so the engine's own work is not starved
                if not self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    drained = True
                    break
                frames = self.sock.recv_multipart(copy=False)
                try:
                    self._receive(frames)
                except Exception:  # one client's message must never take the server down
                    log.error("dropped a message: %s", traceback.format_exc())
        if drained:  # heartbeats still waiting in the socket must be counted before anyone is reaped
            self._reap(time.monotonic())
        return self._events

    def principal(self, client_id: str) -> str | None:
        """The principal a connected client authenticated as; None once it is gone."""
        client = self._by_id.get(client_id)
        return client.principal if client is not None else None

    def send(self, client_id: str, frames: list) -> None:
        client = self._by_id.get(client_id)
        if client is not None:  # a client that went away just misses its reply
            self.sock.send_multipart([client.identity, *frames], copy=False)

    def report(self, load: dict) -> None:
        """A one-device server places nothing: the engine's load is for a front (cluster/link.py)."""

    def session_closed(self, sid: str) -> None:
        """Only a front keeps a table of sessions (cluster/link.py)."""

    def bye_all(self) -> None:
        """Tell every connected client that the server is going away (they fail fast, then reconnect)."""
        frames = codec.encode(MsgType.BYE, {"reason": "server shutting down"})
        for client in list(self._by_id.values()):
            try:
                self.sock.send_multipart([client.identity, *frames], copy=False)
            except zmq.ZMQError:
                pass

    def close(self) -> None:
        self.sock.close(linger=200)  # long enough for the goodbyes to leave
        if self._gate is not None:  # before the context is terminated, or term() waits on its sockets
            self._gate.stop()
            self._gate = None

    # -- inbound ---------------------------------------------------------------------------------
    def _receive(self, frames: list) -> None:
        sock = self.sock
        identity = frames[0].bytes
        client = self._by_identity.get(identity)
        if client is not None:
            client.last_seen = time.monotonic()
        try:
            msg = codec.decode(frames[1:], self.limits, copy=False)
        except ProtocolError as e:
            self._send_error(identity, _salvage_rid(frames), e)
            return
        if msg.kind == MsgType.HELLO:
            self._hello(identity, msg, _curve_key(frames[1]) if self.cfg.curve_secret_key else None)
        elif client is None:
            self._send_error(identity, msg.rid, AuthError("send HELLO before any other message"))
        elif msg.kind == MsgType.HEARTBEAT:
            sock.send_multipart([identity, *codec.encode(MsgType.HEARTBEAT, {})])
        elif msg.kind == MsgType.REQUEST:
            if not isinstance(msg.header.get("rid"), int) or not isinstance(msg.header.get("op"), str):
                self._send_error(identity, _rid(msg), ProtocolError("a request needs an integer rid and an op"))
                return
            self._events.append(Request(client.client_id, msg))
        elif msg.kind == MsgType.BYE:
            self._forget(client)
            self._events.append(ClientGone(client.client_id, "said goodbye"))
        else:
            self._send_error(identity, _rid(msg), ProtocolError(f"clients do not send {msg.kind.name}"))

    def _hello(self, identity: bytes, msg: Message, key: str | None) -> None:
        sock = self.sock
        h = msg.header
        try:
            version = h.get("version")
            if type(version) is not int or version != PROTOCOL_VERSION:  # 1.0 and True are not 1
                raise ProtocolError(f"client speaks protocol {short(version)}, server speaks {PROTOCOL_VERSION}")
            check_secret(self.cfg.secret, h.get("secret"))
            client_id = h.get("client_id")
            if not isinstance(client_id, str) or not 8 <= len(client_id) <= 64:
                raise ProtocolError("HELLO needs a client_id string of 8-64 characters")
        except DjinnError as e:
            log.warning("refused HELLO: %s", clip(e.message, 200))
            self._send_error(identity, _rid(msg), e)
            return
        old = self._by_id.get(client_id)
        if old is None and identity not in self._by_identity and len(self._by_id) >= self.cfg.max_connections:
            log.warning("refused HELLO: %d clients connected (max_connections)", len(self._by_id))
            self._send_error(identity, _rid(msg), ServerBusy(
                f"the server holds its limit of {self.cfg.max_connections} clients (max_connections); "
                "try again later"))
            return
        if old is not None and old.key != key:
            # Note [Client id and key]: a live client id is taken over (reconnect) only by the key that
            # holds it; another allowed tenant who learned the id gets what an unknown id would not.
            log.warning("refused HELLO: client %s is held by another Curve key", client_id[:8])
            self._send_error(identity, _rid(msg), AuthError(
                "this client id is in use by another CurveZMQ key; pick a new id (djinn.connect does)"))
            return
        if old is not None:
            self._by_identity.pop(old.identity, None)
        prev = self._by_identity.get(identity)
        if prev is not None and prev.client_id != client_id:
            # This connection spoke as another client before: that client is gone (its sessions are
            # reclaimed), and its entry must not keep this identity, or reaping it later would
            # de-authenticate the live client.
            self._by_id.pop(prev.client_id, None)
            self._events.append(ClientGone(prev.client_id, "its connection said HELLO as another client"))
        client = _Client(client_id, identity, key, principal_of(key, bool(self.cfg.secret)))
        self._by_identity[identity] = client
        self._by_id[client_id] = client
        reply = dict(self.server_info, version=PROTOCOL_VERSION, capabilities=list(CAPABILITIES),
                     heartbeat_s=self.cfg.heartbeat_s, rid=_rid(msg),
                     architectures=sorted(self.cfg.architectures), reconnected=old is not None,
                     limits={"max_frame_bytes": self.limits.max_frame_bytes, "max_frames": self.limits.max_frames,
                             "max_total_bytes": self.limits.max_total_bytes,
                             "wire_frame_bytes": self.limits.wire_frame_bytes})
        sock.send_multipart([identity, *codec.encode(MsgType.HELLO, reply)])
        log.info("client %s connected%s", client_id[:8], " (reconnect)" if old else "")

    def _reap(self, now: float) -> None:
        for client in list(self._by_id.values()):
            if now - client.last_seen > self.cfg.client_timeout_s:
                self._forget(client)
                self._events.append(ClientGone(client.client_id, f"silent for {self.cfg.client_timeout_s:.0f}s"))

    def _forget(self, client: _Client) -> None:
        if self._by_id.get(client.client_id) is client:
            del self._by_id[client.client_id]
        if self._by_identity.get(client.identity) is client:  # the identity may have a new owner now
            del self._by_identity[client.identity]

    # -- outbound --------------------------------------------------------------------------------
    def _send_error(self, identity: bytes, rid: int, e: DjinnError) -> None:
        self.sock.send_multipart([identity, *codec.encode(MsgType.ERROR, wire_error(rid, e))])


def _curve_key(frame) -> str | None:
    """The client's CurveZMQ public key (z85), which the ZAP handler set as the message's User-Id."""
    try:
        return frame.get("User-Id")
    except (zmq.ZMQError, AttributeError):
        return None


def _rid(msg: Message) -> int:
    rid = msg.header.get("rid", 0)
    return rid if isinstance(rid, int) and not isinstance(rid, bool) else 0


_SALVAGE_BYTES = 64 << 10


def _salvage_rid(frames: list) -> int:
    """Best effort: the request id of a message that failed to decode, so its caller is answered.
    Only small headers are re-parsed, with small container limits: a header that failed for its size
    must not be decoded in full here after all."""
    if len(frames) < 3 or len(frames[2]) > _SALVAGE_BYTES:
        return 0
    try:
        header = msgpack.unpackb(frames[2].bytes, raw=False, ext_hook=lambda c, d: None, strict_map_key=False,
                                 max_array_len=256, max_map_len=256, max_str_len=_SALVAGE_BYTES,
                                 max_bin_len=_SALVAGE_BYTES, max_ext_len=_SALVAGE_BYTES)
        rid = header.get("rid", 0) if isinstance(header, dict) else 0
        return rid if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid < 2**63 else 0
    except Exception:
        return 0
