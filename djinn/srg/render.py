"""A human-readable SRG: ops grouped by module path, with annotations and sizes (`rm.explain(...)`)."""
from __future__ import annotations

from typing import Any

from ..protocol.tensors import DTYPE_NAMES
from .graph import CONST, IN, WEIGHT, Graph, Lifecycle, Ref, TensorMeta

_SHORT = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "float64": "f64", "int64": "i64",
          "int32": "i32", "bool": "bool", "uint8": "u8", "int8": "i8"}


def meta_str(m: TensorMeta) -> str:
    name = DTYPE_NAMES.get(m.dtype, str(m.dtype))
    return f"{_SHORT.get(name, name)}{list(m.shape)}"


def _size(n: int) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def _arg(v: Any) -> str:
    if isinstance(v, Ref):
        return f"%{v.node}" if v.k == 0 else f"%{v.node}.{v.k}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_arg(x) for x in v) + "]"
    if hasattr(v, "is_floating_point"):  # a dtype
        return str(v).replace("torch.", "")
    return repr(v)


def render(g: Graph, title: str = "SRG") -> str:
    ops = sum(1 for n in g.nodes if n.op not in (IN, WEIGHT, CONST))
    weights = [n for n in g.nodes if n.op == WEIGHT]
    wbytes = sum(n.outs[0].nbytes for n in weights)
    lines = [f"{title}: phase={g.phase}, {ops} ops, {len(g.inputs)} inputs, {len(weights)} weights "
             f"({_size(wbytes)}), {len(g.outputs)} outputs{', random' if g.random else ''}"]
    current = None
    for i, n in enumerate(g.nodes):
        group = n.module or n.where or "<top>"
        if group != current:
            current = group
            lines.append(f"{group}:")
        if n.op == IN:
            desc = "input"
        elif n.op == WEIGHT:
            desc = f"weight {n.kwargs.get('name', '')}"
        elif n.op == CONST:
            desc = "constant"
        else:
            args = [_arg(a) for a in n.args] + [f"{k}={_arg(v)}" for k, v in n.kwargs.items()]
            desc = f"{n.op.removeprefix('aten.')}({', '.join(args)})"
        outs = ", ".join(meta_str(m) for m in n.outs)
        nbytes = sum(m.nbytes for m in n.outs)
        ann = f"{Lifecycle(n.lifecycle).name.lower()} {n.cost if n.op not in (IN, WEIGHT, CONST) else '-'}"
        lines.append(f"  %{i:<3} {desc} -> {outs}  [{ann}, {_size(nbytes)}]")
    lines.append("outputs: " + ", ".join(_arg(r) for r in g.outputs))
    return "\n".join(lines)
