"""Tier 2: the operator metrics endpoint (Prometheus text format) and JSON log lines."""
from __future__ import annotations

import json
import socket
import time
import urllib.request

import torch

from djinn.frontend.connection import Connection
from djinn.frontend.remote import RemoteModel
from djinn.server.metrics import Histogram, Metrics

from ..models import tiny_gpt2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_histogram_buckets_are_cumulative_in_the_text():
    m = Metrics()
    for s in (0.0004, 0.003, 0.003, 2.0):
        m.observe("forward", s)
    m.observe("forward", 0.02, "invalid_request")
    m.publish({"sessions": 2}, {"requests_total": 5})
    text = m.text()
    assert 'djinn_request_seconds_bucket{op="forward",le="0.0005"} 1' in text
    assert 'djinn_request_seconds_bucket{op="forward",le="0.005"} 3' in text
    assert 'djinn_request_seconds_bucket{op="forward",le="+Inf"} 5' in text
    assert 'djinn_request_seconds_count{op="forward"} 5' in text
    assert 'djinn_request_errors_total{code="invalid_request"} 1' in text
    assert "djinn_sessions 2.0" in text and "djinn_requests_total 5.0" in text
    h = Histogram()
    h.observe(100.0)
    assert h.counts[-1] == 1 and h.n == 1


def test_server_serves_metrics_and_json_logs(start_server, tmp_path):
    port = free_port()
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"metrics_port: {port}\nlog_format: json\n")
    srv = start_server("--config", str(cfg))
    conn = Connection(srv.address, None)
    try:
        s = conn.session("m")
        rm = RemoteModel.from_module(s, tiny_gpt2())
        rm(torch.tensor([[1, 2, 3]]))
        deadline = time.monotonic() + 10
        while True:  # published once a second by the engine
            m = scrape(port)
            if m.get('djinn_request_seconds_count{op="forward"}', 0) >= 1 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert m['djinn_request_seconds_count{op="forward"}'] >= 1
        assert m["djinn_sessions"] == 1 and m["djinn_models"] == 1 and m["djinn_data_bytes"] > 0
        assert m["djinn_requests_total"] >= 3
        with __import__("pytest").raises(Exception):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=5)
    finally:
        conn.close()
    lines = [ln for ln in srv.log_text().splitlines() if ln.startswith("{")]
    assert lines and all({"ts", "level", "logger", "msg"} <= set(json.loads(ln)) for ln in lines)
    assert any("session" in json.loads(ln)["msg"] for ln in lines)
