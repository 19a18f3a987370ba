"""Tier 1: the decode fast path's pure parts: buckets, sampling rules, the pool's row bookkeeping
(join points a slot at the session's blocks, leave sets the table's length and compacts the rows),
and a batched step over blocks against eager decode over the same blocks."""
from __future__ import annotations

import pytest
import torch

from djinn.server.execution.fastpath import (DecodePool, Row, Sampler, _bucket, length_bucket, length_buckets,
                                             unsupported)
from djinn.server.execution.paged_cache import PagedCache
from djinn.vmu.kv_pool import KVPool, KVShape

from ..models import tiny_bloom, tiny_gpt2, tiny_llama


@pytest.mark.parametrize("n, cap, floor, want", [(1, 64, 1, 1), (3, 64, 1, 4), (33, 64, 1, 64), (65, 64, 1, 64),
                                                 (1, 4096, 64, 64), (65, 4096, 64, 128), (4000, 4096, 64, 4096)])
def test_buckets(n, cap, floor, want):
    assert _bucket(n, cap, floor) == want


@pytest.mark.parametrize("n, cap, want", [(1, 4096, 64), (65, 4096, 128), (1024, 4096, 1024), (1025, 4096, 1536),
                                           (2100, 4096, 2560), (2560, 4096, 2560), (4000, 4096, 4096),
                                           (300, 256, 256), (5000, 4096, 4096)])
def test_length_buckets_grow_by_512_past_1024(n, cap, want):
    """Note [Length buckets]: a 2.1k-token row pads to 2560, not 4096."""
    assert length_bucket(n, cap) == want


def test_length_buckets_list_every_value_length_bucket_takes():
    assert length_buckets(4096) == [64, 128, 256, 512, 1024, 1536, 2048, 2560, 3072, 3584, 4096]
    assert length_buckets(256) == [64, 128, 256] and length_buckets(64) == [64]
    for cap in (64, 256, 1024, 2048, 4096):
        assert sorted({length_bucket(n, cap) for n in range(1, cap + 1)}) == length_buckets(cap)


def test_pool_buckets_cover_every_step_shape():
    """capture_all captures pool.buckets(): exactly the (batch, length) pairs a step can ask for."""
    model = tiny_llama().eval()
    pool = DecodePool(model, KVPool(KVShape.of_module(model), 8, 16, "cpu"), 5, 200)
    assert pool.slots == 5 and pool.max_len == 256
    want = {(_bucket(n, pool.slots), length_bucket(length, pool.max_len))
            for n in range(1, pool.slots + 1) for length in range(1, pool.max_len + 1)}
    assert sorted(want) == pool.buckets() == [(B, L) for B in (1, 2, 4, 5) for L in (64, 128, 256)]
    assert pool.capture_all() == 0 and pool.stats()["graphs"] == []  # no CUDA graphs on the CPU


def test_unsupported_reasons():
    llama, gpt2 = tiny_llama(), tiny_gpt2()
    assert unsupported(llama, 1, {"max_new_tokens": 3}, 10, 256) is None
    assert unsupported(tiny_bloom(), 1, {}, 10, 256) == "BloomForCausalLM has no fast decode step"
    assert unsupported(gpt2, 1, {}, 10, 512) is None
    assert unsupported(gpt2, 1, {}, 300, 512) == "300 tokens > its 256 learned positions"
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


