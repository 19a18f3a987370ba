"""Note [Mixed step]: decode rows and prompt chunks in one forward give the tokens each would alone."""
from __future__ import annotations

import pytest
import torch

from djinn.server.execution.fast_task import FastTask, PrefillBudget, fast_turn
from djinn.server.execution.fastpath import DecodePool
from djinn.server.sessions import KVState
from djinn.vmu.kv_pool import KVPool, KVShape

from ..models import tiny_causal_lm, tiny_llama
from .test_fastpath import _local_greedy


def _task(pool, kv, prompt, new, budget):
    st = KVState.empty(kv, torch.zeros(1, 0, dtype=torch.long))
    assert kv.reserve(st.table, prompt.shape[1] + new)
    return FastTask(pool, st, prompt, {"max_new_tokens": new}, None, None, new, budget, continues=False)


def _run(tasks, budget, max_tokens=1000, arrive=None):
    """Engine turns until every task is done; `arrive`: {turn: task} joining at that turn."""
    live, turn = list(tasks), 0
    while not all(t.done for t in live) or arrive:
        if arrive and turn in arrive:
            live.append(arrive.pop(turn))
        budget.new_turn()
        fast_turn(live, max_tokens)
        for t in live:
            t.advance()
        turn += 1
    return live


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "gpt_neox", "phi", "phi3", "gemma", "gemma2", "mistral",
                                  "qwen2", "qwen3"])
def test_rows_decoding_while_chunks_prefill_share_forwards_and_keep_greedy_tokens(arch):
    # learned positions (GPT-2, OPT's offset), partial rotary, MQA, sliding windows and softcaps (Gemma2)
    model = tiny_causal_lm(arch, seed=3).eval()
    kv = KVPool(KVShape.of_module(model), 96, 4, "cpu")
    pool = DecodePool(model, kv, 4, 64, graphs=False)
    budget = PrefillBudget(7)  # the first two prompts in one turn; the 13-token one in chunks of 7 and 6
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(3, 250, (1, 4), generator=g), torch.randint(3, 250, (1, 3), generator=g)
    late = torch.randint(3, 250, (1, 13), generator=g)
    first = [_task(pool, kv, a, 12, budget), _task(pool, kv, b, 9, budget)]
    third = _task(pool, kv, late, 6, budget)
    done = _run(first, budget, arrive={3: third})
    assert pool.mixed_steps == 2  # each of the late prompt's chunks rode on a decode step
    assert pool.steps > pool.mixed_steps
    for t, p, n in zip(done, (a, b, late), (12, 9, 6)):
        assert t.error is None
        assert t.result["sequences"][0, p.shape[1]:].tolist() == _local_greedy(model, p, n)
    assert kv.alloc.held == sum(t.state.table.blocks for t in done)


def test_a_chunk_over_the_turns_tokens_or_steered_rows_take_separate_forwards():
    model = tiny_llama(seed=4).eval()
    kv = KVPool(KVShape.of_module(model), 96, 4, "cpu")
    pool = DecodePool(model, kv, 4, 64, graphs=False)
    budget = PrefillBudget(8)
    g = torch.Generator().manual_seed(1)
    a, late = torch.randint(3, 250, (1, 4), generator=g), torch.randint(3, 250, (1, 8), generator=g)
    # max_tokens 6 < the 8-token chunk: not packed with the rows (it is prefilled alone, as before)
    done = _run([_task(pool, kv, a, 10, budget)], budget, max_tokens=6, arrive={2: _task(pool, kv, late, 4, budget)})
    assert pool.mixed_steps == 0
    for t, p, n in zip(done, (a, late), (10, 4)):
        assert t.result["sequences"][0, p.shape[1]:].tolist() == _local_greedy(model, p, n)
    steered = _task(pool, kv, a, 10, budget)
    steered.steer = {1: torch.zeros(model.config.hidden_size)}  # a zero vector: same tokens, not mixable
    _run([steered], budget, arrive={2: _task(pool, kv, late, 4, budget)})
    assert pool.mixed_steps == 0


def _random_workload(arch: str, seed: int):
    """Six generates arriving over the first turns: prompts of 1-20 tokens, 1-12 new ones, half of them
    sampled (seeded), some with min_new_tokens against a random eos; a pool of 2-4 rows, so some wait."""
    import random

    rnd = random.Random(seed)
    model = tiny_causal_lm(arch, seed=3).eval()
    kv = KVPool(KVShape.of_module(model), 200, 4, "cpu")
    pool = DecodePool(model, kv, rnd.choice([2, 3, 4]), 64, graphs=False)
    budget = PrefillBudget(rnd.choice([3, 5, 7, 16]))
    specs = []
    for i in range(6):
        n, new = rnd.randint(1, 20), rnd.randint(1, 12)
        kw = {"max_new_tokens": new}
        if rnd.random() < 0.5:
            kw.update(do_sample=True, temperature=0.7)
        if rnd.random() < 0.3:
            kw.update(min_new_tokens=rnd.randint(1, new), eos_token_id=rnd.randint(3, 250))
        ids = torch.randint(3, 250, (1, n), generator=torch.Generator().manual_seed(seed * 10 + i))
        specs.append((rnd.randint(0, 8), ids, new, kw, 1000 + i))
    return model, kv, pool, budget, sorted(specs, key=lambda s: s[0])


@pytest.mark.parametrize("arch, seed", [("llama", 0), ("llama", 1), ("gemma2", 2), ("gpt2", 3)])
def test_mixed_and_separate_forwards_give_the_same_tokens(arch, seed, monkeypatch):
    """Randomized: the same workload with mixing and with mixing off (a decode step, then the chunks):
    every task's tokens, sampled ones too, and the blocks held are the same."""
    from djinn.server.execution import fast_task

    def run(mix: bool):
        if not mix:
            monkeypatch.setattr(fast_task, "can_mix", lambda *a: False)
        model, kv, pool, budget, pending = _random_workload(arch, seed)
        live, turn = [], 0
        while pending or not all(t.done for t in live):
            while pending and pending[0][0] <= turn:
                _, p, new, kw, sd = pending.pop(0)
                st = KVState.empty(kv, torch.zeros(1, 0, dtype=torch.long))
                assert kv.reserve(st.table, p.shape[1] + new)
                live.append(FastTask(pool, st, p, kw, sd, None, new, budget, continues=False))
            budget.new_turn()
            fast_turn([t for t in live if not t.done], 1000)
            for t in live:
                t.advance()
            turn += 1
            assert turn < 500
        out = [(repr(t.error) if t.error else t.result["sequences"][0].tolist()) for t in live]
        return out, pool.mixed_steps, kv.alloc.held

    mixed, n_mixed, held = run(True)
    plain, n_plain, held_plain = run(False)
    assert n_mixed > 0 and n_plain == 0
    assert mixed == plain and held == held_plain
