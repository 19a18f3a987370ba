"""Steered generates: a vector added to a decoder layer's output at every position a generate feeds.

Note [Steering]
    `generate(..., steer={layer: vector})` adds `vector` to the hidden states decoder layer `layer`
    outputs at every position the call feeds (its new prompt tokens and every generated token): what a
    local forward hook returning `output + vector` (`(output[0] + vector, *output[1:])` for a layer that
    returns a tuple) does during a local `generate`. One hook per decoder layer is registered once per
    module (`install`); it adds nothing unless the forward running on its thread set a vector for its
    layer (`active`), so every other use of the module (forwards, breakpoint runs, unsteered
    generates) runs unchanged. Who sets what:
      - the eager path (executor.generate) sets the call's own vectors, [hidden], for the call;
      - the batched decode step (fastpath.DecodePool) keeps one buffer [slots, 1, hidden] per layer any
        row steers, each row's vector in its slot and zeros elsewhere, and sets {layer: buffer[:B]}. Its
        CUDA graphs are keyed by the set of steered layers: Python (and so the hook) runs only at
        capture, so the graphs of a batch without steered rows hold no add, and a batch with one replays
        the graph that has the adds, unsteered rows adding zeros (x + 0 is x), still in one batch;
      - the batched prefill (prefill_step) sets each chunk's row vector, [R, 1, hidden].
    A session's earlier tokens keep the KV they were computed with: the vector applies to what this
    call feeds, as the local hook would over a continued cache.
"""
from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from ...protocol.errors import InvalidRequest
from ...srg.layers import decoder_stack, layer_path

_local = threading.local()  # .vectors: {layer: tensor} of the forward running on this thread
_installed: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def hidden_size(module: nn.Module) -> int:
    return int(module.get_input_embeddings().embedding_dim)


def parse(module: nn.Module, wire: Any) -> dict[int, torch.Tensor]:
    """The wire's [[layer, vector], ...] -> {layer index: vector [hidden]} on the module's device and in
    its dtype; every layer resolved as breakpoints resolve them (negative counts from the end). The
    module's hooks are installed before any forward of the call needs them."""
    if wire is None:
        return {}
    _, n = decoder_stack(module)
    if not isinstance(wire, list) or len(wire) > n:
        raise InvalidRequest(f"steer must map at most {n} layer numbers to vectors, e.g. steer={{1: v}}")
    hidden = hidden_size(module)
    p = next(module.parameters())
    out: dict[int, torch.Tensor] = {}
    for item in wire:
        if not isinstance(item, list) or len(item) != 2:
            raise InvalidRequest("steer must map layer numbers to vectors, e.g. steer={1: v}")
        layer, v = item
        idx = int(layer_path(module, layer).rsplit(".", 1)[1])  # Note [Layer numbers]: range-checked
        if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.numel() != hidden:
            got = f"a {v.dtype} tensor of shape {tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
            raise InvalidRequest(f"steer[{layer}] must be a float tensor of {hidden} values (the hidden size), "
                                 f"got {got}")
        if not torch.isfinite(v).all():
            raise InvalidRequest(f"steer[{layer}] holds NaN or infinite values")
        if idx in out:
            raise InvalidRequest(f"steer names layer {idx} twice")
        out[idx] = v.reshape(hidden).to(device=p.device, dtype=p.dtype)
    if out:
        install(module)
    return out


def install(module: nn.Module) -> None:
    """Register the steering hook on every decoder layer of `module`, once."""
    if module in _installed:
        return
    path, n = decoder_stack(module)
    for i in range(n):
        module.get_submodule(f"{path}.{i}").register_forward_hook(_hook(i))
    _installed.add(module)


def _hook(index: int):
    def hook(mod, args, output):
        vectors = getattr(_local, "vectors", None)
        if not vectors or index not in vectors:
            return None
        v = vectors[index]
        if isinstance(output, tuple):
            return (output[0] + v, *output[1:])
        return output + v
    return hook


@contextmanager
def active(vectors: dict[int, torch.Tensor] | None) -> Iterator[None]:
    """Forwards on this thread add `vectors[layer]` to decoder layer `layer`'s output."""
    outer = getattr(_local, "vectors", None)
    _local.vectors = vectors or None
    try:
        yield
    finally:
        _local.vectors = outer
