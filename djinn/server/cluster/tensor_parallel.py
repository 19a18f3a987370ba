"""Tensor parallelism: one model's layers sharded over the workers (Note [Tensor-parallel sessions]).

Note [Tensor-parallel sessions]
    `conn.session(tp=2)` (or `djinn.remote(model, tp=2)`, which opens one) is a session that spans the
    workers: the front opens it on every worker under one id and relays each of its requests to all
    of them in the same order; the first worker's replies go to the client, the others' are dropped.
    A model registered in it with `tp=2` is built on each worker from the same weights, kept whole in
    host memory (uploaded to the host, loaded from the server's disk there, or, for a config, drawn
    on the CPU, so no device ever holds the model whole), then sharded with PyTorch's own tensor
    parallelism (`torch.distributed.tensor.parallel`, over a
    DeviceMesh of the workers' group) by the architecture's transformers plan (`base_model_tp_plan`:
    the attention's q/k/v and the MLP's gate/up column-wise, o and down row-wise; embeddings, norms
    and the LM head replicated). Each worker then holds its share of the heads, and its KV is split
    by heads too. A row-wise layer ends in an all-reduce, after which every worker holds the same
    hidden state, so every worker computes the same logits and picks the same tokens: each runs the
    same Hugging Face generate over its own shard and KV, and the collectives pair up call by call.
    That pairing needs every worker to run a session's model calls in the same order, so a
    tensor-parallel call runs to its end when its request is served (the engine's thread waits in it;
    other sessions on those workers wait for it), and whatever is random is seeded alike: the front
    gives each relayed request one seed, used when the call names none, and handle, run and stop ids
    come from a counter instead of the OS's randomness (`Session.new_id`).
    Breakpoint runs work as on one device: at a decoder layer's boundary every worker holds the same
    hidden state (after the row-wise all-reduce), each worker's run parks at the same stop, the stop
    the client reads is the first worker's, and an edit, relayed to every worker like any request, is
    applied alike on each; a generate run uses HF's own cache (no blocks) and has no tail job.
    Its KV is each worker's share of the heads in the model's block pool on that worker (the pool's
    shape says kv_heads / tp), a session's blocks continued call after call as the eager path's, and
    swapped by each worker's scheduler like any other (a call brings them back first). A generate
    decodes in the model's decode pool as one call at a time (Note [Tensor-parallel decode]), steered
    and recording as on one device (`generate(steer=..., record=...)`), and streaming: the first
    worker's tokens go to the client; since the call has ended by the time a client's cancel is served,
    the cancel rolls the session's KV back to the tokens the client consumed (`cancel`). A TP sum is not bitwise the
    single-device sum: greedy tokens are compared with TP=1, logits within tolerance.
    A model shards over a block of tp workers aligned on tp (workers 0-1 or 2-3 of four at tp=2;
    tp must divide the number of workers): creating a process group is collective over the whole
    group, so every worker creates each block's sub-group when it joins (`make_groups`), and a block
    is then only a lookup. The front opens a tensor-parallel session on the live block with the most
    free KV (then the fewest sessions); the other workers serve other sessions meanwhile.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ...protocol.errors import InvalidRequest, ModelNotSupported


def check(tp: object, world: int | None = None) -> int | None:
    """The tp a request asks for: None for 1 (not sharded), or InvalidRequest; with `world`, it must
    divide the number of workers (a model shards over an aligned block of tp workers)."""
    if tp is None:
        return None
    if type(tp) is not int or tp < 1:
        raise InvalidRequest(f"tp must be a positive int, got {tp!r}")
    if tp == 1:
        return None
    if world is not None and (tp > world or world % tp):
        raise InvalidRequest(f"tp={tp} needs a block of {tp} workers out of a number of workers it divides; this "
                             f"server has {world} (start it with --gpus listing a multiple of {tp} GPUs)")
    return tp


def blocks(world: int, tp: int) -> list[list[int]]:
    """The aligned blocks of tp workers a model may shard over: [[0, 1], [2, 3]] for 4 workers at tp=2."""
    return [list(range(start, start + tp)) for start in range(0, world, tp)]


_GROUPS: dict[int, object] = {}  # tp -> the sub-group of this worker's block (tp below the world's size)


def make_groups(world: int, rank: int) -> None:
    """Every worker, right after joining the group, in the same order: each block's sub-group for every
    tp that divides the world (creating a group is collective over the whole group)."""
    import torch.distributed as dist

    for tp in range(2, world):
        if world % tp:
            continue
        for block in blocks(world, tp):
            group = dist.new_group(block)
            if rank in block:
                _GROUPS[tp] = group


def plan(module: nn.Module, tp: int) -> dict[str, object]:
    """The architecture's transformers TP plan as PyTorch parallel styles, one entry per layer."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    cfg = module.config
    base = getattr(cfg, "base_model_tp_plan", None)
    if not base:
        raise ModelNotSupported(f"{type(module).__name__} has no tensor-parallel plan in transformers")
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        n = getattr(cfg, name, None)
        if isinstance(n, int) and n % tp:
            raise ModelNotSupported(f"{type(module).__name__}: {name}={n} does not split over tp={tp}")
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    prefix = module.base_model_prefix
    names = {n for n, _ in module.named_modules()}
    out = {}
    for pattern, style in base.items():
        if style not in styles:
            raise ModelNotSupported(f"{type(module).__name__}: tensor-parallel style {style!r} is not supported")
        rx = re.compile("^" + re.escape(f"{prefix}.{pattern}").replace(r"\*", r"\d+") + "$")
        hits = [n for n in names if rx.match(n)]
        if not hits:
            raise ModelNotSupported(f"{type(module).__name__}: its TP plan names {pattern!r}, which it lacks")
        for n in hits:
            out[n] = styles[style]()
    return out


