"""Experiment 1: agent density under semantic scheduling (signal vs lru vs recompute vs resident).

    python OSDI_Evaluation/exp1_semantic_scheduler/run_exp1.py [--device cuda:0] [--policies ...] [--agents ...]
    python OSDI_Evaluation/exp1_semantic_scheduler/run_exp1.py --tiny          # CPU, well under 60 s
    python OSDI_Evaluation/exp1_semantic_scheduler/run_exp1.py --merge a.json b.json [--name exp1_h100]

An agent workload generator run against a real server (a subprocess on loopback) under each KV
scheduling policy (DESIGN.md section 5). For each policy and each agent count N, a FRESH server starts
with that policy and the same --data-budget-gb / --host-pool-gb (--server-per policy, the --tiny
default, keeps one server per policy and takes each row's counters as differences), the model is
provisioned once (RemoteModel.from_config when the client has it: the server builds it with seeded
random weights; else RemoteModel.from_module of a locally built copy, uploaded once and deduplicated
for every other agent) and warmed up (one stateless generate of the full context; then one short
stateless generate per agent client, all at once, so the server has a warm worker thread per agent),
and N agent threads run, each its own client (Connection) with its own session:

    agent i arrives at a Poisson time (exponential gaps, --arrival-rate per second, seeded);
    turn 1 sends a random prompt of --context tokens, each later turn --tool-tokens new tokens (the tool
    result), each a greedy s.generate(..., max_new_tokens=min_new_tokens=--new-tokens) that continues
    the session's server-side KV cache; between turns the agent waits a tool time drawn uniformly from
    [--wait-min, --wait-max] inside `with s.io_wait(eta_s=wait)`; --turns turns, then it closes.

The workload (arrivals, prompts, tool tokens, waits) depends only on --seed and the agent's index, so
every policy sees the identical workload, and agent i is the same agent at every N. Turn latency is the
wall time of one generate call (queueing, swap-in and recompute included). A failure (any exception,
e.g. a turn that got no reply within --turn-timeout) is recorded, the agent closes its session and
stops; the run goes on.

Why a data budget (--data-budget-gb, default: --budget-agents x one agent's final KV): it makes GPU
memory for KV caches, not compute, the binding constraint, as on a GPU shared by many agents with long
contexts. At the Llama-2-13B shape one token of KV is 0.78 MiB (40 layers x 40 heads x 128 x 2 x fp16),
so a 2k-token agent holds ~1.7 GiB and the default budget (4 agents) is ~7 GiB: `resident` can hold 4
agents' contexts at once, the others must wait for one to finish or be swapped/dropped while they wait
on tools. The host pool (--host-pool-gb, 48) holds the swapped-out KV of every agent of the largest N.

Reported per (policy, N): P50/P99/mean turn latency (all turns; and first turns, which prefill the
context, vs later turns), turns, aggregate tokens/s, swaps out/in, GB moved, prefetch hits/misses/hit
rate, total and mean queue time, drops, recomputed tokens, failures and wall time, from the server's
stats() sampled before it stops; and, sampled during the run, the most sessions at once with their
KV on the host (SWAPPED, and the host tier: swapping out, swapped, prefetching) and on the GPU.
Headline: the SLO is P99 turn latency <= --slo-factor (2) x the single-agent P99 (N=1 under
`resident`, or the minimum over policies with --slo-base min or when resident is not run); for each
policy the largest N that meets it with zero failures (and every smaller N too); the ratio
signal/resident of those; P99 of recompute vs signal at signal's largest N.
Writes exp1_<card>.json (exp1_tiny.json with --tiny) with the environment (card, versions, commit) and
the exact arguments, and a PNG of P99 vs N per policy (skipped, with a note in the JSON, when
matplotlib does not import). Output: --out, else $OUT, else results/ next to this script.

Policy names: signal, lru, recompute, resident, and signal-always (signal with --swap-on-io-wait: every
IO_WAIT session is swapped out, not only while memory is wanted).

Time: on an H200 a server start takes ~15 s and from_config of the 13B shape ~9 s; one turn of one agent
~3 s (eager decode, ~90 ms a step). The sessions' decode steps interleave one at a time, unbatched, so
N agents busy at once make each turn ~N times slower. The full default grid (4 policies x 6 N, a
fresh server per row, 3 turns with 10-20 s waits; resident rows past what fits wait --turn-timeout, see
below) takes well over 30 minutes: where one job is limited (10 minutes), run one policy per job with
--server-per policy and --name exp1_<card>_<policy>, then --merge the files.

Failures under `resident` (and `lru`/`signal` when the host pool cannot take a victim): the scheduler
serves requests first come first served and queues every later request that needs memory behind the
first one waiting for it, so an agent that already holds KV and asks to grow it (its next turn) waits
behind a new agent's admission that only its own KV could make room for: nothing moves until the new
agent's turn times out (--turn-timeout) and it closes its session. Those turns are counted as failures.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "OSDI_Evaluation"))
sys.path.insert(0, str(ROOT))
from common import environment, start_server  # noqa: E402

from djinn.config import ClientConfig  # noqa: E402
from djinn.frontend.connection import Connection  # noqa: E402
from djinn.frontend.remote import RemoteModel  # noqa: E402

GIB = 1 << 30
ALIGN = 512  # the Data segment's granule (djinn/vmu/data.py): each cache tensor is rounded up to it
POLICY_FLAGS = {
    "signal": ["--policy", "signal"],
    "signal-always": ["--policy", "signal", "--swap-on-io-wait"],
    "lru": ["--policy", "lru"],
    "recompute": ["--policy", "recompute"],
    "resident": ["--policy", "resident"],
}
HOST_TIER = ("SWAPPING_OUT", "SWAPPED", "PREFETCHING")
GPU_TIER = ("ACTIVE", "IO_WAIT")

# Mode defaults; an explicit flag always wins.
FULL = dict(device="cuda:0", model="llama2-13b", dtype="float16", context=2048, new_tokens=32, tool_tokens=64,
            wait_min=10.0, wait_max=20.0, turns=3, agents="1,2,4,8,12,16", arrival_rate=0.5, budget_agents=4.0,
            host_pool_gb=48.0, turn_timeout=120.0, sample_s=0.25, server_per="row")
TINY = dict(device="cpu", model="tiny", dtype="float32", context=64, new_tokens=8, tool_tokens=16,
            wait_min=0.3, wait_max=0.6, turns=2, agents="1,2,4", arrival_rate=8.0, budget_agents=2.0,
            host_pool_gb=0.01, turn_timeout=5.0, sample_s=0.05, server_per="policy")


# -- arguments ------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU, a 2-layer toy Llama, small contexts (< 60 s)")
    p.add_argument("--device", help="server device (full: cuda:0; tiny: cpu)")
    p.add_argument("--model", choices=["llama2-13b", "llama2-7b", "tiny"],
                   help="model shape, random weights (full: llama2-13b; tiny: tiny)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], help="(full: float16; tiny: float32)")
    p.add_argument("--policies", default="signal,lru,recompute,resident",
                   help=f"comma list of {', '.join(POLICY_FLAGS)}")
    p.add_argument("--agents", help="comma list of agent counts N (1 is always added: the SLO base) "
                                    f"(full: {FULL['agents']}; tiny: {TINY['agents']})")
    p.add_argument("--context", type=int, help="prompt tokens of turn 1 (full: 2048; tiny: 64)")
    p.add_argument("--new-tokens", type=int, dest="new_tokens", help="tokens generated per turn (full: 32; tiny: 8)")
    p.add_argument("--tool-tokens", type=int, dest="tool_tokens",
                   help="new input tokens of each later turn, the tool's result (full: 64; tiny: 16)")
    p.add_argument("--turns", type=int, help="turns per agent (full: 3; tiny: 2)")
    p.add_argument("--wait-min", type=float, dest="wait_min", help="tool wait, uniform in [min, max] s (full: 10)")
    p.add_argument("--wait-max", type=float, dest="wait_max", help="(full: 20)")
    p.add_argument("--arrival-rate", type=float, dest="arrival_rate",
                   help="Poisson arrivals: agents per second (full: 0.5; tiny: 8)")
    p.add_argument("--data-budget-gb", type=float, dest="data_budget_gb",
                   help="server --data-budget-gb (GiB of GPU for sessions' KV); default: --budget-agents x one "
                        "agent's final KV; <= 0: no budget (the server uses what the device has free)")
    p.add_argument("--budget-agents", type=float, dest="budget_agents",
                   help="the default data budget holds this many agents' final KV (full: 4; tiny: 2)")
    p.add_argument("--host-pool-gb", type=float, dest="host_pool_gb", help="server --host-pool-gb (full: 48)")
    p.add_argument("--turn-timeout", type=float, dest="turn_timeout",
                   help="seconds a generate may take before it counts as a failure (full: 120; tiny: 5)")
    p.add_argument("--sample-s", type=float, dest="sample_s", help="stats() sampling period during a run")
    p.add_argument("--slo-factor", type=float, default=2.0, dest="slo_factor",
                   help="SLO: P99 turn latency <= this x the single-agent P99")
    p.add_argument("--slo-base", choices=["resident", "min"], default="resident", dest="slo_base",
                   help="single-agent P99 of the resident policy (default), or the minimum over policies")
    p.add_argument("--server-per", choices=["row", "policy"], dest="server_per",
                   help="a fresh server for every (policy, N) (full default), or one per policy whose rows run "
                        "one after another, counters taken as differences (tiny default: a CPU server start and "
                        "provisioning take ~4 s, 12 of them would not fit in a minute)")
    p.add_argument("--provision", choices=["auto", "config", "module"], default="auto",
                   help="RemoteModel.from_config (server-side random init), from_module (upload a local copy), "
                        "or auto: from_config when this client has it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-arg", action="append", default=[], dest="server_args",
                   help="extra server flag (repeatable), e.g. --server-arg=--prefetch-margin ...")
    p.add_argument("--out", help="output directory (default $OUT, else results/ next to this script)")
    p.add_argument("--name", help="base name of the JSON and PNG (default exp1_<card>, exp1_tiny with --tiny)")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="run nothing: combine the rows of these result files (e.g. one per policy, each run "
                        "within a job's time limit) into one, with the headline and plot over all of them")
    args = p.parse_args(argv)
    for k, v in (TINY if args.tiny else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.policy_list = [x.strip() for x in args.policies.split(",") if x.strip()]
    bad = [x for x in args.policy_list if x not in POLICY_FLAGS]
    if bad or not args.policy_list:
        p.error(f"unknown policies {bad}; choose from {list(POLICY_FLAGS)}")
    args.agent_list = sorted({1, *(int(x) for x in args.agents.split(",") if x.strip())})
    if args.agent_list[0] < 1 or args.turns < 1 or args.context < 1 or args.new_tokens < 1:
        p.error("agents, turns, context and new tokens must be >= 1")
    if args.turns > 1 and args.tool_tokens < 1:
        p.error("--tool-tokens must be >= 1 when there is more than one turn")
    if not 0 <= args.wait_min <= args.wait_max or not args.arrival_rate > 0:
        p.error("need 0 <= --wait-min <= --wait-max and --arrival-rate > 0")
    return args


# -- model ----------------------------------------------------------------------------------------
def model_config(name: str):
    from transformers import LlamaConfig

    if name == "tiny":  # tests/models.py's tiny Llama
        return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           bos_token_id=1, eos_token_id=2)
    if name == "llama2-7b":
        return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    return LlamaConfig(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096)


def kv_bytes(cfg, dtype: torch.dtype, tokens: int) -> int:
    """GPU bytes of a `tokens`-token KV cache as the server's Data segment counts them: per layer, keys
    and values each one tensor of kv_heads x tokens x head_dim, rounded up to 512 B."""
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    per_tensor = kv_heads * head_dim * tokens * torch.empty(0, dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * (-(-per_tensor // ALIGN) * ALIGN)


def final_tokens(args) -> int:
    """Tokens in one agent's session after its last turn."""
    return args.context + args.turns * args.new_tokens + (args.turns - 1) * args.tool_tokens


