"""The exp3 script end to end in its --tiny CPU mode: it runs, and the results it records hold."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "OSDI_Evaluation" / "exp3_whitebox_debugging" / "run_exp3.py"


def test_exp3_tiny(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads((tmp_path / "exp3_tiny.json").read_text())
    assert res["tiny"] and res["environment"]["device"] == "cpu" and res["environment"]["commit"]
    assert [m["model"] for m in res["models"]] == ["tiny-gpt2-small float32", "tiny-llama-2-7b-shape float32"]
    for m in res["models"]:
        a = m["accuracy"]
        assert a["token_accuracy"] == 1.0 and a["pauses"] == 3 * a["new_tokens"]
        assert a["generate_bitwise"] and a["forward_logits_bitwise"]
        assert a["remote_equals_local_generate"] and a["remote_equals_local_forward"]
        assert m["steering"]["forward_bitwise"] and m["steering"]["generate_bitwise"] and m["steering"]["forward_changed"]
        assert m["recompute"]["same_output"] and m["recompute"]["rounds"] == 3
        lat = m["latency"]
        assert lat["resume"]["handoff_ms"]["n"] == 2 * (m["layers"] - 1)  # reps x stops that end in a stop
        assert set(m["hooks"]["overhead_pct"]) == {"run_without_breakpoints", "generate_breakpoints_never_hit",
                                                   "forward_through_paused_runs_hooks"}
        assert m["neighbour"]["other_paused_bytes"] > 0
