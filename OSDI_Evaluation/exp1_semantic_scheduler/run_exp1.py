"""Experiment 1: agent density under semantic scheduling (signal vs lru vs recompute vs resident).

    python OSDI_Evaluation/exp1_semantic_scheduler/run_exp1.py [--device cuda:0] [--policies ...] [--agents ...]
    python OSDI_Evaluation/exp1_semantic_scheduler/run_exp1.py --tiny          # CPU, well under 60 s
    python OSDI_Evaluation/exp1_semantic_scheduler/run_exp1.py --estimate [GPU_GIB]   # the plan and its time
    python OSDI_Evaluation/exp1_semantic_scheduler/run_exp1.py --merge a.json b.json [--name exp1_h100]

An agent workload generator run against a real server (a subprocess on loopback) under each KV
scheduling policy (DESIGN.md section 5). For each policy one server starts with that policy (and the
same --host-pool-gb, and --data-budget-gb only when given); its rows (agent counts N) run one after
another and each row's counters are the change in the server's totals over the row (--server-per row:
a fresh server for every (policy, N)). The model is provisioned once per server (RemoteModel.from_config
when the client has it: the server builds it with seeded random weights; else RemoteModel.from_module
of a locally built copy, uploaded once and deduplicated for every other agent) and warmed up (one
stateless generate of the full context, which also makes the server size the model's KV pool; then, per
row, one short stateless generate per agent client, all at once, so the server has a warm worker thread
per agent), and N agent threads run, each its own client (Connection) with its own session:

    agent i arrives at a Poisson time (exponential gaps, --arrival-rate per second, seeded);
    turn 1 sends a prompt of --context tokens (with --shared-prefix-tokens K, the same K tokens for every
    agent, a common system prompt, then its own context-K random tokens), each later turn --tool-tokens
    new tokens (the tool result), each a greedy s.generate(..., max_new_tokens=min_new_tokens=--new-tokens)
    that continues the session's server-side KV cache; between turns the agent waits a tool time drawn
    uniformly from [--wait-min, --wait-max] inside `with s.io_wait(eta_s=wait)`; --turns turns, then it
    closes.

The workload (arrivals, prompts, tool tokens, waits) depends only on --seed and the agent's index, so
every policy sees the identical workload, and agent i is the same agent at every N. Turn latency is the
wall time of one generate call (queueing, swap-in and recompute included). A failure (any exception,
e.g. a turn that got no reply within --turn-timeout) is recorded, the agent closes its session and
stops; the run goes on. A row with any failed turn is a FAILED row: "failed": true in its JSON with the
count and the first errors, marked in the table and the plot, and never within the SLO.

GPU memory is the VMU's (DESIGN.md section 3): when the model first needs KV the server measures a
Stack reserve (a profile forward of the server's --max-prefill-tokens tokens, 4096, plus the batched
decode step's workspace) and gives the rest of the device to a pool of fixed-size KV blocks
(--kv-block-tokens tokens each, 16). No artificial budget by default: at the Llama-2-13B shape (fp16, 24 GiB of weights) one
token of KV is 0.78 MiB (40 layers x 40 heads x 128 x 2 x fp16), an agent's final 2272 tokens are 142
blocks of 16 (1.8 GiB), and an H100 80GB's pool holds about 27 agents, so from N=32 on the agents'
contexts no longer fit at once: `resident` makes the others wait for an agent to finish, the others
swap or drop agents that wait on tools. The host pool (--host-pool-gb, 64) holds about 36 agents'
swapped KV. --data-budget-gb caps the pool (a smaller device). --tiny sets a pool of 16 blocks
(--budget-agents 2.7; a tiny agent's final 96 tokens are 6 blocks, 5 after its first turn): two agents
fit with more than the 10% the signal policy keeps free, four do not, and three agents' first-turn KV
leaves a block for one of them to grow into (see Failures).

Reported per (policy, N): P50/P99/mean turn latency (all turns; and first turns, which prefill the
context, vs later turns), turns, aggregate tokens/s, swaps out/in, GB moved, prefetch hits/misses/hit
rate and failures (a prefetch that found too few free blocks), total and mean queue time, drops,
recomputed tokens, failed turns with their errors and wall time, from the server's stats() before and
after the row; and, sampled during the run (--sample-s), what the VMU did: the most sessions at once
with their KV on the host (SWAPPED, and the host tier: swapping out, swapped, prefetching) and on the
GPU, the most KV blocks held and the fewest free, the most host blocks used, shared blocks, prefix-cache
hits, and kv_bytes_per_agent: the pool's held block bytes per session holding blocks, averaged over the
samples (a shared-prefix run holds the common prefix once, so it compares with an unshared run here).
Once per server: its start, provisioning and warm-up times and the KV pool's plan (blocks, pool bytes,
Stack reserve, profile peak, decode rows) with how many agents' final KV the pool and the host pool hold.
Headline: the SLO is P99 turn latency <= --slo-factor (2) x the single-agent P99 (N=1 under
`resident`, or the minimum over policies with --slo-base min or when resident is not run); for each
policy the largest N that meets it with zero failures (and every smaller N too, none skipped); the ratio
signal/resident of those; P99 of recompute vs signal at signal's largest N.
Writes exp1_<card>.json (exp1_tiny.json with --tiny) after every row, with the environment (card,
versions, commit) and the exact arguments, and a PNG of P99 vs N and failed turns vs N per policy
(skipped, with a note in the JSON, when matplotlib does not import). Output: --out, else $OUT, else
results/ next to this script.

Policy names: signal, lru, recompute, resident, and signal-always (signal with --swap-on-io-wait: every
IO_WAIT session is swapped out, not only while memory is wanted).

Time: the script prints the expected wall time before it starts (--estimate prints it and runs
nothing). A row takes N x ~0.1 s of client setup, then lasts until its last agent is done: each lives
its tool waits plus its turns from when it gets memory, and where a policy cannot hold N agents' KV at
once (resident: the GPU pool; lru, signal: the GPU and host pools) the others wait first come first
served for the earliest to finish, or fail after --turn-timeout (`last_done`). A server's start,
provisioning and warm-up take ~45 s on an H100. The estimate starts from those priors (PRIORS) and
learns from each server and row it runs. The full default grid (4 policies x 7 N, 10-20 s waits) takes
about 37 minutes on an H100 80GB (--estimate 79.2). Where a job is limited (10 minutes), run two
policies per job on a smaller grid with --time-budget-s and --name exp1_<card>_<policies>, then --merge
the files, e.g. (about 8 minutes each):

    run_exp1.py --policies resident,signal --agents 16,48,96 --wait-min 5 --wait-max 10 \
        --time-budget-s 500 --name exp1_h100_resident_signal
    run_exp1.py --policies lru,recompute --agents 16,48,96 --wait-min 5 --wait-max 10 \
        --time-budget-s 500 --name exp1_h100_lru_recompute
    run_exp1.py --merge results/exp1_h100_resident_signal.json results/exp1_h100_lru_recompute.json \
        --out results --name exp1_h100

With --time-budget-s each policy gets a share of the time left in proportion to its rows' expected time
(what one leaves goes to the next); a row that would likely not finish within its policy's share is
skipped: recorded in the JSON as "skipped" with its estimate, listed in the headline, never silently
dropped. A row still running when the budget ends is cut: its unfinished agents count as failed turns
("cut_by_time_budget"), so the job's own limit never kills the script before it has written its JSON.

Failures: an agent whose KV does not fit waits for memory first come first served (sessions already
holding KV go first, Note [Running sessions go first] in djinn/scheduler/policies/base.py); a turn that
waits longer than --turn-timeout fails, and the agent closes its session. Under `resident` (and
`lru`/`signal` once the host pool is full too) that happens beyond what fits, and also sooner: an agent
is admitted when its first turn fits, not its later ones, so a pool full of agents that each need a
few blocks more for their next turn moves only when one of them times out and closes.
"""
from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import random
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
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
BLOCK_TOKENS = 16      # the server's default --kv-block-tokens
POOL_MAX_TOKENS = 1 << 20  # the server's kv_pool_max_tokens: caps a pool whatever the device has
CPU_POOL_BYTES = 2 * GIB   # the server's CPU pool when no --data-budget-gb is given
POLICY_FLAGS = {
    "signal": ["--policy", "signal"],
    "signal-always": ["--policy", "signal", "--swap-on-io-wait"],
    "lru": ["--policy", "lru"],
    "recompute": ["--policy", "recompute"],
    "resident": ["--policy", "resident"],
}
HOST_TIER = ("SWAPPING_OUT", "SWAPPED", "PREFETCHING")
GPU_TIER = ("ACTIVE", "IO_WAIT")
FIRST_ERRORS = 5  # error messages kept per failed row (all of them stay in failure_list)