class Provisioner:
    """Gets every agent's connection the same server-side model: from_config when the client has it,
    else from_module of one local copy (uploaded to a fresh server once; other agents' has_weights finds
    every weight there and register_model answers the same model id)."""

    def __init__(self, cfg, dtype: torch.dtype, device: torch.device, seed: int, how: str = "auto"):
        self.cfg, self.dtype, self.seed = cfg, dtype, seed
        if how == "auto":
            how = "config" if hasattr(RemoteModel, "from_config") else "module"
        self.via = f"from_{how}"
        self.local = None
        self.hashes = None
        if self.via == "from_module":
            from transformers import AutoModelForCausalLM

            from djinn.frontend.upload import HashCache

            torch.manual_seed(seed)
            # Random init where it is fast (the GPU for big shapes), then kept on the CPU: it is only
            # uploaded, and must not take GPU memory from the server.
            with torch.device(device if device.type == "cuda" else "cpu"):
                model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
            self.local = model.to("cpu").eval()
            self.hashes = HashCache()  # one for all connections: every weight is hashed once

    def __call__(self, session) -> RemoteModel:
        if self.via == "from_config":
            return RemoteModel.from_config(session, self.cfg, seed=self.seed, dtype=self.dtype)
        session.conn.hashes = self.hashes
        return RemoteModel.from_module(session, self.local)


