"""Tier 2: `djinn.stats()` reads as a short table for a person and stays the raw dict for programs.

A private server, so the sessions and models in the table are exactly this test's.
"""
from __future__ import annotations

import json
import re

import pytest
import torch

import djinn
from djinn import Breakpoint
from djinn.frontend.connection import Connection
from djinn.frontend.stats_view import Stats, fmt_bytes

from ..models import tiny_gpt2

KEYS = {"device", "device_memory", "segments", "kv", "scheduler", "quotas", "principal", "text_entries", "sessions", "models",
        "requests_served"}
IDS = torch.tensor([[1, 17, 42, 99, 5]])


@pytest.mark.parametrize("n,text", [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (5 << 20, "5.0 MiB"),
                                    (3 << 30, "3.0 GiB"), (None, "-")])
def test_bytes_read_as_binary_units(n, text):
    assert fmt_bytes(n) == text


def test_stats_is_the_raw_dict_with_a_short_table(start_server, monkeypatch):
    monkeypatch.delenv("DJINN_SERVER", raising=False)
    srv = start_server()
    other = Connection(srv.address, None)
    try:
        other.session("theirs")
        djinn.connect(srv.address)
        rm = djinn.remote(tiny_gpt2(seed=4))
        with djinn.session("agent-1") as s, djinn.session("<b>odd</b>") as odd:
            s.generate(rm, IDS, max_new_tokens=3)
            run = odd.start(rm, IDS, breakpoints=[Breakpoint(layer=0)])
            run.wait()
            st = djinn.stats()
            # For programs: a dict with every key the server sent, as before.
            assert type(st) is Stats and isinstance(st, dict) and set(st) == KEYS
            raw = json.loads(json.dumps(st))
            assert raw == dict(st) and st["sessions"][s.sid]["kv_tokens"] == {rm.model_id: 8}
            # For a person: a few lines, one per session and model, bytes in units.
            text = repr(st)
            lines = text.splitlines()
            assert lines[0] == f"djinn server at {srv.address} on cpu: {st['requests_served']} requests served"
            assert len(lines) <= 16 and str(st["segments"]["text"]) not in text
            assert f"text {fmt_bytes(st['segments']['text'])}" in lines[1]
            rows = {line.split()[0]: line for line in lines if line.split()[:1] in (["default"], ["agent-1"],
                                                                                     ["<b>odd</b>"], ["(another"])}
            assert set(rows) == {"default", "agent-1", "<b>odd</b>", "(another"}
            assert rows["agent-1"].split()[1] == "ACTIVE" and " 8 " in rows["agent-1"]
            assert rows["<b>odd</b>"].endswith("paused at a breakpoint")
            assert any(line.startswith("GPT2LMHeadModel") and rm.model_id[:12] in line for line in lines)
            page = st._repr_html_()
            assert page.startswith("<div>") and page.count("<table>") == 3
            assert "&lt;b&gt;odd&lt;/b&gt;" in page and "<b>odd</b>" not in page  # names are escaped
            assert "agent-1" in page and fmt_bytes(st["segments"]["text"]) in page
            run.cancel()
    finally:
        djinn.disconnect()
        other.close()


def _cells(page: str) -> dict[str, str]:
    """{label: value} of an html_card's rows."""
    return dict(re.findall(r"<tr><td style='text-align:left'>(.*?)</td><td style='text-align:left'>(.*?)</td></tr>",
                           page))


def test_run_stop_session_and_model_show_as_short_html_tables(server, monkeypatch):
    """In a notebook cell a Run, Stop, Session or RemoteModel shows as a titled two-column table, names
    escaped; the text repr is what it was."""
    monkeypatch.delenv("DJINN_SERVER", raising=False)
    djinn.connect(server.address)
    try:
        rm = djinn.remote(tiny_gpt2(seed=4))
        with djinn.session("<i>notes</i>") as s:
            page = s._repr_html_()
            assert page.startswith("<div><b>Session &lt;i&gt;notes&lt;/i&gt;</b><table>") and "<i>" not in page
            assert _cells(page) == {"state": "open", "id": s.sid[:8], "server": server.address,
                                    "checkpoint on shutdown": "no"}
            assert repr(s) == f"Session('<i>notes</i>', open, server={server.address})"
            page = rm._repr_html_()
            assert page.startswith("<div><b>RemoteModel GPT2LMHeadModel</b>")
            assert _cells(page) == {"path": "module: the server builds GPT2LMHeadModel itself",
                                    "weights": f"{fmt_bytes(rm.nbytes)} (uploaded)", "id": rm.model_id[:12],
                                    "server": server.address}
            run = s.start(rm, IDS, breakpoints=[Breakpoint(layer=1)])
            stop = run.wait()
            assert _cells(run._repr_html_()) == {"call": "GPT2LMHeadModel.forward", "state": "paused",
                                                 "id": run.run_id, "paused at": "transformer.h.1 (after, step 0)"}
            cells = _cells(stop._repr_html_())
            assert cells["at"] == "transformer.h.1 (after)" and cells["activation"] == "float32[1, 5, 64]"
            assert cells["state"].startswith("live") and cells["run"] == run.run_id
            assert run.resume() is None
            assert _cells(stop._repr_html_())["state"] == "gone (the run moved on)"
            assert "paused at" not in _cells(run._repr_html_()) and run._repr_html_().count("<tr>") == 3
            assert repr(run) == f"Run({run.run_id}, GPT2LMHeadModel.forward, finished)"
        assert _cells(s._repr_html_())["state"] == "closed"
        g = djinn.remote(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        g(torch.randn(1, 4))
        assert _cells(g._repr_html_())["graphs"] == "1 captured, 1 calls"
    finally:
        djinn.disconnect()
