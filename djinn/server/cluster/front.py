"""The front of a server with several workers: one address for clients, one engine per device.

Note [One server, several workers]
    `server_main --gpus 0,1` (or `--device cpu --workers 2`) runs this front and one worker process per
    device. The front owns the clients' socket (the same Router as a one-device server: HELLO, auth,
    heartbeats, reaping), the session table (session id -> worker) and placement; each worker runs an
    unchanged Engine (its VMU, scheduler, dispatcher and fast path) on its device, polling a WorkerLink
    where a one-device server polls the Router. Clients see one server: the front relays each request
    to the worker holding its session and each reply back as it came, without re-encoding (tensors
    stay in their frames). Control (requests, replies, load reports) travels over ZeroMQ; tensors
    that move between workers (a model's weights, a migrated session's blocks) travel over the
    workers' torch.distributed group (gloo on CPUs, NCCL on GPUs), which the front is not part of:
    it holds no tensors. This is vLLM's split (a message-queue control plane, an NCCL data plane).
    Each worker schedules its own device: sessions on different workers share nothing a step would
    need, so no per-step plan crosses processes (a tensor-parallel model's workers will exchange its
    plan among themselves).

    Routing: `open_session` and `restore_session` are placed (below) and the front names the new
    session's id, so it knows the worker before the reply (a fork is named too, and stays on its
    parent's worker, whose blocks it shares); a request naming a session goes to its worker; `stats` goes to
    every worker and the front merges the answers (`workers` lists each one's); anything else (ping)
    goes to the first live worker. A client that leaves is told to every worker.

    Placement: a new session goes to the live worker with the most free KV bytes (free blocks of its
    models' pools, and device memory no pool holds yet), as each worker last reported (every second);
    ties go to the worker with fewer sessions in the front's table. A
    session does not name its model when it opens, so "free for its model" is the worker's free KV
    overall.

    Note [Balancing]: when requests on a worker wait for memory (its dispatcher's queue) and another
    worker has none waiting, the front moves one of the first worker's sessions that sit between
    requests with KV on its device (the largest that fits the other's free KV) there, by the same
    migration a client asks for; the room it leaves admits the waiting requests. One at a time, from
    the workers' load reports (each second), and never the session twice within BALANCE_COOLDOWN_S.

    A worker that dies fails only its own sessions: the front answers every request it had relayed
    there and not seen answered with SessionLost, and later requests for its sessions the same way;
    the other workers keep serving. The worker is not replaced (a new process cannot join the
    torch.distributed group of the old ones); the server goes on with fewer devices, and ends (for the
    supervisor to restart it whole) when none is left.
"""
from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import zmq

from ...protocol import codec
from ...protocol.errors import (
    DjinnError, InvalidRequest, ServerBusy, ServerUnavailable, SessionLost, SessionNotFound, wire_error,
)
from ...protocol.messages import MsgType
from ..router import ClientGone, Request, Router
from . import wire

log = logging.getLogger("djinn.front")

BALANCE_COOLDOWN_S = 30.0  # a session the balancer moved stays where it went at least this long
READY_TIMEOUT_S = 300.0  # a worker's start: torch, transformers and, on a GPU, its CUDA context


@dataclass
class Worker:
    rank: int
    device: str
    proc: subprocess.Popen
    identity: bytes
    info: dict | None = None          # its HELLO info, once ready
    alive: bool = True
    load: dict = field(default_factory=dict)                 # its last report (Engine.load)
    inflight: set = field(default_factory=set)               # (client id, rid) relayed, not yet answered
    muted: set = field(default_factory=set)                  # (client id, rid) whose replies are dropped

    @property
    def ready(self) -> bool:
        return self.info is not None


@dataclass
class _Migration:
    """One session moving (Note [Migration] in migrate.py); its requests wait in `Front.held`."""

    mig: int
    req: Request | None  # None: the balancer's own (Note [Balancing]); nobody waits for a reply
    sid: str
    src: int
    dst: int
    model_id: str | None = None  # a model copied for attach_model (Note [Models between workers])
    t0: float = field(default_factory=time.perf_counter)
    bytes: int = 0


