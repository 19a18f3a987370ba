"""Tier 1: Note [Capture guards]: what a cached capture is keyed on besides its inputs."""
from __future__ import annotations

import torch
from torch import nn

from djinn.frontend.guards import attribute_guard, weight_versions
from djinn.frontend.upload import named_tensors

from ..models import tiny_llama


def test_attribute_guard_sees_module_attributes_and_the_hf_config():
    m = tiny_llama(seed=0)
    before = attribute_guard(list(m.modules()))
    assert attribute_guard(list(m.modules())) == before
    m.config.output_hidden_states = not m.config.output_hidden_states
    changed_cfg = attribute_guard(list(m.modules()))
    assert changed_cfg != before
    m.model.layers[0].self_attn.scaling = 0.5
    assert attribute_guard(list(m.modules())) != changed_cfg
    m.eval() if m.training else m.train()
    assert attribute_guard(list(m.modules())) != changed_cfg


def test_weight_versions_see_in_place_writes_and_replacements():
    m = nn.Linear(2, 2)
    v0 = weight_versions(named_tensors(m))
    with torch.no_grad():
        m.weight.add_(1)
    v1 = weight_versions(named_tensors(m))
    assert v1 != v0
    m.bias = nn.Parameter(torch.zeros(2))
    assert weight_versions(named_tensors(m)) != v1
