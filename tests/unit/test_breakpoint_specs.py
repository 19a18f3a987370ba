"""Breakpoint specs: module paths, layer shortcuts and their errors (djinn/server/execution/breakpoints.py)."""
from __future__ import annotations

import pytest
import torch

from djinn import Breakpoint
from djinn.protocol.errors import InvalidRequest
from djinn.server.execution.breakpoints import BreakpointSpec, decoder_layers_path, parse_breakpoints

from ..models import tiny_gpt2, tiny_llama, tiny_t5


@pytest.fixture(scope="module")
def models():
    return {"llama": tiny_llama(), "gpt2": tiny_gpt2(), "t5": tiny_t5()}


def test_decoder_layer_stacks(models):
    assert decoder_layers_path(models["llama"]) == "model.layers"
    assert decoder_layers_path(models["gpt2"]) == "transformer.h"
    assert decoder_layers_path(torch.nn.Linear(2, 2)) is None
    # Note [Layer numbers]: the decoder's blocks, not the encoder's (as long: the config's
    # num_hidden_layers counts the encoder's).
    assert decoder_layers_path(models["t5"]) == "decoder.block"


def test_t5_layer_numbers_are_decoder_blocks(models):
    raw = [Breakpoint(layer=1).to_wire(), Breakpoint(layer=-2).to_wire()]
    assert parse_breakpoints(models["t5"], raw, "forward") == [BreakpointSpec("decoder.block.1"),
                                                               BreakpointSpec("decoder.block.0")]
    with pytest.raises(InvalidRequest) as e:
        parse_breakpoints(models["t5"], [{"layer": 2}], "forward")
    assert str(e.value) == (
        "layer=2 is out of range: T5ForConditionalGeneration has 2 layers at decoder.block (its ModuleLists: "
        "encoder.block (2), decoder.block (2)); "
        'to stop elsewhere name a module path, e.g. breakpoints=["decoder.block.1"]')


class _TwoStacks(torch.nn.Module):
    """No config: two outermost ModuleLists, so a layer number names neither."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(2))
        self.b = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(3))


def test_ambiguous_layer_numbers_list_the_candidates():
    with pytest.raises(InvalidRequest) as e:
        parse_breakpoints(_TwoStacks(), [{"layer": 0}], "forward")
    assert str(e.value) == ("_TwoStacks: layer numbers are ambiguous between a, b (its ModuleLists: a (2), b (3)); "
                            'name a module path instead, e.g. breakpoints=["b.2"]')
    assert decoder_layers_path(_TwoStacks()) is None


def test_parse_resolves_layers_and_keeps_order(models):
    raw = [Breakpoint(layer=1).to_wire(), Breakpoint("lm_head", "before", 3).to_wire(),
           Breakpoint(layer=-2, step=0).to_wire(), Breakpoint("").to_wire()]
    assert parse_breakpoints(models["gpt2"], raw, "generate") == [
        BreakpointSpec("transformer.h.1"), BreakpointSpec("lm_head", "before", 3),
        BreakpointSpec("transformer.h.0", "after", 0), BreakpointSpec(""),
    ]


@pytest.mark.parametrize("raw, method, msg", [
    ({"path": "model.layers.0"}, "forward", "must be a list"),
    ([{"path": "model.layers.9"}], "forward", "has no module 'model.layers.9'; its decoder layers are model.layers.0"),
    ([{"layer": 2}], "forward", "layer=2 is out of range: LlamaForCausalLM has 2 layers at model.layers"),
    ([{"layer": True}], "forward", "layer must be an int"),
    ([{"path": "model.layers.0", "layer": 0}], "forward", "exactly one of path and layer"),
    ([{"path": "model.layers.0", "where": "around"}], "forward", "where must be one of"),
    ([{"path": "model.layers.0", "step": -1}], "generate", "step must be an int >= 0"),
    ([{"path": "model.layers.0", "step": 1}], "forward", "a forward run has only step 0"),
    ([5], "forward", "a breakpoint is"),
    ([{"path": "x"}] * 257, "forward", "at most 256"),
])
def test_bad_breakpoints(models, raw, method, msg):
    with pytest.raises(InvalidRequest, match=msg):
        parse_breakpoints(models["llama"], raw, method)


def test_client_breakpoint_values():
    assert Breakpoint.of("model.layers.3") == Breakpoint(path="model.layers.3")
    assert Breakpoint.of(3) == Breakpoint(layer=3)
    assert Breakpoint.of(3).to_wire() == {"path": None, "layer": 3, "where": "after", "step": None}
    with pytest.raises(TypeError):
        Breakpoint.of(True)
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        Breakpoint(layer=1, step=-1)