# -- workload ---------------------------------------------------------------------------------------
@dataclass
class AgentPlan:
    index: int
    arrival_s: float
    inputs: list          # per turn: [1, tokens] int64 (turn 1 the prompt, later the tool's result)
    waits: list           # tool wait after turn k (len turns - 1)


def workload(args, n: int, vocab: int) -> list[AgentPlan]:
    """Agent i's plan depends only on (seed, i): the same at every N and under every policy."""
    rng = random.Random(args.seed)
    arrivals = [0.0]
    for _ in range(n - 1):
        arrivals.append(arrivals[-1] + rng.expovariate(args.arrival_rate))
    plans = []
    for i in range(n):
        g = torch.Generator().manual_seed(args.seed * 100_003 + i)
        r = random.Random(args.seed * 100_003 + i)
        inputs = [torch.randint(3, vocab, (1, args.context if k == 0 else args.tool_tokens), generator=g)
                  for k in range(args.turns)]
        waits = [r.uniform(args.wait_min, args.wait_max) for _ in range(args.turns - 1)]
        plans.append(AgentPlan(i, arrivals[i], inputs, waits))
    return plans


@dataclass
class AgentResult:
    index: int
    arrival_s: float
    turns: list = field(default_factory=list)
    failure: dict | None = None
    server: dict | None = None
    done_s: float | None = None


