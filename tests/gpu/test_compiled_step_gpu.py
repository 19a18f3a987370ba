"""Tier 3 (GPU): Note [Compiled step] captured as CUDA graphs gives HF's fp32 greedy tokens."""
from __future__ import annotations

import pytest
import torch

from djinn.server.execution.fast_task import PrefillBudget
from djinn.server.execution.fastpath import DecodePool
from djinn.vmu.kv_pool import KVPool, KVShape

from ..models import tiny_llama
from ..unit.test_fastpath import _local_greedy
from ..unit.test_mixed_step import _run, _task

pytestmark = pytest.mark.gpu
DEV = torch.device("cuda:0")


@pytest.mark.parametrize("graphs", [True, False])
@pytest.mark.parametrize("attention", ["gather", "flex"])
def test_compiled_step_graphs_keep_hf_greedy_tokens(attention, graphs):
    torch._dynamo.reset()
    model = tiny_llama(seed=8).to(DEV).eval()
    kv = KVPool(KVShape.of_module(model), 256, 16, DEV)
    pool = DecodePool(model, kv, 8, 256, graphs=graphs, attention=attention, compile=True)
    budget = PrefillBudget(256)
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(3, 250, (1, n), generator=g).to(DEV) for n in (7, 19, 40)]
    news = [30, 12, 21]
    done = _run([_task(pool, kv, p, n, budget) for p, n in zip(prompts, news)], budget)
    st = pool.stats()
    assert st["compiled"] and bool(st["graphs"]) == graphs, st["compile_error"]  # Note [Compiled step is checked]
    for t, p, n in zip(done, prompts, news):
        assert t.error is None
        assert t.result["sequences"][0, p.shape[1]:].tolist() == _local_greedy(model, p, n)
