"""Hand-written SRGs for tests: what a hostile client can send without going through capture.

`Builder` appends nodes in order, computing each op's declared outputs by running it on small CPU
stand-ins of its inputs (meta tensors would do, but their Python decompositions are ten times slower),
and emits the wire form (Note [SRG wire form]). Nothing here checks that a graph is safe: that is the
server's job.
"""
from __future__ import annotations

from typing import Any

import torch

from djinn.srg import ops as srg_ops
from djinn.srg.graph import CONST, IN, WEIGHT, Graph, Lifecycle, ModuleCall, Node, Ref, TensorMeta, signature

class Builder:
    def __init__(self) -> None:
        self.g = Graph()
        self.metas: list[tuple[torch.Tensor, ...]] = []
        self._hooks = 0

    def _add(self, op: str, args: tuple, kwargs: dict, outs: tuple[torch.Tensor, ...]) -> list[Ref]:
        i = len(self.g.nodes)
        self.g.nodes.append(Node(op, args, kwargs, [TensorMeta.of(t) for t in outs], "", Lifecycle.STACK))
        self.metas.append(outs)
        return [Ref(i, k) for k in range(len(outs))]

    def input(self, like: torch.Tensor) -> Ref:
        return self._add(IN, (), {}, (_stand_in(like),))[0]

    def weight(self, h: str, like: torch.Tensor, name: str = "") -> Ref:
        return self._add(WEIGHT, (h,), {"name": name}, (_stand_in(like),))[0]

    def const(self, t: torch.Tensor) -> Ref:
        return self._add(CONST, (t,), {}, (t.clone(),))[0]

    def op(self, name: str, *args: Any, **kwargs: Any) -> list[Ref]:
        """Append `name(*args, **kwargs)`; returns a Ref per output."""
        fn = srg_ops.ALLOWED[name]
        out = fn(*self._resolve(args), **self._resolve(kwargs))
        outs = tuple(out) if isinstance(out, (list, tuple)) else (out,)
        return self._add(name, tuple(args), dict(kwargs), outs)

    def meta(self, r: Ref) -> torch.Tensor:
        return self.metas[r.node][r.k]

    def call(self, path: str, start: int, end: int, ins: list[Ref], outs: list[Ref]) -> None:
        """Note [Module calls]: a module call at `path` over nodes start..end-1."""
        self.g.calls.append(ModuleCall(path, start, end, tuple(ins), tuple(outs), self._hooks, self._hooks + 1))
        self._hooks += 2

    def wire(self, *outputs: Ref) -> tuple[str, dict]:
        """(signature, wire form) with these outputs."""
        self.g.outputs = list(outputs)
        w = self.g.to_wire()
        return signature(w), w

    def _resolve(self, v: Any) -> Any:
        if isinstance(v, Ref):
            return self.metas[v.node][v.k]
        if isinstance(v, (list, tuple)):
            return type(v)(self._resolve(x) for x in v)
        if isinstance(v, dict):
            return {k: self._resolve(x) for k, x in v.items()}
        return v


