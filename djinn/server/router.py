"""The router thread: owns every socket, authenticates, answers heartbeats, never touches CUDA.

ROUTER socket <- clients. Decoded requests go to the engine through a queue.Queue; the engine's
replies come back over an inproc PULL socket and leave through the ROUTER. Replies are addressed by
client id (from HELLO), not by socket identity, so a client that reconnects on a fresh socket
(Lazy Pirate) keeps its sessions.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field

import msgpack
import zmq

from ..config import ServerConfig
from ..protocol import codec
from ..protocol.auth import check_secret
from ..protocol.errors import AuthError, DjinnError, ProtocolError
from ..protocol.messages import CAPABILITIES, PROTOCOL_VERSION, Message, MsgType

log = logging.getLogger("djinn.router")

OUTBOX = "inproc://djinn-outbox"


@dataclass
class Request:
    client_id: str
    msg: Message

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
    last_seen: float = field(default_factory=time.monotonic)


class Router(threading.Thread):
    def __init__(self, ctx: zmq.Context, cfg: ServerConfig, inbox: queue.Queue, server_info: dict,
                 stop: threading.Event):
        super().__init__(name="djinn-router", daemon=True)
        self.ctx, self.cfg, self.inbox, self.server_info, self.stop = ctx, cfg, inbox, server_info, stop
        self.limits = cfg.limits()
        self.ready = threading.Event()
        self.address: str | None = None
        self.error: BaseException | None = None
        self._by_identity: dict[bytes, _Client] = {}
        self._by_id: dict[str, _Client] = {}

    def run(self) -> None:
        try:
            self._run()
        except BaseException as e:  # surfaced to server_main, which exits non-zero
            self.error = e
            log.error("router failed: %s", traceback.format_exc())
            self.stop.set()
            self.ready.set()

    def _run(self) -> None:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.cfg.max_message_bytes)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)  # replies to vanished clients are dropped, not errors
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        host = f"[{self.cfg.bind}]" if ":" in self.cfg.bind else self.cfg.bind
        if self.cfg.port == 0:
            port = sock.bind_to_random_port(f"tcp://{host}")
        else:
            sock.bind(f"tcp://{host}:{self.cfg.port}")
            port = self.cfg.port
        self.address = f"tcp://{host}:{port}"
        outbox = self.ctx.socket(zmq.PULL)
        outbox.setsockopt(zmq.LINGER, 0)
        outbox.bind(OUTBOX)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(outbox, zmq.POLLIN)
        self.ready.set()
        next_reap = time.monotonic() + self.cfg.heartbeat_s
        try:
            while not self.stop.is_set():
                events = dict(poller.poll(timeout=int(self.cfg.heartbeat_s * 500)))
                if outbox in events:
                    for _ in range(256):  # drain replies first: they unblock clients
                        try:
                            frames = outbox.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._deliver(sock, frames)
                if sock in events:
                    for _ in range(256):
                        try:
                            frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._receive(sock, frames)
                now = time.monotonic()
                if now >= next_reap:
                    self._reap(now)
                    next_reap = now + self.cfg.heartbeat_s
        finally:
            sock.close(linger=0)
            outbox.close(linger=0)

    # -- inbound ---------------------------------------------------------------------------------
    def _receive(self, sock: zmq.Socket, frames: list) -> None:
        identity = frames[0].bytes
        client = self._by_identity.get(identity)
        if client is not None:
            client.last_seen = time.monotonic()
        try:
            msg = codec.decode(frames[1:], self.limits, copy=False)
        except ProtocolError as e:
            self._send_error(sock, identity, _salvage_rid(frames), e)
            return
        if msg.kind == MsgType.HELLO:
            self._hello(sock, identity, msg)
        elif client is None:
            self._send_error(sock, identity, msg.rid, AuthError("send HELLO before any other message"))
        elif msg.kind == MsgType.HEARTBEAT:
            sock.send_multipart([identity, *codec.encode(MsgType.HEARTBEAT, {})])
        elif msg.kind == MsgType.REQUEST:
            if not isinstance(msg.header.get("rid"), int) or not isinstance(msg.header.get("op"), str):
                self._send_error(sock, identity, _rid(msg), ProtocolError("a request needs an integer rid and an op"))
                return
            self.inbox.put(Request(client.client_id, msg))
        elif msg.kind == MsgType.BYE:
            self._forget(client)
            self.inbox.put(ClientGone(client.client_id, "said goodbye"))
        else:
            self._send_error(sock, identity, _rid(msg), ProtocolError(f"clients do not send {msg.kind.name}"))

    def _hello(self, sock: zmq.Socket, identity: bytes, msg: Message) -> None:
        h = msg.header
        try:
            version = h.get("version")
            if version != PROTOCOL_VERSION:
                raise ProtocolError(f"client speaks protocol {version!r}, server speaks {PROTOCOL_VERSION}")
            check_secret(self.cfg.secret, h.get("secret"))
            client_id = h.get("client_id")
            if not isinstance(client_id, str) or not 8 <= len(client_id) <= 64:
                raise ProtocolError("HELLO needs a client_id string of 8-64 characters")
        except DjinnError as e:
            log.warning("refused HELLO: %s", e.message)
            self._send_error(sock, identity, _rid(msg), e)
            return
        old = self._by_id.get(client_id)
        if old is not None:
            self._by_identity.pop(old.identity, None)
        client = _Client(client_id, identity)
        self._by_identity[identity] = client
        self._by_id[client_id] = client
        reply = dict(self.server_info, version=PROTOCOL_VERSION, capabilities=list(CAPABILITIES),
                     heartbeat_s=self.cfg.heartbeat_s, rid=_rid(msg),
                     architectures=sorted(self.cfg.architectures), reconnected=old is not None,
                     limits={"max_frame_bytes": self.limits.max_frame_bytes, "max_frames": self.limits.max_frames,
                             "max_total_bytes": self.limits.max_total_bytes})
        sock.send_multipart([identity, *codec.encode(MsgType.HELLO, reply)])
        log.info("client %s connected%s", client_id[:8], " (reconnect)" if old else "")

    def _reap(self, now: float) -> None:
        for client in list(self._by_id.values()):
            if now - client.last_seen > self.cfg.client_timeout_s:
                self._forget(client)
                self.inbox.put(ClientGone(client.client_id, f"silent for {self.cfg.client_timeout_s:.0f}s"))

    def _forget(self, client: _Client) -> None:
        self._by_id.pop(client.client_id, None)
        self._by_identity.pop(client.identity, None)

    # -- outbound --------------------------------------------------------------------------------
    def _deliver(self, sock: zmq.Socket, frames: list) -> None:
        client = self._by_id.get(frames[0].bytes.decode())
        if client is not None:  # a client that went away just misses its reply
            sock.send_multipart([client.identity, *frames[1:]], copy=False)

    def _send_error(self, sock: zmq.Socket, identity: bytes, rid: int, e: DjinnError) -> None:
        header = {"rid": rid, "code": e.code, "message": e.message, "traceback": e.remote_traceback}
        sock.send_multipart([identity, *codec.encode(MsgType.ERROR, header)])


def _rid(msg: Message) -> int:
    rid = msg.header.get("rid", 0)
    return rid if isinstance(rid, int) and not isinstance(rid, bool) else 0


def _salvage_rid(frames: list) -> int:
    """Best effort: the request id of a message that failed to decode, so its caller is answered."""
    try:
        header = msgpack.unpackb(frames[2].bytes, raw=False, ext_hook=lambda c, d: None, strict_map_key=False)
        rid = header.get("rid", 0) if isinstance(header, dict) else 0
        return rid if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid < 2**63 else 0
    except Exception:
        return 0
