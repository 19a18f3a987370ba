"""Tier 1: the one paged step (djinn/server/execution/paged_step.py) for every module-path causal LM: batched
prefill (fresh rows, a chunk continuing a table, a forked copy-on-write table) and batched decode over
the KV pool's blocks give HF's logits to fp32 rounding and HF generate's greedy tokens, per row."""
from __future__ import annotations

import inspect

import pytest
import torch

from djinn.server.execution import paged_step
from djinn.server.execution.fastpath import DecodePool, Row, Sampler, model_unsupported, unsupported
from djinn.server.execution.prefill_step import Chunk, prefill
from djinn.vmu.kv_pool import KVPool, KVShape

from ..models import VOCAB, tiny_causal_lm

ARCHS = ["gpt2", "gpt_neox", "opt", "phi", "phi3", "gemma", "gemma2", "falcon", "falcon_mqa", "llama", "mistral",
         "qwen2", "qwen3", "gptj", "stablelm", "cohere"]
NEW = 6  # tokens each row generates


def _falcon_dispatches() -> bool:
    """Falcon's attention goes through AttentionInterface only in newer transformers (5.2x); before,
    an adapter routes it (Note [Attention adapters])."""
    from transformers.models.falcon import modeling_falcon

    return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(modeling_falcon.FalconAttention.forward)


def _hf_last_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits[0, -1]


def _hf_greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    with torch.no_grad():
        # eos_token_id: an id no model emits, so HF runs all n steps like the rows (which have no eos)
        return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0,
                              eos_token_id=VOCAB)[0, ids.shape[1]:].tolist()


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_paged_step_gives_hf_logits_and_greedy_tokens(arch):
    model = tiny_causal_lm(arch, seed=3)
    assert model_unsupported(model) is None
    kv = KVPool(KVShape.of_module(model), 64, 4, "cpu")
    kv.kv[:, :, 1:] = float("nan")  # blocks are zeroed when handed out; nothing else may be read
    pool = DecodePool(model, kv, 4, 64, graphs=False)
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.randint(3, VOCAB, (1, k), generator=g) for k in (13, 9, 4))
    ta, tb = kv.new_table(1), kv.new_table(1)
    assert kv.reserve(ta, 13 + NEW) and kv.reserve(tb, 9 + NEW)
    # Forward 1: a's first 6 tokens and all of b, both fresh, padded to 9.
    first = prefill(pool, [Chunk(ta, a[0, :6]), Chunk(tb, b[0])])
    _close(first[0], _hf_last_logits(model, a[:, :6]))
    _close(first[1], _hf_last_logits(model, b))
    # Forward 2: a continues its table; c forks a's (block 1 shared: its write copies it first).
    tc = kv.fork(ta)
    assert kv.reserve(tc, 10 + NEW)
    second = prefill(pool, [Chunk(ta, a[0, 6:]), Chunk(tc, c[0])])
    full = [a, b, torch.cat([a[:, :6], c], 1)]
    _close(second[0], _hf_last_logits(model, full[0]))
    _close(second[1], _hf_last_logits(model, full[2]))
    assert ta.rows[0][1] != tc.rows[0][1] and kv.cow_copies >= 1
    # Batched decode: three rows of lengths 13, 9 and 10; every step's logits against HF's forward.
    seen: list[torch.Tensor] = []
    run = pool._run
    pool._run = lambda B, L, *hooks: seen.append(run(B, L, *hooks).clone()) or seen[-1]
    rows = []
    for logits, t, ids in zip((second[0], first[1], second[1]), (ta, tb, tc), full):
        tok = int(logits.argmax())
        r = Row(tok, ids.shape[1], ids.shape[1], NEW - 1, Sampler(False), frozenset())
        r.new.append(tok)
        pool.join(r, t)
        rows.append(r)
    while not all(r.done for r in rows):
        pool.step()
    for i, (r, ids) in enumerate(zip(rows, full)):
        assert r.new == _hf_greedy(model, ids, NEW), f"row {i}"
        with torch.no_grad():  # HF's logits after each fed token, from one forward over the whole sequence
            want = model(torch.cat([ids, torch.tensor([r.new])], 1)).logits[0, ids.shape[1]:]
        for k, logits in enumerate(seen):
            _close(logits[i], want[k])


def test_falcon_alibi_and_length_varying_rope_stay_eager():
    alibi = tiny_causal_lm("falcon_alibi")
    assert model_unsupported(alibi).startswith("ALiBi position bias")
    # The probe alone refuses it too: its bias needs the dense mask the paged step does not build.
    assert paged_step._probe(alibi).startswith("its " if _falcon_dispatches() else paged_step._NOT_DISPATCHED)
    llama = tiny_causal_lm("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert unsupported(llama, 1, {}, 10, 256) == "rope type 'dynamic' changes with the length"


def test_the_step_leaves_the_model_as_it_was():
    """Note [Paged attention is set per call]: the config names the paged attention only while the step
    runs; the model's plain forward afterwards is bitwise what it was, and the paged attention called
    outside a step refuses."""
    model = tiny_causal_lm("gpt2", seed=2)
    ids = torch.tensor([[5, 6, 7, 8]])
    before = _hf_last_logits(model, ids)
    kv = KVPool(KVShape.of_module(model), 16, 4, "cpu")
    t = kv.new_table(1)
    assert kv.reserve(t, 8)
    pool = DecodePool(model, kv, 2, 64, graphs=False)
    prefill(pool, [Chunk(t, ids[0])])
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(_hf_last_logits(model, ids), before)
    q = torch.zeros(1, 4, 1, 16)
    with pytest.raises(RuntimeError, match="outside a paged step"):
        paged_step.attend(model.transformer.h[0].attn, q, q, q, None)


def test_an_adapted_falcon_runs_its_own_forward_outside_the_step():
    """Note [Attention adapters]: where Falcon's attention does not dispatch (transformers 5.17) the
    adapter takes over only inside the paged step; the eager forward and generate stay bitwise the
    release's own (a fresh copy of the same model is the reference)."""
    model, fresh = tiny_causal_lm("falcon", seed=4), tiny_causal_lm("falcon", seed=4)
    assert model_unsupported(model) is None
    adapted = [m for m in model.modules() if "_djinn_original" in m.__dict__]
    assert len(adapted) == (0 if _falcon_dispatches() else model.config.num_hidden_layers)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    kv = KVPool(KVShape.of_module(model), 16, 4, "cpu")
    t = kv.new_table(1)
    assert kv.reserve(t, 8)
    pool = DecodePool(model, kv, 2, 64, graphs=False)
    _close(prefill(pool, [Chunk(t, ids[0])])[0], _hf_last_logits(fresh, ids))
    assert torch.equal(_hf_last_logits(model, ids), _hf_last_logits(fresh, ids))
    assert _hf_greedy(model, ids, 4) == _hf_greedy(fresh, ids, 4)


def test_stats_name_the_path_and_step():
    model = tiny_causal_lm("opt")
    pool = DecodePool(model, KVPool(KVShape.of_module(model), 8, 4, "cpu"), 2, 64, graphs=False)
    stats = pool.stats()
    assert (stats["path"], stats["step"], stats["attention"]) == ("fast", "hf-paged", "gather")
