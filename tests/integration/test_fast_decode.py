"""Tier 2: the decode fast path (issue 7) on a real server, CPU: several sessions batched into one
step with ragged lengths give the same greedy tokens as a local generate; deterministic=True takes
the eager path; per-session sampling; breakpoints still work; a swapped session continues on it."""
from __future__ import annotations

import pytest
import torch

import djinn
from djinn.frontend import wire
from djinn.frontend.connection import Connection
from djinn.frontend.run import Breakpoint

from ..conftest import DEVICE
from ..models import VOCAB, tiny_causal_lm, tiny_llama, tiny_mistral, tiny_qwen2
from .test_scheduling import submit_generate, wait_for


@pytest.fixture(scope="module", params=[False, True], ids=["steps", "overlapped"])
def fast_server(request):
    """Every test of this file against a server whose greedy steps overlap (Note [Overlapped steps]) too:
    the same tokens, streams, cancels and sessions."""
    from ..conftest import ServerProcess

    # capture=all: on a GPU server every bucket is captured before the first row joins (no-op on the CPU)
    # prefill-step-tokens 16: prompts longer than that prefill in chunks, between decode steps
    s = ServerProcess("--fast-decode", "on", "--fast-decode-max-batch", "8", "--fast-decode-max-len", "256",
                      "--fast-decode-capture", "all", "--prefill-step-tokens", "16",
                      *(("--fast-decode-overlap",) if request.param else ()))
    yield s
    s.stop()


def _local(model, ids, n):
    """HF eager greedy generate on the server's device (the reference the fast path must match)."""
    model, ids = model.to(DEVICE), ids.to(DEVICE)
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids)).cpu()


def _prompts(k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (1, 3 + 4 * i), generator=g) for i in range(k)]


@pytest.mark.parametrize("build", [tiny_llama, tiny_mistral, tiny_qwen2], ids=["llama", "mistral", "qwen2"])
def test_concurrent_sessions_share_steps_and_match_local_greedy(fast_server, build):
    model = build().eval()
    conn = Connection(fast_server.address, secret=None)
    try:
        sessions = [conn.session(f"s{i}") for i in range(4)]
        rm = djinn.remote(model, session=sessions[0])
        prompts = _prompts(4)
        news = [40, 15, 25, 60]  # rows leave at different steps: the pool compacts around them
        for s in sessions:
            rm.attach(s)
        # Sent back to back from one thread: the engine reads them in one poll, so they share steps.
        futures = [s.submit("generate", {
            "model_id": rm.model_id, "input_ids": p, "kwargs": wire.pack(s, {"max_new_tokens": n, "do_sample": False}),
            "seed": None, "use_session_kv": True, "stream": False}) for s, p, n in zip(sessions, prompts, news)]
        outs = [f.result(120)["sequences"] for f in futures]
        for i in range(4):
            assert torch.equal(outs[i], _local(model, prompts[i], news[i])), i
        st = conn.stats()
        fast = st["models"][rm.model_id]["fast_decode"]
        assert fast["rows"] == 0 and fast["steps"] > 0
        assert fast["rows_stepped"] > fast["steps"], "no step ever batched two sessions"
        assert all(st["sessions"][s.sid]["decode"]["fast"] == 1 for s in sessions)
        assert (fast["overlapped_steps"] > 0) == fast["overlap"]  # Note [Overlapped steps]: they did
    finally:
        conn.close()


