"""A module's parameters and buffers by name: listing them, and pointing a meta-built module's at device
tensors. Shared by the model registry (building a model over the Text segment) and weight streaming
(binding resident tensors and ring views)."""
from __future__ import annotations

import torch
from torch import nn

from ...protocol.errors import InvalidRequest


def named_tensors(module: nn.Module):
    """Every parameter and buffer by name, tied ones under each of their names."""
    for name, p in module.named_parameters(remove_duplicate=False):
        yield name, p
    for name, b in module.named_buffers(remove_duplicate=False):
        yield name, b


def unique_tensors(module: nn.Module):
    """Each distinct storage once; a tensor-parallel module's sharded weights as this worker's shard."""
    from torch.distributed.tensor import DTensor

    seen = {}
    for _, t in named_tensors(module):
        if isinstance(t, DTensor):
            t = t.to_local()
        if t.device.type != "meta":
            seen.setdefault(t.untyped_storage().data_ptr() or id(t), t)
    return seen.values()


def bind_tensors(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Point every parameter and buffer of a meta-built module at the given device tensors."""
    expected = {name for name, _ in named_tensors(module)}
    missing = sorted(expected - set(tensors))
    extra = sorted(set(tensors) - expected)
    if missing or extra:
        raise InvalidRequest(f"tensor names do not match the architecture: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, t in tensors.items():
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if attr in owner._parameters:
            old = owner._parameters[attr]
            if tuple(old.shape) != tuple(t.shape):
                raise InvalidRequest(f"{name}: architecture wants shape {list(old.shape)}, got {list(t.shape)}")
            owner._parameters[attr] = nn.Parameter(t, requires_grad=False)
        elif attr in owner._buffers:
            owner._buffers[attr] = t
        else:
            raise InvalidRequest(f"{name} is neither a parameter nor a buffer")
