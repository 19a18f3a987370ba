"""Issue 8 reliability scripts in their --short (CI) forms, each against its own real server subprocess.

load_soak.py --short: 20 clients (each its own Connection, in 4 client processes) for 5 s of ping, stats,
session open/close, a tiny forward and a fetch: zero errors; then 50 soak cycles (open, attach the shared
model, generate, hold a tensor, close; every 10th a fresh client that just disconnects): the server's
threads and fds back to the baseline exactly, RSS within 32 MiB, data/host/stack segments 0, no sessions
left, Text unchanged. fuzz_server.py --short: 2,000 malformed and hostile inputs: no crash, no hang, every
reply decodable with a known error code, the server alive, its threads and fds back, and a normal forward
and session generate bitwise-equal to local ones afterwards. Together ~40 s on a 2-core CPU box.
The long forms and the numbers measured are in docs/RELIABILITY.md.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "OSDI_Evaluation" / "reliability"
DEVICE = os.environ.get("DJINN_TEST_DEVICE", "cpu")


def run(script: str, out: Path, *extra: str, timeout: float = 150) -> dict:
    proc = subprocess.run([sys.executable, str(SCRIPTS / script), "--short", "--device", DEVICE, "--out", str(out),
                           *extra], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-4000:]
    res = json.loads(out.read_text())
    res["_output"] = proc.stdout[-3000:] + proc.stderr[-3000:]
    res["_rc"] = proc.returncode
    return res


def test_load_and_soak_short(tmp_path):
    res = run("load_soak.py", tmp_path / "load_soak.json")
    assert "exception" not in res, res["exception"]
    assert res["environment"]["commit"] and res["args"]["short"] and res["args"]["clients"] == 20

    load = res["load"]
    assert load["errors"] == 0, (load["error_counts"], load["error_samples"], res["_output"])
    assert load["clients_reported"] == 20 and load["fetch_mismatches"] == 0
    for op in ("ping", "stats", "open_session", "close_session", "forward", "fetch"):
        assert load["per_op"][op]["calls"] > 0, op
        assert load["per_op"][op]["p99_ms"] >= load["per_op"][op]["p50_ms"] > 0, op
    assert load["throughput_calls_per_s"] > 0
    assert load["after_load_stats"]["ok"], load["after_load_stats"]  # every client's sessions reclaimed

    soak = res["soak"]
    assert soak["cycles"] == 50
    failed = {k: v for k, v in soak["checks"].items() if not v}
    assert not failed, (failed, soak["failures"], soak["baseline"], soak["end"])
    assert soak["threads_delta"] == 0 and soak["fds_delta"] == 0
    assert abs(soak["rss_delta_mb"]) <= soak["rss_tolerance_mb"]
    seg = soak["end"]["stats"]["segments"]
    assert seg["data"] == 0 and seg["host"] == 0 and seg["stack"] == 0
    assert soak["end"]["stats"]["sessions"] == 0
    assert seg["text"] == soak["baseline"]["stats"]["segments"]["text"] > 0
    assert res["server_alive"] and res["passed"] and res["_rc"] == 0, res["_output"]


def test_fuzz_short(tmp_path):
    res = run("fuzz_server.py", tmp_path / "fuzz.json", "--inputs-dir", str(tmp_path / "inputs"))
    assert "exception" not in res, res["exception"]
    assert res["inputs"] == 2000 and res["args"]["short"]
    assert res["no_crash_or_hang"], (res["events"], res.get("server_log_tail"))
    assert res["crashes_or_hangs"] == 0 and res["restarts"] == 0
    assert not res["anomalies"], res["anomalies"]  # every reply decodes and names a known error code
    assert res["log_dropped_messages"] == 0 and res["log_engine_failures"] == 0, res["log_excerpts"]
    # Each input gets its reply (markers included): replies >= inputs minus the few that legitimately
    # get none (a BYE that decodes), and most are typed errors.
    assert sum(res["replies"].values()) >= 0.95 * res["inputs"]
    assert res["error_codes"].get("protocol", 0) > 0 and res["error_codes"].get("invalid_request", 0) > 0
    assert res["health_checks"] >= 2 and res["ping_ms_max"] is not None
    assert res["alive"] and res["final_forward_bitwise_equal"] and res["final_generate_equal"], res.get("final_error")
    assert res["threads_back"] and res["fds_back"], (res["start_detail"], res["end_detail"])
    assert res["sessions_left"] == 0, res["sessions_left"]  # every fuzz client's sessions reclaimed
    assert res["passed"] and res["_rc"] == 0, res["_output"]
