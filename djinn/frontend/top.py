"""`djinn top [ADDRESS]`: a live terminal view of a server, as nvidia-smi and htop give for a GPU.

One frame is the server's stats (the `stats` request every client may make): the segments as bars
(text: weights; data: session KV against the KV pools; stack: paused runs; host: the host pool), the
scheduler in a line, and a row per session (its name if it is this client's, state, GPU and host
bytes, swaps, queue time, what it runs now). Plain text; the screen is cleared with one standard ANSI
sequence, and only when stdout is a terminal, so `djinn top --once > file` is a clean frame.
"""
from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO

from .stats_view import _SESSION_COLUMNS, _session_rows, _table, _title, fmt_bytes, worker_rows

#: Cursor home, then erase the screen (ECMA-48 CUP and ED): every VT100-like terminal has them.
CLEAR = "\x1b[H\x1b[2J"
REFRESH_S = 1.0


def _bar(used: int, total: int, width: int) -> str:
    filled = 0 if total <= 0 else min(width, round(width * used / total))
    if used > 0 and filled == 0:
        filled = 1  # something is there: show it
    return "[" + "#" * filled + "." * (width - filled) + "]"


def segment_rows(st: dict) -> list[tuple[str, int, int, str]]:
    """(segment, bytes, scale, what the scale is) per bar. The device segments share one scale, the
    device bytes the server holds (data at its KV pools' size, which is reserved whether used or not);
    the host bar is against the host pool's capacity plus the pinned weights."""
    seg = st.get("segments") or {}
    sc = st.get("scheduler") or {}
    text, data, stack, host = (int(seg.get(k) or 0) for k in ("text", "data", "stack", "host"))
    pools = int(seg.get("kv_pools") or sc.get("data_budget") or 0)
    device = text + max(data, pools) + stack
    hp = sc.get("host_pool") or {}
    host_scale = max(host, int(hp.get("capacity") or 0) + max(0, host - int(hp.get("used") or 0)))
    where = st.get("device", "?")
    return [("text", text, device, f"weights, of {fmt_bytes(device)} held on {where}"),
            ("data", data, device, f"session KV, in {fmt_bytes(pools)} of KV pools"),
            ("stack", stack, device, "paused runs' activations"),
            ("host", host, host_scale, f"swapped KV and streamed weights, of {fmt_bytes(host_scale)}")]


def render_frame(st: dict, address: str | None, width: int = 100) -> str:
    lines = [_title(st, address)]
    sc = st.get("scheduler") or {}
    if sc:
        lines.append(f"scheduler: policy {sc.get('policy')}, {sc.get('queued', 0)} queued, swaps "
                     f"{sc.get('swaps_out', 0)} out / {sc.get('swaps_in', 0)} in")
    lines += [f"{label}: {text}" for label, text in worker_rows(st)]
    lines.append("")
    bar_w = 30 if width <= 0 else max(10, min(50, width - 45))
    for name, used, total, what in segment_rows(st):
        lines.append(f"{name:<5} {_bar(used, total, bar_w)} {fmt_bytes(used):>10}  {what}")
    rows = _session_rows(st)
    lines.append("")
    lines += _table(_SESSION_COLUMNS, rows) if rows else ["no sessions"]
    return "\n".join(line[:width] if width > 0 else line for line in lines)


def run(conn, *, once: bool, out: TextIO = sys.stdout, interval_s: float = REFRESH_S) -> int:
    """Print frames until Ctrl-C (or one with `once`). A server that goes away is said in the frame;
    the transport reconnects by itself when it is back at that address."""
    from ..protocol.errors import DjinnError

    tty = out.isatty()
    while True:
        width = shutil.get_terminal_size((100, 24)).columns if tty else 0
        try:
            frame = render_frame(conn.stats(), conn.address, width)
            ok = True
        except DjinnError as e:
            frame, ok = f"djinn top: {conn.address}: {e}", False
        if once:
            print(frame, file=out)
            return 0 if ok else 1
        out.write((CLEAR if tty else "") + frame + "\n" + ("" if tty else "\n"))
        out.flush()
        time.sleep(interval_s)
