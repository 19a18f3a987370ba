"""Graph inputs keep their strides, storage offsets and aliasing (Note [Input layout]).

Note [Input layout]
    The codec sends a tensor's values in C order (Note [Any layout travels] in protocol/tensors.py),
    so a transposed input would arrive contiguous. That changes results, not only speed: on a
    contiguous meta input `x.contiguous()` is `x` itself, so `y = x.contiguous(); y.mul_(2)` writes
    into `x`, and `x.as_strided(...)` reads memory in another order. Two arguments that are the same
    tensor (or views of one storage) would arrive as two copies, so a write through one is not seen
    through the other.

    So local tensor inputs are grouped by storage (and dtype). A group is sent as one 1-d input, the
    storage's elements [lo, hi) (the range its views reach), and each argument in it is recorded as
    `aten.as_strided(storage, size, stride, offset - lo)`: the server's views have the client's strides
    and alias each other exactly as they did locally. An argument alone in its storage with C-order
    strides is a plain `$in` as before (no extra nodes: the common case is unchanged). Limits, stated
    rather than hidden: storage offsets are relative to `lo` (storage outside [lo, hi) is not sent;
    an `as_strided` that reaches it fails at capture, since the meta storage ends there too), and
    views of one storage with different dtypes are separate groups. The layout (groups and views) is
    part of the input signature, so another layout is another capture.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..protocol.tensors import is_remote


@dataclass(frozen=True)
class StorageGroup:
    dtype: torch.dtype
    lo: int          # first storage element any view in the group reaches
    hi: int          # one past the last
    first: int       # the leaf whose storage is sent (any member would do)


@dataclass(frozen=True)
class LeafView:
    group: int                  # index into InputLayout.groups
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int                 # storage offset relative to the group's lo


@dataclass(frozen=True)
class InputLayout:
    """How a call's tensor leaves become graph inputs: per leaf a LeafView, or None for a plain `$in`
    (RemoteTensors, C-order tensors alone in their storage). Hashable: part of the input signature."""
    groups: tuple[StorageGroup, ...]
    views: tuple[LeafView | None, ...]

    def values(self, leaves: list) -> list:
        """What travels for these leaves, one value per graph input, in input order (see `inputs`)."""
        out = []
        for kind, k in self.inputs():
            if kind == "leaf":
                out.append(leaves[k])
            else:
                g = self.groups[k]
                out.append(leaves[g.first].detach().as_strided((g.hi - g.lo,), (1,), g.lo))
        return out

    def inputs(self) -> list[tuple[str, int]]:
        """Graph input order: ("leaf", i) for a plain leaf, ("group", g) for a storage, each at its
        first leaf's position."""
        order, seen = [], set()
        for i, v in enumerate(self.views):
            if v is None:
                order.append(("leaf", i))
            elif v.group not in seen:
                seen.add(v.group)
                order.append(("group", v.group))
        return order


def _c_strides(size: tuple[int, ...]) -> tuple[int, ...]:
    out, acc = [], 1
    for d in reversed(size):
        out.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(out))


def _viewable(t: Any) -> bool:
    return (isinstance(t, torch.Tensor) and not is_remote(t) and t.layout == torch.strided and t.numel() > 0
            and t.device.type != "meta" and not t.is_conj() and not t.is_neg())


def layout_of(leaves: list) -> InputLayout:
    """Note [Input layout]: group local tensor leaves by storage."""
    by_storage: dict[tuple, list[int]] = {}
    for i, t in enumerate(leaves):
        if _viewable(t):
            key = (t.device, t.untyped_storage().data_ptr(), t.dtype)
            by_storage.setdefault(key, []).append(i)
    views: list[LeafView | None] = [None] * len(leaves)
    groups: list[StorageGroup] = []
    for (_, _, dtype), members in by_storage.items():
        t0 = leaves[members[0]]
        if len(members) == 1 and tuple(t0.stride()) == _c_strides(tuple(t0.shape)):
            continue  # the common case: a plain input, as it always was
        lo = min(leaves[i].storage_offset() for i in members)
        hi = max(leaves[i].storage_offset() + sum((d - 1) * s for d, s in zip(leaves[i].shape, leaves[i].stride())) + 1
                 for i in members)
        g = len(groups)
        groups.append(StorageGroup(dtype, lo, hi, members[0]))
        for i in members:
            t = leaves[i]
            views[i] = LeafView(g, tuple(t.shape), tuple(t.stride()), t.storage_offset() - lo)
    return InputLayout(tuple(groups), tuple(views))
