"""What torch's caching allocator holds on a CUDA device, by owner (Note [Device memory agrees]).

Note [Device memory agrees]
    The segments say what the VMU owns; `torch.cuda.memory_reserved()` says what the process holds. They
    must agree (issue: the VMU owns device memory), and when they do not, the difference must have a
    name. `breakdown` reads the allocator's snapshot and sorts every reserved byte into one of:
    - `owned`: allocated blocks holding a tensor some owner names (weights, KV pools, the decode
      step's buffers, sessions' tensors), found by pointer, so a view or a shared storage counts once;
    - `graph_pools`: segments of private pools, i.e. the memory CUDA graphs captured their steps in
      (the decode step's activations and gather workspaces: Stack);
    - `cached`: the default pool's reserved but unallocated blocks, freed activations torch keeps for
      the next step (Stack as well: the reserve `pool_for` measured and left free is where they live);
    - `unowned`: allocated blocks no owner names. This is the number that must stay small; its largest
      blocks are listed with their allocation frames when the server records memory history
      (`--memory-history`), so a leak names its line.
    A snapshot walks every block, on the engine thread, so only `stats` asks, and one snapshot serves
    the stats calls of two seconds (`age_s` says how old it is; server/handlers/memory.py).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch

DEFAULT_POOL = (0, 0)


@dataclass(frozen=True)
class Breakdown:
    reserved: int
    allocated: int
    owned: dict[str, int]
    graph_pools: int
    cached: int
    unowned: int
    largest_unowned: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"reserved": self.reserved, "allocated": self.allocated, "owned": dict(self.owned),
                "graph_pools": self.graph_pools, "cached": self.cached, "unowned": self.unowned,
                "largest_unowned": list(self.largest_unowned)}


def breakdown(device: torch.device, owners: Mapping[str, Iterable[torch.Tensor]], top: int = 5) -> Breakdown:
    """Sort the device's reserved bytes by owner (Note [Device memory agrees])."""
    index = torch.device(device).index or 0
    segments = [s for s in torch.cuda.memory_snapshot() if s.get("device", index) == index]
    return classify(segments, {name: [_ptr(t) for t in ts if _on(t, index)] for name, ts in owners.items()}, top)


def classify(segments: list[dict], owner_ptrs: Mapping[str, Iterable[int]], top: int = 5) -> Breakdown:
    """`breakdown` over snapshot segments (torch.cuda.memory_snapshot's format) and owners' data
    pointers: pure, so the sorting is tested without a device."""
    reserved = allocated = graph_pools = cached = 0
    live: list[tuple[int, int, dict]] = []  # (address, size, block) of the default pools' allocated blocks
    for seg in segments:
        reserved += seg["total_size"]
        private = tuple(seg.get("segment_pool_id") or DEFAULT_POOL) != DEFAULT_POOL
        for b in seg["blocks"]:
            used = b["state"] != "inactive"
            allocated += b["size"] if used else 0
            if private:
                continue
            if used:
                live.append((b["address"], b["size"], b))
            else:
                cached += b["size"]
        if private:
            graph_pools += seg["total_size"]
    live.sort(key=lambda x: x[0])
    starts = [a for a, _, _ in live]
    claimed: dict[int, str] = {}  # block address -> its first owner
    for name, ptrs in owner_ptrs.items():
        for p in ptrs:
            i = bisect.bisect_right(starts, p) - 1
            if i >= 0 and p < live[i][0] + live[i][1]:
                claimed.setdefault(live[i][0], name)
    owned = {name: 0 for name in owner_ptrs}
    for a, size, _ in live:
        if a in claimed:
            owned[claimed[a]] += size
    rest = sorted(((size, b) for a, size, b in live if a not in claimed), key=lambda x: -x[0])
    largest = [{"size": size, "frames": _frames(b.get("frames") or [])} for size, b in rest[:top]]
    return Breakdown(reserved, allocated, owned, graph_pools, cached, sum(s for s, _ in rest), largest)


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _on(t, index: int) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "cuda" and (t.device.index or 0) == index


def _frames(frames: list[dict], n: int = 6) -> list[str]:
    """The frames worth showing: Python lines of this project or of transformers; else the innermost
    few (an allocation made inside a library, cuBLAS's workspace, has no Python frame of ours)."""
    ours = [f for f in frames if f.get("filename", "").endswith(".py")
            and ("/djinn/" in f["filename"] or "/transformers/" in f["filename"])]
    return [f"{f.get('filename', '?')}:{f.get('line', '?')} {f.get('name', '')}" for f in (ours or frames)[:n]]


def record_history() -> None:
    """Keep the Python frames of each live allocation, for `largest_unowned` (costs a little per malloc;
    "state": no trace of past events is kept, "python": no C++ frames, which take long to symbolize)."""
    torch.cuda.memory._record_memory_history(enabled="state", context="alloc", stacks="python")
