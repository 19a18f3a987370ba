"""Tier 1: the decode fast path's pure parts: buckets, sampling rules, and the pool's row bookkeeping
(join copies a cache into the next slot, leave hands the new KV back and compacts the rows)."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from djinn.server.fastpath import MIN_LEN_BUCKET, DecodePool, Row, Sampler, _bucket, unsupported

from ..models import tiny_gpt2, tiny_llama


@pytest.mark.parametrize("n, cap, floor, want", [(1, 64, 1, 1), (3, 64, 1, 4), (33, 64, 1, 64), (65, 64, 1, 64),
                                                 (1, 4096, 64, 64), (65, 4096, 64, 128), (4000, 4096, 64, 4096)])
def test_buckets(n, cap, floor, want):
    assert _bucket(n, cap, floor) == want


def test_pool_buckets_cover_every_step_shape():
    """capture_all captures pool.buckets(): exactly the (batch, length) pairs a step can ask for."""
    model = tiny_llama().eval()
    pool = DecodePool(model, torch.device("cpu"), DecodePool.slot_bytes(model, 256) * 5, 200)
    assert pool.slots == 5 and pool.max_len == 256
    want = {(_bucket(n, pool.slots), _bucket(length, pool.max_len, MIN_LEN_BUCKET))
            for n in range(1, pool.slots + 1) for length in range(1, pool.max_len + 1)}
    assert sorted(want) == pool.buckets() == [(B, L) for B in (1, 2, 4, 5) for L in (64, 128, 256)]
    assert pool.capture_all() == 0 and pool.stats()["graphs"] == []  # no CUDA graphs on the CPU


def test_unsupported_reasons():
    llama, gpt2 = tiny_llama(), tiny_gpt2()
    assert unsupported(llama, 1, {"max_new_tokens": 3}, 10, 256) is None
    assert unsupported(gpt2, 1, {}, 10, 256) == "GPT2LMHeadModel has no fast decode step"
    assert unsupported(llama, 2, {}, 10, 256) == "input batch 2 (the fast path batches sessions, one row each)"
    assert unsupported(llama, 1, {"num_beams": 2}, 10, 256) == "generate arguments ['num_beams']"
    assert unsupported(llama, 1, {"use_cache": False}, 10, 256) == "use_cache=False"
    assert unsupported(llama, 1, {}, 300, 256) == "300 tokens > fast_decode_max_len 256"


def test_sampler_rules():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert Sampler(False)(logits).tolist() == [1]
    g = torch.Generator().manual_seed(0)
    assert {Sampler(True, top_k=1, generator=g)(logits).item() for _ in range(20)} == {1}
    assert {Sampler(True, top_p=0.1, generator=g)(logits).item() for _ in range(20)} == {1}
    two = {Sampler(True, top_k=2, generator=g)(logits).item() for _ in range(200)}
    assert two == {1, 3}
    a = [Sampler(True, generator=torch.Generator().manual_seed(5))(logits).item() for _ in range(1)]
    b = [Sampler(True, generator=torch.Generator().manual_seed(5))(logits).item() for _ in range(1)]
    assert a == b


def _cache(model, n: int, fill: float) -> DynamicCache:
    c = DynamicCache()
    cfg = model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    for i in range(cfg.num_hidden_layers):
        k = torch.full((1, cfg.num_key_value_heads, n, hd), fill + i)
        c.update(k, -k, i)
    return c


def test_join_leave_and_compaction():
    model = tiny_llama().eval()
    pool = DecodePool(model, torch.device("cpu"), DecodePool.slot_bytes(model, 64) * 3, 64)
    assert pool.slots == 3 and pool.max_len == 64
    rows = []
    for j, n in enumerate((4, 6, 5)):
        r = Row(token=1, pos=n, start=n, remaining=3, sampler=Sampler(False), eos=frozenset())
        pool.join(r, _cache(model, n, 10.0 * j))
        rows.append(r)
    assert [r.slot for r in rows] == [0, 1, 2] and pool.free_slots() == 0
    assert torch.equal(pool.kv[1, 0, 2, :, :5], torch.full((2, 5, 16), 21.0))  # layer 1, K, slot 2
    rows[2].pos = 7  # pretend row 2 decoded two tokens
    pool.kv[:, :, 2, :, 5:7] = 99.0
    out = _cache(model, 4, 0.0)
    pool.leave(rows[0], out)  # row 0 leaves with nothing new: its cache is unchanged
    assert out.get_seq_length() == 4
    assert rows[0].slot == -1 and rows[2].slot == 0 and [r.slot for r in pool.rows] == [0, 1]
    assert torch.equal(pool.kv[1, 0, 0, :, :5], torch.full((2, 5, 16), 21.0))  # row 2's KV moved with it
    assert torch.equal(pool.kv[0, 1, 0, :, 5:7], torch.full((2, 2, 16), 99.0))
    back = _cache(model, 5, 20.0)
    pool.leave(rows[2], back)  # the two generated positions are appended to its cache
    assert back.get_seq_length() == 7
    assert torch.equal(back.layers[0].keys[0, :, 5:7], torch.full((2, 2, 16), 99.0))
    assert [r.slot for r in pool.rows] == [0] and rows[1].slot == 0
