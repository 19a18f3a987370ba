"""Swap on the CPU (the same code path as CUDA, plain copies): exact layout and bitwise round trips.
Block swaps of sessions' KV are tested with the Data segment (test_data_segment.py)."""
from __future__ import annotations

import pytest
import torch

from djinn.vmu.host_pool import HostPool
from djinn.vmu.swap import Slot, Swapper

from ._util import bits


def sample_tensors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    return [
        torch.randn(2, 4, 7, 16, generator=g),                      # 3584 B
        torch.randn(3, 5, generator=g).half(),                       # 30 B
        torch.randn(1, 2, 3, 8, generator=g).bfloat16(),             # 96 B
        torch.randint(-9, 9, (10,), generator=g),                    # int64, 80 B
        base.t(),                                                    # not contiguous, 96 B
        torch.rand(5, generator=g) > 0.5,                            # bool, 5 B
        torch.empty(2, 0, 4),                                        # no bytes
    ]


def test_swap_round_trip_is_bitwise_with_one_slot_per_tensor():
    pool = HostPool(1 << 16)
    sw = Swapper(pool, "cpu")
    ts = sample_tensors()
    h = sw.swap_out(ts)
    assert h is not None and h.done() and h.direction == "out" and h.elapsed_s() >= 0
    # One region, each tensor at the next 512-byte boundary: 3584 -> 3584, 30 -> 512, ...
    assert [(s.offset, s.nbytes) for s in h.host.slots] == [
        (0, 3584), (3584, 30), (4096, 96), (4608, 80), (5120, 96), (5632, 5), (6144, 0)]
    assert h.host.slots[4] == Slot(5120, 96, (6, 4), torch.float32)
    assert (h.host.alloc.offset, h.host.alloc.nbytes, h.nbytes) == (0, 6144, 3891) and pool.used == 6144
    for host, t in zip(h.tensors, ts):
        assert bits(host) == bits(t) and host.untyped_storage().data_ptr() == pool.buffer.data_ptr()
    back = sw.swap_in(h.host)
    back.wait()
    assert back.done() and back.direction == "in"
    for b, t in zip(back.tensors, ts):
        assert (b.shape, b.dtype, b.device) == (t.shape, t.dtype, t.device) and b.is_contiguous()
        assert bits(b) == bits(t)
        assert b.numel() == 0 or b.data_ptr() not in (t.data_ptr(), pool.buffer.data_ptr())
    sw.release(h.host)
    assert pool.used == 0 and len(pool) == 0
    pool.check()


def test_swap_out_returns_none_when_the_pool_is_full():
    pool = HostPool(4096)
    sw = Swapper(pool, "cpu")
    first = sw.swap_out([torch.ones(512)])                             # 2048 B at 0
    second = sw.swap_out([torch.ones(256), torch.ones(256)])           # 2 x 1024 B at 2048: full
    assert (first.host.alloc.offset, second.host.alloc.offset, pool.free) == (0, 2048, 0)
    assert sw.swap_out([torch.ones(1)]) is None and len(pool) == 2   # nothing allocated on failure
    sw.release(first.host)
    # 3 x 516 B = 1548 B of payload, but each slot starts on a 512 B boundary: 3072 B do not fit 2048.
    assert sw.swap_out([torch.ones(129)] * 3) is None and pool.free == 2048
    third = sw.swap_out([torch.ones(130), torch.ones(130)])            # 2 x 520 B -> 2 x 1024 B: fits
    assert third.host.alloc.offset == 0 and pool.free == 0 and third.nbytes == 1040
    pool.check()


def test_swap_rejects_what_it_cannot_do():
    sw = Swapper(HostPool(4096), "cpu")
    with pytest.raises(ValueError, match="swapper device is cpu"):
        sw.swap_out([torch.empty(4, device="meta")])
    with pytest.raises(ValueError, match="no bytes"):
        sw.swap_out([torch.empty(0)])
