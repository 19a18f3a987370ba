"""Load and soak tests against a real server subprocess (issue 8, part 3).

    python OSDI_Evaluation/reliability/load_soak.py [--device cpu] [--mode both|load|soak]
        [--clients 200] [--duration 60] [--client-kind raw|connection] [--procs K] [--cycles 1000]
        [--short] [--out results.json]

load: C concurrent clients, each with its own client id (HELLO), session, handle on the shared model and
      app-level heartbeats, each looping for D seconds over small calls picked at random (seeded): ping,
      stats, open+close a session, a forward of a tiny GPT-2 shared by all clients (built once on the
      server from its config; every client's init_model finds the same weights), and a fetch of that
      forward's 8 KiB logits (checked bitwise against the client's first fetch). A new forward's handle
      replaces the old one, which is freed with the client's next call, as RemoteTensor does.
      Client side (--client-kind):
        raw (default): each client is a bare DEALER socket speaking the wire protocol; C/K of them are
          multiplexed by one event loop in each of K processes. This measures the server: on a 2-core
          machine it leaves the server most of a core.
        connection: each client is a djinn Connection (own zmq context, IO thread, keeper thread) on its
          own thread, C/K threads in each of K processes. Its callers poll the socket in 2 ms slices and
          its keeper wakes every 50 ms, so 200 of them on 2 cores saturate the CPU themselves (see
          docs/RELIABILITY.md): use it for the client library's behaviour under load, not for the server's.
      Reported: throughput (calls/s), p50/p99 latency per call type, errors (must be 0), the server's CPU
      use (whole process and its busiest threads: the engine) and the clients' CPU use.
soak: 1000 cycles of: open a session, attach the shared model (init_model), generate a few tokens with
      the session's KV cache, continue the generate, run a forward whose logits handle is held, fetch a
      slice of it, close the session (every 10th cycle on a fresh Connection that just disconnects:
      the server reclaims the session on the client's BYE). Before (after a warm-up) and after: the
      server process's RSS, thread count and open file descriptors (/proc/<pid>/status, /proc/<pid>/fd)
      and stats() (data/host/stack segments 0, no sessions but the model holder's, text unchanged).
      Thresholds: threads and fds exactly back to baseline (after a bounded settle for the kernel to
      close the disconnected clients' sockets); RSS within --rss-tolerance-mb (default 32 MiB), which is
      far below what a leak of the per-cycle state would add (cycles x held bytes, reported as
      `leak_if_every_cycle_leaked_mb`), and the RSS trend over the cycles is reported too.

Server threads: on a CPU server the clients share the machine, so by default the server process gets
OMP_NUM_THREADS=1 (--server-threads; 0 keeps torch's one-thread-per-core default, which on 2 cores made
forwards ~10x slower under load: see docs/RELIABILITY.md).
The server's pid comes from its HELLO reply (`pid`): with the supervisor (server_main without
--no-supervise) EmbeddedServer.proc is the supervisor, and the worker is what serves.
Writes JSON with `common.environment(device)` and the arguments; exits 1 if a check fails.
--short (CI): 20 clients for 5 s and 50 soak cycles, well under 60 s on a 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import sys
import threading
import time
import traceback
from array import array
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # OSDI_Evaluation/common.py
sys.path.insert(0, str(HERE.parents[1]))  # the repository (djinn) when run from elsewhere

CALL_TYPES = ["ping", "stats", "session", "forward", "fetch"]  # "session" = open_session + close_session
TIMED = ["ping", "stats", "open_session", "close_session", "forward", "fetch"]
VOCAB = 256

# The tiny model every client shares: built by the server from this config with seeded weights.
TINY_GPT2 = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=256, bos_token_id=1,
                 eos_token_id=2)


# -- server process resources ---------------------------------------------------------------------
def proc_resources(pid: int) -> dict:
    """RSS, peak RSS, virtual size, threads and open fds of a process, from /proc."""
    out = {"pid": pid}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "VmSize"):
                out[key] = int(value.split()[0]) * 1024
            elif key == "Threads":
                out["threads"] = int(value)
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    out["rss_mb"] = round(out["VmRSS"] / 2**20, 1)
    return out


def proc_cpu(pid: int) -> dict:
    """CPU seconds of a process and of each of its threads (utime + stime)."""
    tick = os.sysconf("SC_CLK_TCK")

    def read(path: str) -> tuple[str, float]:
        with open(path) as f:
            text = f.read()
        name = text[text.index("(") + 1:text.rindex(")")]
        fields = text[text.rindex(")") + 2:].split()
        return name, (int(fields[11]) + int(fields[12])) / tick

    _, total = read(f"/proc/{pid}/stat")
    threads = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name, cpu = read(f"/proc/{pid}/task/{tid}/stat")
        except (OSError, ValueError):
            continue
        threads[tid] = (name, cpu)
    return {"total": total, "threads": threads}


def cpu_delta(before: dict, after: dict, wall: float) -> dict:
    """CPU used between two proc_cpu readings: the process, and its busiest threads (the engine first)."""
    per = sorted(((cpu - before["threads"].get(tid, (name, 0.0))[1], name, tid)
                  for tid, (name, cpu) in after["threads"].items()), reverse=True)
    out = {"cpu_s": round(after["total"] - before["total"], 2),
           "cores_used": round((after["total"] - before["total"]) / wall, 2),
           "top_threads": [{"thread": f"{name} (tid {tid})", "cpu_s": round(c, 2), "utilization": round(c / wall, 3)}
                           for c, name, tid in per[:4]]}
    if per:
        out.update(busiest_thread_utilization=round(per[0][0] / wall, 3))
    return out


def server_pid(conn, server) -> int:
    pid = conn.info.get("pid")
    return pid if isinstance(pid, int) and os.path.exists(f"/proc/{pid}") else server.proc.pid


def pct(xs, q: float) -> float | None:
    if not len(xs):
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


def model_spec(seed: int = 0) -> dict:
    """The init_model request of the tiny GPT-2 (what RemoteModel.from_config sends)."""
    from transformers import GPT2Config

    cfg = GPT2Config(**TINY_GPT2)
    return {"arch": "GPT2LMHeadModel", "config": json.loads(cfg.to_json_string(use_diff=False)),
            "attn_impl": None, "dtype": None, "seed": seed}


def remote_tiny(session, spec: dict):
    """The shared tiny model in this session: the server finds its weights, or builds them once."""
    from djinn.frontend.remote import RemoteModel

    info = session.call("init_model", spec)
    return RemoteModel(session, info["model_id"], info["arch"], info["bytes"], info.get("config"),
                       source=f"random init, seed {spec['seed']}")


# -- load -----------------------------------------------------------------------------------------
def _client(idx: int, address: str, spec: dict, weights: list[float], seed: int, timeout_s: float,
            ready: threading.Barrier, go: threading.Event, window: list, out: list) -> None:
    import torch

    from djinn.config import ClientConfig
    from djinn.frontend.connection import Connection

    rng = random.Random(seed * 1_000_003 + idx)
    lat = {k: array("d") for k in TIMED}
    ends = array("d")
    errors: dict[str, int] = {}
    samples: list[str] = []
    mismatches = 0
    conn = None

    def done(op: str, t: float) -> float:
        now = time.perf_counter()
        lat[op].append(now - t)
        ends.append(time.monotonic() - window[0])
        return now

    def fail(what: str, e: BaseException) -> None:
        key = f"{what}: {type(e).__name__}"
        errors[key] = errors.get(key, 0) + 1
        if len(samples) < 5:
            samples.append(f"{key}: {str(e)[:300]}")

    try:
        try:
            conn = Connection(address, None, ClientConfig(call_timeout_s=timeout_s, retries=0))
            s = conn.session(f"load-{idx}")
            rm = remote_tiny(s, spec)
            ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(idx))
            last = rm(ids).logits
            ref = last.cpu()
        except BaseException as e:
            fail("setup", e)
            ready.abort()
            return
        ready.wait()
        go.wait()
        t0, deadline = window
        while True:
            now = time.monotonic()
            if now >= deadline:
                break
            kind = rng.choices(CALL_TYPES, weights)[0]
            t = time.perf_counter()
            try:
                if kind == "ping":
                    conn.ping()
                    done("ping", t)
                elif kind == "stats":
                    conn.stats()
                    done("stats", t)
                elif kind == "session":
                    s2 = conn.session()
                    t = done("open_session", t)
                    s2.close()
                    done("close_session", t)
                elif kind == "forward":
                    last = rm(ids).logits  # the previous handle is freed with this client's next call
                    done("forward", t)
                else:
                    got = last.cpu()
                    done("fetch", t)
                    if not torch.equal(got, ref):
                        mismatches += 1
            except BaseException as e:  # counted, and the client goes on
                fail(kind, e)
        try:
            del last
            s.close()
        except BaseException as e:
            fail("teardown", e)
    finally:
        if conn is not None:
            try:
                conn.close()
            except BaseException as e:
                fail("close", e)
        out.append({"lat": {k: v.tobytes() for k, v in lat.items()}, "ends": ends.tobytes(),
                    "errors": errors, "samples": samples, "mismatches": mismatches})


def load_worker(wid: int, n: int, first: int, address: str, spec: dict, weights: list[float], seed: int,
                timeout_s: float, q, go, start_at) -> None:
    """One client process: n client threads, each with its own Connection."""
    results: list = []
    ready = threading.Barrier(n + 1)
    go_local = threading.Event()
    window = [0.0, 0.0]
    threads = [threading.Thread(target=_client, args=(first + i, address, spec, weights, seed, timeout_s, ready,
                                                     go_local, window, results), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    try:
        ready.wait(timeout=300)
        q.put(("ready", wid, None))
    except threading.BrokenBarrierError:
        q.put(("ready", wid, "a client failed to set up"))
    go.wait()
    window[0] = start_at.value
    window[1] = start_at.value + start_at.duration
    cpu0 = time.process_time()
    go_local.set()
    for t in threads:
        t.join()
    q.put(("done", wid, {"clients": results, "cpu_s": time.process_time() - cpu0}))


class _RawClient:
    """One client on a bare DEALER socket (own client id, HELLO, session, model, heartbeats), driven by a
    worker's event loop: the same requests a Connection sends, without its per-call thread machinery."""

    def __init__(self, idx: int, zctx, address: str, spec: dict, rng: random.Random):
        import secrets

        import zmq

        self.idx, self.rng, self.spec = idx, rng, spec
        self.sock = zctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 500)
        self.sock.connect(address)
        self.client_id = secrets.token_hex(16)
        self.rid = 0
        self.pending: tuple | None = None  # (rid, op, t0)
        self.next_beat = 0.0
        self.sid = self.hid = self.ref = None
        self.spare = None  # the session of an open/close pair in progress
        self.frees: list[str] = []

    def send(self, kind, header: dict) -> int:
        from djinn.protocol import codec

        self.rid += 1
        self.sock.send_multipart(codec.encode(kind, dict(header, rid=self.rid)), copy=False)
        return self.rid

    def request(self, op: str, args: dict) -> int:
        from djinn.protocol.messages import MsgType

        return self.send(MsgType.REQUEST, {"op": op, "args": args})

    def recv(self):
        from djinn.protocol import codec

        return codec.decode(self.sock.recv_multipart(copy=False))

    def sync(self, kind, header: dict, timeout_s: float, beat=None):
        """Set-up: one message and its reply (by rid); `beat()` keeps the worker's other clients alive."""
        from djinn.protocol.messages import MsgType

        rid = self.send(kind, header)
        deadline = time.monotonic() + timeout_s
        while True:
            if beat is not None:
                beat()
            if time.monotonic() > deadline:
                raise TimeoutError(f"client {self.idx}: no reply within {timeout_s} s")
            if not self.sock.poll(200):
                continue
            msg = self.recv()
            if msg.rid == rid:
                if msg.kind == MsgType.ERROR:
                    raise RuntimeError(f"{msg.header.get('code')}: {msg.header.get('message')}")
                return msg.header.get("result", msg.header)

    def setup(self, timeout_s: float, beat=None) -> None:
        from djinn.protocol.messages import PROTOCOL_VERSION, MsgType

        hello = {"version": PROTOCOL_VERSION, "secret": None, "client_id": self.client_id}
        self.sync(MsgType.HELLO, hello, timeout_s, beat)
        self.sid = self.sync(MsgType.REQUEST, {"op": "open_session", "args": {"name": f"load-{self.idx}"}},
                             timeout_s, beat)["sid"]
        self.mid = self.sync(MsgType.REQUEST, {"op": "init_model", "args": dict(self.spec, sid=self.sid)},
                             timeout_s, beat)["model_id"]
        import torch

        self.ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(self.idx))
        out = self.sync(MsgType.REQUEST, {"op": "forward", "args": self._fwd()}, timeout_s, beat)
        self.hid = out["output"]["$d"]["logits"]["$t"][0]
        self.ref = self.sync(MsgType.REQUEST, {"op": "fetch", "args": {"sid": self.sid, "handles": [self.hid]}},
                             timeout_s, beat)["tensors"][0]

    def _fwd(self) -> dict:
        return {"sid": self.sid, "model_id": self.mid, "args": [self.ids], "kwargs": {"$d": {}}}

    def start(self, op: str) -> None:
        """Send the request of call type `op` (a "session" pair starts with open_session)."""
        if self.frees:  # like Session._flush_frees: freed handles ride along, unanswered by the caller
            self.request("free", {"sid": self.sid, "handles": self.frees})
            self.frees = []
        if op == "ping":
            rid = self.request("ping", {})
        elif op == "stats":
            rid = self.request("stats", {})
        elif op in ("session", "open_session"):
            op = "open_session"
            rid = self.request("open_session", {"name": None})
        elif op == "close_session":
            rid = self.request("close_session", {"sid": self.spare})
        elif op == "forward":
            rid = self.request("forward", self._fwd())
        else:
            rid = self.request("fetch", {"sid": self.sid, "handles": [self.hid]})
        self.pending = (rid, op, time.perf_counter())

    def finish(self, msg) -> tuple[str, bool, str | None]:
        """A reply to the pending call: (op, ok, error key); updates handles and the session pair."""
        import torch

        from djinn.protocol.messages import MsgType

        _, op, _ = self.pending
        self.pending = None
        if msg.kind == MsgType.ERROR:
            if op == "close_session":
                self.spare = None
            return op, False, f"{op}: {msg.header.get('code')}: {str(msg.header.get('message'))[:200]}"
        result = msg.header.get("result")
        if op == "open_session":
            self.spare = result["sid"]
        elif op == "close_session":
            self.spare = None
        elif op == "forward":
            self.frees.append(self.hid)
            self.hid = result["output"]["$d"]["logits"]["$t"][0]
        elif op == "fetch" and not torch.equal(result["tensors"][0], self.ref):
            return op, False, "fetch: values differ from the first fetch"
        return op, True, None