def shard(module: nn.Module, tp: int, device: torch.device) -> None:
    """Shard the module in place over this worker's block of tp workers (every worker of the block
    calls this with the same module)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    if tp == dist.get_world_size():
        mesh, group = init_device_mesh(device.type, (tp,)), None
    elif tp in _GROUPS:
        group = _GROUPS[tp]
        mesh = DeviceMesh.from_group(group, device.type)
    else:
        raise InvalidRequest(f"tp={tp} does not divide this server's {dist.get_world_size()} workers")
    # Every worker holds the whole weights: each keeps its own shard, no scatter (src_data_rank=None).
    # The scatter from rank 0 gave wrong, run-to-run different weights over gloo for weights bound
    # from the Text segment (tests/integration/test_cluster.py compares against one device).
    styles = plan(module, tp)
    parallelize_module(module, mesh, styles, src_data_rank=None)
    _localize(module, styles, group)
    module._djinn_tp = tp  # KVShape.of_module: this worker's KV is its share of the heads


def _localize(module: nn.Module, styles: dict, group) -> None:
    """Note [Plain tensors in the step]
        parallelize_module leaves DTensor weights and hooks that turn each layer's input and output
        into DTensors; every op then goes through DTensor's sharding propagation, which took most of a
        decode step (tiny Llama, two gloo workers: 11 tok/s, against 298 for one worker's step). Its
        shards are kept as plain tensors instead, as gpt-fast does: a column-wise layer is a Linear
        over its rows of the weight (its output is this worker's share of the heads or the MLP's
        width), a row-wise one a Linear over its columns whose partial sums are all-reduced over the
        block's group before the bias. The forward then runs plain ops and one all-reduce per
        row-wise layer, which a CUDA graph can also hold."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import RowwiseParallel

    def local(p):
        if p is None:
            return None
        t = p.to_local() if isinstance(p, DTensor) else p
        return nn.Parameter(t.detach(), requires_grad=False)

    for name, style in styles.items():
        lin = module.get_submodule(name)
        for hooks in (lin._forward_pre_hooks, lin._forward_hooks, lin._forward_hooks_with_kwargs,
                      lin._forward_pre_hooks_with_kwargs):
            hooks.clear()
        weight, bias = local(lin.weight), local(lin.bias)
        if isinstance(style, RowwiseParallel):
            parent, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, leaf, _RowwiseLinear(weight, bias, group))
        else:
            lin.weight, lin.bias = weight, bias
            lin.out_features = weight.shape[0]


