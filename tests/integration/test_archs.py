"""Tier 2: the architectures of issue #16 on the module path, against one real server.

Decoder-only BLOOM (ALiBi), GPT-J (a fixed sin/cos position table), GPT-Neo (a learned table, a local
layer), StableLM, Cohere, Mixtral, Qwen2-MoE and Qwen3-MoE (experts, grouped-query attention) are built
by the server and generate over the session's paged KV blocks: greedy and seeded sampled tokens are
bitwise a local `generate`'s, a session's second call continues its cache as a local DynamicCache does,
and the pool's blocks are sized by the model's own KV heads. T5 (encoder-decoder) generates with the
decoder's self-attention KV in blocks and no KV kept between calls (Note [Encoder-decoder generate] in
djinn/server/execution/executor.py). Index inputs are refused before the device sees them, and the server goes
on. Graph-path models get a typed error for generate, on the client before anything is sent and on
the server for a raw request; MoE models run forward on the graph path (histc, _grouped_mm).
"""
from __future__ import annotations

import pytest
import torch

import djinn
from djinn.frontend import wire
from djinn.frontend.connection import Connection
from djinn.frontend.remote import RemoteModel

from ..conftest import DEVICE
from ..models import (VOCAB, tiny_bloom, tiny_cohere, tiny_gpt_neo, tiny_gptj, tiny_mixtral, tiny_qwen2_moe,
                      tiny_qwen3_moe, tiny_stablelm, tiny_t5)
from .test_sessions import LocalSession

IDS = torch.tensor([[1, 17, 42, 99, 5, 250, 7, 64]])
MORE = torch.tensor([[33, 8, 120]])
DECODERS = {"bloom": tiny_bloom, "gptj": tiny_gptj, "gpt_neo": tiny_gpt_neo, "stablelm": tiny_stablelm,
            "cohere": tiny_cohere, "mixtral": tiny_mixtral, "qwen2_moe": tiny_qwen2_moe, "qwen3_moe": tiny_qwen3_moe}
#: (architecture, layers, KV heads, head dim) of each tiny model: what one token's KV must cost.
KV_SHAPES = {"bloom": ("BloomForCausalLM", 2, 4, 16), "gptj": ("GPTJForCausalLM", 2, 4, 16),
             "gpt_neo": ("GPTNeoForCausalLM", 2, 4, 16), "stablelm": ("StableLmForCausalLM", 2, 2, 16),
             "cohere": ("CohereForCausalLM", 2, 2, 16), "mixtral": ("MixtralForCausalLM", 2, 2, 16),
             "qwen2_moe": ("Qwen2MoeForCausalLM", 2, 2, 16), "qwen3_moe": ("Qwen3MoeForCausalLM", 2, 2, 16),
             "t5": ("T5ForConditionalGeneration", 2, 4, 8)}


@pytest.fixture(scope="module")
def client(server):
    conn = Connection(server.address, secret=None)
    yield conn
    conn.close()


@pytest.fixture(scope="module")
def remote(client):
    """Every model once: (local module, RemoteModel), remoted in one session."""
    s = client.session("archs")
    models = {name: build(seed=3, device=DEVICE) for name, build in {**DECODERS, "t5": tiny_t5}.items()}
    return s, {name: (m, RemoteModel.from_module(s, m)) for name, m in models.items()}


def _local(model, ids, seed=None, **kw):
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(ids.to(DEVICE), **kw).cpu()


def _pool(client, mid: str) -> dict:
    return client.stats()["models"][mid]["kv_pool"]