def run_agent(plan: AgentPlan, conn: Connection, s, rm, args, t0_box: list, go: threading.Event,
              res: AgentResult) -> None:
    turn = -1
    try:
        go.wait()
        t0 = t0_box[0]
        delay = t0 + plan.arrival_s - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        seen = 0
        for turn, ids in enumerate(plan.inputs):
            t = time.perf_counter()
            out = s.generate(rm, ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                             do_sample=False, pad_token_id=0)
            lat = time.perf_counter() - t
            new = int(out.shape[1]) - seen - int(ids.shape[1])
            seen = int(out.shape[1])
            res.turns.append({"turn": turn, "start_s": round(t - t0, 4), "latency_s": lat,
                              "input_tokens": int(ids.shape[1]), "new_tokens": new, "kv_tokens": seen})
            if turn < len(plan.waits):
                w = plan.waits[turn]
                with s.io_wait(eta_s=w):
                    time.sleep(w)
        turn = -1
        res.server = _session_counters(conn, s.sid)
        s.close()
    except Exception as e:  # recorded, never raised: the run goes on
        res.failure = {"turn": turn, "at_s": round(time.perf_counter() - t0_box[0], 3) if t0_box else None,
                       "error": f"{type(e).__name__}: {e}"[:600]}
        try:
            if not s.closed:
                s.close()  # frees what it holds and unblocks the others
        except Exception:
            pass
    finally:
        res.done_s = time.perf_counter() - t0_box[0] if t0_box else None


def _fast_steps(conn: Connection) -> int:
    """Session-steps the server's decode fast path has run so far (all models)."""
    models = conn.stats()["models"].values()
    return sum(m.get("fast_decode", {}).get("rows_stepped", 0) for m in models)


def _session_counters(conn: Connection, sid: str) -> dict | None:
    keys = ("swaps_out", "swaps_in", "bytes_moved", "prefetch_hits", "prefetch_misses", "drops",
            "recomputed_tokens", "queue_s")
    try:
        st = conn.stats()["sessions"].get(sid)
    except Exception:
        return None
    return {k: st.get(k) for k in keys} if st else None


class Monitor(threading.Thread):
    """Samples stats() during a run: how many agents' KV is on the host and on the GPU at once."""

    def __init__(self, conn: Connection, exclude: set, period_s: float):
        super().__init__(name="exp1-monitor", daemon=True)
        self.conn, self.exclude, self.period = conn, exclude, period_s
        self.stop_evt = threading.Event()
        self.t0: float | None = None
        self.timeline: list = []
        self.max = {"swapped": 0, "host_tier": 0, "gpu_resident": 0, "with_kv": 0, "queued": 0, "data_bytes": 0,
                    "host_pool_used": 0}
        self.errors = 0

    def run(self) -> None:
        while not self.stop_evt.is_set():
            try:
                st = self.conn.stats()
            except Exception:
                self.errors += 1
                if self.stop_evt.wait(self.period):
                    return
                continue
            states = [v.get("state") for sid, v in st["sessions"].items() if sid not in self.exclude]
            sch = st["scheduler"]
            now = {"swapped": states.count("SWAPPED"), "host_tier": sum(x in HOST_TIER for x in states),
                   "gpu_resident": sum(x in GPU_TIER for x in states), "queued": sch.get("queued", 0),
                   "with_kv": sum(x in GPU_TIER or x in HOST_TIER for x in states),
                   "data_bytes": sch.get("data_bytes", 0), "host_pool_used": sch["host_pool"]["used"]}
            for k, v in now.items():
                self.max[k] = max(self.max[k], v)
            if self.t0 is not None and len(self.timeline) < 4000:
                self.timeline.append([round(time.perf_counter() - self.t0, 3), now["gpu_resident"], now["host_tier"],
                                      now["queued"], now["data_bytes"]])
            self.stop_evt.wait(self.period)


# -- one (policy, N) -----------------------------------------------------------------------------------
def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


def lat_summary(xs: list[float]) -> dict:
    r = lambda v: None if v is None else round(v, 4)  # noqa: E731
    return {"n": len(xs), "p50": r(pct(xs, 50)), "p99": r(pct(xs, 99)),
            "mean": r(statistics.fmean(xs)) if xs else None, "max": r(max(xs)) if xs else None}


COUNTERS = ("swaps_out", "swaps_in", "bytes_moved", "prefetch_hits", "prefetch_misses", "drops",
            "recomputed_tokens", "queue_s")


class ServerRun:
    """One server with one policy, a control client holding the model (so it stays provisioned), and a
    warm-up: one stateless generate of the full context (kernels for the prefill shape, lazy imports)."""

    def __init__(self, policy: str, args, provision: Provisioner, server_flags: list, vocab: int):
        t = time.perf_counter()
        self.policy = policy
        self.server = start_server(args.device, *POLICY_FLAGS[policy], *server_flags, *args.server_args)
        self.start_s = round(time.perf_counter() - t, 3)
        self.rows = 0
        try:
            self.ctrl = Connection(self.server.address, None)
            self.cs = self.ctrl.session("exp1-control")
            t = time.perf_counter()
            self.rm = provision(self.cs)
            self.provision_s = round(time.perf_counter() - t, 3)
            t = time.perf_counter()
            ids = torch.randint(3, vocab, (1, args.context), generator=torch.Generator().manual_seed(10**6))
            self.rm.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)
            self.warmup_s = round(time.perf_counter() - t, 3)
        except BaseException:
            self.close()
            raise

    def agent_sessions(self) -> list[str]:
        return [sid for sid in self.ctrl.stats()["sessions"] if sid != self.cs.sid]

    def close(self) -> None:
        try:
            if getattr(self, "ctrl", None) is not None:
                self.ctrl.close()
        finally:
            self.server.stop()


