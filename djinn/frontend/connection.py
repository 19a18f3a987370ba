"""A connection to one server: transport, default session, weight-hash cache, embedded server."""
from __future__ import annotations

import dataclasses
import logging

from ..config import ClientConfig
from . import wire
from .address import check_reachable
from .address import parse as parse_address
from .embedded import EmbeddedServer
from .session import Session
from .stats_view import Stats
from .transport import Transport
from .upload import HashCache


class Connection:
    def __init__(self, address: str | None, secret: str | None, cfg: ClientConfig | None = None,
                 device: str | None = None, *, server_public_key: str | None = None,
                 client_secret_key: str | None = None):
        self.cfg = cfg or ClientConfig()
        keys = {k: v for k, v in (("server_public_key", server_public_key), ("client_secret_key", client_secret_key))
                if v is not None}
        if keys:  # CurveZMQ (docs/SECURITY.md); arguments win over the config's fields
            self.cfg = dataclasses.replace(self.cfg, **keys)
        self.embedded: EmbeddedServer | None = None
        self.embedded_device = device  # what an embedded server was asked to serve on (None: its default)
        if address is not None:
            self.cfg.validate()  # a bad Curve key is the first thing to report, before any socket
            where = parse_address(address)
            check_reachable(where, self.cfg.connect_probe_s)
            address = where.url
        else:
            if self.cfg.server_public_key or self.cfg.client_secret_key:  # it listens on loopback without Curve
                logging.getLogger("djinn.client").warning(
                    "no server address: CurveZMQ keys are ignored for the embedded local server")
                self.cfg = dataclasses.replace(self.cfg, server_public_key=None, client_secret_key=None)
            self.embedded = EmbeddedServer(device, self.cfg.embedded_start_timeout_s)
            address = self.embedded.address
        self.address = address
        try:
            self.transport = Transport(address, secret, self.cfg)
        except Exception:
            if self.embedded is not None:
                self.embedded.stop()
            raise
        self.hashes = HashCache()
        self._default: Session | None = None

    @property
    def info(self) -> dict:
        return self.transport.server_info

    @property
    def device(self) -> str:
        return self.info.get("device", "?")

    def architectures(self) -> set[str] | None:
        archs = self.info.get("architectures")
        return set(archs) if isinstance(archs, list) else None

    def default_session(self) -> Session:
        if self._default is None or self._default.closed or self._default.lost:
            self._default = Session(self, name="default")
        return self._default

    def session(self, name: str | None = None, *, checkpoint: bool = False,
                max_kv_tokens: int | None = None, tp: int | None = None) -> Session:
        """A new server-side session. checkpoint=True: saved to the server's host memory if it shuts
        down; `session.checkpoint_token` restores it (restore_session) after the restart.
        max_kv_tokens: the most tokens this session's KV will hold (an agent's whole context); the
        server reserves them at its first generate, so later turns never wait for memory.
        tp: a session spanning that many workers of a server with several (`--gpus 0,1`), whose models
        remoted with the same tp are sharded over them (tensor parallelism)."""
        return Session(self, name, checkpoint=checkpoint, max_kv_tokens=max_kv_tokens, tp=tp)

    def restore_session(self, token: str, name: str | None = None) -> Session:
        """A new session holding a checkpointed session's KV caches, token ids and tensors (its
        tensors are in `session.restored_tensors`). Remote the model again to continue generating."""
        args = {"token": token} if name is None else {"token": token, "name": name}
        reply = self.transport.call("restore_session", args)
        s = Session(self, reply.get("name"), _restored=reply)
        s.kv_tokens = dict(reply["kv_tokens"])
        s.restored_tensors = wire.handles(s, reply["tensors"], self.info["device"])
        return s

    def stats(self) -> Stats:
        """What the server holds: the raw dict (every key as the server sent it), printed as a table."""
        return Stats(self.transport.call("stats", {}, idempotent=True), self.address)

    def ping(self) -> float:
        return self.transport.call("ping", {}, idempotent=True)["time"]

    def close(self) -> None:
        self.transport.close()
        if self.embedded is not None:
            self.embedded.stop()
            self.embedded = None

    def __repr__(self) -> str:
        kind = "embedded" if self.embedded else "remote"
        return f"Connection({self.address}, {kind}, device={self.device})"
