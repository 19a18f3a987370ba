"""Tier 2: `djinn top ADDRESS --once` against a real server: one plain-text frame of its segments as
bars and a row per session; another client sees that a session is generating, not its details."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import torch
from transformers import LlamaConfig

from djinn import Breakpoint
from djinn.frontend import generate
from djinn.frontend.connection import Connection
from djinn.frontend.remote import RemoteModel
from djinn.frontend.top import CLEAR, render_frame

from ..models import tiny_gpt2
from .test_scheduling import submit_generate

IDS = torch.tensor([[1, 17, 42, 99, 5]])


def test_top_once_prints_one_frame_of_bars_and_sessions(start_server):
    srv = start_server()
    conn = Connection(srv.address, None)
    try:
        rm = RemoteModel.from_module(conn.session("warm-up"), tiny_gpt2(seed=1))
        s = conn.session("agent-7")
        s.generate(rm, IDS, max_new_tokens=3)
        paused = conn.session("paused-one")
        run = paused.start(rm, IDS, breakpoints=[Breakpoint(layer=0)])
        run.wait()
        env = {k: v for k, v in os.environ.items() if k != "DJINN_SERVER"}
        env["PYTHONPATH"] = os.getcwd() + os.pathsep + env.get("PYTHONPATH", "")
        r = subprocess.run([sys.executable, "-m", "djinn", "top", srv.address.removeprefix("tcp://"), "--once"],
                           capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 0, r.stderr
        assert CLEAR not in r.stdout and "\x1b" not in r.stdout  # not a terminal: a clean frame
        lines = r.stdout.rstrip("\n").splitlines()
        assert lines[0].startswith(f"djinn server at {srv.address} on cpu: ")
        assert lines[1].startswith("scheduler: policy ") and lines[2] == ""
        bars = lines[3:7]
        assert [b.split()[0] for b in bars] == ["text", "data", "stack", "host"]
        assert all(b[6] == "[" and "]" in b for b in bars)
        assert "#" in bars[0] and "#" in bars[1] and "#" not in bars[3]  # weights and KV held, nothing swapped
        assert lines[7] == "" and lines[8].split()[:3] == ["session", "state", "on"]
        rows = lines[9:]
        assert len(rows) == 3  # warm-up, agent-7, paused-one: another client's, so without their names
        assert sum(row.rstrip().endswith("paused at a breakpoint") for row in rows) == 1
        assert all(row.startswith("(another client)") for row in rows)
        assert sum(" 8 " in row for row in rows) == 1  # agent-7's 8 tokens of KV
        run.cancel()
    finally:
        conn.close()


def test_another_client_sees_that_a_session_generates(server):
    """The row's "now" for another client's session: "generate running", without its timings or steps
    (those stay its owner's `job`). It looks its session up by id, so the shared server does."""
    owner, viewer = Connection(server.address, None), Connection(server.address, None)
    try:
        cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
        s = owner.session("busy")
        rm = RemoteModel.from_config(s, cfg, seed=0)
        fut = submit_generate(s, rm, IDS, max_new_tokens=3000, min_new_tokens=3000, do_sample=False)
        deadline = time.monotonic() + 60
        while owner.stats()["sessions"][s.sid]["job"] is None and time.monotonic() < deadline:
            time.sleep(0.01)
        st = viewer.stats()
        theirs = st["sessions"][s.sid]
        assert (theirs["job"], theirs["busy"]) == (None, "generate running")
        [row] = [line for line in render_frame(st, viewer.address).splitlines()
                  if line.startswith("(another") and line.rstrip().endswith("generate running")]
        assert row.rstrip().endswith("generate running")
        assert owner.stats()["sessions"][s.sid]["busy"] == "generate running"
        generate.cancel(s, fut.rid, 0)
        try:
            fut.result(timeout=60)
        except Exception:
            pass
        assert viewer.stats()["sessions"][s.sid]["busy"] is None
    finally:
        owner.close()
        viewer.close()