class _RowwiseLinear(nn.Module):
    """A row-wise shard (Note [Plain tensors in the step]): this worker's columns of the weight, the
    partial sums all-reduced over the block, then the whole bias."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, group):
        super().__init__()
        self.weight, self.bias, self.group = weight, bias, group
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        y = torch.nn.functional.linear(x, self.weight)
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias


@dataclass
class Streamed:
    """A TP generate of the session's KV that ended, kept until the session's next call: what a cancel
    (a client leaving its stream, or interrupted while waiting) rolls the session's KV back to."""

    rid: int
    model_id: str
    before: torch.Tensor    # the session's token ids before the call
    fed: int                # the positions its KV held then
    inputs: torch.Tensor    # the call's input ids
    new: list[int]          # its generated tokens
    after: torch.Tensor     # the token ids it left (the KV's, unless another call ran since)


def generate(engine, s, entry, input_ids: torch.Tensor, kwargs: dict, seed: int | None, use_kv: bool,
             steer: dict | None = None, record: list | None = None, on_tokens=None,
             rid: int | None = None) -> tuple[torch.Tensor, dict | None]:
    """A generate on a tensor-parallel model, run to its end now (Note [Tensor-parallel sessions]),
    over this worker's share of the KV in the model's block pool (its heads): its sequences (on the
    CPU) and, with `record`, each recorded layer's outputs. Steering vectors and recordings act at
    decoder layer boundaries, where every worker holds the same whole hidden state (after the
    row-wise all-reduce), so each worker adds the same vector and records the same values."""
    from ...protocol.errors import OutOfMemory
    from ..execution import executor
    from ..execution.fastpath import why_eager
    from ..execution.kv_pools import pool_for
    from ..execution.rng import Stream
    from ..sessions import KVState

    mid, dev = entry.model_id, engine.device
    s.tp_streamed = None  # a later call ends what a cancel could roll back
    err: Exception | None = None
    try:
        pool = pool_for(engine, entry)
        if use_kv:
            _home(engine, s)
        state = s.kv.get(mid) if use_kv else None
        if state is None:
            state = KVState.empty(pool, executor.empty_ids(input_ids))
            if use_kv:
                engine.data.attach_kv(s, mid, state)
        prompt = int(state.ids.shape[1]) + int(input_ids.shape[1])
        new = executor.new_tokens(entry.module, prompt, kwargs)
        tokens = prompt + new
        if use_kv and s.max_kv_tokens is not None:  # Note [Declared KV budgets] in handlers/ops.py
            if tokens > s.max_kv_tokens:
                raise InvalidRequest(f"this generate would hold {tokens} tokens of KV, over the session's "
                                     f"max_kv_tokens={s.max_kv_tokens}")
            tokens = s.max_kv_tokens
        if not pool.reserve(state.table, tokens):
            raise OutOfMemory(f"a tensor-parallel generate needs {tokens} tokens of KV; the model's pool on "
                              f"{dev} has too few free blocks now")
    except (OutOfMemory, InvalidRequest) as e:
        err = e

    def give_back() -> None:  # the blocks it reserved and did not write
        if use_kv:
            pool.trim(state.table, s.max_kv_tokens or 0)
        else:
            pool.release(state.table)

    if not agree(err is None, entry.tp, dev):  # Note [Tensor-parallel decode]: all of the block or none
        if err is None:
            give_back()
            err = OutOfMemory("another worker of this tensor-parallel block has no room for this call now "
                              "(its pool is short of free KV blocks)")
        raise err
    records: dict[int, list] | None = {k: [] for k in record} if record else None
    before, fed = state.ids, state.table.length
    try:
        why = why_eager(engine.cfg, dev, entry.module, input_ids, kwargs, prompt)
        if why is None:
            out = _fast(engine, entry, state, input_ids.to(dev), kwargs, seed, new, steer, records, on_tokens)
        else:
            with Stream.new(seed, dev).active():
                out = executor.generate(entry.module, state, input_ids.to(dev), kwargs, on_tokens, continues=True,
                                        steer=steer or None, record=records)
        if use_kv:  # an interrupted call (Ctrl-C) is cancelled with keep=0 after it ended: see `cancel`
            n = int(before.shape[1]) + int(input_ids.shape[1])
            s.tp_streamed = Streamed(rid, mid, before, fed, input_ids.to(before.device), out[0, n:].tolist(),
                                     state.ids)
        s.decode["eager" if why else "fast"] += 1
        s.eager_why = why or s.eager_why
    finally:
        give_back()
    return out.cpu(), records