def _stand_in(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor of t's dtype, shape and strides (its own memory: ops on it touch nothing of t's)."""
    return torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype).copy_(t.detach().cpu())


# -- random graphs over weights (tests/unit/test_weight_writes.py, tests/integration/test_weight_integrity.py,
# OSDI_Evaluation/reliability/weight_integrity.py) --------------------------------------------------------
def _views(b: Builder, r: Ref, rng) -> list:
    """Candidate view ops of r, each a function returning (op name, args, kwargs)."""
    t = b.meta(r)
    n, d = t.numel(), t.dim()
    c = [lambda: ("aten._unsafe_view.default", (r, [n]), {}), lambda: ("aten.view.default", (r, [-1]), {}),
         lambda: ("aten.alias.default", (r,), {}), lambda: ("aten.detach.default", (r,), {}),
         lambda: ("aten.lift_fresh.default", (r,), {}), lambda: ("aten.unsqueeze.default", (r, 0), {})]
    if d >= 1 and t.shape[0] > 0:
        k = int(rng.integers(t.shape[0]))
        c += [lambda: ("aten.select.int", (r, 0, k), {}), lambda: ("aten.slice.Tensor", (r, 0, k, t.shape[0]), {}),
              lambda: ("aten.slice.Tensor", (r, 0, 0, t.shape[0], 2), {}),
              lambda: ("aten.split.Tensor", (r, max(1, k)), {}), lambda: ("aten.unsafe_split.Tensor", (r, 2), {}),
              lambda: ("aten.unbind.int", (r, 0), {})]
    if d >= 2:
        c += [lambda: ("aten.t.default", (r,), {}) if d == 2 else ("aten.transpose.int", (r, 0, 1), {}),
              lambda: ("aten.permute.default", (r, list(reversed(range(d)))), {}),
              lambda: ("aten.diagonal.default", (r,), {})]
    if n >= 3:
        c.append(lambda: ("aten.as_strided.default", (r, [2], [1], int(rng.integers(n - 2))), {}))
    return c


def _writes(b: Builder, r: Ref, rng, pool: list[Ref]) -> list:
    """Candidate in-place ops on r and calls that mutate r as another argument (batch norm's running
    mean, positionally or by keyword), each a function returning (op name, args, kwargs)."""
    t = b.meta(r)
    c = [lambda: ("aten.add_.Scalar", (r, 1.0), {}), lambda: ("aten.mul_.Tensor", (r, 2.0), {}),
         lambda: ("aten.zero_.default", (r,), {}), lambda: ("aten.fill_.Scalar", (r, 3.0), {}),
         lambda: ("aten.clamp_.default", (r, -0.5, 0.5), {}), lambda: ("aten.relu_.default", (r,), {}),
         lambda: ("aten.uniform_.default", (r,), {})]
    same = [p for p in pool if tuple(b.meta(p).shape) == tuple(t.shape) and b.meta(p).dtype == t.dtype]
    if same:
        c.append(lambda: ("aten.copy_.default", (r, same[int(rng.integers(len(same)))]), {}))
    if t.dim() >= 1 and t.shape[0] > 0:
        c.append(lambda: ("aten.index_put_.default", (r, [b.const(torch.tensor([int(rng.integers(t.shape[0]))]))],
                                                      b.const(torch.zeros(()))), {}))
        c.append(lambda: ("aten.masked_fill_.Scalar", (r, b.const(torch.ones(t.shape, dtype=torch.bool)), 0.0), {}))
    if t.dim() == 2:
        c.append(lambda: ("aten.tril_.default", (r,), {}))
    if t.dim() == 1 and t.shape[0] > 0:
        def bn(native: bool):
            ch = t.shape[0]
            x, var = b.const(torch.randn(3, ch)), b.const(torch.ones(ch))
            training = bool(rng.integers(4))  # mostly training: the mode that writes the running stats
            if native:
                return "aten.native_batch_norm.default", (x, None, None, r, var, training, 0.5, 1e-5), {}
            return "aten.batch_norm.default", (x, None, None), {"running_mean": r, "running_var": var,
                                                                 "training": training, "momentum": 0.5,
                                                                 "eps": 1e-5, "cudnn_enabled": False}
        c += [lambda: bn(True), lambda: bn(False)]
    return c


def _compute(b: Builder, r: Ref, rng) -> list:
    return [lambda: ("aten.mul.Tensor", (r, 2.0), {}), lambda: ("aten.clone.default", (r,), {}),
            lambda: ("aten.relu.default", (r,), {})]


def random_graph(rng, weights: dict[str, tuple[str, torch.Tensor]], n_ops: int = 8, *, calls: bool = False
                 ) -> tuple[Builder, list[Ref], str | None]:
    """A small graph over `weights` (name -> (hash, tensor)): views (with and without alias annotations,
    list-returning ones), functional ops, in-place and mutating ops on any tensor in reach (weights
    included), and outputs picked from everything (weights and their views included). With `calls`, one
    module call "leak" whose output is a random tensor (a weight, often) for a breakpoint to expose.
    Returns (builder, outputs, the call's path or None). `rng` is a numpy Generator."""
    b = Builder()
    pool: list[Ref] = []
    names = sorted(weights)
    for name in rng.permutation(names)[:int(rng.integers(1, len(names) + 1))]:
        h, t = weights[name]
        pool.append(b.weight(h, t, str(name)))
    pool.append(b.const(torch.randn(4, 6)))
    for _ in range(n_ops):
        r = pool[int(rng.integers(len(pool)))]
        kind = rng.random()
        cands = _views(b, r, rng) if kind < 0.45 else _writes(b, r, rng, pool) if kind < 0.85 else _compute(b, r, rng)
        name, args, kwargs = cands[int(rng.integers(len(cands)))]()
        try:
            outs = b.op(name, *args, **kwargs)
        except Exception:  # a shape or dtype the op does not take (a constant made for it stays unused)
            continue
        pool.extend(outs if name.split(".")[1] in ("split", "unsafe_split", "unbind") else outs[:1])
    outputs = [pool[int(i)] for i in rng.integers(len(pool), size=int(rng.integers(1, 4)))]
    path = None
    if calls:
        leak = pool[int(rng.integers(len(pool)))]
        path = "leak"
        b.call(path, leak.node + 1, leak.node + 1, [], [leak])
    return b, outputs, path