def _warm_agents(agents: list, short: torch.Tensor) -> None:
    """One short stateless generate per agent client, all at once (no KV is kept): the server has as
    many warm worker threads as agents and every client has made its first call before the clock starts."""
    def one(rm):
        rm.generate(short, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)

    threads = [threading.Thread(target=one, args=(rm,), daemon=True) for _, _, rm in agents]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def run_row(srv: ServerRun, n: int, args, cfg, provision: Provisioner) -> dict:
    """N agents against `srv`. Counters are the change in the server's totals over this row (the whole
    totals on a fresh server)."""
    plans = workload(args, n, cfg.vocab_size)
    t_row = time.perf_counter()
    conns: list[Connection] = []
    results = [AgentResult(p.index, p.arrival_s) for p in plans]
    row: dict = {"policy": srv.policy, "agents": n, "fresh_server": srv.rows == 0,
                 "server_start_s": srv.start_s if srv.rows == 0 else 0.0,
                 "provision_s": srv.provision_s if srv.rows == 0 else 0.0,
                 "warmup_s": srv.warmup_s if srv.rows == 0 else 0.0}
    srv.rows += 1
    try:
        deadline = time.monotonic() + 5
        left = srv.agent_sessions()
        while left and time.monotonic() < deadline:  # earlier rows' sessions (reused server) are gone
            time.sleep(0.05)
            left = srv.agent_sessions()
        row["leftover_sessions"] = len(left)
        before = srv.ctrl.stats()["scheduler"]
        fast_before = _fast_steps(srv.ctrl)
        ccfg = ClientConfig(call_timeout_s=args.turn_timeout)
        agents = []
        t = time.perf_counter()
        for p in plans:  # every client is set up before the clock starts; arrivals are what is timed
            c = Connection(srv.server.address, None, ccfg)
            conns.append(c)
            s = c.session(f"agent-{p.index}")
            rm = provision(s)
            if rm.model_id != srv.rm.model_id:
                raise RuntimeError(f"agent {p.index} got model {rm.model_id}, not the shared {srv.rm.model_id}")
            agents.append((c, s, rm))
        _warm_agents(agents, torch.randint(3, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(7)))
        row["setup_s"] = round(time.perf_counter() - t, 3)
        mon = Monitor(srv.ctrl, {srv.cs.sid}, args.sample_s)
        mon.start()
        go, t0_box = threading.Event(), []
        threads = [threading.Thread(target=run_agent, name=f"agent-{p.index}", daemon=True,
                                    args=(p, c, s, rm, args, t0_box, go, r))
                   for p, (c, s, rm), r in zip(plans, agents, results)]
        for th in threads:
            th.start()
        t0 = time.perf_counter()
        t0_box.append(t0)
        mon.t0 = t0
        go.set()
        limit = plans[-1].arrival_s + args.turns * (args.turn_timeout + args.wait_max) + 30
        for th in threads:
            th.join(max(0.0, t0 + limit - time.perf_counter()))
        wall = time.perf_counter() - t0
        for th, r in zip(threads, results):
            if th.is_alive() and r.failure is None:
                r.failure = {"turn": len(r.turns), "at_s": round(wall, 3), "error": "agent did not finish in time"}
        mon.stop_evt.set()
        mon.join(5)
        after = srv.ctrl.stats()["scheduler"]
        final = dict(after, **{k: after[k] - before[k] for k in COUNTERS})
        row.update(_row_numbers(results, final, mon, wall, args))
        row["fast_decode_rows_stepped"] = _fast_steps(srv.ctrl) - fast_before  # 0: every turn decoded eagerly
        row["server_alive"] = srv.server.alive()
        if row["failures"]:
            row["server_log_tail"] = srv.server.log_tail(20)
    except Exception as e:  # a row that could not run at all: recorded, the experiment goes on
        row.update({"error": f"{type(e).__name__}: {e}"[:1000], "failures": n, "server_log_tail": srv.server.log_tail(30)})
    finally:
        for c in conns:
            try:
                c.close()
            except Exception:
                pass
    row["row_s"] = round(time.perf_counter() - t_row, 2)
    row["workload"] = {"arrivals_s": [round(p.arrival_s, 3) for p in plans],
                       "waits_s": [[round(w, 3) for w in p.waits] for p in plans]}
    return row