@pytest.mark.parametrize("arch", ["opt", "gpt2"])
def test_learned_position_models_take_the_one_fast_step(fast_server, arch):
    """Note [One step for every architecture] in paged_step.py: OPT (its position offset of 2, projected
    embeddings) and GPT-2 (learned positions, inverse-layer scaling) decode in the batched step, two
    sessions together, and equal local greedy generate; stats name the path and the step."""
    model = tiny_causal_lm(arch, seed=4).eval()
    conn = Connection(fast_server.address, secret=None)
    try:
        sessions = [conn.session() for _ in range(2)]
        rm = djinn.remote(model, session=sessions[0])
        rm.attach(sessions[1])
        prompts, news = _prompts(2, seed=8), [12, 20]
        futures = [s.submit("generate", {
            "model_id": rm.model_id, "input_ids": p, "kwargs": wire.pack(s, {"max_new_tokens": n, "do_sample": False}),
            "seed": None, "use_session_kv": True, "stream": False}) for s, p, n in zip(sessions, prompts, news)]
        for f, p, n in zip(futures, prompts, news):
            assert torch.equal(f.result(120)["sequences"], _local(model, p, n))
        st = conn.stats()
        m = st["models"][rm.model_id]
        assert (m["decode"]["path"], m["decode"]["step"], m["decode"]["eager_why"]) == ("fast", "hf-paged", None)
        assert (m["fast_decode"]["path"], m["fast_decode"]["step"]) == ("fast", "hf-paged")
        assert m["fast_decode"]["rows_stepped"] > m["fast_decode"]["steps"], "no step batched the two sessions"
        assert all(st["sessions"][s.sid]["decode"]["fast"] == 1 for s in sessions)
    finally:
        conn.close()


def test_long_prompts_prefill_in_chunks_between_decode_steps(fast_server):
    """Note [Chunked prefill]: two 100-token prompts sent together prefill 16 tokens a turn (7 chunks
    each), and give the local greedy tokens."""
    model = tiny_llama(seed=9).eval()
    conn = Connection(fast_server.address, secret=None)
    try:
        sessions = [conn.session() for _ in range(2)]
        rm = djinn.remote(model, session=sessions[0])
        rm.attach(sessions[1])
        g = torch.Generator().manual_seed(11)
        prompts = [torch.randint(0, VOCAB, (1, 100), generator=g) for _ in range(2)]
        before = conn.stats()["scheduler"]["prefill"]
        futures = [s.submit("generate", {
            "model_id": rm.model_id, "input_ids": p, "kwargs": wire.pack(s, {"max_new_tokens": 12, "do_sample": False}),
            "seed": None, "use_session_kv": True, "stream": False}) for s, p in zip(sessions, prompts)]
        outs = [f.result(120)["sequences"] for f in futures]
        for out, p in zip(outs, prompts):
            assert torch.equal(out, _local(model, p, 12))
        after = conn.stats()["scheduler"]["prefill"]
        assert after["step_tokens"] == 16
        assert after["chunks"] - before["chunks"] == 14  # ceil(100 / 16) = 7 chunks per prompt
        assert after["turns"] - before["turns"] >= 13    # at most one chunk per turn after the first
        # Note [Mixed step]: once the first prompt decodes, the second's chunks ride on its steps
        assert conn.stats()["models"][rm.model_id]["fast_decode"]["mixed_steps"] >= 1
    finally:
        conn.close()


def test_session_continues_across_calls_on_the_fast_path(fast_server):
    model = tiny_llama(seed=1).eval()
    conn = Connection(fast_server.address, secret=None)
    try:
        s = conn.session()
        rm = djinn.remote(model, session=s)
        a, b = _prompts(2, seed=3)
        out1 = s.generate(rm, a, max_new_tokens=6, do_sample=False)
        out2 = s.generate(rm, b, max_new_tokens=7, do_sample=False)
        assert torch.equal(out1, _local(model, a, 6))
        assert torch.equal(out2, _local(model, torch.cat([out1, b], 1), 7))  # one long local generate
        assert conn.stats()["sessions"][s.sid]["kv_tokens"][rm.model_id] == out2.shape[1]
    finally:
        conn.close()


