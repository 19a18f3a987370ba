"""Breakpoints on the graph path: a captured forward as a module that Runs can pause (DESIGN.md section 7).

A Run (server/execution/breakpoints.py) pauses through forward hooks on the target modules of a real module tree.
The graph path has no module tree on the server, only a compiled graph, so `GraphModule` builds a
skeleton: an empty nn.Module at every path the capture recorded a call for (Note [Module calls] in
srg/graph.py), under a root whose forward runs the graph. The interpreter fires the skeleton modules'
hooks at the call boundaries: forward pre-hooks before the first op of a call, with the tensors it was
called with; forward hooks after its last op, with the tensors it returned. So breakpoints, edits
(in place, on the very tensors later nodes read), resume, fork and the paused-run bookkeeping are the
module path's, unchanged.
"""
from __future__ import annotations

from bisect import bisect_left

import torch
from torch import nn

from ...protocol.errors import InvalidRequest
from ...vmu.readonly import ReadOnlyMemory
from .interpreter import Compiled, Interpreter

MAX_PATHS = 1 << 14  # skeleton modules a graph run may ask for (each is a small Python object)
MAX_DEPTH = 64       # dots in a module path (the skeleton is built recursively)


class GraphModule(nn.Module):
    """The root of the skeleton; calling it runs the graph (outputs as a tuple, in graph order)."""

    def __init__(self, compiled: Compiled, weights: list[torch.Tensor], readonly: ReadOnlyMemory | None = None):
        super().__init__()
        self._compiled, self._weights, self._readonly = compiled, weights, readonly
        paths = {call.path for call in compiled.graph.calls}
        if len(paths) > MAX_PATHS or any(p.count(".") >= MAX_DEPTH for p in paths):
            raise InvalidRequest(f"a graph run takes at most {MAX_PATHS} module paths, each at most {MAX_DEPTH} deep")
        tree: dict = {}
        for path in paths:
            node = tree
            for name in path.split("."):
                node = node.setdefault(name, {})
        for name, sub in tree.items():
            self.add_module(name, _skeleton(sub))

    def forward(self, *inputs: torch.Tensor) -> tuple:
        return tuple(_HookedInterpreter(self).run(list(inputs), self._weights))


def _skeleton(tree: dict) -> nn.Module:
    """Empty modules for a path tree; children named 0..n-1 make a ModuleList, as in the module. (The
    client sends layer numbers as paths: the skeleton has no config, Note [Layer numbers] in
    srg/layers.py; one from a raw client resolves here only to a single outermost stack.)"""
    children = {name: _skeleton(sub) for name, sub in tree.items()}
    if children and sorted(children) == sorted(str(k) for k in range(len(children))):
        return nn.ModuleList(children[str(k)] for k in range(len(children)))
    m = nn.Module()
    for name, child in children.items():
        m.add_module(name, child)
    return m


class _HookedInterpreter(Interpreter):
    def __init__(self, gm: GraphModule):
        super().__init__(gm._compiled, gm._readonly)
        self.gm = gm
        graph = self.c.graph
        ops = self.c.ops
        # A call's before fires ahead of the first op at or after its start, its after ahead of the first
        # op at or after its end (or at the end); at one op, in the order the capture's hooks fired.
        hooked = [c for c in graph.calls if _has_hooks(gm.get_submodule(c.path))]
        end = len(graph.nodes)

        def at(b: int) -> int:
            k = bisect_left(ops, b)
            return ops[k] if k < len(ops) else end

        events = sorted([(c.opened, at(c.start), "before", c) for c in hooked] +
                        [(c.closed, at(c.end), "after", c) for c in hooked], key=lambda e: e[0])
        self.events: dict[int, list] = {}
        for _, i, kind, c in events:
            self.events.setdefault(i, []).append((kind, c))
        self.keep = {r.node for c in hooked for r in (*c.ins, *c.outs)}

    def frees(self) -> list:
        if not self.keep:
            return self.c.frees
        return [[j for j in f if j not in self.keep] for f in self.c.frees]

    def before_node(self, i: int, env: list) -> None:
        for kind, call in self.events.get(i, ()):
            module = self.gm.get_submodule(call.path)
            args = tuple(env[r.node][r.k] for r in call.ins)
            if kind == "before":
                for hid, hook in list(module._forward_pre_hooks.items()):
                    if hid in module._forward_pre_hooks_with_kwargs:
                        hook(module, args, {})
                    else:
                        hook(module, args)
            else:
                outs = tuple(env[r.node][r.k] for r in call.outs)
                output = outs[0] if len(outs) == 1 else outs
                for hid, hook in list(module._forward_hooks.items()):
                    if hid in module._forward_hooks_with_kwargs:
                        hook(module, args, {}, output)
                    else:
                        hook(module, args, output)


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_pre_hooks or m._forward_hooks)
