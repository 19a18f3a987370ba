"""Tier 2: steered generates (Note [Steering] in djinn/server/execution/steering.py). `generate(steer={layer: v})`
adds v to a decoder layer's output at every position the call feeds: on the eager path bitwise-equal to a
local generate with the same forward hook, on the batched fast path with the hook's greedy tokens while
unsteered sessions share its steps and keep their own tokens; bad vectors and layers are typed errors."""
from __future__ import annotations

import pytest
import torch

import djinn
from djinn.frontend import wire
from djinn.frontend.connection import Connection
from djinn.srg.layers import layer_path

from ..conftest import DEVICE
from ..models import VOCAB, tiny_causal_lm, tiny_llama


def _hooked_generate(model, ids, steer: dict, record: dict | None = None, **kw) -> torch.Tensor:
    """The local reference: forward hooks adding each vector to its layer's output during generate, and
    appending that output (row 0) to `record[layer]` when asked."""
    model, ids = model.to(DEVICE), ids.to(DEVICE)
    hooks = []
    for layer, v in steer.items():
        v = v.to(DEVICE, next(model.parameters()).dtype)

        def add(mod, args, out, v=v):
            return (out[0] + v, *out[1:]) if isinstance(out, tuple) else out + v
        hooks.append(model.get_submodule(layer_path(model, layer)).register_forward_hook(add))
    for layer, got in (record or {}).items():
        def keep(mod, args, out, got=got):
            got.append((out[0] if isinstance(out, tuple) else out)[0].detach().clone())
        hooks.append(model.get_submodule(layer_path(model, layer)).register_forward_hook(keep))
    try:
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), **kw).cpu()
    finally:
        for h in hooks:
            h.remove()


