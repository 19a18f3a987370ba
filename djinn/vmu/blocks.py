"""The KV block allocator: which fixed-size blocks of a model's KV pool are free, held or cached.

Pure bookkeeping over block ids (no torch): the pool (kv_pool.py) owns the device memory the ids
index. Shaped after vLLM's `BlockPool` and nano-vllm's `BlockManager`: handles out, free lists
hidden, "no memory" is a `None` the caller acts on, a broken invariant is an exception.

Note [Block ref counts]
    A block is in exactly one of three places: free (`_free`, never written by anyone), held (ref
    count >= 1: in the block tables of that many sessions), or cached (ref count 0 but keyed by the
    tokens it holds, kept for reuse in `_cached`, least recently released first). `allocate` takes
    free blocks first and evicts cached ones only when no free block is left, so cached blocks count
    as free for admission (`available`). A block shared by several tables is written by none of them:
    the writer copies it first (copy on write, `KVPool.ensure_private`).

Note [Prefix keys]
    A full block can be keyed by (model, hash of every token id up to and including its last one):
    `chain_key(parent, tokens)` chains the key of the block before it with this block's token ids, so
    two sequences share a key for block i exactly when their first (i + 1) x block_tokens tokens are
    equal. `lookup(key)` hands out a held reference to the cached block; `publish(block, key)` records
    a block whose contents are final. A key names one block; publishing a second block under a key
    that exists keeps the first.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Iterable, Sequence


def chain_key(parent: bytes | None, tokens: Sequence[int]) -> bytes:
    """Note [Prefix keys]: the key of a full block whose tokens follow the block keyed `parent`."""
    h = hashlib.blake2b(parent or b"root", digest_size=16)
    h.update(b",".join(str(int(t)).encode() for t in tokens))
    return h.digest()


class BlockAllocator:
    """Ids 0..n-1, minus `reserved` ids at the front that are never handed out (the pool's scratch)."""

    def __init__(self, num_blocks: int, reserved: int = 0):
        if num_blocks < reserved or reserved < 0:
            raise ValueError(f"{num_blocks} blocks cannot keep {reserved} reserved")
        self.num_blocks = num_blocks
        self.reserved = reserved
        self._free: list[int] = list(range(num_blocks - 1, reserved - 1, -1))  # pop() gives the lowest id
        self._refs: dict[int, int] = {}
        self._cached: OrderedDict[int, None] = OrderedDict()  # ref count 0, keyed: evictable, LRU first
        self._key_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self.evictions = 0
        self.hits = 0

    # -- counts ------------------------------------------------------------------------------------
    @property
    def total(self) -> int:
        return self.num_blocks - self.reserved

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def cached(self) -> int:
        return len(self._cached)

    @property
    def available(self) -> int:
        """Blocks `allocate` can hand out now: free plus evictable cached ones."""
        return len(self._free) + len(self._cached)

    @property
    def held(self) -> int:
        return len(self._refs)

    def refcount(self, block: int) -> int:
        return self._refs.get(block, 0)

    # -- allocation --------------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int] | None:
        """`n` blocks with ref count 1, lowest free ids first; None (nothing taken) when fewer are available."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > self.available:
            return None
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:
                b, _ = self._cached.popitem(last=False)
                del self._block_of[self._key_of.pop(b)]
                self.evictions += 1
            self._refs[b] = 1
            out.append(b)
        return out

    def incref(self, blocks: Iterable[int]) -> None:
        for b in blocks:
            if b not in self._refs:
                raise RuntimeError(f"incref of block {b}, which nobody holds")
            self._refs[b] += 1

    def release(self, blocks: Iterable[int]) -> int:
        """Drop one reference to each block; returns how many became unreferenced (free or cached)."""
        n = 0
        freed = []
        for b in blocks:
            r = self._refs.get(b)
            if r is None:
                raise RuntimeError(f"release of block {b}, which nobody holds (released twice?)")
            if r > 1:
                self._refs[b] = r - 1
                continue
            del self._refs[b]
            n += 1
            if b in self._key_of:
                self._cached[b] = None  # the most recently released is evicted last
            else:
                freed.append(b)
        self._free.extend(sorted(freed, reverse=True))  # lowest next: a table's blocks stay in runs
        return n

    # -- prefix cache (Note [Prefix keys]) --------------------------------------------------------------
    def lookup(self, key: bytes) -> int | None:
        """The block cached under `key`, with a reference taken for the caller; None when there is none."""
        b = self._block_of.get(key)
        if b is None:
            return None
        if b in self._cached:
            del self._cached[b]
            self._refs[b] = 1
        else:
            self._refs[b] += 1
        self.hits += 1
        return b

    def publish(self, block: int, key: bytes) -> None:
        """Record that `block` (held) holds the tokens keyed `key`."""
        if block not in self._refs:
            raise RuntimeError(f"publish of block {block}, which nobody holds")
        if key in self._block_of or block in self._key_of:
            return
        self._key_of[block] = key
        self._block_of[key] = block

    def unpublish(self, block: int) -> None:
        """Forget the block's key (it is about to be written)."""
        key = self._key_of.pop(block, None)
        if key is not None:
            del self._block_of[key]

    def key_of(self, block: int) -> bytes | None:
        return self._key_of.get(block)

    def check(self) -> None:
        """Verify Note [Block ref counts]; raises AssertionError naming what is broken."""
        free, held, cached = set(self._free), set(self._refs), set(self._cached)
        assert len(free) == len(self._free), "a block is twice in the free list"
        assert not (free & held) and not (free & cached) and not (held & cached), "a block is in two places"
        assert free | held | cached == set(range(self.reserved, self.num_blocks)), "blocks lost or invented"
        assert all(r >= 1 for r in self._refs.values()), "a held block with ref count < 1"
        assert cached <= set(self._key_of), "a cached block without a key"
        assert all(self._block_of[k] == b for b, k in self._key_of.items()), "key maps disagree"
