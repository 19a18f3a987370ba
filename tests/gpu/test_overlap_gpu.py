"""Tier 3 (GPU): Note [Overlapped steps] with CUDA graphs, pinned staging and events: the same tokens
as plain steps (greedy, and seeded sampling with min_new_tokens), with a late join and mixed steps
(prompt chunks) in between; and steps did overlap."""
from __future__ import annotations

import pytest
import torch

from djinn.server.execution.fast_task import PrefillBudget
from djinn.server.execution.fastpath import DecodePool
from djinn.vmu.kv_pool import KVPool, KVShape

from ..models import tiny_llama
from ..unit.test_mixed_step import _run, _task

pytestmark = pytest.mark.gpu
DEV = torch.device("cuda:0")


def _sampled_task(pool, kv, prompt, new, budget, seed):
    from djinn.server.execution.fast_task import FastTask
    from djinn.server.sessions import KVState

    st = KVState.empty(kv, torch.zeros(1, 0, dtype=torch.long))
    assert kv.reserve(st.table, prompt.shape[1] + new)
    kwargs = {"max_new_tokens": new, "do_sample": True, "temperature": 0.9, "top_k": 20, "min_new_tokens": 4}
    return FastTask(pool, st, prompt, kwargs, seed, None, new, budget, continues=False)


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
@pytest.mark.parametrize("attention", ["gather", "flex"])
def test_overlapped_steps_keep_the_plain_steps_tokens(attention, sampled):
    model = tiny_llama(seed=12).to(DEV).eval()
    g = torch.Generator().manual_seed(12)
    prompts = [torch.randint(3, 250, (1, n), generator=g).to(DEV) for n in (7, 19, 40, 23)]
    news = [40, 12, 33, 25]
    out = {}
    for overlap in (False, True):
        kv = KVPool(KVShape.of_module(model), 256, 16, DEV)
        pool = DecodePool(model, kv, 8, 256, attention=attention, overlap=overlap)
        pool.capture_all()
        budget = PrefillBudget(16)  # the 40-token prompt prefills in chunks, beside decoding rows (mixed steps)
        make = (lambda p, n, i: _sampled_task(pool, kv, p, n, budget, 100 + i)) if sampled else \
            (lambda p, n, i: _task(pool, kv, p, n, budget))
        first = [make(p, n, i) for i, (p, n) in enumerate(zip(prompts[:3], news[:3]))]
        late = make(prompts[3], news[3], 3)
        done = _run(first, budget, arrive={5: late})
        for t in done:
            assert t.error is None, t.error_traceback
        out[overlap] = ([t.result["sequences"].tolist() for t in done], pool.stats())
    assert out[True][0] == out[False][0]
    st = out[True][1]
    assert st["overlap"] and st["overlapped_steps"] > 0 and st["mixed_steps"] > 0
    assert out[False][1]["overlapped_steps"] == 0
