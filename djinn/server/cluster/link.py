"""A worker's end of the front (Note [One server, several workers] in front.py): what the engine polls
and replies on in place of the router, with the same methods (poll, send, principal, bye_all, close)."""
from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass

import zmq

from ...protocol import codec
from ...protocol.errors import ProtocolError, wire_error
from ...protocol.messages import MsgType
from ..router import ClientGone, Request
from . import wire

log = logging.getLogger("djinn.worker")


@dataclass
class Control:
    """A message from the front to the engine itself (not a client's request): `op` and its fields."""

    op: str
    fields: dict


class WorkerLink:
    def __init__(self, ctx: zmq.Context, front: str, rank: int, cfg, server_info: dict):
        self.rank, self.cfg = rank, cfg
        self.limits = cfg.limits()
        self.address = front
        self._principals: dict[str, str] = {}  # client id -> principal, as the front authenticated it
        self._events: list = []
        self.exports: dict = {}  # migration id -> (sid, tensors) exported, until the front says drop or keep
        sock = self.sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, f"w{rank}".encode())
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.connect(front)
        self.control("ready", info=server_info)

    # -- what the engine calls --------------------------------------------------------------------
    def poll(self, timeout_s: float) -> list:
        self._events = []
        if self.sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            for _ in range(64):  # bounded, as the router's: the engine's own work is not starved
                try:
                    frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                try:
                    self._receive(frames)
                except Exception:
                    log.error("dropped a message from the front: %s", traceback.format_exc())
        return self._events

    def principal(self, client_id: str) -> str | None:
        return self._principals.get(client_id)

    def send(self, client_id: str, frames: list) -> None:
        rid, final = wire.reply_rid(frames)
        self.sock.send_multipart([wire.REPLY, client_id.encode(), wire.pack(rid), b"1" if final else b"0", *frames],
                                 copy=False)

    def control(self, op: str, **fields) -> None:
        self.sock.send_multipart([wire.CONTROL, wire.pack({"op": op, **fields})])

    def report(self, load: dict) -> None:
        """The engine's periodic load (free KV, sessions): the front places new sessions by it."""
        self.control("load", **load)

    def session_closed(self, sid: str) -> None:
        self.control("closed", sid=sid)

    def bye_all(self) -> None:
        """The front tells the clients; a worker only says it is leaving."""
        try:
            self.control("leaving")
        except zmq.ZMQError:
            pass

    def close(self) -> None:
        self.sock.close(linger=200)

    # -- inbound -----------------------------------------------------------------------------------
    def _receive(self, frames: list) -> None:
        kind = frames[0].bytes
        if kind == wire.REQUEST:
            client_id = frames[1].bytes.decode()
            meta = wire.unpack(frames[2].bytes)
            self._principals[client_id] = meta.get("principal", "")
            try:
                msg = codec.decode(frames[3:], self.limits, copy=False)
            except ProtocolError as e:  # the front decoded it already: only a bug gets here
                self.send(client_id, codec.encode(MsgType.ERROR, wire_error(0, e)))
                return
            self._events.append(Request(client_id, msg, meta=meta))
        elif kind == wire.GONE:
            client_id = frames[1].bytes.decode()
            self._principals.pop(client_id, None)
            self._events.append(ClientGone(client_id, frames[2].bytes.decode()))
        elif kind == wire.CONTROL:
            fields = wire.unpack(frames[1].bytes)
            self._events.append(Control(str(fields.pop("op")), fields))
        else:
            log.error("unknown message kind %r from the front", kind)
