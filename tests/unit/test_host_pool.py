"""The pinned host pool's allocator: exact offsets, first fit, coalescing, None when full."""
from __future__ import annotations

import random

import pytest
import torch

from djinn.vmu.host_pool import HostAlloc, HostPool

A = 512


def test_first_fit_offsets_and_alignment():
    p = HostPool(8 * A)
    assert (p.capacity, p.used, p.free, p.largest_free, p.pinned) == (8 * A, 0, 8 * A, 8 * A, False)
    assert p.buffer.dtype == torch.uint8 and p.buffer.shape == (8 * A,)
    a = p.allocate(1)              # rounded up to one alignment unit
    b = p.allocate(A + 1)          # two units
    c = p.allocate(A)
    assert (a, b, c) == (HostAlloc(0, A), HostAlloc(A, 2 * A), HostAlloc(3 * A, A))
    assert (p.used, p.free, p.largest_free, len(p)) == (4 * A, 4 * A, 4 * A, 3)
    p.check()


def test_none_when_nothing_fits_and_the_largest_block_decides():
    p = HostPool(4 * A)
    blocks = [p.allocate(A) for _ in range(4)]
    assert p.allocate(1) is None and p.free == 0 and p.largest_free == 0
    p.release(blocks[0])
    p.release(blocks[2])
    assert (p.free, p.largest_free, p.free_blocks) == (2 * A, A, [(0, A), (2 * A, A)])
    assert p.allocate(2 * A) is None          # 2 units free, but not in one block
    assert p.allocate(A) == HostAlloc(0, A)   # first fit: the lowest block
    p.check()


def test_release_coalesces_with_both_neighbours():
    p = HostPool(6 * A)
    a, b, c, d = (p.allocate(A) for _ in range(4))   # 0, 1, 2, 3; [4, 6) free
    p.release(a)
    p.release(c)
    assert p.free_blocks == [(0, A), (2 * A, A), (4 * A, 2 * A)]
    p.release(b)                                       # joins 0 and 2 into [0, 3)
    assert p.free_blocks == [(0, 3 * A), (4 * A, 2 * A)]
    p.release(d)                                       # joins everything
    assert p.free_blocks == [(0, 6 * A)] and p.used == 0 and len(p) == 0
    p.check()
    assert p.allocate(6 * A) == HostAlloc(0, 6 * A)


def test_first_fit_reuses_a_freed_hole_before_the_tail():
    p = HostPool(10 * A)
    a = p.allocate(3 * A)
    p.allocate(A)
    p.release(a)
    assert p.allocate(2 * A) == HostAlloc(0, 2 * A)    # in the hole, leaving [2, 3) free
    assert p.allocate(2 * A) == HostAlloc(4 * A, 2 * A)  # the hole's rest is too small: the tail
    assert p.free_blocks == [(2 * A, A), (6 * A, 4 * A)]
    p.check()


def test_broken_invariants_raise():
    p = HostPool(4 * A)
    a = p.allocate(A)
    p.release(a)
    with pytest.raises(RuntimeError, match="released already"):
        p.release(a)
    with pytest.raises(RuntimeError, match="has not handed out"):
        p.release(HostAlloc(A, A))
    b = p.allocate(2 * A)
    with pytest.raises(RuntimeError):
        p.release(HostAlloc(b.offset, A))           # wrong size
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            p.allocate(bad)
    with pytest.raises(ValueError, match="power of two"):
        HostPool(4 * A, align=3)
    with pytest.raises(ValueError, match="bytes >= 0"):
        HostPool(-1)
    p._free.append((3 * A, A))                       # corrupt it: check() must notice
    with pytest.raises(AssertionError):
        p.check()


def test_views_are_regions_of_one_buffer():
    p = HostPool(4 * A)
    a, b = p.allocate(A), p.allocate(A)
    p.view(b).fill_(7)
    p.view(a).fill_(3)
    assert p.view(a).shape == (A,) and p.view(a).data_ptr() == p.buffer.data_ptr()
    assert p.buffer[:A].eq(3).all() and p.buffer[A:2 * A].eq(7).all()


def test_capacity_rounds_down_to_alignment_and_empty_pool():
    assert HostPool(3 * A + 100).capacity == 3 * A
    p = HostPool(0)
    assert p.allocate(1) is None and p.largest_free == 0
    p.check()


def test_random_allocate_release_keeps_exact_accounting():
    rng = random.Random(4)
    p = HostPool(256 * A)
    live: list[HostAlloc] = []
    for _ in range(3000):
        if live and rng.random() < 0.45:
            p.release(live.pop(rng.randrange(len(live))))
        else:
            n = rng.randint(1, 24 * A)
            a = p.allocate(n)
            if a is None:
                assert p.largest_free < n
            else:
                assert a.nbytes == -(-n // A) * A and a.offset % A == 0
                live.append(a)
        assert p.used == sum(a.nbytes for a in live)
        p.check()
    spans = sorted((a.offset, a.offset + a.nbytes) for a in live)
    assert all(e1 <= s2 for (_, e1), (s2, _) in zip(spans, spans[1:]))  # no two regions overlap
    for a in live:
        p.release(a)
    assert p.free_blocks == [(0, 256 * A)] and p.used == 0
