"""`stats()`'s view of device memory: the segments next to what torch's allocator holds, every reserved
byte given an owner (Note [Device memory agrees] in djinn/vmu/device_memory.py)."""
from __future__ import annotations

import time
import weakref

import torch

from ...vmu.device_memory import Breakdown, breakdown

#: A snapshot walks every block of the allocator, on the engine thread, and stats() is polled (experiment 1
#: samples it four times a second): one breakdown serves the calls of this many seconds.
SNAPSHOT_TTL_S = 2.0
_last: "weakref.WeakKeyDictionary[object, tuple[float, Breakdown]]" = weakref.WeakKeyDictionary()


def owners(engine, workspace: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """The device tensors each segment owns (`workspace`: `workspace_tensors`)."""
    return {
        "text": engine.text.device_tensors() + [m.streamed.streamer.ring for m in engine.models
                                                if getattr(m, "streamed", None) is not None
                                                and getattr(m.streamed.streamer, "ring", None) is not None],
        "kv_pools": [p.kv for p in engine.data.pools.values()],
        "workspace": workspace,
        "data": [t for s in engine.sessions for t in (*s.tensors.values(), *s.graphs.device_tensors())],
    }


def workspace_tensors(engine) -> list[torch.Tensor]:
    """The steps' own buffers: each KV pool's staging buffer, each decode pool's inputs and tables."""
    pools = engine.data.pools.values()
    decode = [m.fast for m in engine.models if getattr(m, "fast", None) is not None]
    return [t for p in pools for t in p.staging()] + [t for d in decode for t in d.buffers()]


def device_memory(engine) -> tuple[dict | None, dict]:
    """(`device_memory`, the `workspace` segment's parts). On the CPU the first is None and the
    workspace is the step's buffers alone."""
    workspace = workspace_tensors(engine)
    buffers = sum(_nbytes(t) for t in workspace)
    if engine.device.type != "cuda":
        return None, {"buffers": buffers, "graph_pools": 0, "cached": 0}
    now = time.monotonic()
    last = _last.get(engine)
    if last is None or now - last[0] > SNAPSHOT_TTL_S:
        last = _last[engine] = (now, breakdown(engine.device, owners(engine, workspace)))
    b = last[1]
    free, total = torch.cuda.mem_get_info(engine.device)
    # The Stack's step workspaces: the step's own buffers, the graphs' private pools (their captured
    # activations) and the allocator's cache (freed activations kept for the next step).
    return ({"total": total, "free": free, "age_s": round(now - last[0], 3), **b.as_dict()},
            {"buffers": buffers, "graph_pools": b.graph_pools, "cached": b.cached})


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
