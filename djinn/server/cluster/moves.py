"""The front's moves of sessions and models between workers: one at a time, with the requests of what
moves held until it lands (Note [Migration] in migrate.py, Note [Models between workers] there, and
Note [Balancing] in front.py). The workers do the moving (migrate.control); this is the order of it."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from ...protocol.errors import InvalidRequest, ServerBusy, SessionNotFound
from ..router import Request
from . import wire

log = logging.getLogger("djinn.front")

BALANCE_COOLDOWN_S = 30.0  # a session the balancer moved stays where it went at least this long


@dataclass
class Move:
    """One session moving (Note [Migration] in migrate.py); its requests wait in `Moves.held`."""

    mig: int
    req: Request | None  # None: the balancer's own (Note [Balancing]); nobody waits for a reply
    sid: str
    src: int
    dst: int
    model_id: str | None = None  # a model copied for attach_model (Note [Models between workers])
    t0: float = field(default_factory=time.perf_counter)
    bytes: int = 0


class Moves:
    """Owned by the front (its engine thread of sorts: the one thread that relays)."""

    def __init__(self, front):
        self.front = front
        self.current: Move | None = None        # one at a time
        self.held: dict[str, list[Request]] = {}  # sid -> its requests while it moves
        self._balanced: dict[str, float] = {}     # sid -> when the balancer last moved it
        self._ids = 0
        self.balance_moves = 0

    def hold(self, req: Request, sid: str) -> bool:
        """Keep the request of a session that is moving, for where it lands; False if it is not moving."""
        if sid not in self.held:
            return False
        self.held[sid].append(req)
        return True

    def _tell(self, rank: int, fields: dict) -> None:
        """A control message to one worker (cluster/wire.py)."""
        self.front.send_to(self.front.workers[rank], [wire.CONTROL, wire.pack(fields)])

    def lost(self, rank: int) -> None:
        """A worker died: a move from or to it has failed."""
        m = self.current
        if m is not None and rank in (m.src, m.dst):
            self._fail(f"worker {rank} died while it moved")

    def migrate(self, req: Request, args: dict) -> None:
        """Note [Migration] in migrate.py: start moving a session; the reply comes when it has moved."""
        sid, rank = args.get("sid"), self.front.sessions.get(args.get("sid"))
        if sid in self.front.span:
            self.front.error(req, InvalidRequest("a tensor-parallel session is sharded over its block of workers: it does not move"))
            return
        if rank is None:
            self.front.error(req, SessionNotFound(f"session {sid!r} does not exist (closed, reclaimed, or never opened)"))
            return
        if self.current is not None:
            self.front.error(req, ServerBusy("another session is moving between workers; try again shortly"))
            return
        dst = args.get("worker")
        others = [w for w in self.front.live() if w.rank != rank]
        if dst is None:
            best = self.front.place(others)
            dst = best.rank if best is not None else None
        if type(dst) is not int or not any(w.rank == dst for w in self.front.live()):
            self.front.error(req, InvalidRequest(f"worker {dst!r} is not a live worker: live are "
                                                 f"{[w.rank for w in self.front.live()]}"))
            return
        if dst == rank:
            self.front.reply(req, {"worker": rank, "moved": False, "seconds": 0.0, "bytes": 0})
            return
        self._start_move(req, sid, rank, dst)

    def balance(self) -> None:
        """Note [Balancing]: move a session away from a worker whose requests wait for memory."""
        if self.current is not None:
            return
        live = self.front.live()
        now = time.monotonic()
        for hot in sorted(live, key=lambda w: -w.load.get("queued", 0)):
            if not hot.load.get("queued"):
                return
            cold = [w for w in live if w is not hot and not w.load.get("queued")]
            if not cold:
                return
            dst = max(cold, key=lambda w: w.load.get("free_kv_bytes", 0))
            room = dst.load.get("free_kv_bytes", 0)
            for sid, nbytes in hot.load.get("movable") or []:
                if (nbytes <= room and self.front.sessions.get(sid) == hot.rank and sid not in self.held
                        and now - self._balanced.get(sid, -BALANCE_COOLDOWN_S) >= BALANCE_COOLDOWN_S):
                    self._balanced[sid] = now
                    self.balance_moves += 1
                    log.info("balancing: %d requests wait on worker %d; moving session %s (%.1f MB) to worker %d",
                             hot.load["queued"], hot.rank, sid[:8], nbytes / 1e6, dst.rank)
                    self._start_move(None, sid, hot.rank, dst.rank)
                    return

    def _start_move(self, req: Request | None, sid: str, src: int, dst: int, model_id: str | None = None) -> None:
        """Hold the session's requests and ask `src` to export it (or only `model_id`, for `dst`)."""
        self._ids += 1
        m = self.current = Move(self._ids, req, sid, src, dst, model_id=model_id)
        self.held[sid] = []
        client = req.client_id if req is not None else self.front.owner.get(sid, "")
        if model_id is None:
            self._tell(src, {"op": "export", "mig": m.mig, "sid": sid, "client": client})
        else:
            self._tell(src, {"op": "export_model", "mig": m.mig, "model_id": model_id, "client": client})

    def copy_model(self, req: Request, args: dict) -> bool:
        """Note [Models between workers]: start copying the model to the session's worker from one
        where this client holds sessions; False when there is none to copy from (the worker answers)."""
        sid, mid = args.get("sid"), args.get("model_id")
        dst = self.front.sessions.get(sid)
        if dst is None or not isinstance(mid, str) or self.current is not None or sid in self.front.span:
            return False
        srcs = sorted({r for s, r in self.front.sessions.items()
                       if r != dst and self.front.owner.get(s) == req.client_id and self.front.workers[r].alive})
        if not srcs:
            return False
        self._start_move(req, sid, srcs[0], dst, model_id=mid)
        return True

    def step(self, op: str, fields: dict) -> None:
        """A worker's report on the move under way (Note [Migration] lists the steps)."""
        m = self.current
        if m is None or fields.get("mig") != m.mig:
            return
        if op == "exported":
            self._tell(m.dst, {"op": "import", "mig": m.mig, "src": m.src, "manifest": fields["manifest"]})
        elif op == "want":
            self._tell(m.src, {"op": "send", "mig": m.mig, "dst": m.dst, "hashes": fields.get("hashes") or []})
        elif op == "sent":  # the source's count; the destination's, in "imported", is the one kept
            m.bytes = m.bytes or int(fields.get("bytes") or 0)
        elif op == "imported" and m.model_id is not None:
            self._tell(m.src, {"op": "keep", "mig": m.mig})
            self.front.relay(self.front.workers[m.dst], m.req, dict(self.front.meta_of(m.req), held_elsewhere=m.model_id))
            self._end()
        elif op == "imported":
            m.bytes = int(fields.get("bytes") or m.bytes)
            self.front.sessions[m.sid] = m.dst
            self._tell(m.src, {"op": "drop", "mig": m.mig})
            if m.req is not None:
                self.front.reply(m.req, {"worker": m.dst, "moved": True, "seconds": time.perf_counter() - m.t0,
                                         "bytes": m.bytes})
            log.info("session %s moved from worker %d to %d (%.1f MB)", m.sid[:8], m.src, m.dst, m.bytes / 1e6)
            self._end()
        elif op == "migrate_failed":
            self._fail(fields.get("message") or "failed", fields.get("code"), fields.get("step"))

    def _fail(self, message: str, code: str | None = None, step: str | None = None) -> None:
        m = self.current
        if self.front.workers[m.src].alive:
            self._tell(m.src, {"op": "keep", "mig": m.mig})
        if m.model_id is not None:  # no copy: the session's own worker answers the attach_model
            if self.front.workers[m.dst].alive:
                self.front.relay(self.front.workers[m.dst], m.req, self.front.meta_of(m.req))
            self._end()
            return
        err = {"SessionNotFound": SessionNotFound}.get(code, InvalidRequest)
        if m.req is not None:
            self.front.error(m.req, err(f"session {m.sid[:12]} did not move ({step or 'migrate'}): {message}"))
        else:
            log.info("balancing: session %s did not move (%s): %s", m.sid[:8], step, message)
        self._end()

    def _end(self) -> None:
        m, self.current = self.current, None
        for req in self.held.pop(m.sid, []):  # each goes where the session now is
            self.front.take(req)
