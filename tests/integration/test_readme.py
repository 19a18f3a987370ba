"""Tier 2: every python block of README.md runs as written, in order, in one interpreter (like the cells
of one notebook), against the embedded server the first block starts (on the CPU: no GPU is visible)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>\S*)[ \t]*$")

# Runs in a fresh interpreter: the blocks share one namespace, each compiled under its README line so a
# traceback points at the snippet.
RUNNER = """
import json, sys
ns = {"__name__": "__readme__"}
for line, code in json.load(sys.stdin):
    print(f"--- README.md line {line}", flush=True)
    exec(compile(code, f"README.md (block at line {line})", "exec"), ns)
print("--- all blocks ran", flush=True)
"""


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line of the opening fence, dedented code) of each ```python block, list-item indented ones too."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and not (_FENCE.match(lines[i]) and _FENCE.match(lines[i])["lang"] == ""):
            body.append(lines[i])
            i += 1
        if m["lang"] == "python":
            blocks.append((start + 1, textwrap.dedent("\n".join(body))))
        i += 1
    return blocks


def test_blocks_are_found():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 5
    assert blocks[0][1].startswith("import torch\nimport djinn\n")  # the first block imports what it uses


def test_every_python_block_runs_as_written():
    import json

    blocks = python_blocks(README.read_text())
    env = {k: v for k, v in os.environ.items() if k not in ("DJINN_SERVER", "DJINN_SECRET")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the embedded server serves on the CPU
    r = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(blocks), capture_output=True, text=True,
                       timeout=600, env=env, cwd=README.parent)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    out = r.stdout
    assert out.count("--- README.md line") == len(blocks) and out.rstrip().endswith("--- all blocks ran")
    assert "RemoteModel(LlamaForCausalLM" in out and "module path" in out     # print(rm)
    assert "djinn server at tcp://127.0.0.1:" in out and " on cpu: " in out  # print(djinn.stats()): a table
    assert "torch.return_types.topk" in out
