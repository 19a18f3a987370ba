"""The exp1 script (agent density under each scheduling policy) end to end in its --tiny CPU mode: it
runs, writes its JSON, and what the policies did is what each policy is for.

--tiny: a 2-layer toy Llama on the CPU, context 64, 8 new tokens and 16 tool tokens per turn, 2 turns,
tool waits 0.3-0.6 s, N = 1, 2, 4 agents arriving within ~0.5 s, and a data budget that holds two
agents' final KV (2 x 96 tokens). So N = 1 and 2 fit and N = 4 does not. Latencies on a shared 2-core
CPU are noise: the SLO numbers are checked for presence, not value.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "OSDI_Evaluation" / "exp1_semantic_scheduler" / "run_exp1.py"
POLICIES = ["signal", "lru", "recompute", "resident"]
AGENTS = [1, 2, 4]
TURNS, CONTEXT, NEW, TOOL = 2, 64, 8, 16


def test_exp1_tiny(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    res = json.loads((tmp_path / "exp1_tiny.json").read_text())
    assert res["tiny"] and res["environment"]["device"] == "cpu" and res["environment"]["commit"]
    assert res["args"]["policy_list"] == POLICIES and res["args"]["agent_list"] == AGENTS
    assert res["final_tokens_per_agent"] == CONTEXT + TURNS * NEW + (TURNS - 1) * TOOL
    assert 1.9 < res["data_budget_agents"] < 2.1
    rows = {(r["policy"], r["agents"]): r for r in res["rows"]}
    assert sorted(rows) == sorted((p, n) for p in POLICIES for n in AGENTS)
    for (p, n), r in rows.items():
        assert "error" not in r, (p, n, r.get("error"), r.get("server_log_tail"))
        assert r["server_alive"] and r["leftover_sessions"] == 0
        for key in ("p50_s", "p99_s", "tokens_per_s", "swaps_out", "swaps_in", "gb_moved", "prefetch_hits",
                    "prefetch_misses", "prefetch_hit_rate", "queue_s_total", "queue_s_mean_per_turn", "drops",
                    "recomputed_tokens", "failures", "wall_s", "max_swapped_sessions", "within_slo"):
            assert key in r, (p, n, key)
        assert r["failures"] == 0, (p, n, r["failure_list"], r.get("server_log_tail"))
        assert r["turns"] == n * TURNS and r["new_tokens"] == n * TURNS * NEW
        assert all(a["kv_tokens"] == res["final_tokens_per_agent"] for a in r["agents_detail"])
        assert r["p99_s"] >= r["p50_s"] > 0

    # What fits moves nothing: N=1 and N=2 are within the budget under every policy.
    for p in POLICIES:
        for n in (1, 2):
            assert rows[(p, n)]["swaps_out"] == 0 and rows[(p, n)]["drops"] == 0, (p, n)
    # resident never moves or drops a KV: at N=4 the agents beyond the budget wait for memory (and, since
    # sessions holding KV are not held up behind them, nothing deadlocks: every turn completed above).
    assert rows[("resident", 4)]["queue_s_total"] > 0
    assert all(rows[("resident", n)]["swaps_out"] == 0 and rows[("resident", n)]["drops"] == 0 for n in AGENTS)
    # signal swaps waiting agents out at N=4 and brings every one back before it closes (or it closes
    # while away: at most one swap-out more than swap-ins).
    s4 = rows[("signal", 4)]
    assert s4["swaps_out"] > 0 and s4["swaps_in"] > 0 and s4["bytes_moved"] > 0 and s4["drops"] == 0
    assert s4["max_swapped_sessions"] >= 1
    assert 0 < s4["prefetch_hits"] + s4["prefetch_misses"] <= s4["swaps_in"]
    # lru swaps only on demand: every swap-in is a miss (it never prefetches).
    l4 = rows[("lru", 4)]
    assert l4["swaps_out"] > 0 and l4["prefetch_hits"] == 0 and l4["prefetch_misses"] == l4["swaps_in"] > 0
    # recompute drops instead of swapping, and re-prefills what it dropped.
    r4 = rows[("recompute", 4)]
    assert r4["drops"] > 0 and r4["recomputed_tokens"] > 0 and r4["swaps_out"] == 0

    hl = res["headline"]
    for key in ("slo_p99_s", "single_agent_p99_s", "slo_base_policy", "max_agents_within_slo",
                "density_ratio_signal_over_resident", "recompute_vs_signal_at_signal_max"):
        assert key in hl, key
    assert hl["slo_base_policy"] == "resident" and hl["slo_p99_s"] == round(2 * rows[("resident", 1)]["p99_s"], 4)
    assert set(hl["max_agents_within_slo"]) == set(POLICIES)
    assert res["plot"]  # the PNG's name next to the JSON, or the note that matplotlib is missing