def test_join_leave_and_compaction():
    model = tiny_llama().eval()
    kv = KVPool(KVShape.of_module(model), 32, 4, "cpu")
    pool = DecodePool(model, kv, 3, 64)
    assert pool.slots == 3 and pool.max_len == 64 and pool.tables.shape == (3, 16)
    rows, tables = [], []
    for n in (4, 6, 5):
        t = kv.new_table(1)
        assert kv.reserve(t, n + 3)
        r = Row(token=1, pos=n, start=n, remaining=3, sampler=Sampler(False), eos=frozenset())
        pool.join(r, t)
        rows.append(r)
        tables.append(t)
    assert [t.rows[0] for t in tables] == [[1, 2], [3, 4, 5], [6, 7]]
    assert [r.slot for r in rows] == [0, 1, 2] and pool.free_slots() == 0
    assert pool.tables[:, :3].tolist() == [[1, 2, 2], [3, 4, 5], [6, 7, 7]]  # tails repeat the last block
    assert pool.tables[:, -1].tolist() == [2, 5, 7]
    rows[2].pos = 7  # pretend row 2 decoded two tokens
    pool.leave(rows[0], tables[0])  # row 0 leaves with nothing new
    assert tables[0].length == 4
    assert rows[0].slot == -1 and rows[2].slot == 0 and [r.slot for r in pool.rows] == [0, 1]
    assert pool.tables[:, :3].tolist() == [[6, 7, 7], [3, 4, 5], [0, 0, 0]]  # row 2's ids moved, slot 2 scratch
    pool.leave(rows[2], tables[2])
    assert tables[2].length == 7
    assert [r.slot for r in pool.rows] == [0] and rows[1].slot == 0
    assert pool.tables[:, :3].tolist() == [[3, 4, 5], [0, 0, 0], [0, 0, 0]]


def test_batched_step_over_blocks_matches_eager_decode():
    """Two sessions of different lengths decode together in one batched step over their blocks; the
    tokens equal HF eager decode over a PagedCache of the same blocks (greedy)."""
    model = tiny_llama(seed=4).eval()
    kv = KVPool(KVShape.of_module(model), 64, 4, "cpu")
    kv.kv[:, :, 1:] = float("nan")  # what freed memory may hold: blocks are zeroed when handed out (regression)
    pool = DecodePool(model, kv, 4, 64, graphs=False)
    prompts = [torch.tensor([[5, 9, 33, 2 + 40, 17]]), torch.tensor([[8, 1 + 60, 3, 44, 12, 90, 7, 71, 6]])]
    rows, tables, want = decode_with_eager_reference(model, kv, pool, prompts, 6)
    assert [r.new for r in rows] == want
    for r, t, ids in zip(rows, tables, prompts):
        pool.leave(r, t)
        assert t.length == ids.shape[1] + 5


def decode_with_eager_reference(model, kv, pool, prompts, n):
    """Each prompt's greedy tokens from HF eager decode over a PagedCache of `kv` (the reference), then
    the same prompts prefilled into fresh blocks, joined to `pool` and decoded in batched steps until
    every row has its n tokens. Returns (rows, tables, reference tokens)."""
    want, rows, tables = [], [], []
    for ids in prompts:
        ref = kv.new_table(1)
        assert kv.reserve(ref, ids.shape[1] + n)
        want.append(model.generate(ids, past_key_values=PagedCache(kv, ref), max_new_tokens=n, do_sample=False,
                                   pad_token_id=0)[0, ids.shape[1]:].tolist())
        kv.release(ref)
        t = kv.new_table(1)
        assert kv.reserve(t, ids.shape[1] + n)
        with torch.no_grad():
            logits = model(ids, past_key_values=PagedCache(kv, t), use_cache=True).logits[:, -1]
        first = int(logits.argmax(-1))
        r = Row(first, ids.shape[1], ids.shape[1], n - 1, Sampler(False), frozenset())
        r.new.append(first)
        pool.join(r, t)
        rows.append(r)
        tables.append(t)
    while not all(r.done for r in rows):
        pool.step()
    return rows, tables, want


def _local_greedy(model, ids, n):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()


