"""`djinn.stats()` for a person: the server's stats dict, shown as a short table.

`Stats` is the raw dict the server sent, unchanged (every key, as programs and tests read it); only
its repr (a terminal, `print`) and `_repr_html_` (a notebook cell) are a summary: the segments, the
scheduler in one line, one line per session and per model, bytes in B/KiB/MiB/GiB.
"""
from __future__ import annotations

import html

_UNITS = (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))
_SESSION_COLUMNS = ("session", "state", "on device", "in host pool", "kv tokens", "swaps", "queue", "now")
_MODEL_COLUMNS = ("model", "id", "weights", "sessions")


class Stats(dict):
    """The server's stats (a dict: every key as sent); prints as a short human table."""

    def __init__(self, raw: dict, address: str | None = None):
        super().__init__(raw)
        self.address = address  # where it came from (not a key: the dict is what the server sent)

    def __repr__(self) -> str:
        return render_text(self, self.address)

    def _repr_html_(self) -> str:
        return render_html(self, self.address)


def fmt_bytes(n) -> str:
    if not isinstance(n, (int, float)):
        return "-"
    for unit, size in _UNITS:
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _title(st: dict, address: str | None) -> str:
    where = f" at {address}" if address else ""
    return f"djinn server{where} on {st.get('device', '?')}: {st.get('requests_served', 0)} requests served"


def _summary(st: dict) -> list[tuple[str, str]]:
    """(label, one line) rows above the tables."""
    seg = st.get("segments") or {}
    rows = [("memory", "  ".join(f"{k} {fmt_bytes(seg.get(k))}" for k in ("text", "data", "stack", "host")
                                 if k in seg)
             + (f"  (KV pools {fmt_bytes(seg['kv_pools'])})" if "kv_pools" in seg else ""))]
    dm = st.get("device_memory")
    if dm:  # what the device and torch's allocator say, beside the VMU's segments
        rows.append(("device", f"{fmt_bytes(dm['reserved'])} reserved by torch ({fmt_bytes(dm['allocated'])} in "
                               f"tensors), {fmt_bytes(dm['free'])} free of {fmt_bytes(dm['total'])}"))
    sc = st.get("scheduler") or {}
    if sc:
        rows.append(("scheduler", f"policy {sc.get('policy')}, {sc.get('queued', 0)} queued, swaps "
                                  f"{sc.get('swaps_out', 0)} out / {sc.get('swaps_in', 0)} in "
                                  f"({fmt_bytes(sc.get('bytes_moved', 0))} moved), prefetch hits "
                                  f"{sc.get('prefetch_hits', 0)} / misses {sc.get('prefetch_misses', 0)}"))
    rows += worker_rows(st)
    pools = ((st.get("kv") or {}).get("models") or {})
    for mid, p in pools.items():
        rows.append(("kv blocks", f"{mid[:12]}: {p.get('blocks_free', 0):,} of {p.get('blocks_total', 0):,} free, "
                                  f"{p.get('blocks_cached', 0):,} cached, {p.get('block_tokens', '?')} tokens each"))
    return rows


def worker_rows(st: dict) -> list[tuple[str, str]]:
    """A server with several workers (`--gpus`): a line each, what it holds."""
    out = []
    for w in st.get("workers") or []:
        if not w.get("alive", True):
            out.append((f"worker {w.get('rank')}", f"{w.get('device')}: dead (its sessions were lost)"))
            continue
        seg = w.get("segments") or {}
        out.append((f"worker {w.get('rank')}", f"{w.get('device')}: {w.get('sessions', 0)} sessions, text "
                                               f"{fmt_bytes(seg.get('text'))}, data {fmt_bytes(seg.get('data'))}"))
    return out


def _now(job, s: dict) -> str:
    if s.get("paused"):
        return "paused at a breakpoint"
    if not job:  # another client's session: only the coarse "busy" (its timings are its owner's)
        return s.get("busy") or "-"
    if "running_s" in job:
        return f"{job.get('op')} running {job['running_s']:.1f}s, {job.get('steps', 0)} steps"
    return f"{job.get('op')} waiting {job.get('waiting_s', 0):.1f}s ({job.get('why') or 'queued'})"


def _session_rows(st: dict) -> list[tuple[str, ...]]:
    rows = []
    for sid, s in (st.get("sessions") or {}).items():
        name = s.get("name") if s.get("mine") else "(another client)"
        kv = s.get("kv_tokens") or {}
        rows.append((f"{name or sid[:8]}", str(s.get("state", "?")), fmt_bytes(s.get("gpu_bytes")),
                     fmt_bytes(s.get("host_bytes")), str(sum(kv.values())) if kv else "-",
                     f"{s.get('swaps_out', 0)}/{s.get('swaps_in', 0)}", f"{s.get('queue_s') or 0:.2f}s",
                     _now(s.get("job"), s)))
    return rows


def _model_rows(st: dict) -> list[tuple[str, ...]]:
    return [(m.get("architecture", "?"), mid[:12], fmt_bytes(m.get("bytes")), str(len(m.get("sessions") or ())))
            for mid, m in (st.get("models") or {}).items()]


def _table(columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in (columns, *rows)) for i in range(len(columns))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in (columns, *rows)]


def render_text(st: dict, address: str | None = None) -> str:
    lines = [_title(st, address)]
    lines += [f"{label:<10} {text}" for label, text in _summary(st)]
    sessions, models = _session_rows(st), _model_rows(st)
    lines += [""] + _table(_SESSION_COLUMNS, sessions) if sessions else ["", "no sessions"]
    if models:
        lines += [""] + _table(_MODEL_COLUMNS, models)
    lines.append("(a dict: djinn.stats()['sessions'] and the other keys hold every number)")
    return "\n".join(lines)


def _html_table(columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    head = "".join(f"<th style='text-align:left'>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td style='text-align:left'>{html.escape(v)}</td>" for v in r) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_card(title: str, rows: list[tuple[str, str]]) -> str:
    """A notebook's view of one object (Run, Stop, Session, RemoteModel): a bold title over a two-column
    table, every string escaped (names and paths come from users)."""
    body = "".join(f"<tr><td style='text-align:left'>{html.escape(k)}</td>"
                   f"<td style='text-align:left'>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<div><b>{html.escape(title)}</b><table>{body}</table></div>"


def render_html(st: dict, address: str | None = None) -> str:
    parts = [f"<b>{html.escape(_title(st, address))}</b>", "<table>"]
    parts += [f"<tr><td>{html.escape(label)}</td><td>{html.escape(text)}</td></tr>" for label, text in _summary(st)]
    parts.append("</table>")
    sessions, models = _session_rows(st), _model_rows(st)
    parts.append(_html_table(_SESSION_COLUMNS, sessions) if sessions else "<p>no sessions</p>")
    if models:
        parts.append(_html_table(_MODEL_COLUMNS, models))
    return "<div>" + "".join(parts) + "</div>"
