"""Tier 1: a model's KV pool (djinn/vmu/kv_pool.py) and the transformers cache over it
(djinn/server/execution/paged_cache.py): reservation, trim, fork with copy on write, exact reads, and HF
generate over blocks bitwise-equal to HF's own DynamicCache for every tiny architecture."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from djinn.server.execution.paged_cache import PagedCache
from djinn.vmu.kv_pool import KVPool, KVShape

from ..models import TINY_BUILDERS, tiny_llama


def pool_of(model, blocks=32, bt=4) -> KVPool:
    return KVPool(KVShape.of_module(model), blocks, bt, "cpu")


def test_shape_and_block_sizes_from_the_config():
    p = pool_of(tiny_llama(), blocks=10, bt=4)
    assert p.shape == KVShape(layers=2, kv_heads=2, head_dim=16, dtype=torch.float32)
    assert p.shape.token_bytes == 2 * 2 * 2 * 16 * 4 and p.block_bytes == 4 * 512
    assert p.kv.shape == (2, 2, 10, 4, 2, 16) and p.nbytes == 10 * 4 * 512  # layer-major (Note [Pool layout])
    assert (p.blocks_for(0), p.blocks_for(1), p.blocks_for(4), p.blocks_for(5)) == (0, 1, 1, 2)
    assert p.bytes_for(9, batch=2) == 2 * 3 * 2048
    assert p.alloc.total == 9  # block 0 is scratch


def test_reserve_trim_release_keep_exact_block_counts():
    p = pool_of(tiny_llama(), blocks=8, bt=4)
    t = p.new_table(1)
    assert p.reserve(t, 10) and t.rows == [[1, 2, 3]]
    assert p.reserve(t, 12) and t.rows == [[1, 2, 3]]     # already covered
    assert not p.reserve(t, 40) and t.rows == [[1, 2, 3]]  # 10 blocks: nothing taken
    t.length = 5
    assert p.trim(t) == 1 and t.rows == [[1, 2]]
    p.release(t)
    assert t.rows == [[]] and p.alloc.free == 7
    p.alloc.check()


def test_write_then_read_gives_the_same_bits_across_blocks():
    p = pool_of(tiny_llama(), bt=4)
    t = p.new_table(2)
    assert p.reserve(t, 11)
    k = torch.randn(2, 2, 11, 16)
    v = torch.randn(2, 2, 11, 16)
    p.write(t, 1, k[:, :, :7], v[:, :, :7], 0)
    p.write(t, 1, k[:, :, 7:], v[:, :, 7:], 7)
    rk, rv = p.read(t, 1, 11)
    assert torch.equal(rk, k) and torch.equal(rv, v) and rk.is_contiguous()
    with pytest.raises(RuntimeError, match="past the table's reserved"):
        p.write(t, 0, k[:, :, :2], v[:, :, :2], 11)


def test_fork_shares_blocks_and_a_write_copies_only_the_block_written():
    p = pool_of(tiny_llama(), bt=4)
    t = p.new_table(1)
    p.reserve(t, 8)
    k = torch.randn(1, 2, 6, 16)
    for layer in (0, 1):
        p.write(t, layer, k, k, 0)
    t.length = 6
    f = p.fork(t)
    assert f.rows == t.rows == [[1, 2]] and f.length == 6
    assert p.alloc.refcount(1) == p.alloc.refcount(2) == 2
    p.reserve(f, 8)                                  # covered: the fork shares both blocks
    p.ensure_private(f, 6, 7)                        # writing position 6 touches block 2 only
    assert f.rows == [[1, 3]] and p.cow_copies == 1
    assert p.alloc.refcount(1) == 2 and p.alloc.refcount(2) == 1 and p.alloc.refcount(3) == 1
    assert torch.equal(p.read(f, 0, 6)[0], p.read(t, 0, 6)[0])
    new = torch.randn(1, 2, 1, 16)
    for layer in (0, 1):
        p.write(f, layer, new, new, 6)
    assert torch.equal(p.read(t, 0, 6)[0], k)          # the parent's bits are untouched
    p.release(f)
    p.release(t)
    assert p.alloc.free == p.alloc.total
    p.alloc.check()


def test_runs_coalesce_consecutive_block_ids():
    p = pool_of(tiny_llama())
    assert p.runs([4, 5, 6, 9, 10, 2]) == [(0, 4, 3), (3, 9, 2), (5, 2, 1)]
    assert p.runs([]) == []


@pytest.mark.parametrize("arch", sorted(TINY_BUILDERS))
def test_generate_over_blocks_is_bitwise_hf_dynamic_cache(arch):
    torch.manual_seed(0)
    m = TINY_BUILDERS[arch](seed=2)
    p = pool_of(m, blocks=64, bt=4)
    ids = torch.randint(3, 256, (1, 13))
    more = torch.randint(3, 256, (1, 5))
    gen = dict(max_new_tokens=9, do_sample=False, pad_token_id=0)
    dc = DynamicCache(config=m.config)
    r1 = m.generate(ids, past_key_values=dc, **gen)
    r2 = m.generate(torch.cat([r1, more], 1), past_key_values=dc, **gen)
    t = p.new_table(1)
    assert p.reserve(t, 13 + 9 + 5 + 9 + 5)
    c = PagedCache(p, t)
    o1 = m.generate(ids, past_key_values=c, **gen)
    o2 = m.generate(torch.cat([o1, more], 1), past_key_values=c, **gen)
    assert torch.equal(o1, r1) and torch.equal(o2, r2)
    assert t.length == dc.get_seq_length() == o2.shape[1] - 1
    with torch.no_grad():  # and the logits of a forward continuing the cache
        la = m(more, past_key_values=c, use_cache=True).logits
        lb = m(more, past_key_values=dc, use_cache=True).logits
    assert torch.equal(la, lb)


def test_prefix_blocks_are_published_shared_by_key_and_cached_after_release():
    p = pool_of(tiny_llama(), blocks=16, bt=4)
    ids = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    a = p.new_table(1)
    assert p.reserve(a, 12)
    a.length = 10
    p.publish(a, ids, 10)                    # two full blocks of the prompt get keys; the third is partial
    assert [p.alloc.key_of(b) is not None for b in a.rows[0]] == [True, True, False]
    b = p.new_table(1)
    assert p.share_prefix(b, ids[:8] + [99, 98, 97], 10) == 8
    assert b.rows == [a.rows[0][:2]] and b.length == 8
    assert [p.alloc.refcount(x) for x in a.rows[0]] == [2, 2, 1]
    c = p.new_table(1)
    assert p.share_prefix(c, [5, 6, 7, 0] + ids[4:], 10) == 0 and c.rows == [[]]  # first block differs
    p.release(a)
    p.release(b)
    assert (p.alloc.cached, p.alloc.held) == (2, 0)   # keyed blocks stay as a cache, counted available
    d = p.new_table(1)
    assert p.share_prefix(d, ids, 5) == 4 and d.rows[0] == [1]  # limit 5: one full block at most
    p.alloc.check()


def test_generate_arguments_that_copy_or_reorder_cache_rows_are_refused_up_front():
    from djinn.protocol.errors import InvalidRequest
    from djinn.server.execution.executor import check_generate

    ids = torch.ones(1, 3, dtype=torch.long)
    check_generate(ids, {"num_beams": 1, "num_return_sequences": 1})
    for bad in ({"num_beams": 2}, {"num_return_sequences": 3, "do_sample": True}):
        with pytest.raises(InvalidRequest, match="not supported over paged KV blocks"):
            check_generate(ids, bad)
    p = pool_of(tiny_llama())
    layer = PagedCache(p, p.new_table(1)).layers[0]
    with pytest.raises(InvalidRequest, match="reordering its rows"):
        layer.reorder_cache(torch.zeros(1, dtype=torch.long))


def test_kv_shape_reads_the_decoders_layers_and_kv_heads():
    """An encoder-decoder's blocks hold its decoder's self-attention KV (Note [Encoder-decoder generate]):
    T5 with 3 encoder and 2 decoder layers has 2 block layers; Mixtral's grouped-query attention has
    2 KV heads of its 4; GPT-J's and BLOOM's fields are named n_layer / n_head."""
    import transformers as T

    cases = [(T.T5ForConditionalGeneration, T.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=3,
                                                       num_decoder_layers=2, num_heads=4), (2, 4, 8)),
             (T.MixtralForCausalLM, T.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                                    num_local_experts=4), (3, 2, 8)),
             (T.GPTJForCausalLM, T.GPTJConfig(vocab_size=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4), (2, 4, 8)),
             (T.BloomForCausalLM, T.BloomConfig(vocab_size=64, hidden_size=32, n_layer=3, n_head=2), (3, 2, 16))]
    for cls, cfg, want in cases:
        with torch.device("meta"):
            m = cls(cfg)
        s = KVShape.of_module(m)
        assert (s.layers, s.kv_heads, s.head_dim) == want, cls.__name__


def test_swap_copies_go_through_the_staging_buffer_in_chunks():
    """Note [Staged swap]: scattered blocks cross the link as one copy per chunk of `stage_blocks`,
    gathered by one device copy per run of consecutive ids, and come back bitwise."""
    p = pool_of(tiny_llama(), blocks=12, bt=4)
    p.stage_blocks = 2
    ids = [1, 3, 4, 7, 9]
    torch.manual_seed(0)
    p.kv.normal_()
    want, other = p.kv[:, :, ids].clone(), p.kv[:, :, [2, 5, 8]].clone()
    region = torch.zeros(len(ids) * p.block_bytes // 4)
    dsts, srcs = p.copy_pairs(region, ids, to_host=True)
    # chunks [1, 3] (two runs), [4, 7] (two runs), [9]: a gather copy per run, one link copy per chunk
    assert len(dsts) == (2 + 1) + (2 + 1) + (1 + 1)
    assert [d.device.type == "cpu" and d.numel() * 4 == k * p.block_bytes
            for d, k in zip([dsts[2], dsts[5], dsts[7]], (2, 2, 1))] == [True] * 3
    for d, s in zip(dsts, srcs):
        d.copy_(s)
    assert torch.equal(p.host_blocks(region, len(ids)), want)
    p.kv[:, :, ids] = 0
    for d, s in zip(*p.copy_pairs(region, ids, to_host=False)):
        d.copy_(s)
    assert torch.equal(p.kv[:, :, ids], want)
    assert torch.equal(p.kv[:, :, [2, 5, 8]], other)  # blocks between the runs are untouched
