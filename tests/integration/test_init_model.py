"""Tier 2: models the server builds from a config with seeded random weights (djinn/server/handlers/init_ops.py).

Every remote result is compared bitwise with the model built locally by the documented recipe on the
server's device (DJINN_TEST_DEVICE):

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)   # dtype omitted when None
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

import djinn
from djinn.frontend.connection import Connection
from djinn.frontend.remote import RemoteModel
from djinn.protocol.errors import InvalidRequest, ModelNotSupported

PROMPT = torch.tensor([[1, 17, 42, 99, 5, 250, 7, 64, 31, 128]])


def gpt2_config() -> GPT2Config:
    return GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=256,
                      bos_token_id=1, eos_token_id=2)


def llama_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       bos_token_id=1, eos_token_id=2)


def llama_eager_config() -> LlamaConfig:
    cfg = llama_config()
    cfg._attn_implementation = "eager"  # not in the config's JSON: from_config sends it apart
    return cfg


CONFIGS = {"gpt2": gpt2_config, "llama": llama_config, "llama_eager": llama_eager_config}


def local_recipe(config, seed: int, dtype, device) -> torch.nn.Module:
    """The recipe init_model documents, run here."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, **({"dtype": dtype} if dtype is not None else {}))
    return model.eval()


def init_args(config, seed=0, dtype=None, arch=None) -> dict:
    """A raw init_model request, for what the client API checks before sending."""
    import json

    return {"arch": arch or type(AutoModelForCausalLM.from_config(config)).__name__,
            "config": json.loads(config.to_json_string(use_diff=False)), "dtype": dtype, "seed": seed}


@pytest.mark.parametrize("name, seed, dtype", [
    ("gpt2", 0, None), ("llama", 0, None), ("llama", 5, torch.bfloat16), ("llama_eager", 0, None)])
def test_forward_and_greedy_bitwise(conn, device, name, seed, dtype):
    rm = RemoteModel.from_config(conn.default_session(), CONFIGS[name](), seed=seed, dtype=dtype)
    model = local_recipe(CONFIGS[name](), seed, dtype, device)
    assert rm.arch == type(model).__name__
    unique = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}.values()
    assert rm.nbytes == sum(t.numel() * t.element_size() for t in unique)
    with torch.no_grad():
        ref = model(PROMPT.to(device)).logits
        ref_gen = model.generate(PROMPT.to(device), max_new_tokens=12, do_sample=False)
    got = rm(PROMPT).logits
    assert got.dtype == ref.dtype == (dtype or torch.float32)
    assert torch.equal(got.cpu(), ref.cpu())
    assert torch.equal(rm.generate(PROMPT, max_new_tokens=12, do_sample=False), ref_gen.cpu())


def test_djinn_remote_config_and_seeds_differ(conn, device):
    s = conn.default_session()
    a = djinn.remote(llama_config(), session=s, seed=11, dtype=torch.float16)
    b = djinn.remote(llama_config(), session=s, seed=12, dtype=torch.float16)
    assert a.model_id != b.model_id and "seed 11" in repr(a)
    la, lb = (local_recipe(llama_config(), seed, torch.float16, device) for seed in (11, 12))
    with torch.no_grad():
        assert torch.equal(a(PROMPT).logits.cpu(), la(PROMPT.to(device)).logits.cpu())
        assert torch.equal(b(PROMPT).logits.cpu(), lb(PROMPT.to(device)).logits.cpu())
    assert not torch.equal(a(PROMPT).logits.cpu(), b(PROMPT).logits.cpu())
    with pytest.raises(InvalidRequest, match="only when remoting a config"):
        djinn.remote(la, session=s, seed=1)


def test_two_clients_share_one_model(start_server, device):
    server = start_server()
    c1, c2 = Connection(server.address, None), Connection(server.address, None)
    try:
        s1, s2 = c1.session("a"), c2.session("b")
        rm1 = RemoteModel.from_config(s1, gpt2_config(), seed=3)
        info = s2.call("init_model", init_args(gpt2_config(), seed=3))
        assert info["created"] is False and info["model_id"] == rm1.model_id and info["bytes"] == rm1.nbytes
        assert info["arch"] == "GPT2LMHeadModel" and info["config"]["n_embd"] == 64
        rm2 = RemoteModel.from_config(s2, gpt2_config(), seed=3)  # asked again: the same entry, attached once
        assert rm2.model_id == rm1.model_id
        st = c1.stats()
        assert list(st["models"]) == [rm1.model_id]
        assert sorted(st["models"][rm1.model_id]["sessions"]) == sorted([s1.sid, s2.sid])
        assert torch.equal(rm1(PROMPT).logits.cpu(), rm2(PROMPT).logits.cpu())
        entries = st["text_entries"]
        assert entries > 0
        # Another dtype or seed is another model with its own weights.
        other = RemoteModel.from_config(s2, gpt2_config(), seed=4)
        assert other.model_id != rm1.model_id and len(c1.stats()["models"]) == 2
        s2.close()
        st = c1.stats()
        assert list(st["models"]) == [rm1.model_id] and st["text_entries"] == entries  # refcounted: s1 holds it
        s1.close()
        st = c1.stats()
        assert st["models"] == {} and st["text_entries"] == 0 and st["segments"]["text"] == 0
    finally:
        c1.close()
        c2.close()


