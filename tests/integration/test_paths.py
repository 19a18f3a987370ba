"""Tier 2: which path a model is on, and why, is visible; what the module path supports is asked of
the server; an HF model that lands on the graph path says what that costs, once, at the caller."""
from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

import djinn
from djinn.config import DEFAULT_ARCHITECTURES

from ..models import tiny_llama

IDS = torch.tensor([[1, 17, 42, 99, 5]])
COST = (r"djinn: {arch} is not an architecture this server builds, so it runs on the graph path: forward only, "
        r"no generate and no session KV cache")


class MyGPT2(GPT2LMHeadModel):
    """A user's subclass of an allowed architecture: the server builds classes by name, not this one."""


def my_gpt2() -> MyGPT2:
    torch.manual_seed(0)
    return MyGPT2(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=64)).eval()


@pytest.fixture
def connected(server, monkeypatch):
    monkeypatch.delenv("DJINN_SERVER", raising=False)
    djinn.connect(server.address)
    yield
    djinn.disconnect()


def _djinn_warnings(record) -> list:
    return [w for w in record if str(w.message).startswith("djinn:")]


def test_module_path_and_why(connected):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        rm = djinn.remote(tiny_llama(seed=2))
    assert rm.path == "module" and _djinn_warnings(record) == []
    assert "module path: the server builds LlamaForCausalLM itself" in repr(rm)


def test_a_plain_module_takes_the_graph_path_quietly(connected):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        rm = djinn.remote(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    assert rm.path == "graph" and _djinn_warnings(record) == []
    assert "graph path: Sequential is not a Hugging Face model" in repr(rm)
    forced = djinn.remote(tiny_llama(seed=2), path="graph")
    assert "graph path: path='graph' was asked for" in repr(forced)


def test_an_hf_model_the_server_does_not_build_warns_with_the_cost(connected):
    model = my_gpt2()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        rm = djinn.remote(model)
    [w] = _djinn_warnings(record)
    assert w.filename == __file__  # it points at the user's djinn.remote line
    assert "\n" not in str(w.message) and "djinn.supported_architectures()" in str(w.message)
    assert re.match(COST.format(arch="MyGPT2"), str(w.message))
    assert rm.path == "graph" and "graph path: the server does not build MyGPT2" in repr(rm)
    with torch.no_grad():
        assert torch.equal(rm(IDS).logits.cpu(), model(IDS).logits)
    with pytest.raises(djinn.ModelNotSupported, match="generate runs on the module path"):
        rm.generate(IDS, max_new_tokens=2)


def test_supported_architectures_are_the_servers(connected, start_server, tmp_path):
    assert djinn.supported_architectures() == sorted(DEFAULT_ARCHITECTURES)
    cfg = tmp_path / "server.yaml"
    cfg.write_text("architectures: [GPT2LMHeadModel]\n")
    srv = start_server("--config", str(cfg))
    djinn.connect(srv.address)
    assert djinn.supported_architectures() == ["GPT2LMHeadModel"]
    with pytest.warns(UserWarning, match=COST.format(arch="LlamaForCausalLM")):
        rm = djinn.remote(tiny_llama(seed=2))
    assert rm.path == "graph"