@dataclass
class _Gather:
    """A stats request the front answers once every live worker has."""

    req: Request
    parts: dict = field(default_factory=dict)  # rank -> that worker's stats
    waiting: set = field(default_factory=set)  # ranks not yet answered


class Front:
    def __init__(self, cfg, devices: list[str], worker_argv: list[str], server_info: dict):
        self.cfg, self.devices, self.info = cfg, devices, server_info
        self.ctx = zmq.Context()
        self._dir = tempfile.mkdtemp(prefix="djinn-front-")  # 0700: only this user reaches the workers
        self.internal = self.ctx.socket(zmq.ROUTER)
        self.internal.setsockopt(zmq.LINGER, 0)
        self.internal.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.internal.setsockopt(zmq.SNDHWM, 0)
        self.internal.setsockopt(zmq.RCVHWM, 0)
        self.internal_address = f"ipc://{self._dir}/front"
        self.internal.bind(self.internal_address)
        self.workers: list[Worker] = []
        self.sessions: dict[str, int] = {}   # sid -> rank
        self.owner: dict[str, str] = {}      # sid -> client id (attach_model looks for a client's models)
        self.span: dict[str, list[int]] = {}  # sid -> its workers, first the one that answers (tensor-parallel)
        self.lost: set[str] = set()          # sessions of workers that died
        self._gathers: dict[int, _Gather] = {}
        self.held: dict[str, list[Request]] = {}  # sid -> its requests while it moves
        self._migration: _Migration | None = None   # one at a time (Note [Migration])
        self._balanced: dict[str, float] = {}       # sid -> when the balancer last moved it
        self.balance_moves = 0
        self._ids = 0  # migration and stats-gather ids
        self.router: Router | None = None
        dist_port = _free_port()
        for rank, dev in enumerate(devices):
            cmd = [sys.executable, "-m", "djinn.server.server_main", "--worker", "--device", dev,
                   "--front", self.internal_address, "--rank", str(rank), "--world", str(len(devices)),
                   "--dist-port", str(dist_port), "--parent-pid", str(os.getpid()), *worker_argv]
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
            self.workers.append(Worker(rank, dev, proc, f"w{rank}".encode()))

    # -- start and stop ------------------------------------------------------------------------------
    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Every worker said ready, or SystemExit naming the one that did not."""
        deadline = time.monotonic() + timeout_s
        while not all(w.ready for w in self.workers):
            for w in self.workers:
                if w.proc.poll() is not None:
                    raise SystemExit(f"djinn server: worker {w.rank} ({w.device}) exited with {w.proc.returncode} "
                                     "before it was ready")
            if time.monotonic() > deadline:
                raise SystemExit(f"djinn server: workers not ready after {timeout_s:.0f} s")
            if self.internal.poll(100, zmq.POLLIN):
                self._drain_internal()

    def listen(self) -> str:
        self.router = Router(self.ctx, self.cfg, dict(self.info, workers=[w.info for w in self.workers]))
        return self.router.address

    def serve(self, stop) -> int:
        """Relay until `stop` is set or no worker is left; the exit code."""
        poller = zmq.Poller()
        poller.register(self.router.sock, zmq.POLLIN)
        poller.register(self.internal, zmq.POLLIN)
        while not stop.is_set():
            ready = dict(poller.poll(100))
            for item in self.router.poll(0):
                self._client(item)
            if self.internal in ready:
                self._drain_internal()
            self._check_workers()
            if not any(w.alive for w in self.workers):
                log.error("every worker has died; stopping")
                return 1
        return 0

    def close(self, drain_s: float) -> None:
        for w in self.workers:
            if w.proc.poll() is None:
                w.proc.terminate()  # each drains (bounded) and stops
        deadline = time.monotonic() + drain_s + 10
        for w in self.workers:
            try:
                w.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
        if self.router is not None:
            self.router.bye_all()
            self.router.close()
        self.internal.close(linger=0)
        self.ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)

    # -- clients -------------------------------------------------------------------------------------
    def _client(self, item) -> None:
        if isinstance(item, ClientGone):
            for w in self._live():
                self._send(w, [wire.GONE, item.client_id.encode(), item.reason.encode()])
            return
        req: Request = item
        op, args = req.header["op"], req.header.get("args")
        args = args if isinstance(args, dict) else {}
        meta = {"principal": self.router.principal(req.client_id) or ""}
        if op == "stats":
            self._gather_stats(req)
            return
        if isinstance(args.get("sid"), str) and args["sid"] in self.held:
            self.held[args["sid"]].append(req)  # served where it lands
            return
        if op == "migrate":
            self._migrate(req, args)
            return
        if op == "attach_model" and self._copy_model(req, args):
            return
        if op == "open_session" and args.get("tp") not in (None, 1):
            self._open_spanning(req, args, meta)
            return
        if isinstance(args.get("sid"), str) and args["sid"] in self.span:
            self._relay_spanning(req, args["sid"], meta)
            return
        if op in ("open_session", "restore_session"):  # a new session: placed
            w = self._place()
            if w is not None:
                meta["new_sid"] = secrets.token_hex(12)
                self.sessions[meta["new_sid"]] = w.rank
                self.owner[meta["new_sid"]] = req.client_id
        elif isinstance(args.get("sid"), str):
            sid = args["sid"]
            rank = self.sessions.get(sid)
            if rank is None and sid in self.lost:
                self._error(req, SessionLost(f"session {sid[:12]} was lost with the worker that held it"))
                return
            w = self.workers[rank] if rank is not None else self._first()  # unknown: its answer says so
            if op == "fork_session" and rank is not None:  # the child lives beside its parent's blocks
                meta["new_sid"] = secrets.token_hex(12)
                self.sessions[meta["new_sid"]] = rank
                self.owner[meta["new_sid"]] = req.client_id
        else:
            w = self._first()
        if w is None:
            self._error(req, ServerUnavailable("no worker is serving"))
            return
        self._relay(w, req, meta)

    def _relay(self, w: Worker, req: Request, meta: dict) -> None:
        w.inflight.add((req.client_id, req.msg.rid))
        self._send(w, [wire.REQUEST, req.client_id.encode(), wire.pack(meta), *req.msg.frames])

    def _open_spanning(self, req: Request, args: dict, meta: dict) -> None:
        """Note [Tensor-parallel sessions]: one session on every worker, under one id."""
        tp, live = args.get("tp"), self._live()
        if type(tp) is not int or tp < 1 or tp != len(self.workers) or len(live) != tp:
            self._error(req, InvalidRequest(
                f"tp={tp!r} needs a server with {tp!r} live workers sharding together; this one has "
                f"{len(live)} of {len(self.workers)} (start it with --gpus listing that many GPUs)"))
            return
        sid = secrets.token_hex(12)
        self.span[sid] = [w.rank for w in live]
        self.sessions[sid], self.owner[sid] = live[0].rank, req.client_id
        self._relay_spanning(req, sid, dict(meta, new_sid=sid, tp=tp))

    def _relay_spanning(self, req: Request, sid: str, meta: dict) -> None:
        """Every worker of the span gets the request, in the same order as every other; one seed for
        all of them (used where the call names none); only the first one's reply goes back."""
        meta = dict(meta, seed=secrets.randbits(63))
        for i, rank in enumerate(self.span[sid]):
            w = self.workers[rank]
            if i:
                w.muted.add((req.client_id, req.msg.rid))
            self._relay(w, req, meta)

    def _place(self, among: list[Worker] | None = None) -> Worker | None:
        """Note [One server, several workers]: the most free KV bytes, then the fewest sessions."""
        live = self._live() if among is None else among
        if not live:
            return None
        count = {w.rank: 0 for w in live}
        for rank in self.sessions.values():
            if rank in count:
                count[rank] += 1
        return max(live, key=lambda w: (w.load.get("free_kv_bytes", 0), -count[w.rank], -w.rank))

    def _migrate(self, req: Request, args: dict) -> None:
        """Note [Migration] in migrate.py: start moving a session; the reply comes when it has moved."""
        sid, rank = args.get("sid"), self.sessions.get(args.get("sid"))
        if sid in self.span:
            self._error(req, InvalidRequest("a tensor-parallel session spans every worker: there is nowhere to move it"))
            return
        if rank is None:
            self._error(req, SessionNotFound(f"session {sid!r} does not exist (closed, reclaimed, or never opened)"))
            return
        if self._migration is not None:
            self._error(req, ServerBusy("another session is moving between workers; try again shortly"))
            return
        dst = args.get("worker")
        others = [w for w in self._live() if w.rank != rank]
        if dst is None:
            best = self._place(others)
            dst = best.rank if best is not None else None
        if type(dst) is not int or not any(w.rank == dst for w in self._live()):
            self._error(req, InvalidRequest(f"worker {dst!r} is not a live worker: live are "
                                            f"{[w.rank for w in self._live()]}"))
            return
        if dst == rank:
            self._reply(req, {"worker": rank, "moved": False, "seconds": 0.0, "bytes": 0})
            return
        self._start_move(req, sid, rank, dst)

    def _balance(self) -> None:
        """Note [Balancing]: move a session away from a worker whose requests wait for memory."""
        if self._migration is not None:
            return
        live = self._live()
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
                if (nbytes <= room and self.sessions.get(sid) == hot.rank and sid not in self.held
                        and now - self._balanced.get(sid, -BALANCE_COOLDOWN_S) >= BALANCE_COOLDOWN_S):
                    self._balanced[sid] = now
                    self.balance_moves += 1
                    log.info("balancing: %d requests wait on worker %d; moving session %s (%.1f MB) to worker %d",
                             hot.load["queued"], hot.rank, sid[:8], nbytes / 1e6, dst.rank)
                    self._start_move(None, sid, hot.rank, dst.rank)
                    return

    def _start_move(self, req: Request | None, sid: str, src: int, dst: int) -> None:
        self._ids += 1
        m = self._migration = _Migration(self._ids, req, sid, src, dst)
        self.held[sid] = []
        self._send(self.workers[src], [wire.CONTROL, wire.pack(
            {"op": "export", "mig": m.mig, "sid": sid, "client": self.owner.get(sid, "") if req is None
             else req.client_id})])

    def _copy_model(self, req: Request, args: dict) -> bool:
        """Note [Models between workers]: start copying the model to the session's worker from one
        where this client holds sessions; False when there is none to copy from (the worker answers)."""
        sid, mid = args.get("sid"), args.get("model_id")
        dst = self.sessions.get(sid)
        if dst is None or not isinstance(mid, str) or self._migration is not None or sid in self.span:
            return False
        srcs = sorted({r for s, r in self.sessions.items()
                       if r != dst and self.owner.get(s) == req.client_id and self.workers[r].alive})
        if not srcs:
            return False
        self._ids += 1
        self._migration = _Migration(self._ids, req, sid, srcs[0], dst, model_id=mid)
        self.held[sid] = []
        self._send(self.workers[srcs[0]], [wire.CONTROL, wire.pack(
            {"op": "export_model", "mig": self._ids, "model_id": mid, "client": req.client_id})])
        return True

    def _migration_step(self, w: Worker, op: str, fields: dict) -> None:
        m = self._migration
        if m is None or fields.get("mig") != m.mig:
            return
        if op == "exported":
            self._send(self.workers[m.dst], [wire.CONTROL, wire.pack(
                {"op": "import", "mig": m.mig, "src": m.src, "manifest": fields["manifest"]})])
        elif op == "want":
            self._send(self.workers[m.src], [wire.CONTROL, wire.pack(
                {"op": "send", "mig": m.mig, "dst": m.dst, "hashes": fields.get("hashes") or []})])
        elif op == "sent":  # the source's count; the destination's, in "imported", is the one kept
            m.bytes = m.bytes or int(fields.get("bytes") or 0)
        elif op == "imported" and m.model_id is not None:
            self._send(self.workers[m.src], [wire.CONTROL, wire.pack({"op": "keep", "mig": m.mig})])
            self._relay(self.workers[m.dst], m.req, {"principal": self.router.principal(m.req.client_id) or "",
                                                     "held_elsewhere": m.model_id})
            self._end_migration()
        elif op == "imported":
            m.bytes = int(fields.get("bytes") or m.bytes)
            self.sessions[m.sid] = m.dst
            self._send(self.workers[m.src], [wire.CONTROL, wire.pack({"op": "drop", "mig": m.mig})])
            if m.req is not None:
                self._reply(m.req, {"worker": m.dst, "moved": True, "seconds": time.perf_counter() - m.t0,
                                    "bytes": m.bytes})
            log.info("session %s moved from worker %d to %d (%.1f MB)", m.sid[:8], m.src, m.dst, m.bytes / 1e6)
            self._end_migration()
        elif op == "migrate_failed":
            self._fail_migration(fields.get("message") or "failed", fields.get("code"), fields.get("step"))

    def _fail_migration(self, message: str, code: str | None = None, step: str | None = None) -> None:
        m = self._migration
        if self.workers[m.src].alive:
            self._send(self.workers[m.src], [wire.CONTROL, wire.pack({"op": "keep", "mig": m.mig})])
        if m.model_id is not None:  # no copy: the session's own worker answers the attach_model
            if self.workers[m.dst].alive:
                self._relay(self.workers[m.dst], m.req, {"principal": self.router.principal(m.req.client_id) or ""})
            self._end_migration()
            return
        err = {"SessionNotFound": SessionNotFound}.get(code, InvalidRequest)
        if m.req is not None:
            self._error(m.req, err(f"session {m.sid[:12]} did not move ({step or 'migrate'}): {message}"))
        else:
            log.info("balancing: session %s did not move (%s): %s", m.sid[:8], step, message)
        self._end_migration()

    def _end_migration(self) -> None:
        m, self._migration = self._migration, None
        for req in self.held.pop(m.sid, []):  # each goes where the session now is
            self._client(req)

    def _gather_stats(self, req: Request) -> None:
        live = self._live()
        if not live:
            self._error(req, ServerUnavailable("no worker is serving"))
            return
        gid = self._ids = self._ids + 1
        self._gathers[gid] = _Gather(req, waiting={w.rank for w in live})
        for w in live:
            self._send(w, [wire.CONTROL, wire.pack({"op": "stats", "client": req.client_id, "gid": gid})])

    def _finish_gathers(self) -> None:
        for gid, g in list(self._gathers.items()):
            if g.waiting:
                continue
            del self._gathers[gid]
            self._reply(g.req, merge_stats(g.parts, self))

    # -- workers -------------------------------------------------------------------------------------
    def _drain_internal(self) -> None:
        for _ in range(256):
            try:
                frames = self.internal.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            w = self._by_identity(frames[0].bytes)
            if w is None:
                continue
            kind = frames[1].bytes
            if kind == wire.REPLY:
                client_id = frames[2].bytes.decode()
                key = (client_id, wire.unpack(frames[3].bytes))
                if frames[4].bytes == b"1":
                    w.inflight.discard(key)
                if key in w.muted:  # a spanning session's other worker: its first worker answers
                    if frames[4].bytes == b"1":
                        w.muted.discard(key)
                    continue
                if self.router is not None:
                    self.router.send(client_id, frames[5:])
            elif kind == wire.CONTROL:
                self._control(w, wire.unpack(frames[2].bytes))

    def _control(self, w: Worker, fields: dict) -> None:
        op = fields.get("op")
        if op == "ready":
            w.info = fields.get("info") or {}
            log.info("worker %d ready on %s", w.rank, w.device)
        elif op == "load":
            w.load = fields
            self._balance()
        elif op == "closed":
            if self.sessions.get(fields.get("sid")) == w.rank:
                del self.sessions[fields["sid"]]
                self.owner.pop(fields["sid"], None)
                self.span.pop(fields["sid"], None)
        elif op in ("exported", "want", "sent", "imported", "migrate_failed"):
            self._migration_step(w, op, fields)
        elif op == "stats":
            g = self._gathers.get(fields.get("gid"))
            if g is not None and w.rank in g.waiting:
                g.waiting.discard(w.rank)
                g.parts[w.rank] = fields.get("result") or {}
                self._finish_gathers()

    def _check_workers(self) -> None:
        for w in self.workers:
            if w.alive and w.proc.poll() is not None:
                self._lose(w, f"exit status {w.proc.returncode}")

    def _lose(self, w: Worker, why: str) -> None:
        w.alive = False
        mine = [sid for sid, rank in self.sessions.items() if rank == w.rank or w.rank in self.span.get(sid, ())]
        log.error("worker %d (%s) died (%s): its %d sessions are lost; the other workers serve on",
                  w.rank, w.device, why, len(mine))
        for sid in mine:
            del self.sessions[sid]
            self.owner.pop(sid, None)
            self.span.pop(sid, None)
            self.lost.add(sid)
        err = SessionLost(f"the worker on {w.device} that held this session died ({why})")
        for client_id, rid in w.inflight if self.router is not None else ():
            if (client_id, rid) not in w.muted:
                self.router.send(client_id, codec.encode(MsgType.ERROR, wire_error(rid, err)))
        w.inflight.clear()
        w.muted.clear()
        for g in self._gathers.values():
            g.waiting.discard(w.rank)
        self._finish_gathers()
        m = self._migration
        if m is not None and w.rank in (m.src, m.dst):
            self._fail_migration(f"worker {w.rank} died while it moved")

    # -- helpers -------------------------------------------------------------------------------------
    def _live(self) -> list[Worker]:
        return [w for w in self.workers if w.alive and w.ready]

    def _first(self) -> Worker | None:
        live = self._live()
        return live[0] if live else None

    def _by_identity(self, identity: bytes) -> Worker | None:
        return next((w for w in self.workers if w.identity == identity), None)

    def _send(self, w: Worker, frames: list) -> None:
        self.internal.send_multipart([w.identity, *frames], copy=False)

    def _reply(self, req: Request, result) -> None:
        self.router.send(req.client_id, codec.encode(MsgType.REPLY, {"rid": req.msg.rid, "result": result}))

    def _error(self, req: Request, e: DjinnError) -> None:
        self.router.send(req.client_id, codec.encode(MsgType.ERROR, wire_error(req.msg.rid, e)))