def raw_worker(wid: int, n: int, first: int, address: str, spec: dict, weights: list[float], seed: int,
               timeout_s: float, q, go, start_at) -> None:
    """One client process: n raw clients multiplexed by one thread (one zmq context, n DEALER sockets)."""
    import zmq

    from djinn.protocol.messages import MsgType

    zctx = zmq.Context()
    rng = random.Random(seed * 7919 + wid)
    clients, setup_err = [], None
    def beat() -> None:  # what each Connection's keeper does; a client silent for 10 s is reaped
        now = time.monotonic()
        for c in clients:
            if c.sid is not None and now >= c.next_beat:
                c.send(MsgType.HEARTBEAT, {})
                c.next_beat = now + 0.5

    try:
        for i in range(n):
            c = _RawClient(first + i, zctx, address, spec, random.Random(seed * 1_000_003 + first + i))
            clients.append(c)
            c.setup(timeout_s, beat)
    except Exception as e:
        setup_err = f"{type(e).__name__}: {e}"
    q.put(("ready", wid, setup_err))
    while not go.wait(0.25):  # heartbeats while the other workers set up
        beat()
    t0, deadline = start_at.value, start_at.value + start_at.duration
    while time.monotonic() < t0:
        time.sleep(0.001)
    cpu0 = time.process_time()
    lat = {k: array("d") for k in TIMED}
    ends = array("d")
    errors: dict[str, int] = {}
    samples: list[str] = []
    mismatches = 0
    by_sock = {c.sock: c for c in clients}
    poller = zmq.Poller()
    for c in clients:
        poller.register(c.sock, zmq.POLLIN)
    if setup_err is None:
        for c in clients:
            c.start(c.rng.choices(CALL_TYPES, weights)[0])
    while setup_err is None:
        now = time.monotonic()
        if now >= deadline and all(c.pending is None for c in clients):
            break
        for sock, _ in poller.poll(50):
            c = by_sock[sock]
            while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                msg = c.recv()
                if c.pending is None or msg.rid != c.pending[0] or msg.kind == MsgType.STREAM:
                    if msg.kind == MsgType.ERROR and msg.rid != 0:  # an unanswered free that failed
                        key = f"free: {msg.header.get('code')}"
                        errors[key] = errors.get(key, 0) + 1
                    continue
                t_call = c.pending[2]
                op, ok, err = c.finish(msg)
                done = time.perf_counter()
                if ok:
                    lat[op].append(done - t_call)
                    ends.append(time.monotonic() - t0)
                else:
                    if err.startswith("fetch: values differ"):
                        mismatches += 1
                    key = err.split(":")[0] + ": " + (err.split(":")[1].strip() if ":" in err else "")
                    errors[key] = errors.get(key, 0) + 1
                    if len(samples) < 5:
                        samples.append(err)
                now = time.monotonic()
                if op == "open_session" and ok:
                    c.start("close_session")  # the pair's second half, even past the deadline
                elif now < deadline:
                    c.start(c.rng.choices(CALL_TYPES, weights)[0])
        now = time.monotonic()
        for c in clients:
            if c.pending is not None and time.perf_counter() - c.pending[2] > timeout_s:
                key = f"{c.pending[1]}: timeout"
                errors[key] = errors.get(key, 0) + 1
                c.pending = None
                if now < deadline:
                    c.start(c.rng.choices(CALL_TYPES, weights)[0])
            if now >= c.next_beat:  # what the client transport's keeper does every heartbeat_s
                c.send(MsgType.HEARTBEAT, {})
                c.next_beat = now + 0.5
    cpu = time.process_time() - cpu0
    for c in clients:  # close the session and say goodbye, as Connection.close does
        try:
            if c.sid is not None:
                c.sync(MsgType.REQUEST, {"op": "close_session", "args": {"sid": c.sid}}, timeout_s)
            c.sock.send_multipart(__import__("djinn.protocol.codec", fromlist=["encode"]).encode(MsgType.BYE, {}))
        except Exception as e:
            key = f"teardown: {type(e).__name__}"
            errors[key] = errors.get(key, 0) + 1
        c.sock.close()
    zctx.term()
    result = {"lat": {k: v.tobytes() for k, v in lat.items()}, "ends": ends.tobytes(), "errors": errors,
              "samples": samples, "mismatches": mismatches}
    q.put(("done", wid, {"clients": [result], "n_clients": len(clients) if setup_err is None else 0, "cpu_s": cpu}))