def test_not_allowed_architecture(conn):
    s = conn.default_session()
    cfg = llama_config()
    cfg.architectures = ["LlamaForSequenceClassification"]
    with pytest.raises(ModelNotSupported):
        RemoteModel.from_config(s, cfg)  # refused by the client from the server's HELLO list
    with pytest.raises(ModelNotSupported, match="LlamaForSequenceClassification"):
        s.call("init_model", init_args(llama_config(), arch="LlamaForSequenceClassification"))
    with pytest.raises(ModelNotSupported, match="os.system"):
        s.call("init_model", init_args(llama_config(), arch="os.system"))
    assert conn.ping() > 0


def test_bad_requests_are_typed_and_server_keeps_serving(conn, device):
    s = conn.default_session()
    with pytest.raises(InvalidRequest, match="int64"):
        RemoteModel.from_config(s, llama_config(), dtype=torch.int64)
    with pytest.raises(InvalidRequest, match="float17"):
        s.call("init_model", init_args(llama_config(), dtype="float17"))
    with pytest.raises(InvalidRequest, match="float8"):
        s.call("init_model", init_args(llama_config(), dtype="float8_e4m3fn"))
    with pytest.raises(InvalidRequest, match="seed"):
        s.call("init_model", init_args(llama_config(), seed="7"))
    with pytest.raises(InvalidRequest, match="seed"):
        s.call("init_model", init_args(llama_config(), seed=-1))
    with pytest.raises(InvalidRequest, match="LlamaConfig"):  # a GPT-2 class with a Llama config
        s.call("init_model", init_args(llama_config(), arch="GPT2LMHeadModel"))
    with pytest.raises(InvalidRequest, match="config"):
        s.call("init_model", dict(init_args(llama_config()), config=[1, 2]))
    with pytest.raises(InvalidRequest, match="attention"):
        s.call("init_model", dict(init_args(llama_config()), attn_impl="fast"))
    with pytest.raises(InvalidRequest, match="dtype"):
        RemoteModel.from_config(s, llama_config(), dtype="float16")
    with pytest.raises(InvalidRequest, match="PretrainedConfig"):
        RemoteModel.from_config(s, {"model_type": "llama"})
    if torch.device(device).type != "cuda":
        with pytest.raises(InvalidRequest, match="CUDA"):
            RemoteModel.from_config(s, llama_config(), weight_budget_gb=1.0)
    # Still serving, and a failed request left nothing behind.
    assert conn.ping() > 0
    rm = RemoteModel.from_config(s, llama_config(), seed=21)
    model = local_recipe(llama_config(), 21, None, device)
    with torch.no_grad():
        assert torch.equal(rm(PROMPT).logits.cpu(), model(PROMPT.to(device)).logits.cpu())


@pytest.mark.gpu
def test_weight_budget_streams_bitwise(conn, device):
    """With a budget the weights are built on the GPU, staged on the host, and the streamed layers go to
    pinned memory (like load_dir); a resident request of the same identity reuses those weights."""
    if device.type != "cuda":
        pytest.skip("weight streaming needs a CUDA server (DJINN_TEST_DEVICE=cuda:0)")
    from djinn.server.models.streaming import GIB

    from ..gpu.test_streaming import LAYERS, RESIDENT, budget_of

    cfg = llama_config()
    cfg.num_hidden_layers = LAYERS
    model = local_recipe(cfg, 9, torch.float16, device)
    s = conn.session("budget")
    streamed = RemoteModel.from_config(s, cfg, seed=9, dtype=torch.float16,
                                       weight_budget_gb=budget_of(model, lambda n: n) / GIB)
    resident = RemoteModel.from_config(s, cfg, seed=9, dtype=torch.float16)
    assert streamed.model_id != resident.model_id
    info = conn.stats()["models"][streamed.model_id]["streaming"]
    assert (info["streamed_layers"], info["resident_layers"]) == (LAYERS - RESIDENT, RESIDENT)
    with torch.no_grad():
        ref = model(PROMPT.to(device)).logits
        ref_gen = model.generate(PROMPT.to(device), max_new_tokens=10, do_sample=False)
    for rm in (streamed, resident):
        assert torch.equal(rm(PROMPT).logits.cpu(), ref.cpu())
        assert torch.equal(rm.generate(PROMPT, max_new_tokens=10, do_sample=False), ref_gen.cpu())
    s.close()