def test_deterministic_takes_the_eager_path_bitwise(fast_server):
    model = tiny_llama(seed=2).eval()
    conn = Connection(fast_server.address, secret=None)
    try:
        s = conn.session()
        rm = djinn.remote(model, session=s)
        (ids,) = _prompts(1, seed=4)
        out = s.generate(rm, ids, max_new_tokens=5, do_sample=True, seed=7, deterministic=True)
        torch.manual_seed(7)
        model, dev_ids = model.to(DEVICE), ids.to(DEVICE)
        with torch.no_grad():
            ref = model.generate(dev_ids, max_new_tokens=5, do_sample=True, attention_mask=torch.ones_like(dev_ids)).cpu()
        assert torch.equal(out, ref)
        d = conn.stats()["sessions"][s.sid]["decode"]
        assert d["eager"] == 1 and d["fast"] == 0 and d["eager_why"] == "deterministic=True"
    finally:
        conn.close()


def test_unsupported_models_and_arguments_fall_back_and_say_why(fast_server):
    conn = Connection(fast_server.address, secret=None)
    try:
        s = conn.session()
        alibi = tiny_causal_lm("falcon_alibi").eval()
        rm = djinn.remote(alibi, session=s)
        (ids,) = _prompts(1, seed=5)
        assert torch.equal(s.generate(rm, ids, max_new_tokens=4, do_sample=False), _local(alibi, ids, 4))
        st = conn.stats()
        assert "ALiBi position bias" in st["sessions"][s.sid]["decode"]["eager_why"]
        decode = st["models"][rm.model_id]["decode"]
        assert (decode["path"], decode["step"]) == ("eager", "hf-generate") and "ALiBi" in decode["eager_why"]
        llama = tiny_llama().eval()
        s2 = conn.session()
        rl = djinn.remote(llama, session=s2)
        out = s2.generate(rl, ids, max_new_tokens=4, do_sample=False, repetition_penalty=1.3)
        llama, dev_ids = llama.to(DEVICE), ids.to(DEVICE)
        with torch.no_grad():
            ref = llama.generate(dev_ids, max_new_tokens=4, do_sample=False, repetition_penalty=1.3,
                                 attention_mask=torch.ones_like(dev_ids)).cpu()
        assert torch.equal(out, ref)
        assert "repetition_penalty" in conn.stats()["sessions"][s2.sid]["decode"]["eager_why"]
    finally:
        conn.close()


