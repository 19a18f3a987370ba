"""Tier 1: the KV block allocator (djinn/vmu/blocks.py): free list order, ref counts, prefix keys,
eviction of cached blocks, and the invariant check, with exact expected ids."""
from __future__ import annotations

import pytest

from djinn.vmu.blocks import BlockAllocator, chain_key


def test_lowest_ids_first_and_reserved_ids_never_handed_out():
    a = BlockAllocator(6, reserved=1)
    assert (a.total, a.free, a.available) == (5, 5, 5)
    assert a.allocate(2) == [1, 2]
    assert a.allocate(4) is None                 # only 3 left: nothing taken
    assert a.free == 3
    assert a.allocate(3) == [3, 4, 5]
    assert a.allocate(1) is None and a.allocate(0) == []
    a.check()


def test_release_returns_blocks_and_reuses_the_last_released_first():
    a = BlockAllocator(5)
    x = a.allocate(3)
    assert x == [0, 1, 2]
    assert a.release([1]) == 1
    assert a.allocate(1) == [1]
    assert a.release(x) == 3 and a.free == 5
    with pytest.raises(RuntimeError, match="nobody holds"):
        a.release([0])
    a.check()


def test_ref_counts_free_a_block_only_at_its_last_release():
    a = BlockAllocator(4)
    (b,) = a.allocate(1)
    a.incref([b])
    a.incref([b])
    assert a.refcount(b) == 3
    assert a.release([b]) == 0 and a.release([b]) == 0
    assert a.refcount(b) == 1 and a.free == 3
    assert a.release([b]) == 1 and a.refcount(b) == 0 and a.free == 4
    with pytest.raises(RuntimeError, match="nobody holds"):
        a.incref([b])
    a.check()


def test_prefix_keys_chain_over_every_earlier_token():
    k1 = chain_key(None, [1, 2, 3, 4])
    assert chain_key(None, [1, 2, 3, 4]) == k1
    assert chain_key(None, [1, 2, 3, 5]) != k1
    k2 = chain_key(k1, [5, 6, 7, 8])
    assert chain_key(chain_key(None, [9, 2, 3, 4]), [5, 6, 7, 8]) != k2  # same block, other prefix
    assert len(k1) == 16


def test_cached_blocks_are_reused_by_key_and_evicted_least_recent_first():
    a = BlockAllocator(4)
    x, y, z = a.allocate(3)
    a.publish(x, b"kx")
    a.publish(y, b"ky")
    assert a.release([x, y, z]) == 3
    assert (a.free, a.cached, a.available) == (2, 2, 4)  # cached blocks count as available
    assert a.lookup(b"ky") == y and a.refcount(y) == 1 and a.cached == 1
    assert a.lookup(b"nope") is None
    assert a.allocate(2) == [z, 3]                         # free ones before evicting
    assert a.allocate(1) == [x] and a.evictions == 1        # now the cached x is evicted
    assert a.lookup(b"kx") is None                          # its key went with it
    a.check()


def test_lookup_of_a_held_block_shares_it():
    a = BlockAllocator(2)
    (x,) = a.allocate(1)
    a.publish(x, b"k")
    assert a.lookup(b"k") == x and a.refcount(x) == 2 and a.hits == 1
    a.unpublish(x)
    assert a.key_of(x) is None and a.lookup(b"k") is None
    a.release([x, x])
    assert a.free == 2
    a.check()
