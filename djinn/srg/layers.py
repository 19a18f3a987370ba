"""Layer numbers: which module `breakpoints=[k]` (or `Breakpoint(layer=k)`) names.

Note [Layer numbers]
    Layer k is the k-th decoder layer of the model, on both paths: the server resolves it on the module
    it built, the client on the module it captured (the graph path's skeleton has no config). The
    stack is a ModuleList of identical blocks whose length is the config's layer count (the
    decoder's for an encoder-decoder model), not nested in another such list (a block's sublayers,
    T5's `decoder.block.0.layer`, are not layers) and, when several remain, inside the model's
    decoder (`get_decoder()`). Without a config every outermost list is a candidate. Anything but
    exactly one stack, or a k outside it, is an InvalidRequest that lists the ModuleLists there are,
    so the user can name a module path instead: a wrong guess would pause (and edit) another tensor
    silently.
"""
from __future__ import annotations

import re
from typing import Any

from torch import nn

from ..protocol.errors import InvalidRequest

# Config fields holding the layer count, the decoder's first (an encoder-decoder's num_hidden_layers is
# often the encoder's: T5, BART).
_DECODER_FIELDS = ("num_decoder_layers", "decoder_layers")
_FIELDS = ("num_hidden_layers", "num_layers", "n_layer")


def config_layers(config: Any) -> int | None:
    """The decoder layer count a config (a transformers config or its dict) gives, or None."""
    if config is None:
        return None
    get = config.get if isinstance(config, dict) else (lambda k: getattr(config, k, None))
    fields = (_DECODER_FIELDS if get("is_encoder_decoder") else ()) + _FIELDS
    for name in fields:
        n = get(name)
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    return None


def layer_stacks(module: nn.Module) -> list[tuple[str, int]]:
    """(path, length) of every ModuleList of identical blocks, in module order."""
    return [(name, len(m)) for name, m in module.named_modules()
            if name and isinstance(m, nn.ModuleList) and len(m) and len({type(c) for c in m}) == 1]


def decoder_stack(module: nn.Module) -> tuple[str, int]:
    """(path, length) of the model's decoder layer stack (Note [Layer numbers]); InvalidRequest if
    there is not exactly one."""
    stacks = layer_stacks(module)
    want = config_layers(getattr(module, "config", None))
    picks = _outermost([s for s in stacks if want is None or s[1] == want])
    if len(picks) > 1:
        picks = _in_decoder(module, picks) or picks
    if len(picks) == 1:
        return picks[0]
    name = type(module).__name__
    if not stacks:
        raise InvalidRequest(f"{name} has no decoder layer stack (a ModuleList of identical blocks) for layer "
                             "numbers; give a module path instead")
    if picks:
        why = f"layer numbers are ambiguous between {', '.join(p for p, _ in picks)}"
    else:
        why = f"none of its ModuleLists of identical blocks has the config's {want} layers"
    raise InvalidRequest(f"{name}: {why} (its ModuleLists: {_listing(stacks)}); name a module path instead, "
                         f"e.g. breakpoints=[\"{_example(picks or stacks)}\"]")


def layer_path(module: nn.Module, layer: Any) -> str:
    """The module path of decoder layer `layer` (negative counts from the end)."""
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise InvalidRequest(f"layer must be an int, got {layer!r}")
    path, n = decoder_stack(module)
    if not -n <= layer < n:
        raise InvalidRequest(f"layer={layer} is out of range: {type(module).__name__} has {n} layers at {path} "
                             f"(its ModuleLists: {_listing(layer_stacks(module))}); to stop elsewhere name a "
                             f"module path, e.g. breakpoints=[\"{path}.{n - 1}\"]")
    return f"{path}.{layer % n}"


def _outermost(stacks: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Stacks not inside another one's blocks."""
    paths = [p for p, _ in stacks]
    return [(p, n) for p, n in stacks if not any(p.startswith(q + ".") for q in paths)]


def _in_decoder(module: nn.Module, stacks: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """The stacks inside the model's decoder (an encoder-decoder model's `get_decoder()`)."""
    if not getattr(getattr(module, "config", None), "is_encoder_decoder", False):
        return []
    try:
        decoder = module.get_decoder()
    except (AttributeError, NotImplementedError):
        return []
    where = next((name for name, m in module.named_modules() if m is decoder), None)
    if not where:
        return []
    return [(p, n) for p, n in stacks if p.startswith(where + ".")]


def _listing(stacks: list[tuple[str, int]]) -> str:
    """'encoder.block (2), encoder.block.*.layer (2), ...': one entry per path pattern and length, so a
    block's sublayer lists do not repeat once per block."""
    seen: dict[str, None] = {}
    for path, n in stacks:
        seen.setdefault(f"{re.sub(r'(?<=[.])[0-9]+(?=[.])', '*', path)} ({n})")
    return ", ".join(seen)


def _example(stacks: list[tuple[str, int]]) -> str:
    path, n = stacks[-1]
    return f"{path}.{n - 1}"