# Mode defaults; an explicit flag always wins.
FULL = dict(device="cuda:0", model="llama2-13b", dtype="float16", context=2048, new_tokens=32, tool_tokens=64,
            wait_min=10.0, wait_max=20.0, turns=3, agents="16,32,48,64,80,96", arrival_rate=4.0,
            budget_agents=None, host_pool_gb=64.0, turn_timeout=300.0, sample_s=0.25, server_per="policy",
            prestart=False)
TINY = dict(device="cpu", model="tiny", dtype="float32", context=64, new_tokens=8, tool_tokens=16,
            wait_min=0.3, wait_max=0.6, turns=2, agents="1,2,4", arrival_rate=8.0, budget_agents=2.7,
            host_pool_gb=0.01, turn_timeout=10.0, sample_s=0.05, server_per="policy", prestart=True)
# What the time estimate assumes until the run has measured it: a server's start, provisioning and
# warm-up (H100: 25-45 s measured), a turn, client setup per agent, a row's fixed cost, a server's stop.
PRIORS = {"full": dict(server_s=45.0, turn_s=1.5, setup_per_agent_s=0.1, row_extra_s=5.0, stop_s=5.0),
          "tiny": dict(server_s=7.0, turn_s=0.3, setup_per_agent_s=0.03, row_extra_s=0.5, stop_s=1.5)}
STACK_PRIOR_GIB = 6.5  # CUDA context + measured Stack reserve at the default flags (H100, 13B), until measured
END_S = 5.0            # the table, plot and JSON at the end


def agent_kv_tokens(args) -> int:
    """The most tokens an agent's KV holds: its context, every turn's new tokens and every tool result."""
    return args.context + args.turns * args.new_tokens + (args.turns - 1) * args.tool_tokens


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
    p.add_argument("--shared-prefix-tokens", type=int, default=0, dest="shared_prefix_tokens",
                   help="the first K prompt tokens are the same for every agent (a common system prompt, "
                        "seeded); the other context-K are the agent's own (default 0: none shared)")
    p.add_argument("--no-declare-kv", action="store_false", dest="declare_kv",
                   help="do not open agent sessions with max_kv_tokens (their whole context: context + turns x "
                        "new + (turns - 1) x tool tokens); undeclared, the resident policy can admit more agents "
                        "than can grow and jam until turns time out")
    p.add_argument("--new-tokens", type=int, dest="new_tokens", help="tokens generated per turn (full: 32; tiny: 8)")
    p.add_argument("--tool-tokens", type=int, dest="tool_tokens",
                   help="new input tokens of each later turn, the tool's result (full: 64; tiny: 16)")
    p.add_argument("--turns", type=int, help="turns per agent (full: 3; tiny: 2)")
    p.add_argument("--wait-min", type=float, dest="wait_min", help="tool wait, uniform in [min, max] s (full: 10)")
    p.add_argument("--wait-max", type=float, dest="wait_max", help="(full: 20)")
    p.add_argument("--arrival-rate", type=float, dest="arrival_rate",
                   help="Poisson arrivals: agents per second (full: 4, so 96 agents arrive in ~24 s; tiny: 8)")
    p.add_argument("--data-budget-gb", type=float, dest="data_budget_gb",
                   help="server --data-budget-gb, passed only when given: a cap in GiB on the model's KV pool "
                        "(default: the VMU sizes it from the device)")
    p.add_argument("--budget-agents", type=float, dest="budget_agents",
                   help="instead of --data-budget-gb: a pool of this many agents' final KV in whole blocks "
                        "(full: none; tiny: 2.7, 16 blocks: see the docstring; <= 0: none)")
    p.add_argument("--kv-block-tokens", type=int, dest="kv_block_tokens",
                   help=f"server --kv-block-tokens, passed only when given (the server's default: {BLOCK_TOKENS})")
    p.add_argument("--host-pool-gb", type=float, dest="host_pool_gb", help="server --host-pool-gb (full: 64)")
    p.add_argument("--turn-timeout", type=float, dest="turn_timeout",
                   help="seconds a generate may take before it counts as a failure (full: 300, so that overload "
                        "shows as queue time, not as failed turns; tiny: 10)")
    p.add_argument("--sample-s", type=float, dest="sample_s", help="stats() sampling period during a run")
    p.add_argument("--slo-factor", type=float, default=2.0, dest="slo_factor",
                   help="SLO: P99 turn latency <= this x the single-agent P99")
    p.add_argument("--slo-base", choices=["resident", "min"], default="resident", dest="slo_base",
                   help="single-agent P99 of the resident policy (default), or the minimum over policies")
    p.add_argument("--shared-base", action="store_true", dest="shared_base",
                   help="N=1 only under the SLO base's policy (resident): a lone agent meets no memory pressure, "
                        "so the other policies' N=1 rows would repeat it; saves ~100 s per policy on an H100")
    p.add_argument("--server-per", choices=["row", "policy"], dest="server_per",
                   help="one server per policy whose rows run one after another, counters taken as "
                        "differences (default), or a fresh server for every (policy, N): cleaner, but a "
                        "server start, provisioning and warm-up take ~45 s on an H100")
    p.add_argument("--prestart", action=argparse.BooleanOptionalAction,
                   help="start the next policy's server while this policy's rows run, and stop servers in the "
                        "background (tiny default: a CPU server's start and provisioning take ~6 s; never on a "
                        "GPU, where each server sizes its KV pool from the memory it finds free)")
    p.add_argument("--time-budget-s", type=float, dest="time_budget_s",
                   help="seconds this run may take from its start (leave the job's setup and the interpreter's "
                        "start out of it): rows that would likely not finish within their policy's share are "
                        "skipped and recorded as skipped (default: no limit)")
    p.add_argument("--estimate", nargs="?", const="card", metavar="GPU_GIB",
                   help="run nothing: print the plan and its expected time, for the card found or one of "
                        "GPU_GIB GiB (e.g. 79.2 for an H100 80GB)")
    p.add_argument("--provision", choices=["auto", "config", "module"], default="auto",
                   help="RemoteModel.from_config (server-side random init), from_module (upload a local copy), "
                        "or auto: from_config when this client has it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpus", help="serve on several GPUs, a worker each (server --gpus, e.g. 0,1); with --tiny, "
                                  "a number of CPU workers (server --workers)")
    p.add_argument("--server-arg", action="append", default=[], dest="server_args",
                   help="extra server flag (repeatable), e.g. --server-arg=--fast-decode-max-batch=32")
    p.add_argument("--out", help="output directory (default $OUT, else results/ next to this script)")
    p.add_argument("--name", help="base name of the JSON and PNG (default exp1_<card>, exp1_tiny with --tiny)")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="run nothing: combine the rows of these result files (e.g. two policies per job, each "
                        "run within a job's time limit) into one, with the headline and plot over all of them")
    args = p.parse_args(argv)
    if args.data_budget_gb is not None and args.budget_agents is not None:
        p.error("--data-budget-gb and --budget-agents both size the pool: give one")
    if args.data_budget_gb is not None:
        args.budget_agents = 0.0  # the flag given wins over the mode's default
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
    if not 0 <= args.shared_prefix_tokens <= args.context:
        p.error("need 0 <= --shared-prefix-tokens <= --context")
    if args.prestart and (args.server_per != "policy" or not args.device.startswith("cpu")):
        p.error("--prestart needs --server-per policy and a CPU server")
    if args.gpus:  # Note [One server, several workers] in djinn/server/cluster/front.py
        args.server_args = [*args.server_args, *(["--workers", args.gpus] if args.device.startswith("cpu")
                                                else ["--gpus", args.gpus])]
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


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def token_bytes(cfg, dtype: torch.dtype) -> int:
    """KV bytes of one token as the server's pool lays it out (djinn/vmu/kv_pool.py): every layer,
    keys and values."""
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return cfg.num_hidden_layers * 2 * kv_heads * _head_dim(cfg) * torch.empty(0, dtype=dtype).element_size()