def _row_numbers(results: list[AgentResult], final: dict, mon: Monitor, wall: float, args) -> dict:
    lats = [t["latency_s"] for r in results for t in r.turns]
    first = [t["latency_s"] for r in results for t in r.turns if t["turn"] == 0]
    later = [t["latency_s"] for r in results for t in r.turns if t["turn"] > 0]
    tokens = sum(t["new_tokens"] for r in results for t in r.turns)
    turns = len(lats)
    hits, misses = final.get("prefetch_hits", 0), final.get("prefetch_misses", 0)
    queue = final.get("queue_s", 0.0)
    fails = [dict(f.failure, agent=f.index) for f in results if f.failure]
    return {
        "latency_s": lat_summary(lats), "first_turn_latency_s": lat_summary(first),
        "later_turn_latency_s": lat_summary(later),
        "p50_s": lat_summary(lats)["p50"], "p99_s": lat_summary(lats)["p99"],
        "turns": turns, "turns_expected": len(results) * args.turns,
        "new_tokens": tokens, "tokens_per_s": round(tokens / wall, 3) if wall > 0 else None, "wall_s": round(wall, 3),
        "swaps_out": final.get("swaps_out"), "swaps_in": final.get("swaps_in"),
        "bytes_moved": final.get("bytes_moved"), "gb_moved": round(final.get("bytes_moved", 0) / 1e9, 4),
        "prefetch_hits": hits, "prefetch_misses": misses,
        "prefetch_hit_rate": round(hits / (hits + misses), 4) if hits + misses else None,
        "queue_s_total": round(queue, 4), "queue_s_mean_per_turn": round(queue / turns, 4) if turns else None,
        "drops": final.get("drops"), "recomputed_tokens": final.get("recomputed_tokens"),
        "failures": len(fails), "failure_list": fails,
        "data_budget_bytes": final.get("data_budget"), "host_pool_bytes": final.get("host_pool", {}).get("capacity"),
        "swap_bw_measured": final.get("swap_bw"),
        "max_swapped_sessions": mon.max["swapped"], "max_host_tier_sessions": mon.max["host_tier"],
        "max_gpu_resident_sessions": mon.max["gpu_resident"], "max_sessions_with_kv": mon.max["with_kv"],
        "max_queued": mon.max["queued"],
        "max_data_bytes": mon.max["data_bytes"], "max_host_pool_used": mon.max["host_pool_used"],
        "monitor_samples": len(mon.timeline), "monitor_errors": mon.errors,
        "timeline_cols": ["t_s", "gpu_resident", "host_tier", "queued", "data_bytes"], "timeline": mon.timeline,
        "agents_detail": [{"agent": r.index, "arrival_s": round(r.arrival_s, 3),
                           "latency_s": [round(t["latency_s"], 4) for t in r.turns],
                           "kv_tokens": r.turns[-1]["kv_tokens"] if r.turns else 0,
                           "server": r.server, "failed": r.failure is not None} for r in results],
    }


# -- headline -------------------------------------------------------------------------------------------
def headline(rows: list[dict], args) -> dict:
    by = {(r["policy"], r["agents"]): r for r in rows}
    ok_rows = lambda p: [r for r in rows if r["policy"] == p]  # noqa: E731
    base_policy, base = None, None
    res1 = by.get(("resident", 1))
    if args.slo_base == "resident" and res1 and not res1.get("failures") and res1.get("p99_s"):
        base_policy, base = "resident", res1["p99_s"]
    else:
        ones = [(r["p99_s"], r["policy"]) for r in rows if r["agents"] == 1 and not r.get("failures") and r.get("p99_s")]
        if ones:
            base, base_policy = min(ones)
            base_policy = f"min over policies ({base_policy})"
    slo = None if base is None else args.slo_factor * base
    single = {p: by[(p, 1)].get("p99_s") for p in args.policy_list if (p, 1) in by}
    max_n, ok_ns = {}, {}
    for p in args.policy_list:
        ok = []
        for r in sorted(ok_rows(p), key=lambda r: r["agents"]):
            r["within_slo"] = bool(slo is not None and not r.get("failures") and r.get("p99_s") is not None
                                   and r["p99_s"] <= slo)
            if r["within_slo"]:
                ok.append(r["agents"])
        ok_ns[p] = ok
        best = 0
        for n in args.agent_list:  # the largest N that meets the SLO with every smaller N meeting it too
            if n not in ok:
                break
            best = n
        max_n[p] = best
    out = {"slo_factor": args.slo_factor, "slo_base_policy": base_policy, "single_agent_p99_s": base,
           "slo_p99_s": None if slo is None else round(slo, 4), "single_agent_p99_by_policy_s": single,
           "max_agents_within_slo": max_n, "agents_within_slo": ok_ns,
           "note": "max_agents_within_slo: the largest N with P99 <= SLO and zero failures, every smaller N "
                   "meeting it too; agents_within_slo lists every N that met it"}
    out["density_ratio_signal_over_resident"] = (round(max_n["signal"] / max_n["resident"], 3)
                                                 if max_n.get("signal") is not None and max_n.get("resident") else None)
    out["recompute_vs_signal_at_signal_max"] = None
    n = max_n.get("signal")
    if n and ("recompute", n) in by and ("signal", n) in by:
        sp, rp = by[("signal", n)].get("p99_s"), by[("recompute", n)].get("p99_s")
        out["recompute_vs_signal_at_signal_max"] = {
            "agents": n, "signal_p99_s": sp, "recompute_p99_s": rp,
            "ratio": round(rp / sp, 3) if sp and rp else None,
            "recompute_failures": by[("recompute", n)].get("failures")}
    return out


# -- output ---------------------------------------------------------------------------------------------
def card(env: dict, tiny: bool) -> str:
    if tiny:
        return "tiny"
    gpu = str(env.get("gpu", "")).lower()
    if not gpu:
        return env.get("device", "cpu").split(":")[0]
    return "h200" if "h200" in gpu else "h100" if "h100" in gpu else "".join(c for c in gpu if c.isalnum())[:16]


