"""One `stats()` for a server with several workers, from each worker's (Note [One server, several
workers] in front.py)."""
from __future__ import annotations


def merge_stats(parts: dict[int, dict], front) -> dict:
    """One `stats()` from every worker's: the first's shape, sessions and models of all of them (each
    session says its worker), segments, KV blocks and scheduler counters summed (a model's pool on
    two workers counts both pools' blocks), and `workers` with each one's own."""
    ranks = sorted(parts)
    first = dict(parts[ranks[0]]) if ranks else {}
    sessions, models = {}, {}
    for r in ranks:
        for sid, s in (parts[r].get("sessions") or {}).items():
            if sid in sessions:  # a tensor-parallel session: its first worker's entry, every worker named
                sessions[sid].setdefault("workers", [sessions[sid]["worker"]]).append(r)
                continue
            sessions[sid] = dict(s, worker=r)
        for mid, m in (parts[r].get("models") or {}).items():
            merged = models.setdefault(mid, dict(m, workers=[], sessions=[]))
            merged["workers"].append(r)
            merged["sessions"] = sorted({*merged["sessions"], *(m.get("sessions") or [])})
    first.update(
        sessions=sessions, models=models, **{k: _summed([parts[r].get(k) for r in ranks])
                                             for k in ("segments", "kv", "scheduler")},
        device=", ".join(front.workers[r].device for r in ranks),
        requests_served=sum(parts[r].get("requests_served", 0) or 0 for r in ranks),
        cluster={"workers": len(front.workers), "live": sum(w.alive for w in front.workers),
                 "balance_moves": front.moves.balance_moves},
        workers=[{"rank": r, "device": front.workers[r].device, "alive": front.workers[r].alive,
                  "pid": (front.workers[r].info or {}).get("pid"),
                  "sessions": len(parts[r].get("sessions") or {}), **{k: parts[r].get(k) for k in
                  ("segments", "kv", "device_memory", "scheduler", "requests_served")}} for r in ranks]
        + [{"rank": w.rank, "device": w.device, "alive": False} for w in front.workers if not w.alive])
    return first


_KEPT = frozenset({"block_tokens", "block_bytes", "policy", "step_tokens", "swap_bw"})  # alike on every worker


def _summed(values: list):
    """Numbers summed over the workers, maps merged key by key; anything else (and the sizes and names
    every worker has alike) as the first worker has it."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    head = present[0]
    if isinstance(head, dict):
        keys = list(dict.fromkeys(k for v in present if isinstance(v, dict) for k in v))
        return {k: (head.get(k) if k in _KEPT and k in head else
                    _summed([v.get(k) for v in present if isinstance(v, dict)])) for k in keys}
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return sum(present)
    return head
