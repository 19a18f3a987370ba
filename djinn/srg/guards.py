"""Value guards: Python values a capture read from small integer inputs (Note [Input values]).

Note [Input values]
    Hugging Face models branch on the attention mask's value: `_ignore_causal_mask_sdpa` asks whether
    the padding mask is all ones (`padding_mask.all()` -> Python bool) and drops the causal mask if so.
    A capture over meta tensors cannot answer that, so every mask was refused. Small integer and bool
    inputs (masks, ids, positions: at most _KNOWN_MAX_ELEMENTS elements, local tensors) are therefore
    known values too (Note [Known values] in capture.py): the recorder computes what depends only on
    them and on constants for real, and a Python value read from such a result (`.item()`, `bool()`)
    is recorded as a guard, as dynamo does: the node it was read from and the value. The graph
    is reused only while every guard holds: before a call reuses a capture, the nodes that were
    computed for real (in graph order, up to the last guard) are run again on the CPU with this call's
    inputs and the values compared; a guard that fails (a padded mask after an all-ones one) means
    another capture, kept beside the first. Float inputs are not made known: branching on them would
    recapture on nearly every call. A read from a value that depends on a weight or a float input is
    still a CaptureError.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import ops as srg_ops
from .graph import CONST, IN, Graph, Ref

_CPU = torch.device("cpu")


@dataclass(frozen=True)
class ValueGuard:
    ref: Ref          # the tensor a Python value was read from
    value: Any        # what `.item()` gave at capture (bool, int or float), or `.tolist()` for a tensor read whole


@dataclass(frozen=True)
class Guards:
    checks: tuple[ValueGuard, ...] = ()
    nodes: tuple[int, ...] = ()   # the nodes computed for real at capture, up to the last check

    def hold(self, graph: Graph, inputs: list) -> bool:
        """Whether this call's `inputs` (one value per graph input) give the same values."""
        if not self.checks:
            return True
        position = {node: k for k, node in enumerate(graph.inputs)}
        env: dict[int, list] = {}
        try:
            for i in self.nodes:
                node = graph.nodes[i]
                if node.op == IN:
                    env[i] = [inputs[position[i]].detach().to(_CPU, copy=True)]  # copied: ops may write
                elif node.op == CONST:
                    env[i] = [node.args[0].clone()]
                else:
                    out = srg_ops.ALLOWED[node.op](*_sub(node.args, env), **_sub(node.kwargs, env))
                    env[i] = list(out) if isinstance(out, (list, tuple)) else [out]
            return all(type(v := _value(env[g.ref.node][g.ref.k], g.value)) is type(g.value) and v == g.value
                       for g in self.checks)
        except Exception:  # cannot be evaluated now: capture again, which reports the real problem
            return False


def _value(t: torch.Tensor, like: Any) -> Any:
    """What a guard compares: `.item()`, or every value (`.tolist()`) for a tensor read whole."""
    return t.tolist() if isinstance(like, list) else t.item()


def _sub(v: Any, env: dict[int, list]) -> Any:
    if isinstance(v, Ref):
        return env[v.node][v.k]
    if isinstance(v, torch.device):
        return _CPU
    if isinstance(v, (list, tuple)):
        return type(v)(_sub(x, env) for x in v)
    if isinstance(v, dict):
        return {k: _sub(x, env) for k, x in v.items()}
    return v
