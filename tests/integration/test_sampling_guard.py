"""Tier 2: sampling from scores that are not finite is refused before torch.multinomial (Note [Scores
are checked before sampling] in djinn/server/execution/sampling.py), on the eager path and the decode fast path.

On CUDA multinomial over NaN or inf probabilities is a device-side assert that restarts the worker for
every tenant; on the CPU it raises a RuntimeError. Either way the request must fail alone, with
InvalidRequest, and everyone else's generates go on.
"""
from __future__ import annotations

import pytest
import torch

import djinn
from djinn.frontend import wire
from djinn.frontend.connection import Connection
from djinn.frontend.remote import RemoteModel

from ..models import tiny_llama

PROMPT = torch.tensor([[1, 17, 42, 99, 5, 250, 7, 64, 31, 128]])


@pytest.fixture(scope="module")
def model(device):
    return tiny_llama(seed=31, device=device)


def local_sample(model, device, seed: int, ids=PROMPT, **kw) -> torch.Tensor:
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(ids.to(device), **kw).cpu()


def submit_generate(s, rm, ids, seed=None, **kw):
    rm.attach(s)
    return s.submit("generate", {"model_id": rm.model_id, "input_ids": ids, "use_session_kv": False,
                                 "seed": seed, "kwargs": wire.pack(s, kw)})


def test_overflowing_temperature_is_invalid_request_and_others_go_on(conn, model, device):
    """A temperature so small that the scores overflow to inf fails its own generate with InvalidRequest
    (not a multinomial error) while another tenant's seeded generates, before and after, stay local."""
    kw = dict(max_new_tokens=16, do_sample=True, top_k=30, temperature=0.8)
    ref = local_sample(model, device, 7, **kw)
    other = Connection(conn.address, secret=None)
    try:
        a, b = conn.session("bad"), other.session("bystander")
        rm_a, rm_b = RemoteModel.from_module(a, model), RemoteModel.from_module(b, model)
        mine = submit_generate(b, rm_b, PROMPT, seed=7, **kw)
        for bad in (dict(temperature=1e-40), dict(temperature=1e-40, top_p=0.9), dict(temperature=0.0)):
            with pytest.raises(djinn.InvalidRequest):
                rm_a.generate(PROMPT, max_new_tokens=4, do_sample=True, **bad)
        assert torch.equal(mine.result(60)["sequences"], ref)
        assert torch.equal(rm_b.generate(PROMPT, seed=7, **kw), ref)
        # the failing tenant's session goes on too
        assert torch.equal(a.generate(rm_a, PROMPT, seed=7, **kw), ref)
    finally:
        other.close()


def test_a_nan_steering_edit_fails_only_its_run(conn, model, device):
    """A breakpoint run whose edit writes NaN into an activation samples from NaN logits: its resume fails
    with InvalidRequest; another tenant's generate meanwhile, and the tenant's next call, are fine."""
    kw = dict(max_new_tokens=6, do_sample=True, top_k=30)
    ref = local_sample(model, device, 4, **kw)
    other = Connection(conn.address, secret=None)
    try:
        s = conn.session("steer")
        rm = RemoteModel.from_module(s, model)
        # min_new_tokens: an unseeded run draws fresh tokens every time, and an early eos would end it
        # before the stop at step 2.
        run = s.start(rm, PROMPT, method="generate", breakpoints=[djinn.Breakpoint(layer=0, step=2)],
                      min_new_tokens=6, **kw)
        stop = run.wait()
        stop.activation.fill_(float("nan"))
        b = other.session("bystander")
        bystander = submit_generate(b, RemoteModel.from_module(b, model), PROMPT, seed=4, **kw)
        with pytest.raises(djinn.InvalidRequest, match="sampling refused"):
            run.resume()
        assert torch.equal(bystander.result(60)["sequences"], ref)
        assert torch.equal(rm.generate(PROMPT, seed=4, **kw), ref)
    finally:
        other.close()


# -- the decode fast path ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fast_server():
    from ..conftest import ServerProcess

    s = ServerProcess("--fast-decode", "on", "--fast-decode-max-batch", "4", "--fast-decode-max-len", "128")
    yield s
    s.stop()


def _nan_after_first_token(device):
    """A tiny Llama whose input embedding of token X is NaN, and a prompt without X whose most likely
    next token is X: sampling with top_k=1 picks X first (its prefill is finite), and the decode step
    that feeds X gets NaN logits. The output head is not tied to the embedding, so X's logit stays finite."""
    model = tiny_llama(seed=32, device=device)
    assert not model.config.tie_word_embeddings
    for start in range(3, 200):
        prompt = torch.arange(start, start + 6).unsqueeze(0)
        with torch.no_grad():
            x = int(model(prompt.to(device)).logits[0, -1].argmax())
        if x not in prompt[0].tolist() and x != model.config.eos_token_id:
            break
    with torch.no_grad():
        model.model.embed_tokens.weight[x] = float("nan")
    return model, prompt, x


def test_a_row_with_nan_scores_fails_alone_in_the_batched_step(fast_server, device):
    """Two sessions decode in one batched step of the same model; one row's scores turn NaN mid-decode.
    That generate fails with InvalidRequest; the other row, in the same step, finishes as it would alone."""
    model, bad_prompt, x = _nan_after_first_token(device)
    good_prompt = None
    for start in range(50, 250):  # a prompt whose greedy continuation never feeds X
        p = torch.tensor([[start % 256, (start * 7) % 256, 3, 9]])
        with torch.no_grad():
            ref = model.generate(p.to(device), max_new_tokens=40, do_sample=False).cpu()
        if x not in ref[0].tolist():
            good_prompt = p
            break
    assert good_prompt is not None
    a_conn, b_conn = Connection(fast_server.address, secret=None), Connection(fast_server.address, secret=None)
    try:
        # The two generates share steps only if the second arrives before the first's 40 steps are done: on
        # a loaded machine it may not, so the pair is tried again (each try checked) until they did.
        for attempt in range(4):
            a, b = a_conn.session(f"nan{attempt}"), b_conn.session(f"bystander{attempt}")
            rm_a, rm_b = RemoteModel.from_module(a, model), RemoteModel.from_module(b, model)
            before = a_conn.stats()["models"][rm_a.model_id].get("fast_decode", {"steps": 0, "rows_stepped": 0})
            good = submit_generate(b, rm_b, good_prompt, max_new_tokens=40, do_sample=False)
            bad = submit_generate(a, rm_a, bad_prompt, max_new_tokens=20, do_sample=True, top_k=1)
            with pytest.raises(djinn.InvalidRequest, match="sampling refused"):
                bad.result(60)
            assert torch.equal(good.result(60)["sequences"], ref)
            st = a_conn.stats()
            assert st["sessions"][a.sid]["decode"]["fast"] == 1
            assert b_conn.stats()["sessions"][b.sid]["decode"]["fast"] == 1
            fd = st["models"][rm_a.model_id]["fast_decode"]
            if fd["rows_stepped"] - before["rows_stepped"] > fd["steps"] - before["steps"]:
                break  # the two rows shared a batched step
        else:
            pytest.fail("in 4 tries the two generates never shared a batched step")
        # both sessions go on
        assert torch.equal(rm_b.generate(good_prompt, max_new_tokens=40, do_sample=False), ref)
        assert a.generate(rm_a, good_prompt, max_new_tokens=5, do_sample=False).shape == (1, 9)
    finally:
        a_conn.close()
        b_conn.close()
