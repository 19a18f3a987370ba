"""The breakpoint ops (DESIGN.md sections 7 and 10): start, resume, fork, cancel_run, edit.

Registered in the op registry (registry.py) like every other op; they live here to keep ops.py about plain calls. start,
resume and fork reply when the run parks at a breakpoint or ends, with server-side timings.
"""
from __future__ import annotations

import time

from ...protocol.errors import InvalidRequest
from .. import quotas
from ..execution import executor
from ..execution.breakpoints import Call, parse_breakpoints
from ..execution.graph_runs import GraphModule
from ..execution.kv_pools import pool_for as kv_pool_for
from ..execution.validate import check_forward, check_generate
from .args import check_prefill, model_of, require_module, seed_of
from .graph_ops import graph_call
from .registry import op
from .values import unpack_inputs

METHODS = ("forward", "generate")


@op
def start(engine, client_id, rid, args):
    t0 = time.perf_counter()
    s = engine.session(client_id, args)
    if "sig" in args:
        return _start_graph(engine, client_id, s, args, t0)
    entry = model_of(engine, s, args)
    if getattr(entry, "streamed", None) is not None and args.get("breakpoints"):
        # The ring's slots are shared by every forward through the model: while one run is parked,
        # another session's forward would overwrite the slots the parked run resumes into.
        raise InvalidRequest("breakpoints on a model that streams its weights (weight_budget_gb) are not "
                             "supported yet; remote it without a weight budget to debug it")
    method = args.get("method", "forward")
    if method not in METHODS:
        raise InvalidRequest(f"method must be one of {METHODS}, got {method!r}")
    if method == "generate":
        require_module(entry, "a generate run")
    call_args = unpack_inputs(engine, s, args.get("args", []))
    call_kwargs = unpack_inputs(engine, s, args.get("kwargs", {}))
    if not isinstance(call_args, list) or not isinstance(call_kwargs, dict):
        raise InvalidRequest("start needs args as a list and kwargs as a map")
    if method == "generate" and len(call_args) != 1:
        raise InvalidRequest(f"a generate run takes one positional argument (input_ids, or Whisper's input_features), "
                             f"got {len(call_args)}")
    if method == "forward":  # Note [Index inputs are checked before the device sees them]
        check_forward(entry.module, call_args, call_kwargs)
    else:  # Note [Effective generate arguments]: the arguments first, then the indices they imply
        executor.check_generate(call_args[0], call_kwargs, entry.module)
        check_generate(entry.module, call_args[0], call_kwargs, 0)  # a generate run is stateless
    seed = seed_of(args)
    specs = parse_breakpoints(entry.module, args.get("breakpoints", []), method)
    kv_pool = None
    if method == "generate":
        check_prefill(engine, call_args[0], "a generate run", entry.module)
        kv_pool = kv_pool_for(engine, entry)
        # Its KV blocks are reserved when it starts and held while it is paused (Note [Session quotas]).
        ids = call_args[0]
        prompt = executor.decoder_prompt(entry.module, int(ids.shape[1]))  # Note [Encoder-decoder generate]
        tokens = prompt + executor.new_tokens(entry.module, prompt, call_kwargs)
        grown = kv_pool.bytes_for(tokens, int(ids.shape[0]))
        cross = executor.cross_kv_bytes(entry.module, kv_pool.shape, ids)
        quotas.check_gpu(engine, s, quotas.gpu_used(engine, s) + grown + cross, "a generate run",
                         f"{grown} bytes of KV for {tokens} tokens x batch {int(ids.shape[0])}"
                         + (f", {cross} bytes of cross-attention KV" if cross else ""))
    call = Call(entry.module, method, call_args, call_kwargs, seed, engine.device, kv_pool)
    held = set(s.tensors)
    run = engine.runs.start(s, entry.model_id, call, specs)
    return _reply(engine, s, run, held, t0)


def _start_graph(engine, client_id, s, args, t0: float) -> dict:
    """A graph-path forward as a run (server/execution/graph_runs.py): {sig, graph?, model_id?, inputs, seed?,
    breakpoints}; the reply is start's, its output the graph's outputs in order."""
    compiled, _, weights, inputs = graph_call(engine, client_id, s, args, "start")
    if compiled is None:
        raise InvalidRequest("the server holds no graph with this signature: send it with the start")
    seed = seed_of(args)
    module = GraphModule(compiled, weights, engine.text.readonly)
    specs = parse_breakpoints(module, args.get("breakpoints", []), "forward")
    call = Call(module, "forward", inputs, {}, seed, engine.device)
    held = set(s.tensors)
    run = engine.runs.start(s, args.get("model_id") or "graph", call, specs)
    return _reply(engine, s, run, held, t0)


@op
def resume(engine, client_id, rid, args):
    s, run, t0, t_edits = _paused_with_edits(engine, client_id, args)
    held = set(s.tensors)
    engine.runs.resume(run)
    return _reply(engine, s, run, held, t0, t_edits)


@op
def fork(engine, client_id, rid, args):
    """A copy of a paused run, parked at the same stop (Note [Fork replays the prefix])."""
    s, parent, t0, t_edits = _paused_with_edits(engine, client_id, args)
    held = set(s.tensors)
    child = engine.runs.fork(parent, engine.cfg.run_fork_from_kv
                             if engine.cfg.run_fork_from_kv is not None else engine.device.type != "cuda")
    return _reply(engine, s, child, held, t0, t_edits)


def _reply(engine, s, run, held: set, t0: float, t_edits: float | None = None) -> dict:
    """The run's reply; a finished forward's outputs become session tensors, charged to the session's
    Data segment and held to its GPU quota (Note [Session quotas] in quotas.py)."""
    reply = engine.runs.reply(s, run, t0, t_edits)
    engine.data.sync(s)
    err = quotas.over_gpu(engine, s, held, f"run {run.run_id}")
    if err is not None:
        del reply
        raise err
    return reply


def _paused_with_edits(engine, client_id, args):
    """The paused run a resume/fork names, after applying the edits it carries; with the timings."""
    t0 = time.perf_counter()
    s = engine.session(client_id, args)
    run = engine.runs.paused(engine.runs.get(s, args.get("run")))
    engine.runs.apply_edits(s, args.get("edits"))
    return s, run, t0, time.perf_counter()


@op
def cancel_run(engine, client_id, rid, args):
    s = engine.session(client_id, args)
    why = engine.runs.ended(s, args.get("run"))
    if why is not None:
        return {"ended": why}  # cancelling an ended run is a no-op, e.g. after the paused-run timeout
    engine.runs.cancel(engine.runs.get(s, args.get("run")), "cancelled by the client")
    return {"ended": "cancelled by the client"}


@op
def edit(engine, client_id, rid, args):
    s = engine.session(client_id, args)
    engine.runs.apply_edits(s, args.get("edits"))
    return {}
