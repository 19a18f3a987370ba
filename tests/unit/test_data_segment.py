"""Tier 1: the Data segment on the CPU (the same code path as CUDA, plain copies): residency states,
exact byte accounting per session through swap-out, prefetch, drop and close, and hit/miss counting."""
from __future__ import annotations

import torch
from transformers import DynamicCache

from djinn.scheduler.types import SessionState
from djinn.server.sessions import KVState, Session
from djinn.vmu.data import DataSegment, aligned, kv_bytes_per_token

from ..models import tiny_gpt2, tiny_llama


def session_with_cache(sid: str, tokens: int, model) -> Session:
    s = Session(sid, "client", None)
    cache = DynamicCache(config=model.config)
    ids = torch.arange(3, 3 + tokens).unsqueeze(0)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    s.kv["m"] = KVState(cache, ids)
    return s


def test_kv_bytes_per_token_from_configs():
    # tiny llama: 2 layers x 2 kv heads x 16 head dim x (k, v) x 4 bytes
    assert kv_bytes_per_token(tiny_llama().config, torch.float32) == 2 * 2 * 2 * 16 * 4
    # tiny gpt2 (attribute map): 2 layers x 4 heads x 16 x 2 x 2 bytes
    assert kv_bytes_per_token(tiny_gpt2().config, torch.float16) == 2 * 2 * 4 * 16 * 2


def test_swap_out_prefetch_and_close_keep_exact_accounting():
    model = tiny_llama(seed=1)
    seg = DataSegment(torch.device("cpu"), 1 << 20, budget_bytes=64 << 10, swap_bw=1e9)
    s = session_with_cache("a", 10, model)                   # 4 tensors of 10 x 128 B = 1280 -> 1536
    ref = {k: t.clone() for k, t in vars(s.kv["m"].cache.layers[0]).items() if isinstance(t, torch.Tensor)}
    seg.sync(s)
    assert seg.mem("a").state == SessionState.ACTIVE
    assert (seg.gpu_bytes("a"), seg.host_bytes("a")) == (4 * 1536, 0)
    seg.io_wait("a", now=5.0, eta_s=2.0)
    assert seg.mem("a").state == SessionState.IO_WAIT

    assert seg.swap_out(s)
    assert seg.mem("a").state == SessionState.SWAPPING_OUT
    assert seg.acct.session("a") == {"text": 0, "data": 4 * 1536, "stack": 0, "host": 4 * 1536}
    assert s.kv["m"].cache.layers[0].keys is None                # released from the cache
    assert seg.poll() == ["a"]                                   # CPU copies are done at once
    assert seg.mem("a").state == SessionState.SWAPPED
    assert seg.acct.session("a") == {"text": 0, "data": 0, "stack": 0, "host": 4 * 1536}
    assert seg.memory_view().host_used == 4 * 1536 and seg.memory_view().gpu_used == 0

    assert seg.prefetch(s)
    assert seg.acct.session("a")["data"] == 4 * 1536             # taken at issue
    assert seg.poll() == ["a"]
    assert seg.mem("a").state == SessionState.IO_WAIT            # still waiting: back before its return
    for k, t in ref.items():
        assert torch.equal(getattr(s.kv["m"].cache.layers[0], k), t)
    assert seg.acct.session("a") == {"text": 0, "data": 4 * 1536, "stack": 0, "host": 0}
    seg.request_arrived("a")
    c = seg.mem("a").counters
    assert (c.swaps_out, c.swaps_in, c.prefetch_hits, c.prefetch_misses, c.bytes_moved) == (1, 1, 1, 0, 2 * 4 * 1280)
    assert seg.mem("a").state == SessionState.ACTIVE

    seg.close(s)
    assert seg.acct.segments() == {"text": 0, "data": 0, "stack": 0, "host": 0}
    assert seg.pool.used == 0
    seg.acct.check()
    seg.pool.check()


def test_request_while_away_is_a_miss_and_close_frees_the_host_region():
    model = tiny_llama(seed=1)
    seg = DataSegment(torch.device("cpu"), 1 << 20, budget_bytes=None, swap_bw=1e9)
    s = session_with_cache("b", 4, model)                    # 4 x 512 -> 4 x 512
    seg.sync(s)
    assert seg.swap_out(s) and seg.poll() == ["b"]
    seg.request_arrived("b")
    assert seg.mem("b").counters.prefetch_misses == 1
    assert seg.pool.used == aligned(4 * 512)
    seg.close(s)
    assert seg.pool.used == 0 and seg.acct.segments()["host"] == 0


def test_drop_keeps_ids_and_empties_the_cache():
    model = tiny_llama(seed=1)
    seg = DataSegment(torch.device("cpu"), 0, budget_bytes=None, swap_bw=1e9)
    s = session_with_cache("c", 6, model)
    seg.sync(s)
    seg.drop(s, lambda mid: DynamicCache(config=model.config))
    assert seg.mem("c").state == SessionState.DROPPED
    assert s.kv["m"].cache.get_seq_length() == 0 and s.kv["m"].ids.shape == (1, 6)
    assert seg.gpu_bytes("c") == 0 and seg.mem("c").counters.drops == 1


def test_forget_model_of_a_swapped_session_frees_its_region():
    model = tiny_llama(seed=1)
    seg = DataSegment(torch.device("cpu"), 1 << 20, budget_bytes=None, swap_bw=1e9)
    s = session_with_cache("d", 5, model)
    seg.sync(s)
    assert seg.swap_out(s) and seg.poll()
    seg.forget_model(s, "m")
    assert seg.mem("d").state == SessionState.NEW and seg.pool.used == 0
    assert seg.acct.session("d")["host"] == 0 and "m" not in s.kv


def test_swap_out_fails_cleanly_when_the_pool_is_too_small():
    model = tiny_llama(seed=1)
    seg = DataSegment(torch.device("cpu"), 1024, budget_bytes=None, swap_bw=1e9)
    s = session_with_cache("e", 8, model)
    seg.sync(s)
    assert not seg.swap_out(s)
    assert seg.mem("e").state == SessionState.ACTIVE and s.kv["m"].cache.get_seq_length() == 8