def plot(results: dict, path: Path) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows, hl = results["rows"], results["headline"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for p in results["args"]["policy_list"]:
        rs = sorted((r for r in rows if r["policy"] == p and r.get("p99_s") is not None), key=lambda r: r["agents"])
        if not rs:
            continue
        xs = [r["agents"] for r in rs]
        line, = axes[0].plot(xs, [r["p99_s"] for r in rs], marker="o", label=p)
        bad = [(r["agents"], r["p99_s"]) for r in rs if r.get("failures")]
        if bad:
            axes[0].scatter(*zip(*bad), marker="x", s=80, color=line.get_color())
        axes[1].plot(xs, [r["tokens_per_s"] for r in rs], marker="o", label=p)
        axes[2].plot(xs, [r["max_sessions_with_kv"] for r in rs], marker="o", label=p)
    if hl.get("slo_p99_s"):
        axes[0].axhline(hl["slo_p99_s"], color="grey", ls="--", label=f"SLO ({hl['slo_factor']:g}x single agent)")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("P99 turn latency (s)")
    axes[0].set_title("P99 turn latency vs agents (x: had failures)")
    axes[1].set_ylabel("generated tokens/s (all agents)")
    axes[1].set_title("throughput")
    axes[2].set_ylabel("most sessions holding KV at once (GPU or host)")
    axes[2].set_title("density (sampled from stats())")
    for ax in axes:
        ax.set_xlabel("agents N")
        ax.set_xticks(results["args"]["agent_list"])
        ax.legend(fontsize=7)
    a = results["args"]
    fig.suptitle(f"exp1 on {results['environment'].get('gpu', results['environment']['device'])}: {a['model']} "
                 f"{a['dtype']}, context {a['context']}, {a['turns']} turns, waits {a['wait_min']:g}-{a['wait_max']:g} s, "
                 f"data budget {results['data_budget_gb']:.3g} GiB", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name  # next to the JSON: the results are read where they are copied to, not where they ran


def print_table(rows: list[dict]) -> None:
    head = (f"{'policy':<13}{'N':>3} {'p50 s':>8} {'p99 s':>8} {'tok/s':>8} {'out':>4} {'in':>4} {'GB':>8} "
            f"{'hit':>5} {'queue s':>8} {'drops':>5} {'recomp':>6} {'maxhost':>7} {'fail':>4} {'SLO':>4}")
    print(head, flush=True)
    for r in rows:
        f = lambda v, w, d=3: f"{'-':>{w}}" if v is None else f"{v:>{w}.{d}f}"  # noqa: E731
        print(f"{r['policy']:<13}{r['agents']:>3} {f(r.get('p50_s'), 8)} {f(r.get('p99_s'), 8)} "
              f"{f(r.get('tokens_per_s'), 8, 1)} {r.get('swaps_out', 0) or 0:>4} {r.get('swaps_in', 0) or 0:>4} "
              f"{f(r.get('gb_moved'), 8, 4)} {f(r.get('prefetch_hit_rate'), 5, 2)} {f(r.get('queue_s_total'), 8)} "
              f"{r.get('drops', 0) or 0:>5} {r.get('recomputed_tokens', 0) or 0:>6} "
              f"{r.get('max_swapped_sessions', 0):>7} {r.get('failures', 0):>4} "
              f"{'yes' if r.get('within_slo') else 'no':>4}", flush=True)


WORKLOAD_KEYS = ("model", "dtype", "context", "new_tokens", "tool_tokens", "turns", "wait_min", "wait_max",
                 "arrival_rate", "seed", "host_pool_gb", "data_budget_gb", "budget_agents")


def merge(args) -> int:
    """Combine result files: rows of later files replace the same (policy, N) of earlier ones."""
    files = [json.loads(Path(f).read_text()) for f in args.merge]
    base = files[0]
    rows: dict = {}
    mismatch = []
    for f, res in zip(args.merge, files):
        diff = {k: (base["args"].get(k), res["args"].get(k)) for k in WORKLOAD_KEYS
                if base["args"].get(k) != res["args"].get(k)}
        if diff or res["environment"].get("gpu") != base["environment"].get("gpu"):
            mismatch.append({"file": f, "differs": diff, "gpu": res["environment"].get("gpu")})
        for r in res["rows"]:
            rows[(r["policy"], r["agents"])] = r
    order = list(POLICY_FLAGS)
    policies = sorted({p for p, _ in rows}, key=order.index)
    agents = sorted({n for _, n in rows})
    merged_args = argparse.Namespace(**dict(base["args"], policy_list=policies, agent_list=agents,
                                            slo_factor=args.slo_factor, slo_base=args.slo_base))
    out = dict(base, args=vars(merged_args), argv=list(sys.argv[1:]),
               rows=sorted(rows.values(), key=lambda r: (order.index(r["policy"]), r["agents"])),
               merged_from=[{"file": f, "commit": r["environment"].get("commit"), "argv": r.get("argv"),
                             "gpu": r["environment"].get("gpu")} for f, r in zip(args.merge, files)],
               merge_mismatches=mismatch)
    out["headline"] = headline(out["rows"], merged_args)
    out_dir = Path(args.out or os.environ.get("OUT") or Path(__file__).parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{args.name or 'exp1_' + card(base['environment'], base.get('tiny', False))}.json"
    print_table(out["rows"])
    if mismatch:
        print(f"WARNING: the files differ in workload or card: {mismatch}", flush=True)
    fig = plot(out, path.with_suffix(".png"))
    out["plot"] = fig or "matplotlib not importable: no plot"
    path.write_text(json.dumps(out, indent=2, default=str))
    print(f"headline: {out['headline']}\nwrote {path}", flush=True)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.merge:
        return merge(args)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    cfg = model_config(args.model)
    out_dir = Path(args.out or os.environ.get("OUT") or Path(__file__).parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    per_agent = kv_bytes(cfg, dtype, final_tokens(args))
    if args.data_budget_gb is None:
        budget_gb = args.budget_agents * per_agent * 1.001 / GIB  # a hair over: float round-trip of the flag
    else:
        budget_gb = args.data_budget_gb
    server_flags = ["--host-pool-gb", repr(args.host_pool_gb)]
    if budget_gb > 0:
        server_flags += ["--data-budget-gb", repr(budget_gb)]
    t0 = time.perf_counter()
    env = environment(device)
    provision = Provisioner(cfg, dtype, device, args.seed, args.provision)
    name = args.name or f"exp1_{card(env, args.tiny)}"
    path = out_dir / f"{name}.json"
    results = {
        "experiment": "exp1_semantic_scheduler", "tiny": args.tiny, "environment": env,
        "argv": list(sys.argv[1:] if argv is None else argv), "args": vars(args),
        "model": {"shape": args.model, "dtype": args.dtype, "layers": cfg.num_hidden_layers,
                  "hidden": cfg.hidden_size, "heads": cfg.num_attention_heads,
                  "kv_heads": cfg.num_key_value_heads, "provisioned_via": provision.via, "weights": "random, seeded"},
        "kv_bytes_per_agent_final": per_agent, "final_tokens_per_agent": final_tokens(args),
        "data_budget_gb": budget_gb if budget_gb > 0 else None,
        "data_budget_agents": round(budget_gb * GIB / per_agent, 3) if budget_gb > 0 else None,
        "server_flags": server_flags + list(args.server_args),
        "rows": [],
    }
    print(f"exp1: {args.model} {args.dtype} on {device}, policies {args.policy_list}, N {args.agent_list}; "
          f"one agent's final KV {per_agent / 2**20:.3f} MiB ({final_tokens(args)} tokens), data budget "
          f"{budget_gb:.4g} GiB (~{results['data_budget_agents']} agents), host pool {args.host_pool_gb:g} GiB, "
          f"model via {provision.via}", flush=True)
    for policy in args.policy_list:
        srv = None
        for n in args.agent_list:
            if srv is None or args.server_per == "row":
                if srv is not None:
                    srv.close()
                try:
                    srv = ServerRun(policy, args, provision, server_flags, cfg.vocab_size)
                except Exception as e:  # recorded; the next row tries a fresh server
                    srv = None
                    row = {"policy": policy, "agents": n, "error": f"server/provision: {type(e).__name__}: {e}"[:1000],
                           "failures": n, "row_s": 0.0}
            if srv is not None:
                row = run_row(srv, n, args, cfg, provision)
            results["rows"].append(row)
            print(f"[{policy} N={n}] p50 {row.get('p50_s')} s, p99 {row.get('p99_s')} s, "
                  f"{row.get('tokens_per_s')} tok/s, swaps {row.get('swaps_out')}/{row.get('swaps_in')}, "
                  f"drops {row.get('drops')}, hit rate {row.get('prefetch_hit_rate')}, queue {row.get('queue_s_total')} s, "
                  f"max swapped {row.get('max_swapped_sessions')}, failures {row.get('failures')} "
                  f"({row['row_s']} s)" + (f" ERROR {row['error']}" if row.get("error") else ""), flush=True)
            results["headline"] = headline(results["rows"], args)
            results["wall_s"] = round(time.perf_counter() - t0, 2)
            path.write_text(json.dumps(results, indent=2, default=str))  # after each row: a crash keeps it
        if srv is not None:
            srv.close()
    results["headline"] = headline(results["rows"], args)
    print_table(results["rows"])
    hl = results["headline"]
    print(f"SLO: P99 <= {hl['slo_p99_s']} s ({args.slo_factor:g} x {hl['slo_base_policy']} single-agent P99 "
          f"{hl['single_agent_p99_s']}); largest N within it: {hl['max_agents_within_slo']}; "
          f"signal/resident {hl.get('density_ratio_signal_over_resident')}; "
          f"recompute vs signal {hl.get('recompute_vs_signal_at_signal_max')}", flush=True)
    fig = plot(results, path.with_suffix(".png"))
    results["plot"] = fig or "matplotlib not importable: no plot"
    results["wall_s"] = round(time.perf_counter() - t0, 2)
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {path}" + (f" and {fig}" if fig else " (matplotlib not importable: no plot)"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