class _Start:
    """Start time and duration shared with the worker processes."""

    def __init__(self, ctx):
        self._v = ctx.Value("d", 0.0)
        self._d = ctx.Value("d", 0.0)

    @property
    def value(self) -> float:
        return self._v.value

    @property
    def duration(self) -> float:
        return self._d.value

    def set(self, start: float, duration: float) -> None:
        self._d.value = duration
        self._v.value = start


def run_load(address: str, pid: int, args, spec: dict, exclude: set) -> dict:
    C, K = args.clients, max(1, min(args.procs, args.clients))
    weights = [float(w) for w in args.mix.split(",")]
    ctx = mp.get_context("spawn")
    q, go, start_at = ctx.Queue(), ctx.Event(), _Start(ctx)
    sizes = [C // K + (1 if i < C % K else 0) for i in range(K)]
    firsts = [sum(sizes[:i]) for i in range(K)]
    t_setup = time.monotonic()
    worker = raw_worker if args.client_kind == "raw" else load_worker
    procs = [ctx.Process(target=worker, args=(i, sizes[i], firsts[i], address, spec, weights, args.seed,
                                                    args.call_timeout, q, go, start_at), daemon=True)
             for i in range(K)]
    for p in procs:
        p.start()
    setup_errors = []
    for _ in range(K):
        kind, wid, err = q.get(timeout=600)
        if err:
            setup_errors.append(f"worker {wid}: {err}")
    setup_s = time.monotonic() - t_setup
    samples = []
    stop_sampling = threading.Event()

    def sample() -> None:
        while not stop_sampling.wait(1.0):
            try:
                samples.append(proc_resources(pid))
            except OSError:
                samples.append({"pid": pid, "gone": True})
                return

    res0 = proc_resources(pid)
    cpu0 = proc_cpu(pid)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic() + 0.2
    start_at.set(t0, args.duration)
    go.set()
    done = []
    for _ in range(K):
        kind, wid, payload = q.get(timeout=args.duration + 3 * args.call_timeout + 300)
        done.append(payload)
    wall = time.monotonic() - t0
    cpu1 = proc_cpu(pid)
    stop_sampling.set()
    sampler.join()
    for p in procs:
        p.join(timeout=30)

    lat = {k: array("d") for k in TIMED}
    ends = array("d")
    errors: dict[str, int] = {}
    error_samples: list[str] = []
    mismatches = 0
    client_cpu = 0.0
    for w in done:
        client_cpu += w["cpu_s"]
        for c in w["clients"]:
            for k, b in c["lat"].items():
                lat[k].frombytes(b)
            ends.frombytes(c["ends"])
            for k, v in c["errors"].items():
                errors[k] = errors.get(k, 0) + v
            error_samples += c["samples"]
            mismatches += c["mismatches"]
    clients_reported = sum(w.get("n_clients", len(w["clients"])) for w in done)
    in_window = [e for e in ends if e <= args.duration]
    calls = sum(len(v) for v in lat.values())
    per_op = {}
    for k, v in lat.items():
        per_op[k] = {"calls": len(v), "p50_ms": _ms(pct(v, 50)), "p99_ms": _ms(pct(v, 99)),
                     "max_ms": _ms(max(v) if len(v) else None),
                     "mean_ms": _ms(sum(v) / len(v) if len(v) else None)}
    per_second = [0] * (int(args.duration) + 1)
    for e in in_window:
        per_second[min(len(per_second) - 1, int(e))] += 1

    # After every client closed its sessions and said BYE, the server holds nothing of theirs.
    after = _settle_stats(address, exclude, lambda st: not st["sessions"] and st["segments"]["data"] == 0, 20.0)
    n_errors = sum(errors.values()) + mismatches + len(setup_errors) + (C - clients_reported)
    out = {
        "client_kind": args.client_kind, "clients": C, "processes": K, "clients_per_process": sizes, "duration_s": args.duration,
        "mix": dict(zip(CALL_TYPES, weights)), "setup_s": round(setup_s, 1), "wall_s": round(wall, 2),
        "calls": calls, "calls_in_window": len(in_window),
        "throughput_calls_per_s": round(len(in_window) / args.duration, 1),
        "per_op": per_op,
        "calls_per_second_timeline": per_second[:int(args.duration)],
        "errors": n_errors, "error_counts": errors, "error_samples": error_samples[:20],
        "fetch_mismatches": mismatches, "setup_errors": setup_errors,
        "clients_reported": clients_reported,
        "server_cpu": cpu_delta(cpu0, cpu1, wall),
        "client_cpu": {"cpu_s": round(client_cpu, 2), "cores_used": round(client_cpu / wall, 2)},
        "server_resources": {"before": res0, "max_rss_mb": max((s.get("rss_mb", 0) for s in samples), default=None),
                             "max_threads": max((s.get("threads", 0) for s in samples), default=None),
                             "max_fds": max((s.get("fds", 0) for s in samples), default=None),
                             "after": proc_resources(pid)},
        "after_load_stats": after,
    }
    out["passed"] = n_errors == 0 and after["ok"]
    return out


def _ms(x):
    return None if x is None else round(x * 1e3, 3)


def _settle_stats(address: str, exclude: set, ok, timeout_s: float) -> dict:
    """stats() from a fresh client until ok(stats) or the timeout; the last one, summarized. Sessions in
    `exclude` (the model holder's) and the fresh client's own are left out."""
    from djinn.frontend.connection import Connection

    conn = Connection(address, None)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            st = conn.stats()
            st["sessions"] = {sid: v for sid, v in st["sessions"].items()
                              if sid not in exclude and not v.get("mine")}
            if ok(st) or time.monotonic() > deadline:
                return {"ok": bool(ok(st)), "segments": st["segments"], "sessions": len(st["sessions"]),
                        "models": len(st["models"]), "text_entries": st.get("text_entries")}
            time.sleep(0.2)
    finally:
        conn.close()


# -- soak -----------------------------------------------------------------------------------------
def _summary(st: dict, exclude: set) -> dict:
    sessions = {sid: v for sid, v in st["sessions"].items() if sid not in exclude}
    return {"segments": dict(st["segments"]), "sessions": len(sessions),
            "session_ids": sorted(sessions)[:5], "text_entries": st.get("text_entries"),
            "models": {mid: len(m["sessions"]) for mid, m in st["models"].items()}}


def run_soak(address: str, pid: int, args, spec: dict, exclude: set) -> dict:
    import torch

    from djinn.frontend.connection import Connection

    holder = Connection(address, None)
    hs = holder.session("soak-holder")
    remote_tiny(hs, spec)  # holds the shared model (Text) for the whole soak
    cyc = Connection(address, None)
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, VOCAB, (1, 8), generator=gen)
    more = torch.randint(0, VOCAB, (1, 3), generator=gen)
    batch = torch.randint(0, VOCAB, (args.soak_batch, 32), generator=gen)
    held_bytes = args.soak_batch * 32 * VOCAB * 4
    ref: dict = {}
    failures: list[str] = []
    timings = array("d")

    def cycle(i: int) -> None:
        fresh = i % 10 == 9
        conn = Connection(address, None) if fresh else cyc
        t = time.perf_counter()
        try:
            s = conn.session(f"soak-{i}")
            rm = remote_tiny(s, spec)
            seq = s.generate(rm, prompt, max_new_tokens=args.soak_tokens, min_new_tokens=args.soak_tokens)
            seq2 = s.generate(rm, more, max_new_tokens=2, min_new_tokens=2)  # continues from the session's KV
            held = rm(batch, session=s).logits  # a handle held by the session until it closes
            tail = held[:, -1].cpu()
            got = (seq, seq2, tail)
            if not ref:
                ref["v"] = got
            elif not all(torch.equal(a, b) for a, b in zip(got, ref["v"])):
                failures.append(f"cycle {i}: results differ from cycle 0")
            if fresh:
                conn.close()  # BYE: the server reclaims the session, its KV and the held tensor
            else:
                s.close()
            del held
        except Exception as e:
            failures.append(f"cycle {i}: {type(e).__name__}: {str(e)[:300]}")
            if fresh:
                conn.close()
        timings.append(time.perf_counter() - t)

    exclude = exclude | {hs.sid}

    def settled(base_res: dict | None, timeout_s: float = 10.0) -> tuple[dict, dict]:
        """Resources and stats once the server is quiet: no session but the holder's, and (with a
        baseline) threads and fds back to it; bounded by timeout_s."""
        deadline = time.monotonic() + timeout_s
        while True:
            st = _summary(holder.stats(), exclude)
            res = proc_resources(pid)
            quiet = st["sessions"] == 0 and st["segments"]["data"] == 0
            if base_res is not None:
                quiet = quiet and res["threads"] == base_res["threads"] and res["fds"] == base_res["fds"]
            if quiet or time.monotonic() > deadline:
                return res, st
            time.sleep(0.1)

    try:
        for i in range(args.warmup):
            cycle(-args.warmup + i)
        timings = array("d")
        base_res, base_st = settled(None)
        trend = [{"cycle": 0, **{k: base_res[k] for k in ("rss_mb", "threads", "fds")}}]
        t0 = time.monotonic()
        every = max(1, args.cycles // 10)
        for i in range(args.cycles):
            cycle(i)
            if (i + 1) % every == 0 and i + 1 < args.cycles:
                r = proc_resources(pid)
                trend.append({"cycle": i + 1, **{k: r[k] for k in ("rss_mb", "threads", "fds")}})
        soak_s = time.monotonic() - t0
        end_res, end_st = settled(base_res)
        trend.append({"cycle": args.cycles, **{k: end_res[k] for k in ("rss_mb", "threads", "fds")}})
    finally:
        cyc.close()
        hs.close()
        holder.close()

    rss_delta_mb = (end_res["VmRSS"] - base_res["VmRSS"]) / 2**20
    per_cycle_state = held_bytes + 2 * TINY_GPT2["n_layer"] * (8 + args.soak_tokens + 3 + 2) * TINY_GPT2["n_embd"] * 4
    checks = {
        "no_cycle_failed": not failures,
        "rss_within_tolerance": abs(rss_delta_mb) <= args.rss_tolerance_mb,
        "threads_back_to_baseline": end_res["threads"] == base_res["threads"],
        "fds_back_to_baseline": end_res["fds"] == base_res["fds"],
        "no_sessions_left": end_st["sessions"] == 0,
        "data_segment_zero": end_st["segments"]["data"] == 0,
        "host_segment_zero": end_st["segments"]["host"] == 0,
        "stack_segment_zero": end_st["segments"].get("stack", 0) == 0,
        "uploads_in_flight_zero": end_st["segments"].get("uploads_in_flight", 0) == 0,
        "text_unchanged": end_st["segments"]["text"] == base_st["segments"]["text"]
                          and end_st["text_entries"] == base_st["text_entries"],
        "models_unchanged": end_st["models"] == base_st["models"],
    }
    rss = [t["rss_mb"] for t in trend]
    slope = _slope([t["cycle"] for t in trend], rss)
    return {
        "cycles": args.cycles, "warmup_cycles": args.warmup, "fresh_connection_every": 10,
        "tokens_per_cycle": args.soak_tokens + 2, "held_tensor_bytes_per_cycle": held_bytes,
        "soak_s": round(soak_s, 1), "cycle_ms_p50": _ms(pct(timings, 50)), "cycle_ms_p99": _ms(pct(timings, 99)),
        "baseline": {"resources": base_res, "stats": base_st},
        "end": {"resources": end_res, "stats": end_st},
        "rss_delta_mb": round(rss_delta_mb, 1), "rss_tolerance_mb": args.rss_tolerance_mb,
        "leak_if_every_cycle_leaked_mb": round(args.cycles * per_cycle_state / 2**20, 1),
        "rss_slope_kb_per_cycle": None if slope is None else round(slope * 1024, 2),
        "threads_delta": end_res["threads"] - base_res["threads"], "fds_delta": end_res["fds"] - base_res["fds"],
        "trend": trend, "checks": checks, "failures": failures[:20], "passed": all(checks.values()),
    }


def _slope(xs, ys):
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return None if den == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den


# -- main -----------------------------------------------------------------------------------------
def start_with_threads(device: str, threads: int | None, extra: list[str]):
    """common.start_server, with OMP_NUM_THREADS/MKL_NUM_THREADS set for the server process only."""
    from common import start_server

    if not threads:
        return start_server(device, *extra)
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    try:
        return start_server(device, *extra)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="server device (default cpu)")
    p.add_argument("--mode", choices=["both", "load", "soak"], default="both")
    p.add_argument("--short", action="store_true", help="CI: 20 clients for 5 s, 50 soak cycles (< 60 s)")
    p.add_argument("--clients", type=int, help="concurrent clients (default 200; short 20)")
    p.add_argument("--duration", type=float, help="load seconds (default 60; short 5)")
    p.add_argument("--procs", type=int, help="client processes the clients are spread over (default raw: "
                                             "max(2, cores); connection: max(4, 2 x cores))")
    p.add_argument("--client-kind", choices=["raw", "connection"], default="raw", dest="client_kind",
                   help="raw (default): each client a bare DEALER with its own client id, session and model, "
                        "C/K of them multiplexed by one thread in each of K processes; connection: each client "
                        "a djinn Connection on its own thread (C/K threads per process)")
    p.add_argument("--mix", default="1,1,1,1,1", help="weights of ping,stats,session,forward,fetch")
    p.add_argument("--call-timeout", type=float, default=60.0, dest="call_timeout",
                   help="a call with no reply for this long counts as an error")
    p.add_argument("--cycles", type=int, help="soak cycles (default 1000; short 50)")
    p.add_argument("--warmup", type=int, help="soak cycles before the baseline (default 50; short 10)")
    p.add_argument("--soak-tokens", type=int, default=4, dest="soak_tokens", help="tokens generated per cycle")
    p.add_argument("--soak-batch", type=int, default=8, dest="soak_batch",
                   help="batch of the forward whose logits each cycle holds (8 x 32 x 256 fp32 = 256 KiB)")
    p.add_argument("--rss-tolerance-mb", type=float, default=32.0, dest="rss_tolerance_mb")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server", help="address of a running server (default: start one)")
    p.add_argument("--server-threads", type=int, dest="server_threads",
                   help="OMP_NUM_THREADS for the server process; 0: leave it unset (torch uses every core). "
                        "Default 1 on a CPU server, whose cores the clients share: with one OpenMP worker per "
                        "core, a forward stalls at every parallel region whose worker a client process has "
                        "descheduled, and the load measures that collapse instead of the server "
                        "(docs/RELIABILITY.md); default 0 on a GPU server")
    p.add_argument("--server-arg", action="append", default=[], dest="server_args",
                   help="extra server_main flag (repeatable), e.g. --server-arg=--log-level=WARNING")
    p.add_argument("--out", help="JSON path (default results/load_soak_<device>[_short].json next to this script)")
    args = p.parse_args(argv)
    short = args.short
    args.clients = args.clients or (20 if short else 200)
    args.duration = args.duration or (5.0 if short else 60.0)
    if args.server_threads is None:
        args.server_threads = 1 if args.device == "cpu" else 0
    if args.server_threads == 0:
        args.server_threads = None
    cores = os.cpu_count() or 1
    args.procs = args.procs or min(args.clients, max(2, cores) if args.client_kind == "raw" else max(4, 2 * cores))
    args.cycles = args.cycles if args.cycles is not None else (50 if short else 1000)
    args.warmup = args.warmup if args.warmup is not None else (10 if short else 50)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from common import environment
    from djinn.frontend.connection import Connection

    device = torch.device(args.device)
    spec = model_spec(args.seed)
    t_start = time.monotonic()
    server = None if args.server else start_with_threads(str(device), args.server_threads, args.server_args)
    address = args.server or server.address
    results: dict = {"environment": environment(device), "args": vars(args), "address": address}
    ok = True
    try:
        probe = Connection(address, None)
        pid = server_pid(probe, server) if server else probe.info.get("pid")
        hold = probe.session("model-holder")
        remote_tiny(hold, spec)  # built once here and held throughout; every client's init_model finds it
        results["server_pid"] = pid
        results["server_at_start"] = proc_resources(pid)
        if args.mode in ("both", "load"):
            load = results["load"] = run_load(address, pid, args, spec, {hold.sid})
            print(f"load: {load['clients']} clients in {load['processes']} processes for {args.duration:.0f} s: "
                  f"{load['throughput_calls_per_s']:.0f} calls/s, errors {load['errors']}; server "
                  f"{load['server_cpu']['cores_used']} cores (busiest thread "
                  f"{load['server_cpu'].get('busiest_thread_utilization')}), clients "
                  f"{load['client_cpu']['cores_used']} cores")
            for k, v in load["per_op"].items():
                print(f"  {k:14s} {v['calls']:7d} calls  p50 {v['p50_ms']} ms  p99 {v['p99_ms']} ms")
            if load["errors"]:
                print(f"  errors: {load['error_counts']} {load['error_samples'][:3]}")
            ok &= load["passed"]
        if args.mode in ("both", "soak"):
            soak = results["soak"] = run_soak(address, pid, args, spec, {hold.sid})
            b, e = soak["baseline"]["resources"], soak["end"]["resources"]
            print(f"soak: {soak['cycles']} cycles in {soak['soak_s']} s (p50 {soak['cycle_ms_p50']} ms/cycle): "
                  f"RSS {b['rss_mb']} -> {e['rss_mb']} MB ({soak['rss_delta_mb']:+} MB, tolerance "
                  f"{args.rss_tolerance_mb}), threads {b['threads']} -> {e['threads']}, fds {b['fds']} -> {e['fds']}, "
                  f"segments {soak['end']['stats']['segments']}, sessions {soak['end']['stats']['sessions']}")
            failed = [k for k, v in soak["checks"].items() if not v]
            if failed:
                print(f"  FAILED checks: {failed}; {soak['failures'][:3]}")
            ok &= soak["passed"]
        hold.close()
        probe.close()
        results["server_alive"] = server.alive() if server else True
        ok &= results["server_alive"]
    except BaseException:
        results["exception"] = traceback.format_exc()
        print(results["exception"], file=sys.stderr)
        ok = False
    finally:
        if server is not None:
            results["server_log_tail"] = server.log_tail(20)
            server.stop()
    results["passed"] = bool(ok)
    results["total_s"] = round(time.monotonic() - t_start, 1)
    name = f"load_soak_{device.type}{'_short' if args.short else ''}.json"
    out = Path(args.out) if args.out else HERE / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"{'PASSED' if ok else 'FAILED'} in {results['total_s']} s; wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
