"""Tier 1: the Data segment on the CPU (the same code path as CUDA, plain copies): residency states,
exact byte accounting per session through swap-out, prefetch, drop and close by blocks, and hit/miss
counting.

Sizes: the tiny Llama keeps 512 B of KV per token (2 layers x k,v x 2 heads x 16 x 4 B); with 4-token
blocks a block is 2048 B, so 10 tokens hold 3 blocks (6144 B)."""
from __future__ import annotations

import torch

from djinn.scheduler.types import SessionState
from djinn.server.sessions import KVState, Session
from djinn.vmu.data import DataSegment
from djinn.vmu.kv_pool import KVPool, KVShape

from ..models import tiny_gpt2, tiny_llama

BLOCK = 2048


def segment(host_bytes: int, blocks: int = 16, model=None) -> tuple[DataSegment, KVPool]:
    seg = DataSegment(torch.device("cpu"), host_bytes, swap_bw=1e9)
    pool = KVPool(KVShape.of_module(model or tiny_llama(seed=1)), blocks, 4, "cpu")
    seg.add_pool("m", pool)
    return seg, pool


def session_with_kv(seg: DataSegment, sid: str, tokens: int, model, pool) -> Session:
    s = Session(sid, "client", None)
    ids = torch.arange(3, 3 + tokens).unsqueeze(0)
    state = KVState.empty(pool, ids[:, :0])
    assert pool.reserve(state.table, tokens)
    with torch.no_grad():
        model(ids, past_key_values=state.cache, use_cache=True)
    state.ids = ids
    seg.attach_kv(s, "m", state)
    return s


def test_kv_bytes_per_token_from_configs():
    assert KVShape.of_module(tiny_llama()).token_bytes == 2 * 2 * 2 * 16 * 4
    assert KVShape.of_module(tiny_gpt2().half()).token_bytes == 2 * 2 * 4 * 16 * 2


def test_swap_out_prefetch_and_close_keep_exact_accounting():
    model = tiny_llama(seed=1)
    seg, pool = segment(1 << 20, model=model)
    s = session_with_kv(seg, "a", 10, model, pool)
    t = s.kv["m"].table
    ref = [pool.read(t, i, 10) for i in (0, 1)]
    seg.sync(s)
    assert seg.mem("a").state == SessionState.ACTIVE
    assert (seg.gpu_bytes("a"), seg.host_bytes("a")) == (3 * BLOCK, 0)
    assert seg.memory_view().gpu_used == 3 * BLOCK and seg.capacity() == 15 * BLOCK
    seg.io_wait("a", now=5.0, eta_s=2.0)
    assert seg.mem("a").state == SessionState.IO_WAIT

    assert seg.swap_out(s)
    assert seg.mem("a").state == SessionState.SWAPPING_OUT
    assert seg.acct.session("a") == {"text": 0, "data": 3 * BLOCK, "stack": 0, "host": 3 * BLOCK}
    assert pool.alloc.held == 3                                  # held until the copy is done
    assert seg.poll() == ["a"]                                   # CPU copies are done at once
    assert seg.mem("a").state == SessionState.SWAPPED and t.rows == [[]] and t.length == 10
    assert pool.alloc.held == 0
    assert seg.acct.session("a") == {"text": 0, "data": 0, "stack": 0, "host": 3 * BLOCK}
    assert seg.memory_view().host_used == 3 * BLOCK and seg.memory_view().gpu_used == 0
    assert seg.stats("a", s)["kv_host_blocks"] == 3 and seg.stats("a", s)["kv_blocks"] == 0
    assert seg.kv_summary()["models"]["m"]["host_blocks_used"] == 3

    other = pool.new_table(1)
    assert pool.reserve(other, 8)                                # takes blocks 1 and 2: a comes back elsewhere
    assert seg.prefetch(s)
    assert t.rows == [[3, 4, 5]]
    assert seg.acct.session("a")["data"] == 3 * BLOCK            # taken at issue
    assert seg.poll() == ["a"]
    assert seg.mem("a").state == SessionState.IO_WAIT            # still waiting: back before its return
    for i in (0, 1):
        k, v = pool.read(t, i, 10)
        assert torch.equal(k, ref[i][0]) and torch.equal(v, ref[i][1])
    assert seg.acct.session("a") == {"text": 0, "data": 3 * BLOCK, "stack": 0, "host": 0}
    seg.request_arrived("a")
    c = seg.mem("a").counters
    assert (c.swaps_out, c.swaps_in, c.prefetch_hits, c.prefetch_misses, c.bytes_moved) == (1, 1, 1, 0, 2 * 3 * BLOCK)
    assert seg.mem("a").state == SessionState.ACTIVE

    seg.close(s)
    pool.release(other)
    assert seg.acct.segments() == {"text": 0, "data": 0, "stack": 0, "host": 0}
    assert seg.pool.used == 0 and pool.alloc.held == 0
    seg.acct.check()
    seg.pool.check()
    pool.alloc.check()


