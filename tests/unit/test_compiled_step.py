"""Note [Compiled step]: the decode step compiled by torch.compile gives the eager step's greedy tokens,
one compile for every batch size (CPU inductor here; tier 3 captures it as CUDA graphs)."""
from __future__ import annotations

import torch

from djinn.server.execution.fast_task import PrefillBudget
from djinn.server.execution.fastpath import DecodePool
from djinn.vmu.kv_pool import KVPool, KVShape

from ..models import tiny_llama
from .test_fastpath import _local_greedy
from .test_mixed_step import _run, _task


def test_compiled_step_keeps_greedy_tokens_across_batch_sizes():
    torch._dynamo.reset()
    model = tiny_llama(seed=6).eval()
    kv = KVPool(KVShape.of_module(model), 96, 4, "cpu")
    pool = DecodePool(model, kv, 4, 64, graphs=False, compile=True)
    budget = PrefillBudget(64)
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, 250, (1, n), generator=g) for n in (5, 8, 3)]
    news = [14, 6, 9]  # rows leave at different steps: batches of 3, 2 and 1 row
    done = _run([_task(pool, kv, p, n, budget) for p, n in zip(prompts, news)], budget)
    assert pool.stats()["compiled"]
    for t, p, n in zip(done, prompts, news):
        assert t.error is None
        assert t.result["sequences"][0, p.shape[1]:].tolist() == _local_greedy(model, p, n)


def _compiled_pool():
    model = tiny_llama(seed=7).eval()
    kv = KVPool(KVShape.of_module(model), 64, 4, "cpu")
    return model, kv, DecodePool(model, kv, 4, 64, graphs=False, compile=True)


def _greedy_as_local(model, kv, pool) -> bool:
    """A 5-token prompt and 7 greedy tokens through the pool: no error, and local generate's tokens."""
    budget = PrefillBudget(64)
    p = torch.tensor([[3, 14, 15, 92, 65]])
    (t,) = _run([_task(pool, kv, p, 7, budget)], budget)
    return t.error is None and t.result["sequences"][0, 5:].tolist() == _local_greedy(model, p, 7)


def test_a_compiled_step_that_fails_falls_back_to_the_eager_step_and_says_why():
    model, kv, pool = _compiled_pool()

    def broken(B, L):
        raise RuntimeError("CppCompileError: no compiler here")

    pool._compiled = broken
    assert _greedy_as_local(model, kv, pool)
    st = pool.stats()
    assert not st["compiled"] and st["compile_error"] == "RuntimeError: CppCompileError: no compiler here"


def test_a_compiled_step_that_differs_from_eager_is_dropped():
    """Note [Compiled step is checked]: a compiled step whose logits are not the eager step's (its graphs
    gave other tokens on an H100, 16f090e) is dropped at its first step; the tokens are eager decode's."""
    model, kv, pool = _compiled_pool()
    calls = []

    def wrong(B, L):  # the real step body, with its top logit moved to another token
        calls.append(B)
        out = pool._step_body(B, L)
        return out.roll(1, dims=-1)

    pool._compiled = wrong
    assert _greedy_as_local(model, kv, pool)
    st = pool.stats()
    assert calls == [1] and not st["compiled"]
    assert st["compile_error"].startswith("the compiled step differs from the eager step by ")


def test_a_matching_compiled_step_is_checked_once_per_bucket():
    model, kv, pool = _compiled_pool()
    eager, calls = pool._eager, []
    pool._compiled = lambda B, L: pool._step_body(B, L)
    pool._eager = lambda *a: calls.append(a[:2]) or eager(*a)
    assert _greedy_as_local(model, kv, pool)
    assert pool.stats()["compiled"] and calls == [(1, 64)]  # one bucket, checked at its first step
