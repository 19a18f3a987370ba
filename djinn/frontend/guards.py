"""Guards on a cached capture (Note [Capture guards]): what must still hold for a graph to be reused.

Note [Capture guards]
    A capture runs the module's Python once, so every Python value it consumed is baked into the
    graph: `if self.use_bias:`, `x * self.scale`, `self.config.output_attentions`. The input signature
    (Note [Input signature]) covers the arguments; these guards cover the module itself, as dynamo's
    guards do, so a changed value recaptures instead of reusing a stale graph:
    - attributes: every plain Python value (bool, int, float, str, None, and tuples/lists of them) in
      the `__dict__` of every submodule (the `training` flags included) and of the transformers
      config they hold as `config`. This is all of them, not only those the forward read: a superset is never
      stale, and tracking reads would mean patching attribute access on user classes.
    - weights: each parameter and buffer object and its version counter (`t._version`, bumped by every
      in-place op). A change re-hashes and re-uploads what changed (content-addressed: only the changed
      tensors move) and registers the new weight set; graphs name weights by hash, so they recapture.
      Writes through `t.data` bypass the version counter, so they are not seen; the old weight set
      stays attached to the session until it closes.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .remote import is_config

_SCALARS = (bool, int, float, str, type(None))


def _plain(v: Any) -> bool:
    if isinstance(v, _SCALARS):
        return True
    return isinstance(v, (tuple, list)) and len(v) <= 64 and all(isinstance(x, _SCALARS) for x in v)


def _values(obj: Any) -> tuple:
    return tuple((k, type(v).__name__, tuple(v) if isinstance(v, list) else v)
                 for k, v in vars(obj).items() if _plain(v))


def attribute_guard(modules: list[nn.Module]) -> tuple:
    """The plain Python values the module tree holds (Note [Capture guards]), as a hashable key."""
    out, configs = [], {}
    for m in modules:
        out.append((type(m), _values(m)))  # the type too: a swapped submodule without weights
        cfg = vars(m).get("config")         # where transformers keeps it (one config, many modules)
        if cfg is not None and id(cfg) not in configs and is_config(cfg):
            configs[id(cfg)] = _values(cfg)
    return tuple(out), tuple(configs.values())


def weight_versions(named: list[tuple[str, torch.Tensor]]) -> tuple:
    """Which tensor objects hold the weights, and their version counters (Note [Capture guards])."""
    return tuple((name, id(t), t._version) for name, t in named)