def test_chunked_prefill_interleaves_with_decode_and_is_first_come_first_served():
    """Note [Chunked prefill]: with a budget of 8 prompt tokens a turn, two 40-token prompts prefill in
    5 chunks each, the one that started first entirely before the other; every turn the session that
    already decodes takes its step in between; all three give the local greedy tokens."""
    from djinn.server.execution.fast_task import FastTask, PrefillBudget
    from djinn.server.sessions import KVState

    model = tiny_llama(seed=6).eval()
    kv = KVPool(KVShape.of_module(model), 64, 4, "cpu")
    pool = DecodePool(model, kv, 4, 64, graphs=False)
    budget = PrefillBudget(8)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 100, (1, n), generator=g) for n in (5, 40, 40)]
    news = [30, 6, 6]
    tasks = []
    for ids, n in zip(prompts, news):
        state = KVState.empty(kv, ids[:, :0])
        assert kv.reserve(state.table, ids.shape[1] + n)
        tasks.append(FastTask(pool, state, ids, {"max_new_tokens": n, "do_sample": False}, None, None, n, budget,
                              continues=False))
    lengths = []  # per turn: (decoded tokens of task 0, table lengths of tasks 1 and 2)
    for turn in range(40):
        if all(t.done for t in tasks):
            break
        pool.step()
        budget.new_turn()
        for t in tasks:
            t.advance()
        a = tasks[0]
        lengths.append((len(a.row.new) if a.row is not None else None,
                        tasks[1].state.table.length, tasks[2].state.table.length))
    # Turn 0: task 0's 5-token prompt takes 5 of the 8, task 1 the other 3; from then on 8 a turn.
    assert [l[1:] for l in lengths[:7]] == [(3, 0), (11, 0), (19, 0), (27, 0), (35, 0), (40, 3), (40, 11)]
    assert [l[0] for l in lengths[1:7]] == [1, 2, 3, 4, 5, 6]  # task 0 decodes a token every turn meanwhile
    assert budget.chunks == 1 + 6 + 6 and budget.per_turn == 8
    for t, ids, n in zip(tasks, prompts, news):
        assert t.error is None and t.done
        assert t.result["sequences"][0, ids.shape[1]:].tolist() == _local_greedy(model, ids, n)


def test_prefill_budget_counts_turns_and_chunks():
    from djinn.server.execution.fast_task import PrefillBudget

    b = PrefillBudget(10)
    assert (b.take(4), b.take(9), b.take(3)) == (4, 6, 0) and b.left == 0
    b.new_turn()
    assert b.turns == 1 and b.take(2) == 2 and b.chunks == 3
    b.new_turn()
    b.new_turn()  # a turn that prefilled nothing is not counted
    assert b.turns == 2
    with pytest.raises(ValueError):
        PrefillBudget(0)


@pytest.mark.parametrize("overlap", [False, True], ids=["steps", "overlapped"])
def test_a_row_whose_scores_are_not_finite_fails_alone(overlap):
    """Note [Scores are checked before sampling]: a sampled row fed a token whose embedding is NaN gets NaN
    logits; the batched step marks that row failed (InvalidRequest) and the other rows of the step go on.
    Overlapped (Note [Overlapped steps]), it draws from a uniform distribution instead and fails when its
    token is applied, a step later."""
    from djinn.protocol.errors import InvalidRequest

    model = tiny_llama(seed=6).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[77] = float("nan")
    kv = KVPool(KVShape.of_module(model), 32, 4, "cpu")
    pool = DecodePool(model, kv, 4, 64, graphs=False, overlap=overlap)
    rows = []
    for token, seed in ((77, 1), (5, 2), (9, None)):
        t = kv.new_table(1)
        assert kv.reserve(t, 8)
        sampler = Sampler(seed is not None, generator=torch.Generator().manual_seed(seed or 0))
        r = Row(token, 4, 4, 3, sampler, frozenset())
        pool.join(r, t)
        rows.append(r)
    pool.step()
    pool.drain()
    bad, sampled, greedy = rows
    assert bad.done and isinstance(bad.error, InvalidRequest) and bad.new == [] and bad.pos == 4
    assert sampled.error is None and len(sampled.new) == 1 and sampled.pos == 5 and not sampled.done
    assert greedy.error is None and len(greedy.new) == 1
    pool.step()
    pool.drain()
    assert len(sampled.new) == 2 and len(greedy.new) == 2 and bad.new == []


def test_a_free_slots_non_finite_writes_reach_no_row():
    """Note [Decode pool]: a row that left keeps its last token in its slot; a later step over a larger
    bucket feeds it at position 0 into the scratch block. With a model whose forward of that token is
    NaN, the scratch block holds NaN, and no live row may read it (0 x NaN at a masked position)."""
    model = tiny_llama(seed=6).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[77] = float("nan")

    def decode(with_poison: bool) -> list:
        kv = KVPool(KVShape.of_module(model), 64, 4, "cpu")
        pool = DecodePool(model, kv, 4, 64, graphs=False)
        rows = []
        for token in (5, 9, 11) + ((77,) if with_poison else ()):
            t = kv.new_table(1)
            assert kv.reserve(t, 12)
            r = Row(token, 4, 4, 6, Sampler(False), frozenset())
            pool.join(r, t)
            rows.append(r)
        pool.step()
        if with_poison:
            pool.drop(rows[3])
        for _ in range(3):
            pool.step()  # a bucket of 4 over 3 rows: the free slot writes the scratch block
        if with_poison:
            assert not torch.isfinite(kv.block(0)).all()  # the poison is there
        return [r.new for r in rows[:3]]

    assert decode(True) == decode(False)


