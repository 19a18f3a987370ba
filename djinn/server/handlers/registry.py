"""The op registry: `op(engine, client_id, rid, args) -> result` functions by name.

Each op module (ops, model_ops, run_ops, init_ops, graph_ops, checkpoint, fork) registers its ops here with
`@op` when imported; the engine imports them all and looks requests up in `OPS`. Keeping the table in
its own module lets op modules share helpers one way (args.py, values.py, model_ops.py) without an import
cycle back through the table's owner.
"""
from __future__ import annotations

from typing import Callable

OPS: dict[str, Callable] = {}


def op(fn: Callable) -> Callable:
    OPS[fn.__name__] = fn
    return fn
