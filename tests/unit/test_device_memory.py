"""Sorting the allocator's snapshot by owner (Note [Device memory agrees]): exact bytes."""
from djinn.vmu.device_memory import classify

MIB = 2**20


def seg(address, blocks, pool=(0, 0)):
    return {"address": address, "total_size": sum(s for s, _ in blocks), "segment_pool_id": pool,
            "blocks": [{"address": address + sum(s for s, _ in blocks[:i]), "size": s, "state": st,
                        "frames": [{"filename": "/x/torch/cuda/blas.py", "line": 1, "name": "ws"},
                                   {"filename": "/src/djinn/server/x.py", "line": 7, "name": "f"}]}
                       for i, (s, st) in enumerate(blocks)]}


def test_bytes_are_sorted_into_owned_graph_pools_cached_and_unowned():
    segments = [
        seg(0x1000_0000, [(8 * MIB, "active_allocated"), (2 * MIB, "inactive"), (4 * MIB, "active_allocated")]),
        seg(0x2000_0000, [(6 * MIB, "active_allocated"), (1 * MIB, "active_awaiting_free")]),
        seg(0x3000_0000, [(3 * MIB, "active_allocated"), (5 * MIB, "inactive")], pool=(1, 0)),  # a graph's pool
    ]
    # "text" owns the first block twice (a view at an offset counts once); "kv" the 6 MiB one; a
    # pointer outside every allocated block (in the cached one, in the graph pool) claims nothing.
    owners = {"text": [0x1000_0000, 0x1000_0000 + 100], "kv": [0x2000_0000, 0x1000_0000 + 9 * MIB, 0x3000_0000]}
    b = classify(segments, owners, top=2)
    assert b.reserved == 29 * MIB
    assert b.allocated == 22 * MIB                      # awaiting-free blocks are still allocated
    assert b.owned == {"text": 8 * MIB, "kv": 6 * MIB}
    assert b.graph_pools == 8 * MIB and b.cached == 2 * MIB
    assert b.unowned == 5 * MIB                         # the 4 MiB block and the 1 MiB one awaiting free
    assert [x["size"] for x in b.largest_unowned] == [4 * MIB, 1 * MIB]
    assert b.largest_unowned[0]["frames"] == ["/src/djinn/server/x.py:7 f"]  # our own frames first
    # every reserved byte has exactly one place
    assert sum(b.owned.values()) + b.graph_pools + b.cached + b.unowned == b.reserved


def test_frames_of_an_allocation_without_our_frames_are_the_innermost():
    s = seg(0, [(MIB, "active_allocated")])
    s["blocks"][0]["frames"] = [{"filename": "??", "line": 0, "name": "cublasCreate"}]
    assert classify([s], {}).largest_unowned == [{"size": MIB, "frames": ["??:0 cublasCreate"]}]


def test_stats_reuse_one_snapshot_for_a_couple_of_seconds(monkeypatch):
    """stats() is polled on the engine thread; a snapshot walks every block: one serves SNAPSHOT_TTL_S."""
    import types

    import torch

    from djinn.server.handlers import memory
    from djinn.vmu.device_memory import Breakdown

    calls, clock = [], [100.0]
    monkeypatch.setattr(memory, "breakdown", lambda dev, own: calls.append(own) or Breakdown(10, 8, {}, 1, 2, 0))
    monkeypatch.setattr(memory.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev: (5, 20))

    class Engine:  # what device_memory reads of an engine
        device = torch.device("cuda:0")
        data = types.SimpleNamespace(pools={})
        models, sessions = [], []
        text = types.SimpleNamespace(device_tensors=lambda: [])

    e = Engine()
    first, parts = memory.device_memory(e)
    clock[0] += memory.SNAPSHOT_TTL_S / 2
    second, _ = memory.device_memory(e)
    assert len(calls) == 1 and first["age_s"] == 0 and second["age_s"] == memory.SNAPSHOT_TTL_S / 2
    assert parts == {"buffers": 0, "graph_pools": 1, "cached": 2} and second["reserved"] == 10
    clock[0] += memory.SNAPSHOT_TTL_S
    assert memory.device_memory(e)[0]["age_s"] == 0 and len(calls) == 2
