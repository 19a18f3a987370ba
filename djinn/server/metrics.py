"""Operator metrics: a Prometheus text endpoint and JSON log lines (DESIGN.md §10, "Faults...").

The engine thread owns every number; once a second (and on demand never) it publishes an immutable
snapshot here, and a small HTTP thread serves the last snapshot at `/metrics` in the Prometheus text
format (version 0.0.4), so a scrape never touches engine state. Request latencies go into fixed-bucket
histograms per op, updated by the engine thread only. Written with the standard library: the format
is a few lines, and the server has no other use for prometheus-client.
"""
from __future__ import annotations

import bisect
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    """Cumulative-bucket latency histogram of one op (engine thread only)."""

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS_S) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS_S, seconds)] += 1
        self.total += seconds
        self.n += 1


class Metrics:
    def __init__(self) -> None:
        self.latency: dict[str, Histogram] = {}
        self.errors: dict[str, int] = {}
        self._text = ""
        self._lock = threading.Lock()
        self._http: ThreadingHTTPServer | None = None

    # -- engine thread ---------------------------------------------------------------------------
    def observe(self, op: str, seconds: float, error_code: str | None = None) -> None:
        h = self.latency.get(op)
        if h is None:
            if len(self.latency) >= 256:  # op names come from clients: bound the label set
                op = "other"
            h = self.latency.setdefault(op, Histogram())
        h.observe(seconds)
        if error_code is not None:
            self.errors[error_code] = self.errors.get(error_code, 0) + 1

    def publish(self, gauges: dict[str, float], counters: dict[str, float]) -> None:
        lines = []
        for name, v in sorted(gauges.items()):
            lines += [f"# TYPE djinn_{name} gauge", f"djinn_{name} {float(v)}"]
        for name, v in sorted(counters.items()):
            lines += [f"# TYPE djinn_{name} counter", f"djinn_{name} {float(v)}"]
        lines.append("# TYPE djinn_request_errors_total counter")
        for code, n in sorted(self.errors.items()):
            lines.append(f'djinn_request_errors_total{{code="{_label(code)}"}} {n}')
        lines.append("# TYPE djinn_request_seconds histogram")
        for op, h in sorted(self.latency.items()):
            acc = 0
            for le, c in zip((*BUCKETS_S, float("inf")), h.counts):
                acc += c
                le_s = "+Inf" if le == float("inf") else repr(le)
                lines.append(f'djinn_request_seconds_bucket{{op="{_label(op)}",le="{le_s}"}} {acc}')
            lines.append(f'djinn_request_seconds_sum{{op="{_label(op)}"}} {h.total}')
            lines.append(f'djinn_request_seconds_count{{op="{_label(op)}"}} {h.n}')
        with self._lock:
            self._text = "\n".join(lines) + "\n"

    # -- HTTP thread -------------------------------------------------------------------------------
    def text(self) -> str:
        with self._lock:
            return self._text

    def serve(self, host: str, port: int) -> int:
        """Start the endpoint on a daemon thread; returns the port (0 picks a free one)."""
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                body = metrics.text().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # scrapes are not worth a log line each
                pass

        self._http = ThreadingHTTPServer((host, port), Handler)
        threading.Thread(target=self._http.serve_forever, name="djinn-metrics", daemon=True).start()
        return self._http.server_address[1]

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()


def _label(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")[:100]


class JsonFormatter(logging.Formatter):
    """One JSON object per log line (config log_format: json), for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 6), "level": record.levelname, "logger": record.name,
               "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)
