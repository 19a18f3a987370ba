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
    DjinnError, InvalidRequest, ServerUnavailable, SessionLost, wire_error,
)
from ...protocol.messages import MsgType
from ..router import ClientGone, Request, Router
from . import tensor_parallel, wire
from .merge import merge_stats
from .moves import Moves

log = logging.getLogger("djinn.front")

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
        self.moves = Moves(self)             # sessions and models moving between workers
        self._ids = 0  # stats-gather ids
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
                self.take(item)
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
    def take(self, item) -> None:
        if isinstance(item, ClientGone):
            for w in self.live():
                self.send_to(w, [wire.GONE, item.client_id.encode(), item.reason.encode()])
            return
        req: Request = item
        op, args = req.header["op"], req.header.get("args")
        args = args if isinstance(args, dict) else {}
        meta = self.meta_of(req)
        if op == "stats":
            self._gather_stats(req)
            return
        if isinstance(args.get("sid"), str) and self.moves.hold(req, args["sid"]):
            return  # served where the session lands
        if op == "migrate":
            self.moves.migrate(req, args)
            return
        if op == "attach_model" and self.moves.copy_model(req, args):
            return
        if op == "open_session" and args.get("tp") not in (None, 1):
            self._open_spanning(req, args, meta)
            return
        if isinstance(args.get("sid"), str) and args["sid"] in self.span:
            sid = args["sid"]
            if op == "fork_session":  # the child spans the parent's block (its share of the KV on each)
                meta["new_sid"] = self._name(req, self.span[sid])
            self._relay_spanning(req, sid, meta)
            return
        if op in ("open_session", "restore_session"):  # a new session: placed
            w = self.place()
            if w is not None:
                meta["new_sid"] = self._name(req, [w.rank])
        elif isinstance(args.get("sid"), str):
            sid = args["sid"]
            rank = self.sessions.get(sid)
            if rank is None and sid in self.lost:
                self.error(req, SessionLost(f"session {sid[:12]} was lost with the worker that held it"))
                return
            w = self.workers[rank] if rank is not None else self._first()  # unknown: its answer says so
            if op == "fork_session" and rank is not None:  # the child lives beside its parent's blocks
                meta["new_sid"] = self._name(req, [rank])
        else:
            w = self._first()
        if w is None:
            self.error(req, ServerUnavailable("no worker is serving"))
            return
        self.relay(w, req, meta)

    def relay(self, w: Worker, req: Request, meta: dict) -> None:
        w.inflight.add((req.client_id, req.msg.rid))
        self.send_to(w, [wire.REQUEST, req.client_id.encode(), wire.pack(meta), *req.msg.frames])

    def _open_spanning(self, req: Request, args: dict, meta: dict) -> None:
        """Note [Tensor-parallel sessions]: one session on every worker, under one id."""
        try:
            tp = tensor_parallel.check(args.get("tp"), len(self.workers))
            block = self._block(tp)
        except InvalidRequest as e:
            self.error(req, e)
            return
        sid = self._name(req, block)
        self._relay_spanning(req, sid, dict(meta, new_sid=sid, tp=tp))

    def _name(self, req: Request, ranks: list[int]) -> str:
        """A new session's id, for the client of `req`, on `ranks` (the first answers; more than one:
        a tensor-parallel session spanning them)."""
        sid = secrets.token_hex(12)
        self.sessions[sid], self.owner[sid] = ranks[0], req.client_id
        if len(ranks) > 1:
            self.span[sid] = list(ranks)
        return sid

    def _block(self, tp: int) -> list[int]:
        """The aligned block of tp live workers a tensor-parallel session goes to: the most free KV
        bytes, then the fewest sessions (Note [Tensor-parallel sessions])."""
        live = {w.rank: w for w in self.live()}
        whole = [b for b in tensor_parallel.blocks(len(self.workers), tp) if all(r in live for r in b)]
        if not whole:
            raise InvalidRequest(f"tp={tp} needs a block of {tp} live workers; {len(live)} of "
                                 f"{len(self.workers)} are live")
        count = self._sessions_on(live)
        return max(whole, key=lambda b: (sum(live[r].load.get("free_kv_bytes", 0) for r in b),
                                         -sum(count[r] for r in b), -b[0]))

    def _relay_spanning(self, req: Request, sid: str, meta: dict) -> None:
        """Every worker of the span gets the request, in the same order as every other; one seed for
        all of them (used where the call names none); only the first one's reply goes back."""
        meta = dict(meta, seed=secrets.randbits(63))
        for i, rank in enumerate(self.span[sid]):
            w = self.workers[rank]
            if i:
                w.muted.add((req.client_id, req.msg.rid))
            self.relay(w, req, meta)

    def place(self, among: list[Worker] | None = None) -> Worker | None:
        """Note [One server, several workers]: the most free KV bytes, then the fewest sessions."""
        live = self.live() if among is None else among
        if not live:
            return None
        count = self._sessions_on(live)
        return max(live, key=lambda w: (w.load.get("free_kv_bytes", 0), -count[w.rank], -w.rank))

    def _sessions_on(self, workers) -> dict[int, int]:
        """Sessions per worker rank, a tensor-parallel session counted on every worker of its span."""
        count = {w if isinstance(w, int) else w.rank: 0 for w in workers}
        for sid, rank in self.sessions.items():
            for r in self.span.get(sid, (rank,)):
                if r in count:
                    count[r] += 1
        return count

    def _gather_stats(self, req: Request) -> None:
        live = self.live()
        if not live:
            self.error(req, ServerUnavailable("no worker is serving"))
            return
        gid = self._ids = self._ids + 1
        self._gathers[gid] = _Gather(req, waiting={w.rank for w in live})
        for w in live:
            self.send_to(w, [wire.CONTROL, wire.pack({"op": "stats", "client": req.client_id, "gid": gid})])

    def _finish_gathers(self) -> None:
        for gid, g in list(self._gathers.items()):
            if g.waiting:
                continue
            del self._gathers[gid]
            self.reply(g.req, merge_stats(g.parts, self))

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
            self.moves.balance()
        elif op == "closed":
            if self.sessions.get(fields.get("sid")) == w.rank:
                del self.sessions[fields["sid"]]
                self.owner.pop(fields["sid"], None)
                self.span.pop(fields["sid"], None)
        elif op in ("exported", "want", "sent", "imported", "migrate_failed"):
            self.moves.step(op, fields)
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
        self.moves.lost(w.rank)

    # -- helpers -------------------------------------------------------------------------------------
    def live(self) -> list[Worker]:
        return [w for w in self.workers if w.alive and w.ready]

    def _first(self) -> Worker | None:
        live = self.live()
        return live[0] if live else None

    def _by_identity(self, identity: bytes) -> Worker | None:
        return next((w for w in self.workers if w.identity == identity), None)

    def send_to(self, w: Worker, frames: list) -> None:
        self.internal.send_multipart([w.identity, *frames], copy=False)

    def reply(self, req: Request, result) -> None:
        self.router.send(req.client_id, codec.encode(MsgType.REPLY, {"rid": req.msg.rid, "result": result}))

    def meta_of(self, req: Request) -> dict:
        """What a relayed request carries besides the client's frames (cluster/wire.py)."""
        return {"principal": self.router.principal(req.client_id) or ""}

    def error(self, req: Request, e: DjinnError) -> None:
        self.router.send(req.client_id, codec.encode(MsgType.ERROR, wire_error(req.msg.rid, e)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