def _decode_rows(model, overlap: bool, eos: dict[int, int], n: int, sampled: bool = False):
    """Three rows (one ends at an eos the others do not know, one joins late) decoded to the end in a
    pool with or without overlapped steps; their tokens, the KV their blocks hold up to each table's
    length, and the pool."""
    kv = KVPool(KVShape.of_module(model), 64, 4, "cpu")
    pool = DecodePool(model, kv, 4, 64, graphs=False, overlap=overlap)
    prompts = [torch.tensor([[5, 9, 33, 42, 17]]), torch.tensor([[8, 61, 3, 44, 12, 90, 7]]), torch.tensor([[4, 4, 9]])]
    rows, tables = [], []

    def join(i):
        ids = prompts[i]
        t = kv.new_table(1)
        assert kv.reserve(t, ids.shape[1] + n)
        with torch.no_grad():
            first = int(model(ids, past_key_values=PagedCache(kv, t), use_cache=True).logits[:, -1].argmax(-1))
        sampler = Sampler(True, temperature=0.8, top_k=50, generator=torch.Generator().manual_seed(i)) if sampled \
            else Sampler(False)
        r = Row(first, ids.shape[1], ids.shape[1], n - 1, sampler, frozenset({eos[i]}) if i in eos else frozenset(),
                ban_eos=3 if i == 1 else 0)
        r.new.append(first)
        pool.join(r, t)
        rows.append(r)
        tables.append(t)

    join(0)
    join(1)
    steps = 0
    while not all(r.done for r in rows) or len(rows) < 3 or pool._flight is not None:
        pool.step()
        steps += 1
        if steps == 2:
            join(2)  # joins while a step is in flight
        for r, t in zip(rows, tables):
            if r.done and r.slot >= 0:
                pool.leave(r, t)
    kept = [torch.cat([kv.kv[:, :, b] for b in t.rows[0]], dim=2)[:, :, :t.length].clone() for t in tables]
    return [r.new for r in rows], [t.length for t in tables], kept, pool


def test_overlapped_steps_give_the_same_tokens_and_kv_as_plain_steps():
    """Note [Overlapped steps]: each step is launched before the last one's tokens are read; a row's
    eos is learned a step late and its extra step writes no position its KV holds; a row that joins
    while a step is in flight feeds its own token. Tokens and table lengths are the plain steps', the
    KV below them too but for rounding: the eos row's extra step makes that batch one row larger, and
    a batch's size changes its GEMMs' rounding (as any row joining or leaving does)."""
    model = tiny_llama(seed=6).eval()
    plain_tokens, _, _, _ = _decode_rows(model, False, {}, 12)
    eos = {0: plain_tokens[0][4], 1: plain_tokens[1][9]}  # row 0 ends early, row 1 later, row 2 by count
    a = _decode_rows(model, False, eos, 12)
    b = _decode_rows(model, True, eos, 12)
    assert a[0] == b[0] and a[1] == b[1]
    assert len(a[0][0]) < 12 and len(a[0][2]) == 12
    for x, y in zip(a[2], b[2]):
        torch.testing.assert_close(y, x, rtol=0, atol=1e-6)
    assert torch.equal(a[2][0], b[2][0])  # row 0 ended before the batches differed
    assert a[3].overlapped == 0 and b[3].overlapped > 0
    assert b[3]._flight is None and not b[3].rows
    # seeded sampling draws the same tokens from each row's own generator
    s_plain = _decode_rows(model, False, {}, 12, sampled=True)
    s_over = _decode_rows(model, True, {}, 12, sampled=True)
    assert s_plain[0] == s_over[0] and s_plain[0] != plain_tokens and s_over[3].overlapped > 0
