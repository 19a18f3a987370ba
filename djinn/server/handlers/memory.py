"""`stats()`'s view of device memory: the segments next to what torch's allocator holds, every reserved
byte given an owner (Note [Device memory agrees] in djinn/vmu/device_memory.py)."""
from __future__ import annotations

import torch

from ...vmu.device_memory import breakdown


def owners(engine) -> dict[str, list[torch.Tensor]]:
    """The device tensors each segment owns."""
    pools = engine.data.pools.values()
    decode = [m.fast for m in engine.models if getattr(m, "fast", None) is not None]
    return {
        "text": engine.text.device_tensors() + [m.streamed.streamer.ring for m in engine.models
                                                if getattr(m, "streamed", None) is not None
                                                and getattr(m.streamed.streamer, "ring", None) is not None],
        "kv_pools": [p.kv for p in pools],
        "workspace": [t for p in pools for t in p.buffers()[1:]] + [t for d in decode for t in d.buffers()],
        "data": [t for s in engine.sessions for t in (*s.tensors.values(), *s.graphs.device_tensors())],
    }


def device_memory(engine) -> tuple[dict | None, dict]:
    """(`device_memory`, the `workspace` segment's parts). On the CPU the first is None and the
    workspace is the step's buffers alone."""
    own = owners(engine)
    buffers = sum(_nbytes(t) for t in own["workspace"])
    if engine.device.type != "cuda":
        return None, {"buffers": buffers, "graph_pools": 0, "cached": 0}
    b = breakdown(engine.device, own)
    free, total = torch.cuda.mem_get_info(engine.device)
    # The Stack's step workspaces: the step's own buffers, the graphs' private pools (their captured
    # activations) and the allocator's cache (freed activations kept for the next step).
    return ({"total": total, "free": free, **b.as_dict()},
            {"buffers": buffers, "graph_pools": b.graph_pools, "cached": b.cached})


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