def weight_bytes(cfg, dtype: torch.dtype) -> int:
    """A Llama's parameter bytes (untied embeddings, as these configs have): for the time estimate's
    guess of the KV pool before a server has sized it."""
    h, kv = cfg.hidden_size, (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads) * _head_dim(cfg)
    layer = 2 * h * h + 2 * h * kv + 3 * h * cfg.intermediate_size + 2 * h
    params = 2 * cfg.vocab_size * h + cfg.num_hidden_layers * layer + h
    return params * torch.empty(0, dtype=dtype).element_size()


def final_tokens(args) -> int:
    """Tokens in one agent's session after its last turn."""
    return args.context + args.turns * args.new_tokens + (args.turns - 1) * args.tool_tokens


@dataclass
class KVSize:
    """One agent's KV in the server's units: whole blocks of block_tokens tokens."""

    block_tokens: int
    block_bytes: int
    agent_blocks: int  # one agent's final KV (its last turn reserves this many)

    @classmethod
    def of(cls, args, cfg, dtype: torch.dtype) -> "KVSize":
        bt = args.kv_block_tokens or BLOCK_TOKENS
        return cls(bt, bt * token_bytes(cfg, dtype), -(-final_tokens(args) // bt))

    @property
    def agent_bytes(self) -> int:
        return self.agent_blocks * self.block_bytes


def data_budget_gb(args, size: KVSize) -> float | None:
    """The --data-budget-gb passed to the server, if any: the flag's, or --budget-agents agents' final
    KV in whole blocks plus half a block (the GiB float's round trip must not lose the last block)."""
    if args.data_budget_gb is not None:
        return args.data_budget_gb
    if args.budget_agents and args.budget_agents > 0:
        return (math.floor(args.budget_agents * size.agent_blocks) + 0.5) * size.block_bytes / GIB
    return None


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


def arrivals(args, n: int) -> list[float]:
    """Poisson arrival times of agents 0..n-1: agent i's is the same at every N."""
    rng = random.Random(args.seed)
    out = [0.0]
    for _ in range(n - 1):
        out.append(out[-1] + rng.expovariate(args.arrival_rate))
    return out


def tool_waits(args, i: int) -> list[float]:
    """Agent i's tool wait after each turn but the last."""
    r = random.Random(args.seed * 100_003 + i)
    return [r.uniform(args.wait_min, args.wait_max) for _ in range(args.turns - 1)]


def workload(args, n: int, vocab: int) -> list[AgentPlan]:
    """Agent i's plan depends only on (seed, i): the same at every N and under every policy. The shared
    prefix depends only on the seed (its own stream, so K=0 leaves every agent's tokens as they were)."""
    k = args.shared_prefix_tokens
    prefix = torch.randint(3, vocab, (1, k), generator=torch.Generator().manual_seed(10**9 + args.seed))
    plans = []
    for i, t0 in enumerate(arrivals(args, n)):
        g = torch.Generator().manual_seed(args.seed * 100_003 + i)
        inputs = [torch.randint(3, vocab, (1, args.context - k if t == 0 else args.tool_tokens), generator=g)
                  for t in range(args.turns)]
        inputs[0] = torch.cat([prefix, inputs[0]], dim=1)
        plans.append(AgentPlan(i, t0, inputs, tool_waits(args, i)))
    return plans


# -- time ---------------------------------------------------------------------------------------------
@dataclass
class Fit:
    """How many agents' final KV the GPU pool and the host pool hold at once."""

    gpu: int
    host: int
    source: str  # "guess" until a server has sized its pool, then "server"

    def limit(self, policy: str) -> float:
        """Agents a policy holds before one must wait for memory."""
        if policy == "recompute":
            return math.inf  # it drops a waiting agent's KV instead
        return self.gpu if policy == "resident" else self.gpu + self.host


def guess_fit(args, cfg, dtype: torch.dtype, size: KVSize, gpu_gib: float | None) -> Fit:
    """The pool the server will likely size (djinn/server/execution/kv_pools.py), before one has: the card's
    memory less the weights and a typical Stack reserve, or on the CPU the budget or 2 GiB."""
    budget = data_budget_gb(args, size)
    if gpu_gib is None:
        pool = budget * GIB if budget is not None else CPU_POOL_BYTES
    else:
        pool = gpu_gib * GIB - weight_bytes(cfg, dtype) - STACK_PRIOR_GIB * GIB
        if budget is not None:
            pool = min(pool, budget * GIB)
    pool = min(pool, POOL_MAX_TOKENS * token_bytes(cfg, dtype))
    blocks = max(0, int(pool)) // size.block_bytes
    host = int(args.host_pool_gb * GIB) // size.block_bytes
    return Fit(blocks // size.agent_blocks, host // size.agent_blocks, "guess")


class Clock:
    """Expected seconds of what is left to run: PRIORS, replaced by what this run measures."""

    def __init__(self, args, fit: Fit):
        self.args, self.fit = args, fit
        self.p = dict(PRIORS["tiny" if args.tiny else "full"])
        self.turn_at: dict[int, float] = {}  # measured median turn latency per N (any policy so far)

    def row_s(self, policy: str, n: int) -> float:
        """Client setup, then until the last agent is done (`last_done`)."""
        turn = self.turn_at.get(n, self.p["turn_s"])
        return (self.p["setup_per_agent_s"] * n + self.p["row_extra_s"]
                + last_done(self.args, n, self.fit.limit(policy), turn))

    def learn_server(self, srv: "ServerRun") -> None:
        self.p["server_s"] = srv.start_s + srv.provision_s + srv.warmup_s
        if srv.fit is not None:
            self.fit = srv.fit

    def learn_row(self, row: dict) -> None:
        lat = row.get("later_turn_latency_s") or {}
        # Later turns: a first turn's wait for memory is last_done's to model, not a turn's length.
        p50 = lat.get("p50") or (row.get("first_turn_latency_s") or {}).get("p50")
        if p50:
            self.turn_at[row["agents"]] = self.p["turn_s"] = min(p50, self.args.turn_timeout)
        if row.get("setup_s") and row.get("wall_s"):
            self.p["setup_per_agent_s"] = row["setup_s"] / row["agents"]
            self.p["row_extra_s"] = max(0.0, row["row_s"] - row["wall_s"] - row["setup_s"])


def last_done(args, n: int, limit: float, turn_s: float) -> float:
    """When the last of N agents is done if at most `limit` of them hold KV at once: each lives its tool
    waits plus its turns from when it gets memory; first come first served, an agent that does not fit
    waits for the earliest to finish, and one that would wait past --turn-timeout fails then and holds
    nothing."""
    holding: list[float] = []  # when the agents holding memory are done (a heap)
    last = 0.0
    for i, t in enumerate(arrivals(args, n)):
        life = sum(tool_waits(args, i)) + args.turns * turn_s
        start = t
        if len(holding) >= max(1, limit):
            if holding[0] - t > args.turn_timeout:
                last = max(last, t + args.turn_timeout)
                continue
            start = max(t, heapq.heappop(holding))
        heapq.heappush(holding, start + life)
        last = max(last, start + life)
    return last


def policy_end(args, clock: "Clock", now_s: float, policies: list[str]) -> float | None:
    """Seconds since the start by which the first of `policies` should be done: its share of what the
    time budget has left, in proportion to the expected time of each policy's rows (so every row runs
    when all are expected to fit, and each policy loses its largest rows alike when not), or None."""
    if not args.time_budget_s:
        return None
    need = [policy_need_s(args, clock, p) for p in policies]
    return now_s + max(0.0, args.time_budget_s - END_S - now_s) * need[0] / sum(need)


def agents_for(args, policy: str) -> list[int]:
    """The N a policy runs: all of them, or with --shared-base no N=1 but under the SLO base's policy."""
    if getattr(args, "shared_base", False) and args.slo_base == "resident" and "resident" in args.policy_list \
            and policy != "resident":
        return [n for n in args.agent_list if n != 1]
    return list(args.agent_list)


def policy_need_s(args, clock: "Clock", policy: str) -> float:
    """Expected seconds of all of a policy's rows with its server's start and stop."""
    rows = [row_need_s(args, clock, policy, n, fresh=True) for n in agents_for(args, policy)]
    if args.server_per == "row":
        return sum(rows)
    return sum(rows) - (len(rows) - 1) * (clock.p["stop_s"] + (0.0 if args.prestart else clock.p["server_s"]))


def row_need_s(args, clock: Clock, policy: str, n: int, fresh: bool) -> float:
    """A row's expected seconds, with its server's start (a fresh one) and stop."""
    server = clock.p["server_s"] if fresh and not args.prestart else 0.0
    return clock.row_s(policy, n) + server + clock.p["stop_s"]


def expected_plan(args, clock: Clock, start_s: float = 0.0) -> tuple[list[dict], float]:
    """The rows `main` will run or skip, each with its expected seconds (the same rule main applies,
    with today's estimates), and the expected wall time of the whole run."""
    t = start_s + (clock.p["server_s"] if args.prestart else 0.0)  # the first; the others start during rows
    plan = []
    for i, policy in enumerate(args.policy_list):
        end = policy_end(args, clock, t, args.policy_list[i:])
        fresh = True
        for n in agents_for(args, policy):
            fresh = fresh or args.server_per == "row"
            need = row_need_s(args, clock, policy, n, fresh)
            run = end is None or t + need <= end
            plan.append({"policy": policy, "agents": n, "expected_s": round(need, 1), "runs": run})
            if run:
                t += need - (clock.p["stop_s"] if args.server_per == "policy" else 0.0)
                fresh = False
        if not fresh and args.server_per == "policy":
            t += clock.p["stop_s"]
    return plan, t + END_S


def print_plan(plan: list[dict], total_s: float, fit: Fit, args) -> None:
    by = {}
    for r in plan:
        skip = "" if r["runs"] else " SKIP"
        by.setdefault(r["policy"], []).append(f"N={r['agents']} {r['expected_s']:.0f}s{skip}")
    print(f"expected: {total_s:.0f} s ({total_s / 60:.1f} min) in all; the pool holds ~{fit.gpu} agents' final "
          f"KV, the host pool ~{fit.host} ({fit.source}); past that agents wait for memory or fail after "
          f"{args.turn_timeout:g} s" + (f"; time budget {args.time_budget_s:g} s" if args.time_budget_s else ""),
          flush=True)
    for p, rs in by.items():
        print(f"  {p}: {', '.join(rs)}", flush=True)


# -- agents -------------------------------------------------------------------------------------------
@dataclass
class AgentResult:
    index: int
    arrival_s: float
    turns: list = field(default_factory=list)
    failure: dict | None = None
    server: dict | None = None
    done_s: float | None = None


def error_text(e: BaseException) -> str:
    """Type and first line: what the table and the row's first_errors show."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


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
                       "error": error_text(e), "detail": f"{type(e).__name__}: {e}"[:600]}
        try:
            if not s.closed:
                s.close()  # frees what it holds and unblocks the others
        except Exception:
            pass
    finally:
        res.done_s = time.perf_counter() - t0_box[0] if t0_box else None


FAST_KEYS = ("rows_stepped", "steps", "step_s", "mixed_steps", "mixed_s", "mixed_tokens", "prefill_s", "prefill_tokens")


def _fast_steps(conn: Connection) -> dict:
    """The server's decode fast path so far, all models: session-steps, steps, and where its time went
    (host seconds of decode steps, the mixed forwards among them, and batched prefills, each up to its
    tokens' read)."""
    models = conn.stats()["models"].values()
    return {k: sum(m.get("fast_decode", {}).get(k, 0) for m in models) for k in FAST_KEYS}


def _session_counters(conn: Connection, sid: str) -> dict | None:
    keys = ("swaps_out", "swaps_in", "bytes_moved", "prefetch_hits", "prefetch_misses", "prefetch_failures",
            "drops", "recomputed_tokens", "queue_s", "kv_blocks", "kv_shared_blocks")
    try:
        st = conn.stats()["sessions"].get(sid)
    except Exception:
        return None
    return {k: st.get(k) for k in keys} if st else None


def kv_model(st: dict, mid: str) -> dict:
    """stats()["kv"]["models"][mid]: the model's KV pool in blocks (empty before the pool exists)."""
    return (st.get("kv") or {}).get("models", {}).get(mid) or {}


class Monitor(threading.Thread):
    """Samples stats() during a run: how many agents' KV is on the host and on the GPU at once, and
    the model's KV blocks (held, free, cached, host, shared)."""

    def __init__(self, conn: Connection, exclude: set, period_s: float, model_id: str):
        super().__init__(name="exp1-monitor", daemon=True)
        self.conn, self.exclude, self.period, self.mid = conn, exclude, period_s, model_id
        self.stop_evt = threading.Event()
        self.t0: float | None = None
        self.timeline: list = []
        self.max = {"swapped": 0, "host_tier": 0, "gpu_resident": 0, "with_kv": 0, "queued": 0, "data_bytes": 0,
                    "host_pool_used": 0, "blocks_held": 0, "blocks_cached": 0, "host_blocks_used": 0,
                    "shared_blocks": 0}
        self.min_blocks_free: int | None = None
        self.per_agent: list[float] = []  # held block bytes per session holding blocks, one per sample
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
            self.sample(st)
            self.stop_evt.wait(self.period)

    def sample(self, st: dict) -> None:
        agents = [v for sid, v in st["sessions"].items() if sid not in self.exclude]
        states = [v.get("state") for v in agents]
        sch, kv = st["scheduler"], kv_model(st, self.mid)
        holders = sum(1 for v in agents if v.get("kv_blocks"))
        now = {"swapped": states.count("SWAPPED"), "host_tier": sum(x in HOST_TIER for x in states),
               "gpu_resident": sum(x in GPU_TIER for x in states), "queued": sch.get("queued", 0),
               "with_kv": sum(x in GPU_TIER or x in HOST_TIER for x in states),
               "data_bytes": sch.get("data_bytes", 0), "host_pool_used": sch["host_pool"]["used"],
               "blocks_held": kv.get("blocks_held", 0), "blocks_cached": kv.get("blocks_cached", 0),
               "host_blocks_used": kv.get("host_blocks_used", 0),
               "shared_blocks": sum(v.get("kv_shared_blocks") or 0 for v in agents)}
        for k, v in now.items():
            self.max[k] = max(self.max[k], v)
        if "blocks_free" in kv:
            self.min_blocks_free = min(self.min_blocks_free if self.min_blocks_free is not None else kv["blocks_free"],
                                       kv["blocks_free"])
        if holders and kv.get("block_bytes"):  # the pool's held blocks are unique: a shared one counts once
            self.per_agent.append(now["blocks_held"] * kv["block_bytes"] / holders)
        if self.t0 is not None and len(self.timeline) < 4000:
            self.timeline.append([round(time.perf_counter() - self.t0, 3), now["gpu_resident"], now["host_tier"],
                                  now["queued"], now["data_bytes"], now["blocks_held"], now["host_blocks_used"]])


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


COUNTERS = ("swaps_out", "swaps_in", "bytes_moved", "prefetch_hits", "prefetch_misses", "prefetch_failures",
            "drops", "recomputed_tokens", "queue_s")
KV_COUNTERS = ("prefix_hits", "evictions", "cow_copies")


class ServerRun:
    """One server with one policy, a control client holding the model (so it stays provisioned), and a
    warm-up: one stateless generate of the full context (kernels for the prefill shape, lazy imports, and
    the model's KV pool, which the server sizes at the first use of KV). Then the pool's plan is read."""

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
            self.record, self.fit = self._pool(final_tokens(args))
        except BaseException:
            self.close()
            raise

    def _pool(self, tokens: int) -> tuple[dict, Fit | None]:
        """What the VMU gave the model: the pool's plan, its blocks and the host pool's, and how many
        agents' final KV (`tokens` each, whole blocks) each holds."""
        st = self.ctrl.stats()
        kv = kv_model(st, self.rm.model_id)
        rec = {"policy": self.policy, "start_s": self.start_s, "provision_s": self.provision_s,
               "warmup_s": self.warmup_s, "model_id": self.rm.model_id,
               "kv_pool": st["models"].get(self.rm.model_id, {}).get("kv_pool"),
               **{k: kv.get(k) for k in ("block_tokens", "block_bytes", "blocks_total", "host_blocks_total")}}
        fit = None
        if kv.get("block_tokens") and kv.get("blocks_total") is not None:
            per = -(-tokens // kv["block_tokens"])
            fit = Fit(kv["blocks_total"] // per, kv.get("host_blocks_total", 0) // per, "server")
            rec.update(agent_blocks=per, agents_fit_gpu=fit.gpu, agents_fit_host=fit.host)
        return rec, fit

    def describe(self) -> str:
        r, plan = self.record, self.record.get("kv_pool") or {}
        mib = (r.get("block_bytes") or 0) / 2**20
        return (f"server {self.policy}: up in {self.start_s:.1f} s, provisioned {self.provision_s:.1f} s, warm-up "
                f"{self.warmup_s:.1f} s; KV pool {r.get('blocks_total')} blocks x {r.get('block_tokens')} tokens "
                f"({mib:.3g} MiB each, {plan.get('pool_bytes', 0) / GIB:.3g} GiB), Stack reserve "
                f"{plan.get('stack_reserve', 0) / GIB:.3g} GiB (profile peak {plan.get('profile_peak', 0) / GIB:.3g} "
                f"GiB), {plan.get('decode_rows')} decode rows; holds {r.get('agents_fit_gpu')} agents' final KV, "
                f"the host pool {r.get('agents_fit_host')}")

    def agent_sessions(self) -> list[str]:
        return [sid for sid in self.ctrl.stats()["sessions"] if sid != self.cs.sid]

    def close(self) -> None:
        try:
            if getattr(self, "ctrl", None) is not None:
                self.ctrl.close()
        finally:
            self.server.stop()


class Servers:
    """Where each policy's server comes from, and where it goes. With --prestart (CPU only) the next
    policy's server starts in the background while this policy's rows run, and a finished server stops
    in the background: a CPU server's start and provisioning take ~6 s, which the agents' tool waits
    leave room for. On a GPU a server must be gone before the next one sizes its KV pool."""

    def __init__(self, args, provision: Provisioner, server_flags: list, vocab: int):
        self.make = lambda p: ServerRun(p, args, provision, server_flags, vocab)  # noqa: E731
        self.order = list(args.policy_list)
        self.ahead: dict = {}
        self.bg = ThreadPoolExecutor(2, thread_name_prefix="exp1-servers") if args.prestart else None

    def get(self, policy: str) -> ServerRun:
        f = self.ahead.pop(policy, None)
        srv = f.result() if f is not None else self.make(policy)
        i = self.order.index(policy)
        if self.bg is not None and i + 1 < len(self.order) and self.order[i + 1] not in self.ahead:
            self.ahead[self.order[i + 1]] = self.bg.submit(self.make, self.order[i + 1])
        return srv

    def retire(self, srv: ServerRun) -> None:
        if self.bg is not None:
            self.bg.submit(srv.close)
        else:
            srv.close()

    def close(self) -> None:
        """Stop a prestarted server no row used (its policy's rows were skipped); wait for every stop."""
        for f in self.ahead.values():
            try:
                f.result().close()
            except Exception:
                pass
        self.ahead.clear()
        if self.bg is not None:
            self.bg.shutdown(wait=True)


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


def run_row(srv: ServerRun, n: int, args, cfg, provision: Provisioner, cut_s: float | None = None) -> dict:
    """N agents against `srv`. Counters are the change in the server's totals over this row (the whole
    totals on a fresh server). `cut_s`: the time budget's end, seconds from now; agents still running
    then are recorded as failed ("cut") and the row ends, so that a job's hard limit never kills it
    before it has written what it measured."""
    plans = workload(args, n, cfg.vocab_size)
    t_row = time.perf_counter()
    cut_at = math.inf if cut_s is None else t_row + cut_s
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
        before = srv.ctrl.stats()
        fast_before = _fast_steps(srv.ctrl)
        ccfg = ClientConfig(call_timeout_s=args.turn_timeout)
        agents = []
        t = time.perf_counter()
        for p in plans:  # every client is set up before the clock starts; arrivals are what is timed
            c = Connection(srv.server.address, None, ccfg)
            conns.append(c)
            s = c.session(f"agent-{p.index}", max_kv_tokens=agent_kv_tokens(args) if args.declare_kv else None)
            rm = provision(s)
            if rm.model_id != srv.rm.model_id:
                raise RuntimeError(f"agent {p.index} got model {rm.model_id}, not the shared {srv.rm.model_id}")
            agents.append((c, s, rm))
        _warm_agents(agents, torch.randint(3, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(7)))
        row["setup_s"] = round(time.perf_counter() - t, 3)
        mon = Monitor(srv.ctrl, {srv.cs.sid}, args.sample_s, srv.rm.model_id)
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
        end = min(t0 + limit, cut_at)
        for th in threads:
            th.join(max(0.0, end - time.perf_counter()))
        wall = time.perf_counter() - t0
        row["cut_by_time_budget"] = any(th.is_alive() for th in threads) and cut_at < t0 + limit
        for th, r in zip(threads, results):
            if th.is_alive() and r.failure is None:
                msg = (f"TimeoutError: cut at the end of --time-budget-s, {wall:.0f} s into the row"
                       if row["cut_by_time_budget"] else f"TimeoutError: agent did not finish within {limit:.0f} s")
                r.failure = {"turn": len(r.turns), "at_s": round(wall, 3), "error": msg, "detail": msg}
        mon.stop_evt.set()
        mon.join(5)
        after = srv.ctrl.stats()
        row.update(_row_numbers(results, _deltas(before, after, srv.rm.model_id), mon, wall, args))
        fast_after = _fast_steps(srv.ctrl)
        fast = {k: round(fast_after[k] - fast_before[k], 4) for k in FAST_KEYS}
        row["fast_decode_rows_stepped"] = fast["rows_stepped"]  # 0: every turn decoded eagerly
        busy = fast["step_s"] + fast["prefill_s"]  # step_s holds the mixed forwards' mixed_s
        plain = fast["steps"] - fast["mixed_steps"]
        row["fast_decode"] = {**fast, "busy_s": round(busy, 3), "busy_fraction": round(busy / wall, 4) if wall else None,
                              "ms_per_step": round(1e3 * (fast["step_s"] - fast["mixed_s"]) / plain, 3) if plain else None,
                              "ms_per_mixed": round(1e3 * fast["mixed_s"] / fast["mixed_steps"], 3)
                              if fast["mixed_steps"] else None,
                              "prefill_tokens_per_s": round(fast["prefill_tokens"] / fast["prefill_s"])
                              if fast["prefill_s"] else None}
        row["server_alive"] = srv.server.alive()
        if row["failed"]:
            row["server_log_tail"] = srv.server.log_tail(20)
    except Exception as e:  # a row that could not run at all: recorded, the experiment goes on
        row.update({"error": f"{type(e).__name__}: {e}"[:1000], "failed": True, "failures": n,
                    "first_errors": [{"error": error_text(e), "count": 1}],
                    "server_log_tail": srv.server.log_tail(30)})
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


def _deltas(before: dict, after: dict, mid: str) -> dict:
    """The scheduler's totals after the row with its counters (and the pool's) as changes over it."""
    b, a = before["scheduler"], after["scheduler"]
    kb, ka = kv_model(before, mid), kv_model(after, mid)
    return dict(a, **{k: a.get(k, 0) - b.get(k, 0) for k in COUNTERS},
                kv_end=ka, kv_counters={k: ka.get(k, 0) - kb.get(k, 0) for k in KV_COUNTERS})


def first_errors(fails: list[dict]) -> list[dict]:
    """The first few distinct errors in time order, each with how many failed turns gave it."""
    out: dict[str, int] = {}
    for f in sorted(fails, key=lambda f: f.get("at_s") or 0.0):
        out[f["error"]] = out.get(f["error"], 0) + 1
    return [{"error": e, "count": c} for e, c in list(out.items())[:FIRST_ERRORS]]


def _row_numbers(results: list[AgentResult], final: dict, mon: Monitor, wall: float, args) -> dict:
    lats = [t["latency_s"] for r in results for t in r.turns]
    first = [t["latency_s"] for r in results for t in r.turns if t["turn"] == 0]
    later = [t["latency_s"] for r in results for t in r.turns if t["turn"] > 0]
    tokens = sum(t["new_tokens"] for r in results for t in r.turns)
    turns = len(lats)
    hits, misses = final.get("prefetch_hits", 0), final.get("prefetch_misses", 0)
    queue = final.get("queue_s", 0.0)
    fails = [dict(f.failure, agent=f.index) for f in results if f.failure]
    kv_end = final["kv_end"]
    return {
        "failed": bool(fails), "failures": len(fails), "first_errors": first_errors(fails),
        "latency_s": lat_summary(lats), "first_turn_latency_s": lat_summary(first),
        "later_turn_latency_s": lat_summary(later),
        "p50_s": lat_summary(lats)["p50"], "p99_s": lat_summary(lats)["p99"],
        "turns": turns, "turns_expected": len(results) * args.turns,
        "new_tokens": tokens, "tokens_per_s": round(tokens / wall, 3) if wall > 0 else None, "wall_s": round(wall, 3),
        "swaps_out": final.get("swaps_out"), "swaps_in": final.get("swaps_in"),
        "bytes_moved": final.get("bytes_moved"), "gb_moved": round(final.get("bytes_moved", 0) / 1e9, 4),
        "prefetch_hits": hits, "prefetch_misses": misses, "prefetch_failures": final.get("prefetch_failures", 0),
        "prefetch_hit_rate": round(hits / (hits + misses), 4) if hits + misses else None,
        "queue_s_total": round(queue, 4), "queue_s_mean_per_turn": round(queue / turns, 4) if turns else None,
        "drops": final.get("drops"), "recomputed_tokens": final.get("recomputed_tokens"),
        "failure_list": fails,
        "data_budget_bytes": final.get("data_budget"), "host_pool_bytes": final.get("host_pool", {}).get("capacity"),
        "swap_bw_measured": final.get("swap_bw"),
        "max_swapped_sessions": mon.max["swapped"], "max_host_tier_sessions": mon.max["host_tier"],
        "max_gpu_resident_sessions": mon.max["gpu_resident"], "max_sessions_with_kv": mon.max["with_kv"],
        "max_queued": mon.max["queued"],
        "max_data_bytes": mon.max["data_bytes"], "max_host_pool_used": mon.max["host_pool_used"],
        "kv": {"blocks_total": kv_end.get("blocks_total"), "block_bytes": kv_end.get("block_bytes"),
               "host_blocks_total": kv_end.get("host_blocks_total"),
               "max_blocks_held": mon.max["blocks_held"], "min_blocks_free": mon.min_blocks_free,
               "max_blocks_cached": mon.max["blocks_cached"], "max_host_blocks_used": mon.max["host_blocks_used"],
               "max_shared_blocks": mon.max["shared_blocks"], **final["kv_counters"],
               "end": {k: kv_end.get(k) for k in ("blocks_free", "blocks_held", "blocks_cached", "host_blocks_used")}},
        "kv_bytes_per_agent": round(statistics.fmean(mon.per_agent)) if mon.per_agent else None,
        "monitor_samples": len(mon.timeline), "monitor_errors": mon.errors,
        "timeline_cols": ["t_s", "gpu_resident", "host_tier", "queued", "data_bytes", "blocks_held",
                          "host_blocks_used"], "timeline": mon.timeline,
        "agents_detail": [{"agent": r.index, "arrival_s": round(r.arrival_s, 3),
                           "latency_s": [round(t["latency_s"], 4) for t in r.turns],
                           "kv_tokens": r.turns[-1]["kv_tokens"] if r.turns else 0,
                           "server": r.server, "failed": r.failure is not None} for r in results],
    }


def skipped_row(policy: str, n: int, need_s: float, left_s: float) -> dict:
    return {"policy": policy, "agents": n, "skipped": True, "expected_s": round(need_s, 1),
            "reason": f"expected {need_s:.0f} s, {max(0.0, left_s):.0f} s left of this policy's share of "
                      f"--time-budget-s", "row_s": 0.0}


# -- headline -------------------------------------------------------------------------------------------
def is_failed(r: dict) -> bool:
    """A row with any failed turn, or one that could not run (rows of older files have no "failed")."""
    return bool(r.get("failed") or r.get("failures") or r.get("error"))


def headline(rows: list[dict], args) -> dict:
    by = {(r["policy"], r["agents"]): r for r in rows}
    base_policy, base = None, None
    res1 = by.get(("resident", 1))
    if args.slo_base == "resident" and res1 and not is_failed(res1) and res1.get("p99_s"):
        base_policy, base = "resident", res1["p99_s"]
    else:
        ones = [(r["p99_s"], r["policy"]) for r in rows if r["agents"] == 1 and not is_failed(r) and r.get("p99_s")]
        if ones:
            base, base_policy = min(ones)
            base_policy = f"min over policies ({base_policy})"
    slo = None if base is None else args.slo_factor * base
    single = {p: by[(p, 1)].get("p99_s") for p in args.policy_list if (p, 1) in by}
    max_n, ok_ns, failed, skipped = {}, {}, {}, {}
    for p in args.policy_list:
        mine = sorted((r for r in rows if r["policy"] == p), key=lambda r: r["agents"])
        for r in mine:  # a failed or skipped row is never within the SLO, whatever its P99
            r["within_slo"] = bool(slo is not None and not is_failed(r) and not r.get("skipped")
                                   and r.get("p99_s") is not None and r["p99_s"] <= slo)
        ok_ns[p] = [r["agents"] for r in mine if r["within_slo"]]
        failed[p] = [r["agents"] for r in mine if is_failed(r)]
        skipped[p] = [r["agents"] for r in mine if r.get("skipped")]
        best = 0
        for n in agents_for(args, p):  # the largest N that meets the SLO with every smaller N meeting it too
            if n not in ok_ns[p]:
                break
            best = n
        max_n[p] = best
    out = {"slo_factor": args.slo_factor, "slo_base_policy": base_policy, "single_agent_p99_s": base,
           "slo_p99_s": None if slo is None else round(slo, 4), "single_agent_p99_by_policy_s": single,
           "max_agents_within_slo": max_n, "agents_within_slo": ok_ns, "failed_rows": failed, "skipped_rows": skipped,
           "note": "max_agents_within_slo: the largest N with P99 <= SLO and zero failed turns, every smaller N "
                   "meeting it too (a skipped N stops it); agents_within_slo lists every N that met it"}
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
    """Two panels: P99 turn latency vs N per policy (x: a failed row), and failed turns vs N."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows, hl = results["rows"], results["headline"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for p in results["args"]["policy_list"]:
        ran = sorted((r for r in rows if r["policy"] == p and not r.get("skipped")), key=lambda r: r["agents"])
        timed = [r for r in ran if r.get("p99_s") is not None]
        if timed:
            line, = axes[0].plot([r["agents"] for r in timed], [r["p99_s"] for r in timed], marker="o", label=p)
            bad = [(r["agents"], r["p99_s"]) for r in timed if is_failed(r)]
            if bad:
                axes[0].scatter(*zip(*bad), marker="x", s=90, color=line.get_color())
        if ran:
            axes[1].plot([r["agents"] for r in ran], [r.get("failures") or 0 for r in ran], marker="o", label=p)
    if hl.get("slo_p99_s"):
        axes[0].axhline(hl["slo_p99_s"], color="grey", ls="--", label=f"SLO ({hl['slo_factor']:g}x single agent)")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("P99 turn latency (s)")
    axes[0].set_title("P99 turn latency vs agents (x: a row with failed turns)")
    axes[1].set_ylabel("failed turns")
    axes[1].yaxis.get_major_locator().set_params(integer=True)
    axes[1].set_title("failed turns vs agents (timeouts, errors)")
    for ax in axes:
        ax.set_xlabel("agents N")
        ax.set_xticks(results["args"]["agent_list"])
        ax.legend(fontsize=7)
    a = results["args"]
    budget = results.get("data_budget_gb")
    fig.suptitle(f"exp1 on {results['environment'].get('gpu', results['environment']['device'])}: {a['model']} "
                 f"{a['dtype']}, context {a['context']} ({a.get('shared_prefix_tokens') or 0} shared), {a['turns']} "
                 f"turns, waits {a['wait_min']:g}-{a['wait_max']:g} s, "
                 + (f"KV pool capped at {budget:.3g} GiB" if budget else "KV pool sized by the VMU"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name  # next to the JSON: the results are read where they are copied to, not where they ran


def status(r: dict) -> str:
    if r.get("skipped"):
        return "SKIPPED"
    if r.get("error"):
        return "ERROR"
    return "FAILED" if is_failed(r) else ""


def print_table(rows: list[dict]) -> None:
    head = (f"{'policy':<13}{'N':>3} {'p50 s':>8} {'p99 s':>8} {'tok/s':>8} {'out':>4} {'in':>4} {'GB':>8} "
            f"{'hit':>5} {'pfail':>5} {'queue s':>8} {'drops':>5} {'recomp':>6} {'gpu':>4} {'host':>4} "
            f"{'blk held':>9} {'KV/agent':>9} {'fail':>4} {'SLO':>4}")
    print(head, flush=True)
    for r in rows:
        f = lambda v, w, d=3: f"{'-':>{w}}" if v is None else f"{v:>{w}.{d}f}"  # noqa: E731
        kv = r.get("kv") or {}
        held = f"{kv.get('max_blocks_held', '-')}/{kv.get('blocks_total', '-')}" if kv else "-"
        per = r.get("kv_bytes_per_agent")
        print(f"{r['policy']:<13}{r['agents']:>3} {f(r.get('p50_s'), 8)} {f(r.get('p99_s'), 8)} "
              f"{f(r.get('tokens_per_s'), 8, 1)} {r.get('swaps_out', 0) or 0:>4} {r.get('swaps_in', 0) or 0:>4} "
              f"{f(r.get('gb_moved'), 8, 4)} {f(r.get('prefetch_hit_rate'), 5, 2)} "
              f"{r.get('prefetch_failures') or 0:>5} "
              f"{f(r.get('queue_s_total'), 8)} {r.get('drops', 0) or 0:>5} {r.get('recomputed_tokens', 0) or 0:>6} "
              f"{r.get('max_gpu_resident_sessions', 0) or 0:>4} {r.get('max_host_tier_sessions', 0) or 0:>4} "
              f"{held:>9} {f(None if per is None else per / 2**20, 9, 2)} {r.get('failures', 0) or 0:>4} "
              f"{'yes' if r.get('within_slo') else 'no':>4} {status(r)}", flush=True)
    print("gpu/host: most sessions at once with KV on the GPU / in the host tier; blk held: most KV blocks "
          "held / the pool's blocks; KV/agent: MiB of held blocks per session holding some (mean over samples)",
          flush=True)
    for r in rows:
        fd = r.get("fast_decode")
        if fd and fd.get("busy_s"):
            print(f"  {r['policy']} N={r['agents']}: fast path busy {100 * (fd['busy_fraction'] or 0):.0f}% of the row; "
                  f"{fd['steps'] - fd['mixed_steps']} decode steps at {fd['ms_per_step']} ms, {fd['mixed_steps']} mixed "
                  f"at {fd['ms_per_mixed']} ms ({fd['mixed_tokens']} prompt tokens), batched prefills "
                  f"{fd['prefill_tokens']} tokens in {fd['prefill_s']:.2f} s", flush=True)


def print_row(row: dict) -> None:
    if row.get("skipped"):
        print(f"[{row['policy']} N={row['agents']}] SKIPPED: {row['reason']}", flush=True)
        return
    kv = row.get("kv") or {}
    per = row.get("kv_bytes_per_agent")
    print(f"[{row['policy']} N={row['agents']}] p50 {row.get('p50_s')} s, p99 {row.get('p99_s')} s, "
          f"{row.get('tokens_per_s')} tok/s, swaps {row.get('swaps_out')}/{row.get('swaps_in')}, "
          f"drops {row.get('drops')}, hit rate {row.get('prefetch_hit_rate')}, prefetch failures "
          f"{row.get('prefetch_failures')}, queue {row.get('queue_s_total')} s, most on GPU/host "
          f"{row.get('max_gpu_resident_sessions')}/{row.get('max_host_tier_sessions')}, blocks held at most "
          f"{kv.get('max_blocks_held')}/{kv.get('blocks_total')}, host blocks at most {kv.get('max_host_blocks_used')}"
          f"/{kv.get('host_blocks_total')}, KV/agent {None if per is None else round(per / 2**20, 3)} MiB, "
          f"failed turns {row.get('failures')} ({row['row_s']} s)", flush=True)
    if row.get("failed"):
        errs = "; ".join(f"{e['count']}x {e['error']}" for e in row.get("first_errors", []))
        print(f"  FAILED ROW: {row.get('failures')} failed turns: {errs}", flush=True)


WORKLOAD_KEYS = ("model", "dtype", "context", "shared_prefix_tokens", "new_tokens", "tool_tokens", "turns",
                 "wait_min", "wait_max", "arrival_rate", "seed", "host_pool_gb", "data_budget_gb", "budget_agents",
                 "kv_block_tokens", "turn_timeout")


def merge(args) -> int:
    """Combine result files (e.g. one per job): a row of a later file replaces the same (policy, N) of an
    earlier one, except that a skipped row never replaces one that ran."""
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
            key = (r["policy"], r["agents"])
            if not (r.get("skipped") and key in rows and not rows[key].get("skipped")):
                rows[key] = r
    order = list(POLICY_FLAGS)
    policies = sorted({p for p, _ in rows}, key=order.index)
    agents = sorted({n for _, n in rows})
    merged_args = argparse.Namespace(**dict(base["args"], policy_list=policies, agent_list=agents,
                                            slo_factor=args.slo_factor, slo_base=args.slo_base))
    out = dict(base, args=vars(merged_args), argv=list(sys.argv[1:]),
               rows=sorted(rows.values(), key=lambda r: (order.index(r["policy"]), r["agents"])),
               servers=[dict(s, file=f) for f, res in zip(args.merge, files) for s in res.get("servers", [])],
               merged_from=[{"file": f, "commit": r["environment"].get("commit"), "argv": r.get("argv"),
                             "gpu": r["environment"].get("gpu"), "wall_s": r.get("wall_s")}
                            for f, r in zip(args.merge, files)],
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
    print_headline(out["headline"], merged_args)
    print(f"wrote {path}", flush=True)
    return 0


def print_headline(hl: dict, args) -> None:
    print(f"SLO: P99 <= {hl['slo_p99_s']} s ({args.slo_factor:g} x {hl['slo_base_policy']} single-agent P99 "
          f"{hl['single_agent_p99_s']}); largest N within it (no failed turns): {hl['max_agents_within_slo']}; "
          f"signal/resident {hl.get('density_ratio_signal_over_resident')}; "
          f"recompute vs signal {hl.get('recompute_vs_signal_at_signal_max')}", flush=True)
    bad = {p: ns for p, ns in hl["failed_rows"].items() if ns}
    if bad:
        print(f"FAILED rows (N with failed turns): {bad}", flush=True)
    skipped = {p: ns for p, ns in hl["skipped_rows"].items() if ns}
    if skipped:
        print(f"SKIPPED rows (time budget): {skipped}", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.merge:
        return merge(args)
    t0 = time.perf_counter()
    elapsed = lambda: time.perf_counter() - t0  # noqa: E731
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    cfg = model_config(args.model)
    size = KVSize.of(args, cfg, dtype)
    budget_gb = data_budget_gb(args, size)
    server_flags = ["--host-pool-gb", repr(args.host_pool_gb)]
    if budget_gb is not None:
        server_flags += ["--data-budget-gb", repr(budget_gb)]
    if args.kv_block_tokens:
        server_flags += ["--kv-block-tokens", str(args.kv_block_tokens)]
    if args.estimate is not None:
        gib = None
        if device.type == "cuda":
            gib = (float(args.estimate) if args.estimate != "card"
                   else torch.cuda.get_device_properties(device).total_memory / GIB)
        clock = Clock(args, guess_fit(args, cfg, dtype, size, gib))
        print_plan(*expected_plan(args, clock), clock.fit, args)
        return 0
    env = environment(device)
    clock = Clock(args, guess_fit(args, cfg, dtype, size, env.get("gpu_memory_gb")))
    provision = Provisioner(cfg, dtype, device, args.seed, args.provision)
    name = args.name or f"exp1_{card(env, args.tiny)}"
    out_dir = Path(args.out or os.environ.get("OUT") or Path(__file__).parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    plan, total = expected_plan(args, clock, elapsed())
    results = {
        "experiment": "exp1_semantic_scheduler", "tiny": args.tiny, "environment": env,
        "argv": list(sys.argv[1:] if argv is None else argv), "args": vars(args),
        "model": {"shape": args.model, "dtype": args.dtype, "layers": cfg.num_hidden_layers,
                  "hidden": cfg.hidden_size, "heads": cfg.num_attention_heads,
                  "kv_heads": cfg.num_key_value_heads, "provisioned_via": provision.via, "weights": "random, seeded"},
        "final_tokens_per_agent": final_tokens(args), "kv_block_tokens": size.block_tokens,
        "kv_blocks_per_agent_final": size.agent_blocks, "kv_bytes_per_agent_final": size.agent_bytes,
        "data_budget_gb": budget_gb,
        "data_budget_agents": round(budget_gb * GIB / size.agent_bytes, 3) if budget_gb is not None else None,
        "server_flags": server_flags + list(args.server_args),
        "expected": {"wall_s": round(total, 1), "rows": plan, "fit": vars(clock.fit)},
        "servers": [], "rows": [],
    }
    print(f"exp1: {args.model} {args.dtype} on {device}, policies {args.policy_list}, N {args.agent_list}; one "
          f"agent's final KV {size.agent_blocks} blocks of {size.block_tokens} tokens ({size.agent_bytes / 2**20:.3f} "
          f"MiB, {final_tokens(args)} tokens, {args.shared_prefix_tokens} shared), KV pool "
          + (f"capped at {budget_gb:.4g} GiB (~{results['data_budget_agents']} agents)" if budget_gb is not None
             else "sized by the VMU") + f", host pool {args.host_pool_gb:g} GiB, model via {provision.via}", flush=True)
    print_plan(plan, total, clock.fit, args)
    servers = Servers(args, provision, server_flags, cfg.vocab_size)
    try:
        for i, policy in enumerate(args.policy_list):
            run_policy(policy, policy_end(args, clock, elapsed(), args.policy_list[i:]), servers, clock, results,
                       args, cfg, provision, elapsed, path)
    finally:
        servers.close()
    results["headline"] = headline(results["rows"], args)
    print_table(results["rows"])
    print_headline(results["headline"], args)
    fig = plot(results, path.with_suffix(".png"))
    results["plot"] = fig or "matplotlib not importable: no plot"
    results["wall_s"] = round(elapsed(), 2)
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {path}" + (f" and {fig}" if fig else " (matplotlib not importable: no plot)")
          + f"; {results['wall_s']:.0f} s, expected {total:.0f} s", flush=True)
    return 0


def run_policy(policy: str, end_s: float | None, servers: Servers, clock: Clock, results: dict, args, cfg,
               provision: Provisioner, elapsed, path: Path) -> None:
    """Every N of one policy, in order; a row expected to end past `end_s` is skipped (and recorded)."""
    srv = None
    try:
        for n in agents_for(args, policy):
            fresh = srv is None or args.server_per == "row"
            need = row_need_s(args, clock, policy, n, fresh)
            if end_s is not None and elapsed() + need > end_s:
                row = skipped_row(policy, n, need, end_s - elapsed())
            else:
                if fresh:
                    if srv is not None:
                        servers.retire(srv)
                        srv = None
                    srv = start(policy, servers, clock, results)
                if srv is None:  # recorded; the next row tries a fresh server
                    err = results["servers"][-1]
                    row = {"policy": policy, "agents": n, "error": err["error"], "failed": True, "failures": n,
                           "first_errors": [{"error": err["error_line"], "count": 1}], "row_s": 0.0}
                else:
                    cut = None if args.time_budget_s is None else args.time_budget_s - END_S - elapsed()
                    row = run_row(srv, n, args, cfg, provision, cut)
                    row["server"] = len(results["servers"]) - 1
                    results["servers"][-1]["rows"].append(n)
                    clock.learn_row(row)
            results["rows"].append(row)
            print_row(row)
            results["headline"] = headline(results["rows"], args)
            results["wall_s"] = round(elapsed(), 2)
            path.write_text(json.dumps(results, indent=2, default=str))  # after each row: a crash keeps it
    finally:
        if srv is not None:
            servers.retire(srv)


def start(policy: str, servers: Servers, clock: Clock, results: dict) -> ServerRun | None:
    """The policy's server, its pool's plan recorded once (or the error, recorded, and None)."""
    try:
        srv = servers.get(policy)
    except Exception as e:
        results["servers"].append({"policy": policy, "error": f"server/provision: {type(e).__name__}: {e}"[:1000],
                                   "error_line": f"server/provision: {error_text(e)}", "rows": []})
        print(f"server {policy}: FAILED to start: {results['servers'][-1]['error']}", flush=True)
        return None
    results["servers"].append(dict(srv.record, rows=[]))
    clock.learn_server(srv)
    print(srv.describe(), flush=True)
    return srv


if __name__ == "__main__":
    sys.exit(main())
