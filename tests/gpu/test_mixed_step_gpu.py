"""Tier 3 (GPU): Note [Mixed step] with the decode step's CUDA graphs on and either attention: rows
decoding while a prompt prefills in chunks beside them give HF's greedy tokens (fp32)."""
from __future__ import annotations

import pytest
import torch

from djinn.server.execution.fast_task import PrefillBudget
from djinn.server.execution.fastpath import DecodePool
from djinn.vmu.kv_pool import KVPool, KVShape

from ..models import tiny_causal_lm
from ..unit.test_fastpath import _local_greedy
from ..unit.test_mixed_step import _run, _task

pytestmark = pytest.mark.gpu
DEV = torch.device("cuda:0")


@pytest.mark.parametrize("attention", ["gather", "flex"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3"])
def test_mixed_steps_on_the_gpu_keep_hf_greedy_tokens(arch, attention):
    model = tiny_causal_lm(arch, seed=5).to(DEV).eval()
    kv = KVPool(KVShape.of_module(model), 256, 16, DEV)
    pool = DecodePool(model, kv, 8, 256, graphs=True, attention=attention)
    budget = PrefillBudget(40)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 250, (1, n), generator=g).to(DEV) for n in (9, 30, 70)]
    news = [40, 35, 12]
    first = [_task(pool, kv, p, n, budget) for p, n in zip(prompts[:2], news[:2])]
    done = _run(first, budget, arrive={4: _task(pool, kv, prompts[2], news[2], budget)})
    assert pool.mixed_steps == 2 and pool.stats()["graphs"]  # the 70-token prompt went in as 40 + 30
    for t, p, n in zip(done, prompts, news):
        assert t.error is None
        assert t.result["sequences"][0, p.shape[1]:].tolist() == _local_greedy(model, p, n)