def cancel(engine, s, rid: object, keep: int) -> dict:
    """A client left the stream of TP generate `rid` after `keep` tokens (0: interrupted while waiting
    for it): the call has ended (it ran to its end when served), so the session's KV is rolled back to
    those tokens, on every worker alike (the cancel is relayed to each), as a cancelled generate leaves
    it (Note [Cancel] in dispatch.py)."""
    last, s.tp_streamed = s.tp_streamed, None
    state = s.kv.get(last.model_id) if last is not None and last.rid == rid else None
    if state is None or state.ids is not last.after:
        return {"cancelled": False, "kept": 0}
    kept = min(keep, len(last.new))
    state.ids, state.table.length = last.before, last.fed
    if kept:
        state.keep(last.inputs, last.new[:kept])
    engine.data.pools[last.model_id].trim(state.table, s.max_kv_tokens or 0)
    engine.data.sync(s)
    return {"cancelled": True, "kept": kept}


def agree(ok: bool, tp: int, device: torch.device) -> bool:
    """Whether every worker of this worker's block of tp workers has `ok`: a MIN all-reduce of one flag
    over the block, which each reaches at the same point of the same request."""
    import torch.distributed as dist

    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=None if tp == dist.get_world_size() else _GROUPS[tp])
    return bool(flag.item())


def _fast(engine, entry, state, input_ids: torch.Tensor, kwargs: dict, seed: int | None, new: int,
          steer: dict | None, records: dict | None, on_tokens=None) -> torch.Tensor:
    """Note [Tensor-parallel decode]
        A tensor-parallel generate decodes in the model's decode pool, the batched step every other
        model uses (its forward over this worker's shard and KV heads, the row-wise layers' all-reduces
        inside it), run to its end here: prompt chunks, then one step per token. Every worker of the
        block runs the same call in the same order with the same seed, so each runs the same forwards
        (the same chunks, the same one-row steps) and their collectives pair up; a step plan would be
        needed only to batch several calls' rows, which this does not do (one call runs at a time). On
        CUDA the step runs eagerly: the captured graphs would hold the collectives, not yet measured.
        Whether a call can start is agreed before its first forward (`agree`): each worker's pool is
        sized from what its own device has free, so one worker of the block may be short of free KV
        blocks where another is not; then every worker fails the call with OutOfMemory and gives its
        blocks back, instead of the others waiting in their first all-reduce for a forward that never
        comes. A worker of the block that dies in the middle of a call still leaves the others in
        their next collective until the group's timeout (120 s): torch.distributed has no way to
        abort it sooner; the front has by then failed the session (SessionLost)."""
    from ..execution.fast_task import FastTask, PrefillBudget, fast_turn, pool_for

    pool = pool_for(engine, entry)
    budget = PrefillBudget(engine.cfg.max_prefill_tokens)
    task = FastTask(pool, state, input_ids, kwargs, seed, on_tokens, new, budget, continues=True, steer=steer,
                    record=records)
    while not task.done:
        budget.new_turn()
        fast_turn([task], budget.per_turn)
        task.advance()
    if task.error is not None:
        raise task.error
    return task.result["sequences"]


def _home(engine, s, timeout_s: float = 60.0) -> None:
    """The session's KV on the device before the call runs (the scheduler may have swapped it out
    while it waited on a tool): a prefetch, waited for here, since the call cannot wait in a queue."""
    import time

    from ...protocol.errors import OutOfMemory

    if not engine.data.away(s):
        return
    if not engine.data.prefetch(s):
        raise OutOfMemory("this tensor-parallel session's KV is on the host and the device has no free "
                          "blocks to bring it back now")
    deadline = time.monotonic() + timeout_s
    while engine.data.away(s):
        engine.data.poll()
        if time.monotonic() > deadline:
            raise OutOfMemory("bringing this tensor-parallel session's KV back took too long")
        time.sleep(0.0005)
