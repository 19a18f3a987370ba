"""The exp1 script (agent density under each scheduling policy) end to end in its --tiny CPU mode: it
runs, writes its JSON, and what the policies did is what each policy is for; and its pieces that need no
server (the shared-prefix workload, the time budget's skipped rows, --merge of several jobs' files).

--tiny: a 2-layer toy Llama on the CPU, context 64, 8 new tokens and 16 tool tokens per turn, 2 turns,
tool waits 0.3-0.6 s, N = 1, 2, 4 agents arriving within ~0.5 s, and a KV pool of 16 blocks of 16
tokens (--budget-agents 2.7; an agent's final 96 tokens are 6 blocks, after turn 1 it holds 5). So N = 1
and 2 fit, with more than the 10% the signal policy keeps free, and N = 4 does not; three agents' turn-1
KV leaves a block free, so resident's agents can always grow into their second turn. Latencies on a
shared 2-core CPU are noise: the SLO numbers are checked for presence, not value.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "OSDI_Evaluation" / "exp1_semantic_scheduler" / "run_exp1.py"
POLICIES = ["signal", "lru", "recompute", "resident"]
AGENTS = [1, 2, 4]
TURNS, CONTEXT, NEW, TOOL = 2, 64, 8, 16
BLOCK_TOKENS, AGENT_BLOCKS, POOL_BLOCKS = 16, 6, 16  # 96 final tokens; floor(2.7 x 6)


@pytest.fixture(scope="module")
def exp1():
    spec = importlib.util.spec_from_file_location("run_exp1", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("exp1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return out / "exp1_tiny.json"


def test_exp1_tiny(tiny):
    res = json.loads(tiny.read_text())
    assert res["tiny"] and res["environment"]["device"] == "cpu" and res["environment"]["commit"]
    assert res["args"]["policy_list"] == POLICIES and res["args"]["agent_list"] == AGENTS
    assert res["final_tokens_per_agent"] == CONTEXT + TURNS * NEW + (TURNS - 1) * TOOL
    assert res["kv_block_tokens"] == BLOCK_TOKENS and res["kv_blocks_per_agent_final"] == AGENT_BLOCKS
    assert res["data_budget_agents"] == round((POOL_BLOCKS + 0.5) / AGENT_BLOCKS, 3)  # and half a block
    assert all(r["runs"] for r in res["expected"]["rows"]) and res["expected"]["wall_s"] > 0

    # Once per server: the pool's plan as the VMU sized it, and the agents it holds.
    assert [s["policy"] for s in res["servers"]] == POLICIES
    for s in res["servers"]:
        assert s["rows"] == AGENTS and s["blocks_total"] == POOL_BLOCKS and s["block_tokens"] == BLOCK_TOKENS
        assert s["agents_fit_gpu"] == 2 and s["agents_fit_host"] > 4
        plan = s["kv_pool"]
        assert plan["blocks"] == POOL_BLOCKS + 1 and plan["stack_reserve"] == 0 and plan["decode_rows"] >= 1
        assert plan["pool_bytes"] == plan["blocks"] * s["block_bytes"]

    rows = {(r["policy"], r["agents"]): r for r in res["rows"]}
    assert sorted(rows) == sorted((p, n) for p in POLICIES for n in AGENTS)
    for (p, n), r in rows.items():
        assert "error" not in r and not r.get("skipped"), (p, n, r.get("error"), r.get("server_log_tail"))
        assert r["server_alive"] and r["leftover_sessions"] == 0
        for key in ("p50_s", "p99_s", "tokens_per_s", "swaps_out", "swaps_in", "gb_moved", "prefetch_hits",
                    "prefetch_misses", "prefetch_failures", "prefetch_hit_rate", "queue_s_total",
                    "queue_s_mean_per_turn", "drops", "recomputed_tokens", "failures", "wall_s",
                    "max_swapped_sessions", "max_gpu_resident_sessions", "within_slo", "kv_bytes_per_agent"):
            assert key in r, (p, n, key)
        assert not r["failed"] and r["failures"] == 0 and r["first_errors"] == [], (p, n, r["failure_list"])
        assert r["turns"] == n * TURNS and r["new_tokens"] == n * TURNS * NEW
        assert all(a["kv_tokens"] == res["final_tokens_per_agent"] for a in r["agents_detail"])
        assert r["p99_s"] >= r["p50_s"] > 0
        assert r["prefetch_failures"] == 0
        kv = r["kv"]
        assert kv["blocks_total"] == POOL_BLOCKS and kv["end"]["blocks_held"] == 0  # every agent closed
        # One agent holds its turn-1 KV (5 blocks) through its tool wait; more agents hold more, never
        # more than the pool has.
        assert 5 <= kv["max_blocks_held"] <= POOL_BLOCKS and kv["min_blocks_free"] <= POOL_BLOCKS - 5
        assert 0 < r["kv_bytes_per_agent"] <= AGENT_BLOCKS * kv["block_bytes"]  # nothing shared: whole blocks

    # What fits moves nothing: N=1 and N=2 are within the pool under every policy.
    for p in POLICIES:
        for n in (1, 2):
            assert rows[(p, n)]["swaps_out"] == 0 and rows[(p, n)]["drops"] == 0, (p, n)
            assert rows[(p, n)]["kv"]["max_host_blocks_used"] == 0, (p, n)
    # resident never moves or drops a KV: at N=4 the agents beyond the pool wait for memory (and, since
    # sessions holding KV are not held up behind them, nothing deadlocks: every turn completed above).
    assert rows[("resident", 4)]["queue_s_total"] > 0
    assert all(rows[("resident", n)]["swaps_out"] == 0 and rows[("resident", n)]["drops"] == 0 for n in AGENTS)
    # signal swaps waiting agents out at N=4 and brings every one back before it closes (or it closes
    # while away: at most one swap-out more than swap-ins); their blocks sit in the host pool meanwhile.
    s4 = rows[("signal", 4)]
    assert s4["swaps_out"] > 0 and s4["swaps_in"] > 0 and s4["bytes_moved"] > 0 and s4["drops"] == 0
    assert s4["max_swapped_sessions"] >= 1 and s4["kv"]["max_host_blocks_used"] >= 5
    assert 0 < s4["prefetch_hits"] + s4["prefetch_misses"] <= s4["swaps_in"]
    # lru swaps only on demand: every swap-in is a miss (it never prefetches).
    l4 = rows[("lru", 4)]
    assert l4["swaps_out"] > 0 and l4["prefetch_hits"] == 0 and l4["prefetch_misses"] == l4["swaps_in"] > 0
    # recompute drops instead of swapping, and re-prefills what it dropped.
    r4 = rows[("recompute", 4)]
    assert r4["drops"] > 0 and r4["recomputed_tokens"] > 0 and r4["swaps_out"] == 0
    assert r4["kv"]["max_host_blocks_used"] == 0

    hl = res["headline"]
    for key in ("slo_p99_s", "single_agent_p99_s", "slo_base_policy", "max_agents_within_slo",
                "density_ratio_signal_over_resident", "recompute_vs_signal_at_signal_max"):
        assert key in hl, key
    assert hl["slo_base_policy"] == "resident" and hl["slo_p99_s"] == round(2 * rows[("resident", 1)]["p99_s"], 4)
    assert set(hl["max_agents_within_slo"]) == set(POLICIES)
    assert hl["failed_rows"] == hl["skipped_rows"] == {p: [] for p in POLICIES}
    assert res["plot"]  # the PNG's name next to the JSON, or the note that matplotlib is missing


def test_exp1_shared_prefix_workload(exp1):
    """Every agent's prompt starts with the same K tokens, then its own (the start of what its prompt is
    without a shared prefix); arrivals and waits do not change."""
    plain = exp1.workload(exp1.parse_args(["--tiny"]), 3, 256)
    shared = exp1.workload(exp1.parse_args(["--tiny", "--shared-prefix-tokens", "48"]), 3, 256)
    for a, b in zip(plain, shared):
        assert b.inputs[0].shape == (1, CONTEXT) and b.arrival_s == a.arrival_s and b.waits == a.waits
        assert b.inputs[0][0, :48].equal(shared[0].inputs[0][0, :48])
        assert b.inputs[0][0, 48:].equal(a.inputs[0][0, :CONTEXT - 48])
        assert [x.shape for x in b.inputs[1:]] == [(1, TOOL)] * (TURNS - 1)
    assert not shared[0].inputs[0][0, 48:].equal(shared[1].inputs[0][0, 48:])


def test_exp1_time_budget_and_merge(exp1, tiny, tmp_path):
    """A row that would not finish within the time budget is skipped and recorded (no server starts for
    it); --merge of two jobs' files keeps every row that ran, a skipped row never replacing one, and the
    headline counts only rows without failures."""
    assert exp1.main(["--tiny", "--policies", "signal,resident", "--time-budget-s", "1", "--out", str(tmp_path),
                      "--name", "skipped"]) == 0
    skipped = json.loads((tmp_path / "skipped.json").read_text())
    assert skipped["servers"] == [] and len(skipped["rows"]) == 2 * len(AGENTS)
    assert all(r["skipped"] and r["expected_s"] > 0 and "budget" in r["reason"] for r in skipped["rows"])
    assert not any(r["runs"] for r in skipped["expected"]["rows"])
    assert skipped["headline"]["skipped_rows"] == {"signal": AGENTS, "resident": AGENTS}
    assert skipped["headline"]["max_agents_within_slo"] == {"signal": 0, "resident": 0}

    # Two "jobs": the tiny run's lru and recompute rows, and its signal and resident rows with signal N=2
    # marked failed; then the file with every row skipped, which must not replace any of them.
    res = json.loads(tiny.read_text())
    job_a = dict(res, rows=[r for r in res["rows"] if r["policy"] in ("lru", "recompute")],
                 servers=[s for s in res["servers"] if s["policy"] in ("lru", "recompute")])
    job_b = dict(res, rows=[dict(r, failed=True, failures=1) if (r["policy"], r["agents"]) == ("signal", 2) else r
                            for r in res["rows"] if r["policy"] in ("signal", "resident")],
                 servers=[s for s in res["servers"] if s["policy"] in ("signal", "resident")])
    files = []
    for name, data in (("a", job_a), ("b", job_b)):
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps(data))
    files.append(tmp_path / "skipped.json")
    assert exp1.main(["--merge", *map(str, files), "--out", str(tmp_path), "--name", "merged"]) == 0
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert merged["args"]["policy_list"] == POLICIES and merged["args"]["agent_list"] == AGENTS
    assert len(merged["rows"]) == len(POLICIES) * len(AGENTS) and not any(r.get("skipped") for r in merged["rows"])
    assert sorted(s["policy"] for s in merged["servers"]) == sorted(POLICIES)
    hl = merged["headline"]
    assert hl["failed_rows"]["signal"] == [2] and hl["max_agents_within_slo"]["signal"] <= 1
    assert hl["slo_base_policy"] == "resident"


def test_exp1_shared_base_runs_one_single_agent_row(exp1, tiny, tmp_path):
    """--shared-base: N=1 only under resident, the SLO base; the other policies' densities count from
    N=2 against that base."""
    assert exp1.main(["--tiny", "--policies", "signal,resident", "--shared-base", "--time-budget-s", "1",
                      "--out", str(tmp_path), "--name", "shared"]) == 0
    planned = json.loads((tmp_path / "shared.json").read_text())
    assert sorted((r["policy"], r["agents"]) for r in planned["rows"]) == sorted(
        [("resident", n) for n in AGENTS] + [("signal", n) for n in AGENTS if n != 1])
    res = json.loads(tiny.read_text())
    rows = [r for r in res["rows"] if r["policy"] in ("signal", "resident") and (r["policy"], r["agents"]) != ("signal", 1)]
    args = exp1.argparse.Namespace(**dict(res["args"], policy_list=["signal", "resident"], shared_base=True))
    hl = exp1.headline(rows, args)
    full = exp1.headline([r for r in res["rows"] if r["policy"] in ("signal", "resident")],
                         exp1.argparse.Namespace(**dict(res["args"], policy_list=["signal", "resident"])))
    assert hl["slo_p99_s"] == full["slo_p99_s"]
    assert hl["max_agents_within_slo"]["resident"] == full["max_agents_within_slo"]["resident"]
    want = 0  # signal's density counts from N=2, its N=1 being resident's
    for n in AGENTS[1:]:
        r = next(x for x in rows if x["policy"] == "signal" and x["agents"] == n)
        if exp1.is_failed(r) or r.get("p99_s") is None or r["p99_s"] > hl["slo_p99_s"]:
            break
        want = n
    assert hl["max_agents_within_slo"]["signal"] == want


def test_exp1_tiny_on_two_workers(tmp_path):
    """`--gpus 2` with --tiny: the same workload through a front and two CPU workers (sessions placed on
    both, stats merged); every turn succeeds and the record names the workers."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--policies", "signal", "--agents", "4",
                           "--gpus", "2", "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    res = json.loads((tmp_path / "exp1_tiny.json").read_text())
    assert res["server_flags"][-2:] == ["--workers", "2"]
    rows = {r["agents"]: r for r in res["rows"]}
    assert sorted(rows) == [1, 4]
    for r in rows.values():
        assert "error" not in r and r["failures"] == 0 and r["server_alive"] and r["leftover_sessions"] == 0