def _vector(model, seed: int, scale: float = 4.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(model.get_input_embeddings().embedding_dim, generator=g)


def _prompt(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch,layer", [("llama", 1), ("gpt2", -1)])
def test_eager_steered_generate_is_bitwise_the_local_hook(conn, arch, layer):
    model = tiny_llama().eval() if arch == "llama" else tiny_causal_lm("gpt2", seed=3).eval()
    s = conn.session()
    rm = djinn.remote(model, session=s)
    ids, v = _prompt(7), _vector(model, 1)
    kw = dict(max_new_tokens=10, do_sample=False)
    want = _hooked_generate(model, ids, {layer: v}, **kw)
    assert not torch.equal(want, _hooked_generate(model, ids, {}, **kw)), "the vector changes nothing: no test"
    assert torch.equal(s.generate(rm, ids, steer={layer: v}, **kw), want)
    # The session goes on unsteered from the steered call's KV, as the local model would with the hook removed.
    more = _prompt(3, seed=5)
    full = torch.cat([want, more], 1)
    assert torch.equal(rm.generate(full, **kw), _hooked_generate(model, full, {}, **kw))
    # Seeded sampling with a vector at two layers, stateless.
    two = {0: _vector(model, 2), layer: v}
    assert torch.equal(rm.generate(ids, steer=two, seed=7, max_new_tokens=8, do_sample=True, top_k=20),
                       _seeded(model, ids, two, 7))


def _seeded(model, ids, steer, seed):
    torch.manual_seed(seed)
    return _hooked_generate(model, ids, steer, max_new_tokens=8, do_sample=True, top_k=20)


@pytest.fixture(scope="module")
def fast_server(module_server):
    return module_server("--fast-decode", "on", "--fast-decode-max-batch", "8", "--fast-decode-max-len", "256",
                         "--prefill-step-tokens", "16")


def test_fast_path_steers_its_rows_and_leaves_the_others_alone(fast_server):
    """Three sessions decode in shared steps: one steered at layer 1, one unsteered, one steered at layer 0
    by another vector (a prompt longer than a prefill chunk). Each gives the greedy tokens of its local
    reference, so an unsteered row batched with steered ones is untouched."""
    model = tiny_llama().eval()
    conn = Connection(fast_server.address, secret=None)
    try:
        sessions = [conn.session(f"s{i}") for i in range(3)]
        rm = djinn.remote(model, session=sessions[0])
        for s in sessions:
            rm.attach(s)
        prompts = [_prompt(5, 1), _prompt(9, 2), _prompt(21, 3)]
        steers = [{1: _vector(model, 4)}, {}, {0: _vector(model, 5)}]
        news = [24, 30, 18]
        futures = [s.submit("generate", {
            "model_id": rm.model_id, "input_ids": p, "kwargs": wire.pack(s, {"max_new_tokens": n, "do_sample": False}),
            "seed": None, "use_session_kv": True, "stream": False,
            **({"steer": wire.pack(s, [[k, v] for k, v in st.items()])} if st else {})})
            for s, p, st, n in zip(sessions, prompts, steers, news)]
        outs = [f.result(120)["sequences"] for f in futures]
        for i in range(3):
            want = _hooked_generate(model, prompts[i], steers[i], max_new_tokens=news[i], do_sample=False)
            assert torch.equal(outs[i], want), i
        unsteered = _hooked_generate(model, prompts[0], {}, max_new_tokens=news[0], do_sample=False)
        assert not torch.equal(outs[0], unsteered), "the vector changes nothing: no test"
        st = conn.stats()
        fast = st["models"][rm.model_id]["fast_decode"]
        assert fast["rows_stepped"] > fast["steps"], "no step batched two sessions"
        assert all(st["sessions"][s.sid]["decode"]["fast"] == 1 for s in sessions)
    finally:
        conn.close()


def test_bad_steering_is_a_typed_error_and_the_server_serves_on(conn):
    model = tiny_llama().eval()
    s = conn.session()
    rm = djinn.remote(model, session=s)
    ids, v = _prompt(4), _vector(model, 1)
    hidden = v.numel()
    for steer, match in [({2: v}, "layer=2 is out of range"),
                         ({0: torch.ones(hidden + 1)}, f"must be a float tensor of {hidden} values"),
                         ({0: torch.ones(hidden, dtype=torch.long)}, "must be a float tensor"),
                         ({0: torch.full((hidden,), float("nan"))}, "NaN or infinite"),
                         ({0: v, -2: v}, "names layer 0 twice")]:
        with pytest.raises(djinn.InvalidRequest, match=match):
            s.generate(rm, ids, steer=steer, max_new_tokens=3)
    with pytest.raises(djinn.InvalidRequest, match="steer must be a dict"):
        s.generate(rm, ids, steer=[v], max_new_tokens=3)
    out = s.generate(rm, ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, _hooked_generate(model, ids, {}, max_new_tokens=4, do_sample=False))


def test_recorded_activations_are_the_local_hooks_on_both_paths(conn, fast_server):
    """Note [Recorded activations]: record=[...] returns each layer's output at every fed position, after
    its steering vector: bitwise the local hook's on the eager path, to rounding on the batched fast path
    (while another session shares its steps), and the tokens are unchanged by recording."""
    model = tiny_llama().eval()
    ids, v = _prompt(6, 4), _vector(model, 6)
    kw = dict(max_new_tokens=9, do_sample=False)
    got0: list = []
    got1: list = []
    want = _hooked_generate(model, ids, {1: v}, {0: got0, -1: got1}, **kw)
    ref0, ref1 = torch.cat(got0).cpu(), torch.cat(got1).cpu()
    assert ref0.shape == (6 + 9 - 1, model.config.hidden_size)
    s = conn.session()
    rm = djinn.remote(model, session=s)
    seq, acts = s.generate(rm, ids, steer={1: v}, record=[0, -1], **kw)
    assert torch.equal(seq, want) and list(acts) == [0, -1]
    assert torch.equal(acts[0].cpu(), ref0) and torch.equal(acts[-1].cpu(), ref1)

    fc = Connection(fast_server.address, secret=None)
    try:
        a, b = fc.session(), fc.session()
        frm = djinn.remote(model, session=a)
        frm.attach(b)
        other = b.submit("generate", {"model_id": frm.model_id, "input_ids": _prompt(11, 7), "seed": None,
                                      "kwargs": wire.pack(b, {"max_new_tokens": 12, "do_sample": False}),
                                      "use_session_kv": True, "stream": False})
        seq, acts = a.generate(frm, ids, steer={1: v}, record=[0, -1], **kw)
        other.result(60)
        assert torch.equal(seq, want)
        torch.testing.assert_close(acts[0].cpu(), ref0, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(acts[-1].cpu(), ref1, rtol=1e-4, atol=1e-4)
        assert fc.stats()["sessions"][a.sid]["decode"]["fast"] == 1
        with pytest.raises(djinn.InvalidRequest, match="record"):
            a.generate(frm, ids, record=[0, 0], max_new_tokens=2)
    finally:
        fc.close()


def test_a_recorded_activation_steers_a_later_generate_without_leaving_the_server(conn):
    """The vector may be a RemoteTensor: a direction read from one generate's recorded activations steers
    the next, and equals the same steering with that direction fetched and sent back."""
    model = tiny_llama().eval()
    s = conn.session()
    rm = djinn.remote(model, session=s)
    ids = _prompt(6, 8)
    _, acts = s.generate(rm, ids, record=[0], max_new_tokens=4, do_sample=False)
    direction = acts[0][-1] - acts[0][0]                    # lazy ops on the server: a [hidden] RemoteTensor
    got = rm.generate(ids, steer={1: 3 * direction}, max_new_tokens=8, do_sample=False)
    local = 3 * (acts[0][-1].cpu() - acts[0][0].cpu())
    assert torch.equal(got, rm.generate(ids, steer={1: local}, max_new_tokens=8, do_sample=False))
    assert torch.equal(got, _hooked_generate(model, ids, {1: local}, max_new_tokens=8, do_sample=False))
