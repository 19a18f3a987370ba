"""Tier 2: the module path end to end against a real server, for every tiny architecture.

Every remote result is compared bitwise (torch.equal) with the same model run locally on the same
device as the server (DJINN_TEST_DEVICE).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import djinn
from djinn.frontend.remote import RemoteModel
from djinn.frontend.tensor import RemoteTensor

from ..models import TINY_BUILDERS

ARCHS = sorted(TINY_BUILDERS)
PROMPT = torch.tensor([[1, 17, 42, 99, 5, 250, 7, 64, 31, 128]])


def _batch2() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on the second row
    ids[1, :3] = 2
    return ids, mask


@pytest.fixture(scope="module")
def local_models(device):
    return {name: build(seed=0, device=device) for name, build in TINY_BUILDERS.items()}


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture
def pair(arch, local_models, conn):
    """(local model, RemoteModel of the same weights in conn's default session)."""
    model = local_models[arch]
    return model, RemoteModel.from_module(conn.default_session(), model)


def _local(model, fn):
    with torch.no_grad():
        return fn(model)


def test_forward_logits_bitwise(pair, device):
    model, rm = pair
    out = rm(PROMPT)
    assert isinstance(out.logits, RemoteTensor)
    ref = _local(model, lambda m: m(PROMPT.to(device)).logits)
    assert out.logits.shape == ref.shape and out.logits.dtype == ref.dtype
    assert torch.equal(out.logits.cpu(), ref.cpu())


def test_forward_batch2_attention_mask(pair, device):
    model, rm = pair
    ids, mask = _batch2()
    got = rm(ids, attention_mask=mask).logits.cpu()
    ref = _local(model, lambda m: m(ids.to(device), attention_mask=mask.to(device)).logits)
    assert got.shape == (2, 10, 256)
    assert torch.equal(got, ref.cpu())


def test_greedy_generate(pair, device):
    model, rm = pair
    got = rm.generate(PROMPT, max_new_tokens=12, do_sample=False)
    ref = _local(model, lambda m: m.generate(PROMPT.to(device), max_new_tokens=12, do_sample=False))
    assert got.device.type == "cpu"
    assert got.shape == (1, PROMPT.shape[1] + 12)
    assert torch.equal(got, ref.cpu())


def test_greedy_generate_batch2_attention_mask(pair, device):
    model, rm = pair
    ids, mask = _batch2()
    got = rm.generate(ids, attention_mask=mask, max_new_tokens=12, pad_token_id=2)
    ref = _local(model, lambda m: m.generate(ids.to(device), attention_mask=mask.to(device),
                                             max_new_tokens=12, pad_token_id=2))
    assert torch.equal(got, ref.cpu())


def test_sampling_matches_local_seed(pair, device):
    model, rm = pair
    kw = dict(max_new_tokens=12, do_sample=True, top_k=20)
    got = rm.generate(PROMPT, seed=1234, **kw)

    def sample(m):
        torch.manual_seed(1234)
        return m.generate(PROMPT.to(device), **kw)

    assert torch.equal(got, _local(model, sample).cpu())
    assert torch.equal(rm.generate(PROMPT, seed=1234, **kw), got)  # same seed, same tokens
    assert not torch.equal(rm.generate(PROMPT, seed=4321, **kw), got)  # another seed, other tokens


def test_streaming_matches_generate(pair):
    _, rm = pair
    full = rm.generate(PROMPT, max_new_tokens=12)
    stream = rm.generate(PROMPT, max_new_tokens=12, stream=True)
    assert isinstance(stream, djinn.TokenStream)
    tokens = list(stream)
    assert all(isinstance(t, int) for t in tokens)
    assert tokens == full[0, PROMPT.shape[1]:].tolist()
    assert torch.equal(stream.sequences, full)


def test_streaming_sampled_matches_non_streamed(pair):
    _, rm = pair
    kw = dict(max_new_tokens=10, do_sample=True, top_k=20, seed=7)
    full = rm.generate(PROMPT, **kw)
    stream = rm.generate(PROMPT, stream=True, **kw)
    assert list(stream) == full[0, PROMPT.shape[1]:].tolist()
    assert torch.equal(stream.sequences, full)


def test_streaming_rejects_batch2(conn, local_models):
    rm = RemoteModel.from_module(conn.default_session(), local_models["gpt2"])
    ids, _ = _batch2()
    with pytest.raises(djinn.InvalidRequest):
        rm.generate(ids, max_new_tokens=2, stream=True)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_from_path_forward(conn, local_models, device, tmp_path, name):
    model = local_models[name]
    model.save_pretrained(tmp_path)
    assert list(tmp_path.glob("*.safetensors"))
    rm = RemoteModel.from_path(conn.default_session(), str(tmp_path))
    assert rm.arch == type(model).__name__
    ref = _local(model, lambda m: m(PROMPT.to(device)).logits)
    assert torch.equal(rm(PROMPT).logits.cpu(), ref.cpu())
    got = rm.generate(PROMPT, max_new_tokens=6)
    assert torch.equal(got, _local(model, lambda m: m.generate(PROMPT.to(device), max_new_tokens=6)).cpu())


def test_remote_tensor_as_input(conn, local_models, device):
    """An output handle goes back in as inputs_embeds without ever being fetched."""
    model = local_models["llama"]
    rm = RemoteModel.from_module(conn.default_session(), model)
    emb = rm(PROMPT, output_hidden_states=True).hidden_states[0]  # llama: the token embeddings
    assert isinstance(emb, RemoteTensor) and emb.shape == (1, PROMPT.shape[1], 64)
    got = rm(inputs_embeds=emb).logits.cpu()
    ids = PROMPT.to(device)
    ref = _local(model, lambda m: m(inputs_embeds=m.model.embed_tokens(ids)).logits)
    assert torch.equal(got, ref.cpu())
    assert torch.equal(got, rm(PROMPT).logits.cpu())


def test_base_model_hidden_state(conn, local_models, device):
    """A headless architecture (GPT2Model) runs too, and shares the LM's weights on the server."""
    model = local_models["gpt2"]
    rm_lm = RemoteModel.from_module(conn.default_session(), model)
    rm_base = RemoteModel.from_module(conn.default_session(), model.transformer)
    assert rm_base.arch == "GPT2Model" and rm_base.model_id != rm_lm.model_id
    assert rm_base.upload.uploaded == 0  # every weight is already there
    hidden = rm_base(PROMPT).last_hidden_state
    ref = _local(model, lambda m: m.transformer(PROMPT.to(device)).last_hidden_state)
    assert torch.equal(hidden.cpu(), ref.cpu())


def test_generation_config_defaults_follow_local_model(conn, device):
    """generate() without explicit lengths uses the model's own generation_config, per client model:
    the same weights with other generation defaults must not share the first one's defaults."""
    short, long_ = TINY_BUILDERS["llama"](seed=0, device=device), TINY_BUILDERS["llama"](seed=0, device=device)
    short.generation_config.max_new_tokens = 3
    long_.generation_config.max_new_tokens = 5
    rm_short = RemoteModel.from_module(conn.session(), short)
    rm_long = RemoteModel.from_module(conn.session(), long_)
    assert rm_long.upload.uploaded == 0  # the weights are still shared
    for model, rm in ((short, rm_short), (long_, rm_long)):
        ref = _local(model, lambda m: m.generate(PROMPT.to(device)))
        got = rm.generate(PROMPT)
        assert got.shape == (1, PROMPT.shape[1] + model.generation_config.max_new_tokens)
        assert torch.equal(got, ref.cpu())


def test_a_generation_config_cannot_bypass_generates_checks(conn, device, tmp_path):
    """Note [Effective generate arguments]: arguments a generate leaves out come from the model's
    generation_config (sent at registration, or the server's generation_config.json); the allow-list and
    the ranges apply to them too (4096 beams once ran this way). The call can override them, as locally."""
    wide = TINY_BUILDERS["llama"](seed=0, device=device)
    wide.generation_config.num_beams = 4096
    rm = RemoteModel.from_module(conn.session(), wide)
    with pytest.raises(djinn.InvalidRequest) as info:
        rm.generate(PROMPT, max_new_tokens=2, do_sample=False)
    assert info.value.message == ("generate: num_beams must be an int in [1, 64], got 4096 (from the model's "
                                  "generation_config; pass it to override)")
    ref = _local(wide, lambda m: m.generate(PROMPT.to(device), max_new_tokens=4, num_beams=1, do_sample=False))
    assert torch.equal(rm.generate(PROMPT, max_new_tokens=4, num_beams=1, do_sample=False), ref.cpu())
    # A server-side directory: its generation_config.json counts the same way.
    plain = TINY_BUILDERS["gpt2"](seed=0, device=device)
    plain.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text('{"num_beams": 4, "guidance_scale": 3.0}')
    loaded = RemoteModel.from_path(conn.session(), str(tmp_path))
    with pytest.raises(djinn.InvalidRequest, match=r"generation_config sets guidance_scale=3\.0, which generate "
                                                   r"does not accept"):
        loaded.generate(PROMPT, max_new_tokens=2, num_beams=1)
    assert torch.equal(loaded(PROMPT).logits.cpu(), _local(plain, lambda m: m(PROMPT.to(device)).logits).cpu())
    # One transformers itself refuses is a typed error at registration.
    odd = TINY_BUILDERS["llama"](seed=0, device=device)
    odd.generation_config.early_stopping = "sometimes"
    with pytest.raises(djinn.InvalidRequest, match="bad generation_config for LlamaForCausalLM: `early_stopping`"):
        RemoteModel.from_module(conn.session(), odd)


# -- errors ----------------------------------------------------------------------------------------
def test_unsupported_module(conn):
    with pytest.raises(djinn.ModelNotSupported):
        RemoteModel.from_module(conn.default_session(), nn.Linear(4, 4))


def test_disallowed_generate_kwarg(conn, local_models):
    rm = RemoteModel.from_module(conn.default_session(), local_models["gpt2"])
    with pytest.raises(djinn.InvalidRequest, match="output_scores"):
        rm.generate(PROMPT, max_new_tokens=2, output_scores=True)
    with pytest.raises(djinn.InvalidRequest):
        rm.generate(PROMPT.tolist(), max_new_tokens=2)


def test_forward_error_keeps_connection(conn, local_models, device):
    model = local_models["llama"]
    rm = RemoteModel.from_module(conn.default_session(), model)
    with pytest.raises(djinn.RemoteExecutionError) as info:
        rm(torch.zeros(2, 3, 4, dtype=torch.long))  # input_ids of the wrong rank
    assert info.value.remote_traceback and "Traceback" in info.value.remote_traceback
    with pytest.raises(djinn.RemoteExecutionError) as info:
        rm(torch.randn(1, 5))  # float ids
    assert info.value.remote_traceback
    # the same connection and session keep working
    ref = _local(model, lambda m: m(PROMPT.to(device)).logits)
    assert torch.equal(rm(PROMPT).logits.cpu(), ref.cpu())
    assert conn.ping() > 0