def test_a_swapped_session_continues_bitwise():
    model = tiny_llama(seed=1)
    seg, pool = segment(1 << 20, model=model)
    s = session_with_kv(seg, "a", 10, model, pool)
    more = torch.tensor([[7, 8, 9]])
    with torch.no_grad():
        ref = model(torch.cat([s.kv["m"].ids, more], 1), use_cache=False).logits[:, -3:]
    assert seg.swap_out(s) and seg.poll() == ["a"]
    assert seg.prefetch(s) and seg.poll() == ["a"]
    assert pool.reserve(s.kv["m"].table, 13)
    with torch.no_grad():
        out = model(more, past_key_values=s.kv["m"].cache, use_cache=True).logits
    assert torch.allclose(out, ref, atol=1e-5)
    seg.close(s)


def test_prefetch_without_free_blocks_starts_nothing():
    model = tiny_llama(seed=1)
    seg, pool = segment(1 << 20, blocks=5, model=model)        # 4 usable blocks
    s = session_with_kv(seg, "a", 10, model, pool)
    assert seg.swap_out(s) and seg.poll() == ["a"]
    hog = pool.new_table(1)
    assert pool.reserve(hog, 8)                                  # 2 of 4 blocks: a needs 3
    assert not seg.prefetch(s)
    assert seg.mem("a").state == SessionState.SWAPPED and pool.alloc.held == 2
    assert seg.mem("a").counters.prefetch_failures == 1 and seg.host_bytes("a") == 3 * BLOCK
    pool.release(hog)
    assert seg.prefetch(s) and seg.poll() == ["a"]
    seg.close(s)
    assert pool.alloc.held == 0 and seg.pool.used == 0


def test_request_while_away_is_a_miss_and_close_frees_the_host_region():
    model = tiny_llama(seed=1)
    seg, pool = segment(1 << 20, model=model)
    s = session_with_kv(seg, "b", 4, model, pool)
    assert seg.swap_out(s) and seg.poll() == ["b"]
    seg.request_arrived("b")
    assert seg.mem("b").counters.prefetch_misses == 1
    assert seg.pool.used == BLOCK
    seg.close(s)
    assert seg.pool.used == 0 and seg.acct.segments()["host"] == 0


def test_drop_keeps_ids_and_frees_the_blocks():
    model = tiny_llama(seed=1)
    seg, pool = segment(0, model=model)
    s = session_with_kv(seg, "c", 6, model, pool)
    seg.drop(s)
    assert seg.mem("c").state == SessionState.DROPPED
    assert s.kv["m"].table.length == 0 and s.kv["m"].ids.shape == (1, 6) and pool.alloc.held == 0
    assert seg.gpu_bytes("c") == 0 and seg.mem("c").counters.drops == 1


def test_detach_kv_of_a_swapped_session_frees_its_region():
    model = tiny_llama(seed=1)
    seg, pool = segment(1 << 20, model=model)
    s = session_with_kv(seg, "d", 5, model, pool)
    assert seg.swap_out(s) and seg.poll()
    seg.detach_kv(s, "m")
    assert seg.mem("d").state == SessionState.NEW and seg.pool.used == 0
    assert seg.acct.session("d")["host"] == 0 and "m" not in s.kv


def test_swap_out_fails_cleanly_when_the_host_pool_is_too_small():
    model = tiny_llama(seed=1)
    seg, pool = segment(1024, model=model)
    s = session_with_kv(seg, "e", 8, model, pool)
    assert not seg.swap_out(s)
    assert seg.mem("e").state == SessionState.ACTIVE and s.kv["m"].table.blocks == 2 and pool.alloc.held == 2


def test_kv_layers_reads_the_same_tokens_from_the_device_and_the_host():
    model = tiny_llama(seed=1)
    seg, pool = segment(1 << 20, model=model)
    s = session_with_kv(seg, "f", 7, model, pool)
    on_device = seg.kv_layers(s, "m")
    assert len(on_device) == 2 and on_device[0][0].shape == (1, 2, 7, 16)
    assert seg.swap_out(s) and seg.poll()
    away = seg.kv_layers(s, "m")
    for (k1, v1), (k2, v2) in zip(on_device, away):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
    seg.close(s)
