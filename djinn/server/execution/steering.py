"""Steered and recorded generates: a vector added to a decoder layer's output, and that output read,
at every position a generate feeds.

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

Note [Recorded activations]
    `generate(..., record=[layer, ...])` returns, beside the sequences, each named decoder layer's output
    (after its steering vector, if any) at every position the call fed: its new prompt tokens and every
    generated token but the last (which no forward reads), `[positions, hidden]` per layer, kept on the
    server as session tensors. The same hooks call the recorder the running forward set for their
    layer: the eager path appends each forward's `[n, hidden]`; the batched prefill appends each chunk's
    real (unpadded) positions; the batched decode step copies every row's `[hidden]` into a
    `[slots, hidden]` buffer per recorded layer inside its graph (keyed by the recorded layers too),
    and after the step each recording row appends its slot's copy. So reading activations costs one
    small copy per layer per step and the row stays in the batch, where a breakpoint would pause it.
"""
from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ...protocol.errors import InvalidRequest
from ...srg.layers import decoder_stack, layer_path

_local = threading.local()  # .vectors: {layer: tensor} of the forward running on this thread
_installed: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def hidden_size(module: nn.Module) -> int:
    """The width of a decoder layer's output (not the embedding's: OPT may project between them)."""
    size = getattr(module.config, "hidden_size", None)
    return int(size) if isinstance(size, int) else int(module.get_input_embeddings().embedding_dim)


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


def parse_record(module: nn.Module, wire: Any) -> list[int]:
    """The wire's [layer, ...] -> decoder layer indices in the order asked (Note [Recorded activations])."""
    if wire is None:
        return []
    _, n = decoder_stack(module)
    if not isinstance(wire, list) or not wire or len(wire) > n:
        raise InvalidRequest(f"record must be a list of 1 to {n} layer numbers, e.g. record=[1]")
    out = [int(layer_path(module, layer).rsplit(".", 1)[1]) for layer in wire]  # Note [Layer numbers]
    if len(set(out)) != len(out):
        raise InvalidRequest(f"record names a layer twice: {wire}")
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
        recorders = getattr(_local, "recorders", None)
        changed = bool(vectors) and index in vectors
        if changed:
            v = vectors[index]
            output = (output[0] + v, *output[1:]) if isinstance(output, tuple) else output + v
        if recorders and index in recorders:
            recorders[index](output[0] if isinstance(output, tuple) else output)
        return output if changed else None
    return hook


@contextmanager
def active(vectors: dict[int, torch.Tensor] | None,
           recorders: dict[int, Callable[[torch.Tensor], None]] | None = None) -> Iterator[None]:
    """Forwards on this thread add `vectors[layer]` to decoder layer `layer`'s output, then hand that
    output ([batch, n, hidden]) to `recorders[layer]`."""
    outer = getattr(_local, "vectors", None), getattr(_local, "recorders", None)
    _local.vectors, _local.recorders = vectors or None, recorders or None
    try:
        yield
    finally:
        _local.vectors, _local.recorders = outer
