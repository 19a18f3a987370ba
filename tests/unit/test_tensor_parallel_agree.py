"""Note [Tensor-parallel decode]: whether a call can start is agreed over the block (`agree`), so a worker
short of KV blocks fails the call on every worker of its block instead of leaving them in a collective.
Two real gloo processes."""
from __future__ import annotations

import multiprocessing as mp
import socket


def _agree_in(rank: int, port: int, oks: list[bool], out) -> None:
    import torch
    import torch.distributed as dist

    from djinn.server.cluster import tensor_parallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        out.put((rank, [tensor_parallel.agree(ok[rank], 2, torch.device("cpu")) for ok in oks]))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_call_starts_only_where_every_worker_of_the_block_can():
    oks = [(True, True), (True, False), (False, True), (False, False)]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_agree_in, args=(r, port, oks, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = dict(out.get(timeout=90) for _ in procs)
    for p in procs:
        p.join(30)
    assert got == {0: [True, False, False, False], 1: [True, False, False, False]}
