"""Tier 3 (GPU): the decode fast path's CUDA graphs replay exactly what the same step computes eagerly,
and batched ragged rows give HF eager's greedy tokens."""
from __future__ import annotations

import pytest
import torch

from djinn.server.execution import paged_step
from djinn.server.execution.fastpath import DecodePool, Row, Sampler
from djinn.server.execution.paged_cache import PagedCache
from djinn.vmu.kv_pool import KVPool, KVShape

from ..models import VOCAB, tiny_llama

pytestmark = pytest.mark.gpu
DEV = torch.device("cuda:0")


def _run(model, prompts, news, graphs: bool, capture_all: bool = False, attention: str = "auto"):
    kv = KVPool(KVShape.of_module(model), 128, 16, DEV)
    pool = DecodePool(model, kv, 8, 256, graphs=graphs, attention=attention)
    if capture_all:
        assert pool.capture_all() == len(pool.buckets())
    rows, caches, firsts = [], [], []
    for p, n in zip(prompts, news):
        table = kv.new_table(1)
        assert kv.reserve(table, p.shape[1] + n)
        cache = PagedCache(kv, table)
        with torch.no_grad():
            out = model(p, past_key_values=cache, use_cache=True, logits_to_keep=1)
        firsts.append(int(out.logits[0, -1].argmax()))
        row = Row(firsts[-1], p.shape[1], p.shape[1], n - 1, Sampler(False), frozenset())
        pool.join(row, table)
        rows.append(row)
        caches.append(cache)
    while any(r.slot >= 0 for r in rows):
        pool.step()
        for r, c in zip(rows, caches):
            if r.done and r.slot >= 0:
                pool.leave(r, c.table)
    seqs = [torch.cat([p.cpu(), torch.tensor([[f, *r.new]])], 1) for p, f, r in zip(prompts, firsts, rows)]
    return seqs, caches, pool


@pytest.mark.parametrize("attention", ["gather", "flex"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_graphs_replay_the_eager_step_bitwise_and_match_hf_greedy(dtype, attention):
    model = tiny_llama(seed=0).to(DEV, dtype).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, VOCAB, (1, 3 + 5 * i), generator=g).to(DEV) for i in range(5)]
    news = [20, 7, 33, 12, 25]
    graphed, caches, pool = _run(model, prompts, news, graphs=True, attention=attention)
    eager, _, _ = _run(model, prompts, news, graphs=False, attention=attention)
    assert pool.stats()["attention"] == attention
    assert pool.stats()["graphs"], "no graph was captured"
    for a, b in zip(graphed, eager):
        assert torch.equal(a, b)
    if dtype == torch.float32:
        for p, n, seq, cache in zip(prompts, news, graphed, caches):
            with torch.no_grad():
                ref = model.generate(p, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(p))
            assert torch.equal(seq, ref.cpu())
            assert cache.get_seq_length() == seq.shape[1] - 1


def test_capture_all_up_front_gives_the_same_tokens_and_captures_nothing_later():
    """fast_decode_capture=all: every bucket's graph is captured on the empty pool (its warm-up writes
    go to the scratch block), then rows join and decode with no further capture, equal to lazily
    captured graphs."""
    model = tiny_llama(seed=1).to(DEV).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (1, 4 + 9 * i), generator=g).to(DEV) for i in range(4)]
    news = [15, 40, 9, 70]
    upfront, _, pool = _run(model, prompts, news, graphs=True, capture_all=True)
    lazy, _, lazy_pool = _run(model, prompts, news, graphs=True)
    assert pool.stats()["graphs"] == sorted(pool.buckets()) and pool.stats()["capture_s"] > 0
    assert set(lazy_pool.stats()["graphs"]) < set(pool.buckets())
    for a, b in zip(upfront, lazy):
        assert torch.equal(a, b)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "opt", "phi", "phi3", "gemma", "gemma2", "falcon", "falcon_mqa",
                                  "mistral", "qwen3", "gptj", "stablelm", "cohere"])
def test_every_architecture_captures_its_own_forward_and_matches_hf_greedy(arch):
    """Note [One step for every architecture]: the model's own HF forward captured as CUDA graphs (no
    host sync in it) replays the eager step, and fp32 greedy equals HF generate (windows of 6 and 7
    tokens bind in gemma2 and mistral)."""
    from djinn.server.execution.fastpath import model_unsupported

    from ..models import tiny_causal_lm

    model = tiny_causal_lm(arch, seed=2, device=DEV)
    why = model_unsupported(model)
    if why and paged_step._NOT_DISPATCHED in why:
        pytest.skip(why)  # e.g. Falcon and GPT-J before transformers 5.2x: their attention does not dispatch
                          # through the interface, so their generates stay eager (the probe said so)
    assert why is None
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, VOCAB, (1, 3 + 5 * i), generator=g).to(DEV) for i in range(4)]
    news = [20, 7, 33, 12]
    graphed, _, pool = _run(model, prompts, news, graphs=True)
    eager, _, _ = _run(model, prompts, news, graphs=False)
    assert pool.stats()["graphs"] and pool.stats()["step"] == "hf-paged"
    for p, n, a, b in zip(prompts, news, graphed, eager):
        assert torch.equal(a, b)
        with torch.no_grad():
            ref = model.generate(p, max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=VOCAB,
                                 attention_mask=torch.ones_like(p))  # no eos: all n steps, as the rows
        assert torch.equal(a, ref.cpu())
