"""The cluster benchmark (OSDI_Evaluation/exp_cluster/bench_cluster.py) end to end in its --tiny CPU mode:
it runs, writes its JSON, every row ran, a migrated session continued bitwise, and TP=2 gave TP=1's
greedy tokens."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_cluster_tiny(tmp_path):
    out = tmp_path / "cluster.json"
    proc = subprocess.run([sys.executable, str(REPO / "OSDI_Evaluation" / "exp_cluster" / "bench_cluster.py"),
                           "--tiny", "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["failed_rows"] == [], got
    mig, tp = got["rows"]["migration"], got["rows"]["tensor_parallel"]
    assert mig["continues_bitwise"] and mig["moves"] == 5 and mig["bytes_moved"] >= mig["kv_bytes"] > 0
    assert tp["tokens_equal"] and tp["tp2_tok_s"] > 0 and tp["tp1_tok_s"] > 0
    assert got["environment"]["device"] == "cpu" and "commit" in got["environment"]