def merge_stats(parts: dict[int, dict], front: Front) -> dict:
    """One `stats()` from every worker's: the first's shape, sessions and models of all of them (each
    session says its worker), segments, KV blocks and scheduler counters summed (a model's pool on
    two workers counts both pools' blocks), and `workers` with each one's own."""
    ranks = sorted(parts)
    first = dict(parts[ranks[0]]) if ranks else {}
    sessions, models = {}, {}
    for r in ranks:
        for sid, s in (parts[r].get("sessions") or {}).items():
            if sid in sessions:  # a tensor-parallel session: its first worker's entry, every worker named
                sessions[sid].setdefault("workers", [sessions[sid]["worker"]]).append(r)
                continue
            sessions[sid] = dict(s, worker=r)
        for mid, m in (parts[r].get("models") or {}).items():
            merged = models.setdefault(mid, dict(m, workers=[], sessions=[]))
            merged["workers"].append(r)
            merged["sessions"] = sorted({*merged["sessions"], *(m.get("sessions") or [])})
    first.update(
        sessions=sessions, models=models, **{k: _summed([parts[r].get(k) for r in ranks])
                                             for k in ("segments", "kv", "scheduler")},
        device=", ".join(front.workers[r].device for r in ranks),
        requests_served=sum(parts[r].get("requests_served", 0) or 0 for r in ranks),
        cluster={"workers": len(front.workers), "live": sum(w.alive for w in front.workers),
                 "balance_moves": getattr(front, "balance_moves", 0)},
        workers=[{"rank": r, "device": front.workers[r].device, "alive": front.workers[r].alive,
                  "pid": (front.workers[r].info or {}).get("pid"),
                  "sessions": len(parts[r].get("sessions") or {}), **{k: parts[r].get(k) for k in
                  ("segments", "kv", "device_memory", "scheduler", "requests_served")}} for r in ranks]
        + [{"rank": w.rank, "device": w.device, "alive": False} for w in front.workers if not w.alive])
    return first


_KEPT = frozenset({"block_tokens", "block_bytes", "policy", "step_tokens", "swap_bw"})  # alike on every worker


def _summed(values: list):
    """Numbers summed over the workers, maps merged key by key; anything else (and the sizes and names
    every worker has alike) as the first worker has it."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    head = present[0]
    if isinstance(head, dict):
        keys = list(dict.fromkeys(k for v in present if isinstance(v, dict) for k in v))
        return {k: (head.get(k) if k in _KEPT and k in head else
                    _summed([v.get(k) for v in present if isinstance(v, dict)])) for k in keys}
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return sum(present)
    return head


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