def test_seeded_sampling_per_session_is_repeatable(fast_server):
    model = tiny_llama(seed=3).eval()
    conn = Connection(fast_server.address, secret=None)
    try:
        s = conn.session()
        rm = djinn.remote(model, session=s)
        (ids,) = _prompts(1, seed=6)
        kw = dict(max_new_tokens=10, do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
        a = rm.generate(ids, seed=11, **kw)
        b = rm.generate(ids, seed=11, **kw)
        c = rm.generate(ids, seed=12, **kw)
        assert torch.equal(a, b) and a.shape == (1, ids.shape[1] + 10)
        assert not torch.equal(a, c)
        assert ((a >= 0) & (a < VOCAB)).all()
    finally:
        conn.close()


def test_breakpoints_still_work_next_to_fast_sessions(fast_server):
    model = tiny_llama(seed=4).eval()
    conn = Connection(fast_server.address, secret=None)
    try:
        s = conn.session()
        rm = djinn.remote(model, session=s)
        (ids,) = _prompts(1, seed=8)
        run = s.start(rm, ids, method="generate", max_new_tokens=4, do_sample=False,
                      breakpoints=[Breakpoint(layer=1, step=2)])
        stop = run.wait(60)
        assert stop is not None and stop.step == 2
        other = conn.session()
        assert torch.equal(other.generate(rm, ids, max_new_tokens=6, do_sample=False), _local(model, ids, 6))
        assert run.resume() is None
        assert torch.equal(run.output, _local(model, ids, 4))
    finally:
        conn.close()


def test_a_long_sequence_falls_back_to_eager(fast_server):
    model = tiny_llama(seed=5).eval()
    conn = Connection(fast_server.address, secret=None)
    try:
        s = conn.session()
        rm = djinn.remote(model, session=s)
        ids = torch.randint(0, VOCAB, (1, 250), generator=torch.Generator().manual_seed(9))
        assert torch.equal(s.generate(rm, ids, max_new_tokens=10, do_sample=False), _local(model, ids, 10))
        assert "fast_decode_max_len 256" in conn.stats()["sessions"][s.sid]["decode"]["eager_why"]
    finally:
        conn.close()


def test_swapped_session_continues_on_the_fast_path(start_server):
    srv = start_server("--fast-decode", "on", "--fast-decode-max-batch", "8", "--fast-decode-max-len", "256",
                       "--policy", "signal", "--swap-on-io-wait")
    model = tiny_llama(seed=6).eval()
    conn = Connection(srv.address, secret=None)
    try:
        s = conn.session()
        rm = djinn.remote(model, session=s)
        a, b = _prompts(2, seed=10)
        out1 = s.generate(rm, a, max_new_tokens=6, do_sample=False)
        s.signal("IO_WAIT", eta_s=30.0)
        st = wait_for(lambda: (x := conn.stats()["sessions"][s.sid])["state"] == "SWAPPED" and x)
        assert st["host_bytes"] > 0 and st["gpu_bytes"] == 0
        out2 = s.generate(rm, b, max_new_tokens=7, do_sample=False)  # swapped in, then the fast path
        assert torch.equal(out2, _local(model, torch.cat([out1, b], 1), 7))
        full = conn.stats()
        st = full["sessions"][s.sid]
        assert st["swaps_in"] == 1 and st["decode"]["fast"] == 2
        # The Stack's workspace: the decode step's buffers and the swap's staging buffer (>= one block).
        seg, kv = full["segments"], next(iter(full["kv"]["models"].values()))
        parts = seg["workspace_parts"]
        assert parts["graph_pools"] == parts["cached"] == 0 and seg["workspace"] == parts["buffers"]
        assert parts["buffers"] > kv["block_bytes"]
    finally:
        conn.close()


def test_recomputed_session_continues_on_the_fast_path(start_server):
    # A KV pool of 10 blocks of 4 tokens (2 KiB each): the second session's generate needs all of them.
    srv = start_server("--fast-decode", "on", "--fast-decode-max-batch", "8", "--fast-decode-max-len", "256",
                       "--policy", "recompute", "--kv-block-tokens", "4", "--data-budget-gb", str(22_000 / 2**30))
    model = tiny_llama(seed=7).eval()
    conn = Connection(srv.address, secret=None)
    try:
        s1, s2 = conn.session(), conn.session()
        rm = djinn.remote(model, session=s1)
        a, b, c = _prompts(3, seed=11)
        out1 = s1.generate(rm, a, max_new_tokens=5, do_sample=False)
        s2.generate(rm, b, max_new_tokens=30, do_sample=False)  # needs 10 blocks: s1 (2) must go
        assert conn.stats()["sessions"][s1.sid]["state"] == "DROPPED"
        out2 = s1.generate(rm, c, max_new_tokens=5, do_sample=False)  # prefills everything again
        assert torch.equal(out2, _local(model, torch.cat([out1, c], 1), 5))
        assert conn.stats()["scheduler"]["recomputed_tokens"] == out1.shape[1]
    finally:
        conn.close()


def test_min_new_tokens_holds_eos_back_like_hf(fast_server):
    # A model whose eos is its most likely token: without min_new_tokens it stops at once.
    model = tiny_llama(seed=8).eval()
    conn = Connection(fast_server.address, secret=None)
    try:
        s = conn.session()
        rm = djinn.remote(model, session=s)
        (ids,) = _prompts(1, seed=12)
        eager = _local(model, ids, 12)
        eos = int(eager[0, ids.shape[1] + 1])  # the second greedy token: eos from then on
        out = rm.generate(ids, max_new_tokens=12, min_new_tokens=6, eos_token_id=eos, do_sample=False)
        dev_model, dev_ids = model.to(DEVICE), ids.to(DEVICE)
        with torch.no_grad():
            ref = dev_model.generate(dev_ids, max_new_tokens=12, min_new_tokens=6, eos_token_id=eos,
                                     do_sample=False, attention_mask=torch.ones_like(dev_ids)).cpu()
        assert torch.equal(out, ref)
        assert ref.shape[1] >= ids.shape[1] + 6
        assert conn.stats()["sessions"][s.sid]["decode"]["fast"] == 1
    finally:
        conn.close()


def test_a_one_row_batch_makes_the_second_session_wait_for_the_row(start_server):
    srv = start_server("--fast-decode", "on", "--fast-decode-max-batch", "1")
    model = tiny_llama(seed=10).eval()
    conn = Connection(srv.address, secret=None)
    try:
        s1, s2 = conn.session(), conn.session()
        rm1, rm2 = djinn.remote(model, session=s1), djinn.remote(model, session=s2)
        a, b = _prompts(2, seed=13)
        f1 = submit_generate(s1, rm1, a, max_new_tokens=20, do_sample=False)
        out2 = s2.generate(rm2, b, max_new_tokens=20, do_sample=False)
        assert torch.equal(f1.result(30)["sequences"], _local(model, a, 20))
        assert torch.equal(out2, _local(model, b, 20))
        assert conn.stats()["models"][rm1.model_id]["fast_decode"]["slots"] == 1
    finally:
        conn.close()


def test_closing_a_session_mid_generate_frees_its_row_and_others_finish(fast_server):
    model = tiny_llama(seed=11).eval()
    conn = Connection(fast_server.address, secret=None)
    try:
        doomed, other = conn.session(), conn.session()
        rm = djinn.remote(model, session=doomed)
        rm.attach(other)
        a, b = _prompts(2, seed=14)
        futs = [s.submit("generate", {"model_id": rm.model_id, "input_ids": p, "seed": None, "stream": False,
                                      "use_session_kv": True,
                                      "kwargs": wire.pack(s, {"max_new_tokens": n, "do_sample": False})})
                for s, p, n in ((doomed, a, 200), (other, b, 60))]
        wait_for(lambda: (conn.stats()["sessions"][doomed.sid].get("job") or {}).get("steps", 0) > 3)
        doomed.close()
        with pytest.raises(djinn.SessionNotFound):
            futs[0].result(60)
        assert torch.equal(futs[1].result(60)["sequences"], _local(model, b, 60))
        st = conn.stats()["models"][rm.model_id]["fast_decode"]
        assert st["rows"] == 0
    finally:
        conn.close()


def test_streaming_on_the_fast_path(fast_server):
    model = tiny_llama(seed=12).eval()
    conn = Connection(fast_server.address, secret=None)
    try:
        s = conn.session()
        rm = djinn.remote(model, session=s)
        (ids,) = _prompts(1, seed=15)
        stream = s.generate(rm, ids, max_new_tokens=9, do_sample=False, stream=True)
        tokens = list(stream)
        ref = _local(model, ids, 9)
        assert tokens == ref[0, ids.shape[1]:].tolist() and torch.equal(stream.sequences, ref)
        assert conn.stats()["sessions"][s.sid]["decode"]["fast"] == 1
    finally:
        conn.close()


def test_a_generation_config_processor_sends_generate_to_the_eager_path(fast_server):
    """A processor the model's generation_config turns on (repetition_penalty, forced_eos_token_id) was
    ignored by the fast path, whose sampler does not implement it: other tokens than HF's generate."""
    conn = Connection(fast_server.address, secret=None)
    try:
        for field, value in (("repetition_penalty", 1.5), ("forced_eos_token_id", 3)):
            llama = tiny_llama().eval()
            setattr(llama.generation_config, field, value)
            s = conn.session()
            rl = djinn.remote(llama, session=s)
            (ids,) = _prompts(1, seed=9)
            assert torch.equal(s.generate(rl, ids, max_new_tokens=6, do_sample=False), _local(llama, ids, 6)), field
            why = conn.stats()["sessions"][s.sid]["decode"]["eager_why"]
            assert why == f"the model's generation_config sets {field}={value!r}", why
    finally:
        conn.close()
