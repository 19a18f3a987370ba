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
from djinn.srg.render import _size

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
    with pytest.raises(djinn.ModelNotSupported, match="generate needs a model the server builds itself"):
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


def test_explain_on_the_module_path_says_what_will_run(connected):
    """djinn.explain(rm, x) and rm.explain(x) work on both paths (they raised AttributeError on the
    module path): a title line, then groups, as the graph path's SRG text is laid out."""
    rm = djinn.remote(tiny_llama(seed=2))
    with djinn.session("explained") as s:
        s.generate(rm, IDS, max_new_tokens=3)
        text = rm.explain(IDS, session=s)
    lines = text.splitlines()
    assert lines[0] == (f"Module LlamaForCausalLM {rm.model_id[:12]}: path=module, 1 call, 1 inputs, "
                        f"weights ({_size(rm.nbytes)}), KV 8 tokens kept")
    groups = [line for line in lines if not line.startswith("  ")][1:]
    assert groups[:3] == ["call:", "weights:", "kv:"] and groups[3].startswith("outputs: ")
    assert lines[2].startswith("  LlamaForCausalLM.forward(i64[1, 5], use_cache=False)  [the module the server built")
    assert lines[3] == "  2 decoder layers: breakpoints by layer=0..1 or module path"
    assert f"{_size(rm.nbytes)} resident in the text segment on cpu" in lines[5]
    assert "this session (explained): 8 tokens held" in text
    # The function form, the default session (no KV for this model there), a remote input and a kwarg.
    out = rm(IDS)
    text = djinn.explain(rm, out.logits.argmax(-1), use_cache=True)
    assert text.splitlines()[0].endswith("1 inputs, weights (" + _size(rm.nbytes) + "), KV none kept")
    assert "forward(remote i64[1, 5], use_cache=True)" in text
    assert "comes back as None" in text
    # The graph path keeps its SRG text.
    g = djinn.remote(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    assert djinn.explain(g, torch.randn(2, 4)).startswith("SRG Sequential ")