@pytest.mark.parametrize("name", list(DECODERS))
def test_decoder_only_generate_is_bitwise_local(client, remote, name):
    s, models = remote
    model, rm = models[name]
    arch, layers, kv_heads, head_dim = KV_SHAPES[name]
    assert rm.path == "module" and rm.arch == arch and arch in djinn.supported_architectures()
    greedy = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(rm.generate(IDS, **greedy), _local(model, IDS, **greedy))
    sampled = dict(max_new_tokens=6, do_sample=True, top_k=50)   # the same scores, or other draws
    assert torch.equal(rm.generate(IDS, seed=11, **sampled), _local(model, IDS, seed=11, **sampled))
    with torch.no_grad():
        assert torch.equal(rm(IDS).logits.cpu(), model(IDS.to(DEVICE)).logits.cpu())

    local = LocalSession(model, torch.device(DEVICE))          # the session's KV continues, as locally
    s.call("reset_kv", {"model_id": rm.model_id})
    assert torch.equal(s.generate(rm, IDS, **greedy), local.generate(IDS, **greedy))
    assert torch.equal(s.generate(rm, MORE, **greedy), local.generate(MORE, **greedy))
    st = client.stats()
    seen = IDS.shape[1] + MORE.shape[1] + 2 * 6
    assert st["sessions"][s.sid]["kv_tokens"][rm.model_id] == seen
    pool = st["models"][rm.model_id]["kv_pool"]                # blocks of this model's own KV heads
    block = pool["block_tokens"] * layers * 2 * kv_heads * head_dim * 4
    assert pool["pool_bytes"] == pool["blocks"] * block
    assert st["sessions"][s.sid]["kv_blocks"] >= -(-seen // pool["block_tokens"])
    s.call("reset_kv", {"model_id": rm.model_id})


def test_t5_generates_with_its_decoder_kv_in_blocks(client, remote):
    s, models = remote
    model, rm = models["t5"]
    assert rm.path == "module"
    ids = torch.tensor([[5, 17, 42, 99, 5, 250, 7, 64], [9, 3, 44, 12, 80, 6, 31, 2]])
    sampled = dict(max_new_tokens=6, do_sample=True, top_k=50)
    ref = _local(model, ids, seed=5, **sampled)
    assert ref.shape == (2, 7) and len(set(ref[:, 1:].flatten().tolist())) > 2   # real tokens, not padding
    assert torch.equal(rm.generate(ids, seed=5, **sampled), ref)
    greedy = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(rm.generate(ids, **greedy), _local(model, ids, **greedy))
    # A session's generate is a fresh one every call (the input is the encoder's): the same tokens
    # twice, and the session keeps no KV for it.
    assert torch.equal(s.generate(rm, ids, seed=5, **sampled), ref)
    assert torch.equal(s.generate(rm, ids, seed=5, **sampled), ref)
    assert rm.model_id not in client.stats()["sessions"][s.sid]["kv_tokens"]
    _, layers, heads, d_kv = KV_SHAPES["t5"]                   # the decoder's layers and heads
    pool = _pool(client, rm.model_id)
    assert pool["pool_bytes"] == pool["blocks"] * pool["block_tokens"] * layers * 2 * heads * d_kv * 4
    with pytest.raises(djinn.InvalidRequest, match=r"decoder_start_token_id=256 is out of range"):
        rm.generate(ids, decoder_start_token_id=VOCAB, **greedy)
    assert torch.equal(rm.generate(ids, seed=5, **sampled), ref)


def test_t5_generate_run_stops_in_a_decoder_layer(remote):
    """A breakpoint by layer number in T5's decoder during generate (an EncoderDecoderCache over the
    run's blocks); resumed unedited, the run's tokens are the local generate's."""
    s, models = remote
    model, rm = models["t5"]
    ids = IDS.clone()
    ids[0, 0] = 5
    kw = dict(max_new_tokens=4, do_sample=False)
    run = s.start(rm, ids, method="generate", breakpoints=[djinn.Breakpoint(layer=1, step=2)], **kw)
    stop = run.wait()
    assert stop.path == "decoder.block.1" and stop.step == 2 and stop.activation.shape[1] == 1
    # Paused, the run holds its decoder KV block and the encoder's cross-attention KV (8 tokens).
    _, layers, heads, d_kv = KV_SHAPES["t5"]
    token = layers * 2 * heads * d_kv * 4
    assert stop.paused_bytes >= 16 * token + ids.shape[1] * token
    assert run.resume() is None and torch.equal(run.output, _local(model, ids, **kw))


def test_a_breakpoint_by_layer_number_in_bloom(remote):
    s, models = remote
    model, rm = models["bloom"]
    seen = []
    h = model.transformer.h[1].register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        ref = model(IDS.to(DEVICE)).logits.cpu()
    h.remove()
    run = s.start(rm, IDS, breakpoints=[1])
    stop = run.wait()
    assert stop.path == "transformer.h.1" and torch.equal(stop.activation.cpu(), seen[0].cpu())
    assert run.resume() is None and torch.equal(run.output.logits.cpu(), ref)


def test_index_inputs_are_refused_and_the_server_goes_on(remote):
    s, models = remote
    bloom, rb = models["bloom"]
    gptj, rj = models["gptj"]
    bad = IDS.clone()
    bad[0, 3] = VOCAB
    with pytest.raises(djinn.InvalidRequest, match=r"input_ids holds 256, out of range: allowed range is \[0, 256\)"):
        rb.generate(bad, max_new_tokens=2)
    with pytest.raises(djinn.InvalidRequest, match=r"input_ids holds 256"):
        s.generate(rb, bad, max_new_tokens=2)
    # GPT-J indexes a fixed sin/cos table of n_positions (256) rows by position.
    with pytest.raises(djinn.InvalidRequest, match=r"position_ids holds 256, out of range: allowed range is \[0, 256\)"):
        rj(IDS, position_ids=torch.arange(8)[None] + 249).logits.cpu()
    long = torch.randint(3, VOCAB, (1, 250), generator=torch.Generator().manual_seed(1))
    with pytest.raises(djinn.InvalidRequest, match=r"= 260 positions, but this model has a learned position table of 256"):
        rj.generate(long, max_new_tokens=10)
    greedy = dict(max_new_tokens=4, do_sample=False)
    assert torch.equal(rb.generate(IDS, **greedy), _local(bloom, IDS, **greedy))
    assert torch.equal(rj.generate(long, max_new_tokens=6, do_sample=False),
                       _local(gptj, long, max_new_tokens=6, do_sample=False))


def test_graph_path_models_refuse_generate_with_a_typed_error(client, remote):
    s, _ = remote
    model = tiny_mixtral(seed=4, device=DEVICE)
    rg = djinn.remote(model, session=s, path="graph")
    with torch.no_grad():                                   # MoE experts run on the graph path
        assert torch.equal(rg(IDS).logits.cpu(), model(IDS.to(DEVICE)).logits.cpu())
    sent = []
    call, submit = s.call, s.submit
    s.call = lambda op, *a, **k: (sent.append(op), call(op, *a, **k))[1]
    s.submit = lambda op, *a, **k: (sent.append(op), submit(op, *a, **k))[1]
    try:
        for fn in (lambda: s.generate(rg, IDS, max_new_tokens=2), lambda: rg.generate(IDS, max_new_tokens=2)):
            with pytest.raises(djinn.ModelNotSupported, match=r"this MixtralForCausalLM runs on the graph path.*"
                                                              r"djinn.supported_architectures\(\)"):
                fn()
        assert sent == []                                   # refused before anything was sent
    finally:
        del s.call, s.submit
    kwargs = wire.pack(s, {"max_new_tokens": 2})
    for op, args in (("generate", {"input_ids": IDS, "kwargs": kwargs, "use_session_kv": True}),
                     ("start", {"method": "generate", "args": wire.pack(s, [IDS]), "kwargs": kwargs,
                                "breakpoints": []})):
        with pytest.raises(djinn.ModelNotSupported, match=r"needs a model the server builds itself"):
            s.call(op, {"model_id": rg.model_id, **args})  # a raw request: typed on the server too
    assert torch.equal(rg(IDS).logits.cpu(), model(IDS.to(DEVICE)).logits.detach().cpu())
