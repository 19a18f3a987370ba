"""The session ops: open and close, forward, generate and its cancel, signals, tensors (fetch, free),
stats. One function per op, registered in the op table (registry.py); arguments are checked here
(args.py, values.py; Note [Isolation] in args.py), before anything is allocated. Weights and models
are model_ops.py's.

Note [Declared KV budgets]
    A session opened with `max_kv_tokens=N` declares the most tokens its KV will hold (per model, per
    row): its first generate reserves blocks for all N and the end of each call keeps them, so every
    later turn grows into blocks it already holds and never waits for memory, and a generate that
    would pass N is refused. The scheduler therefore admits a session only when its whole future
    fits: with the resident policy (which never moves KV) that is what makes overload queue new
    sessions instead of leaving admitted ones unable to grow. Without a declaration a session holds
    what it wrote, and a later turn's growth is admitted like any request.

Note [Prefix sharing]
    A generate whose table holds no blocks yet (a session's first call, or after a drop) first takes
    the cached blocks that hold its prompt's leading full blocks (KVPool.share_prefix: keys chained over
    every token id up to each block), and feeds only the rest; at its end the full blocks of its prompt
    are published for later prompts. A shared block is never written: a writer copies it first
    (KVPool.ensure_private). Breakpoint runs never take cached blocks, so a stop sees (and may edit)
    every position it observes. Off with prefix_caching: false.

Quotas (Note [Session quotas]) are checked through djinn/server/quotas.py.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch

from ...protocol.errors import InvalidRequest, OutOfMemory, short
from ...protocol.messages import MsgType
from .. import quotas
from ..cluster import tensor_parallel
from ..dispatch import Job
from ..execution import executor, steering, validate
from ..execution.fast_task import FastTask, pool_for
from ..execution.fastpath import STEP, why_eager
from ..execution.kv_pools import pool_for as kv_pool_for
from ..execution.rng import Stream
from ..models import streaming
from ..sessions import KVState, SessionState, install_restored
from . import checkpoint, memory
from .args import check_prefill, model_id_of, model_of, require_module, seed_of, str_list
from .registry import op
from .values import decode_inputs, pack_outputs, read, to_device, unpack_inputs

log = logging.getLogger("djinn.ops")


@op
def ping(engine, client_id, rid, args):
    return {"time": time.time()}


@op
def open_session(engine, client_id, rid, args):
    name = args.get("name")
    if name is not None and (not isinstance(name, str) or len(name) > 200):
        raise InvalidRequest("session name must be a string of at most 200 characters")
    wants_checkpoint = args.get("checkpoint", False)
    if not isinstance(wants_checkpoint, bool):
        raise InvalidRequest(f"checkpoint must be true or false, got {short(wants_checkpoint)}")
    budget = args.get("max_kv_tokens")
    if budget is not None and (type(budget) is not int or not 1 <= budget <= 1 << 24):
        raise InvalidRequest(f"max_kv_tokens must be an int in [1, {1 << 24}] or null, got {budget!r}")
    s = engine.sessions.open(client_id, name, engine.principal(client_id), sid=engine.meta.get("new_sid"))
    s.max_kv_tokens = budget
    s.tp = engine.meta.get("tp")  # a front opened it on every worker (Note [Tensor-parallel sessions])
    log.info("session %s opened by client %s%s", s.sid[:8], client_id[:8], f" name={name!r}" if name else "")
    if wants_checkpoint:  # Note [Checkpoint tokens] in checkpoint.py
        try:
            checkpoint.arm(engine, s)
        except BaseException:
            engine.close_session(s, "cannot checkpoint")
            raise
    return {"sid": s.sid, "checkpoint_token": s.checkpoint_token}


@op
def close_session(engine, client_id, rid, args):
    s = engine.session(client_id, args)
    engine.close_session(s, "closed by client")
    return {}


@op
def forward(engine, client_id, rid, args):
    s = engine.session(client_id, args)
    entry = model_of(engine, s, args)
    call_args = decode_inputs(s, args.get("args", []))
    call_kwargs = decode_inputs(s, args.get("kwargs", {}))
    if not isinstance(call_args, list) or not isinstance(call_kwargs, dict):
        raise InvalidRequest("forward needs args as a list and kwargs as a map")
    # Note [Index inputs are checked before the device sees them]: as they came off the wire, on the
    # host, so the check does not wait for the device's queue; then the copies to the device.
    validate.check_forward(entry.module, call_args, call_kwargs)
    check_prefill(engine, call_kwargs.get("input_ids", call_args[0] if call_args else None), "forward", entry.module)
    call_args, call_kwargs = to_device(call_args, engine.device), to_device(call_kwargs, engine.device)
    held = set(s.tensors)
    with Stream.new(None, engine.device).active():  # Note [Random streams]: a module drawing in forward
        out = executor.forward(entry.module, call_args, call_kwargs)
    result = {"output": pack_outputs(s, out)}
    engine.data.sync(s)
    err = quotas.over_gpu(engine, s, held, "forward")
    if err is not None:
        del out, result  # the outputs are freed now, not when the error's traceback goes
        raise err
    return result


@op
def generate(engine, client_id, rid, args):
    """A job for the dispatcher: it runs one decode step at a time among other sessions' (dispatch.py).

    Its KV is blocks of the model's pool: the session's table (use_session_kv) or a scratch table
    released when it ends. Admission reserves the blocks for every token it may add (`need`, so the
    scheduler's bytes are the pool's blocks); the end gives back the ones it did not write."""
    s = engine.session(client_id, args)
    entry = model_of(engine, s, args)
    require_module(entry, "generate")
    input_ids = unpack_inputs(engine, s, args.get("input_ids"))
    kwargs = unpack_inputs(engine, s, args.get("kwargs", {}))
    seed = seed_of(args, engine.meta)
    if not isinstance(kwargs, dict):
        raise InvalidRequest("generate needs kwargs as a map")
    executor.check_generate(input_ids, kwargs, entry.module)  # Note [Effective generate arguments]
    steer = steering.parse(entry.module, unpack_inputs(engine, s, args.get("steer")))  # Note [Steering]
    record = steering.parse_record(entry.module, args.get("record"))  # Note [Recorded activations]
    if record and (int(input_ids.shape[0]) != 1 or args.get("stream")):
        raise InvalidRequest("record needs an input batch of 1 and stream=False")
    if entry.tp:  # run to its end now, on every worker alike (Note [Tensor-parallel sessions])
        validate.check_generate(entry.module, input_ids, kwargs, 0)

        def send_tokens(tokens: torch.Tensor) -> None:  # the front passes on the first worker's only
            engine.send(client_id, MsgType.STREAM, {"rid": rid, "tokens": tokens.tolist()})

        out, records = tensor_parallel.generate(engine, s, entry, input_ids, kwargs, seed,
                                                bool(args.get("use_session_kv")), steer, record,
                                                send_tokens if args.get("stream") else None, rid)
        result = {"sequences": out}
        if records is not None:  # every worker keeps its copy under the same handles (counter ids)
            result["records"] = pack_outputs(s, [torch.cat(records[k]) for k in record])
        engine.data.sync(s)
        return result
    check_prefill(engine, input_ids, "generate", entry.module)
    encdec = executor.is_encoder_decoder(entry.module)
    use_kv = bool(args.get("use_session_kv")) and not encdec  # Note [Encoder-decoder generate]
    return generate_job(engine, client_id, rid, s, entry, input_ids, kwargs, seed, use_kv=use_kv,
                        stream=bool(args.get("stream")), steer=steer, record=record,
                        deterministic=args.get("deterministic", False))


def generate_job(engine, client_id, rid, s, entry, input_ids, kwargs: dict, seed: int | None, *, use_kv: bool,
                 stream: bool = False, steer: dict | None = None, record: list | None = None,
                 deterministic: Any = False, prefix: bool = True, what: str = "generate",
                 reply: Callable[[dict], dict] | None = None, kv: KVState | None = None,
                 rng: Stream | None = None, hand_back: bool = False) -> Job:
    """The dispatcher job of a generate whose arguments were checked (executor.check_generate, steering,
    check_prefill): its quota check, its KV admission, and its path (the decode fast path where
    `why_eager_of` allows). A plain generate's, and a generate run's that can never stop (Note [A run
    that cannot stop is a generate] in run_ops.py): `prefix=False` takes and publishes no cached prompt
    blocks; `reply` turns the generate's result ({sequences, records?}) into the request's reply.
    `kv`: a table this job continues and owns (the tail of a run, Note [The tail of a run] in
    run_ops.py): `input_ids` follow its ids, and its blocks go back exactly once, when the job ends or
    is dropped (its caller, if this raises); with `hand_back`, a job that ended well leaves it to the
    caller instead, its length the positions it wrote (the head of a run, Note [The head of a run]).
    `rng`: the eager path's stream, instead of `seed`'s."""
    record = record or []
    records: dict[int, list] | None = {k: [] for k in record} if record else None
    emitted: list[int] = []  # tokens streamed to the client so far (Note [Cancel] in dispatch.py)

    def send_tokens(tokens: torch.Tensor) -> None:
        toks = tokens.tolist()
        emitted.extend(toks)
        engine.send(client_id, MsgType.STREAM, {"rid": rid, "tokens": toks})

    on_tokens = send_tokens if stream else None
    encdec = executor.is_encoder_decoder(entry.module)
    # Note [Prefix sharing]: keyed by the KV's own tokens, so never a steered call's (its KV is not theirs),
    # nor a recording one's (a shared block's positions are not fed, so they could not be recorded)
    prefix = prefix and engine.cfg.prefix_caching and not encdec and not steer and not record
    mid = entry.model_id
    kv_pool = kv_pool_for(engine, entry)
    install_restored(engine, s, entry, kv_pool)
    assert kv is None or not (use_kv or prefix or stream or steer or record)
    held = s.kv.get(mid) if use_kv else kv
    seen = int(held.ids.shape[1]) if held is not None else 0
    batch = int(input_ids.shape[0])
    prompt = executor.decoder_prompt(entry.module, seen + int(input_ids.shape[1]))
    new = executor.new_tokens(entry.module, prompt, kwargs)
    tokens = prompt + new
    if use_kv and s.max_kv_tokens is not None:  # Note [Declared KV budgets]
        if tokens > s.max_kv_tokens:
            raise InvalidRequest(f"this generate would hold {tokens} tokens of KV ({prompt} seen and new + {new} "
                                 f"to generate), over the session's max_kv_tokens={s.max_kv_tokens}")
        tokens = s.max_kv_tokens
    grown = kv_pool.bytes_for(tokens, batch)
    cross = executor.cross_kv_bytes(entry.module, kv_pool.shape, input_ids)  # Note [Encoder-decoder generate]
    # The session's KV once this call is done: the other models' as they are, this one's grown. A
    # stateless call's scratch table is all it reserves (the scheduler's bytes)...
    need = max(0, engine.data.gpu_bytes(s.sid) - engine.data.kv_bytes_of(s, mid)) + grown if use_kv else grown
    # ...but it comes on top of everything the session holds (Note [Session quotas]): before anything is queued.
    recorded = len(record) * (prompt + new) * steering.hidden_size(entry.module) * kv_pool.shape.dtype.itemsize
    peak = quotas.gpu_used(engine, s) - (engine.data.kv_bytes_of(s, mid) if use_kv else 0) + grown + cross + recorded
    quotas.check_gpu(engine, s, peak, what, f"{grown} bytes of KV for {prompt} + {new} tokens x batch {batch}"
                     + ("" if use_kv else ", a stateless call's scratch blocks")
                     + (f", {cross} bytes of cross-attention KV" if cross else "")
                     + (f", {recorded} bytes of recorded activations" if recorded else ""))
    capacity = kv_pool.alloc.total * kv_pool.block_bytes
    if grown > capacity:  # it could never be admitted; queued, it would wait forever (and others behind it)
        raise OutOfMemory(f"generate needs {grown / 2**20:.3f} MiB of KV ({prompt} + {new} tokens x batch "
                          f"{batch}); the model's KV pool holds at most {capacity / 2**20:.3f} MiB")
    validate.check_generate(entry.module, input_ids, kwargs, seen if use_kv or kv is not None else 0)  # before any device work
    box: dict[str, Any] = {}

    def reserve() -> bool:  # at start: the scheduler has brought the session's KV back (or dropped it)
        state = s.kv.get(mid) if use_kv else kv
        if state is None:
            state = KVState.empty(kv_pool, executor.empty_ids(input_ids))
            if use_kv:
                engine.data.attach_kv(s, mid, state)
        dropped = use_kv and state.table.length == 0 and int(state.ids.shape[1])  # by the recompute policy
        shared = 0
        if prefix and batch == 1 and not state.table.blocks:  # Note [Prefix sharing]
            shared = kv_pool.share_prefix(state.table, _prompt_ids(state, input_ids, use_kv), prompt - 1)
        if not kv_pool.reserve(state.table, tokens):
            if shared:
                kv_pool.release(state.table)
                state.table.length = 0
            return False
        if kv is not None:
            owned.pop("kv", None)  # from here on box["state"] is what release gives back
        engine.data.prefix_reused(s.sid, shared)
        if dropped:
            engine.data.recomputing(s, max(0, dropped - shared))
        box["state"] = state
        return True

    owned = {"kv": kv} if kv is not None else {}  # the table it continues, until reserve took it

    def release() -> None:  # at the end, or when the job is dropped: blocks it reserved and did not write
        state = box.pop("state", None)
        if state is None:
            state = owned.pop("kv", None)
        if state is None or (hand_back and box.get("ended")):
            return
        if prefix and batch == 1:  # the prompt's full blocks, for later prompts to share
            kv_pool.publish(state.table, _prompt_ids(state, input_ids, False), prompt)
        if use_kv and s.kv.get(mid) is state:
            kv_pool.trim(state.table, s.max_kv_tokens or 0)
        else:
            kv_pool.release(state.table)

    def truncate(keep: int) -> int:  # after a cancel rolled the table back: keep what the client consumed
        state = box.get("state")
        got = emitted[:keep]
        if state is None or not use_kv or batch != 1 or not got:
            return 0
        state.keep(input_ids, got)
        return len(got)

    def finish(out: torch.Tensor) -> dict:
        """The reply: the sequences, and each recorded layer's outputs as session tensors, in the order asked."""
        result = {"sequences": out.cpu()}
        box["ended"] = True
        if records is not None:
            result["records"] = pack_outputs(s, [torch.cat(records[k]) for k in record])
        return result if reply is None else reply(result)

    def body(step_hook):
        for got in (records or {}).values():
            got.clear()
        out = executor.generate(entry.module, box["state"], input_ids, kwargs, on_tokens, step_hook,
                                continues=use_kv or kv is not None, steer=steer, record=records)
        return finish(out)

    why = why_eager_of(engine, entry, s, input_ids, kwargs, deterministic, use_kv, seen)
    if why is None:
        try:
            pool = pool_for(engine, entry)
        except (ValueError, torch.OutOfMemoryError) as e:  # no room for a decode pool: decode eagerly
            why = f"no decode pool: {e}"
    s.decode["eager" if why else "fast"] += 1
    s.eager_why = why or s.eager_why
    entry.eager_why = why or entry.eager_why

    def fast_task():
        return FastTask(pool, box["state"], input_ids, kwargs, seed, on_tokens, new, engine.dispatch.prefill,
                        continues=use_kv or kv is not None, steer=steer, record=records, finish=finish)

    make_task = fast_task if why is None else None
    if rng is None:
        rng = Stream.new(seed, engine.device)  # Note [Random streams]: seeded as locally, or fresh from the OS
    return Job(s, mid, need, body, rng, engine.device, uses_kv=use_kv, make_task=make_task,
               reserve=reserve, release=release, truncate=truncate, peak=peak)


@op
def cancel_generate(engine, client_id, rid, args):
    """{sid, rid, keep}: end this session's generate `rid`, keeping its first `keep` generated tokens
    (Note [Cancel] in dispatch.py). A control op: served at once, between two steps."""
    s = engine.session(client_id, args)
    target, keep = args.get("rid"), args.get("keep", 0)
    if type(target) is not int or type(keep) is not int or keep < 0:
        raise InvalidRequest("cancel_generate needs rid (the generate's request id) and keep (an int >= 0)")
    if s.tp:  # its generates ran to their end when served (Note [Tensor-parallel decode])
        return tensor_parallel.cancel(engine, s, target, keep)
    return engine.cancel_generate(s.sid, target, keep)


def _prompt_ids(state, input_ids: torch.Tensor, continues: bool) -> list[int]:
    """Row 0's token ids from position 0: the state's (its ids start with the prompt) and, before the
    call ran, the new ones."""
    ids = torch.cat([state.ids, input_ids], dim=1) if continues else state.ids if state.ids.shape[1] else input_ids
    return ids[0].tolist()


def why_eager_of(engine, entry, s, input_ids, kwargs: dict, deterministic, use_kv: bool, seen: int = 0) -> str | None:
    """None if this generate takes the decode fast path (fastpath.py), else why it does not."""
    if not isinstance(deterministic, bool):
        raise InvalidRequest(f"deterministic must be true or false, got {deterministic!r}")
    if use_kv:
        held = s.kv.get(entry.model_id)
        seen = int(held.ids.shape[1]) if held is not None else 0
    return why_eager(engine.cfg, engine.device, entry.module, input_ids, kwargs, seen + int(input_ids.shape[1]),
                     deterministic)


@op
def signal(engine, client_id, rid, args):
    """IO_WAIT(eta_s) while the application waits on a tool or a user; COMPUTE when it is back."""
    s = engine.session(client_id, args)
    kind, eta = args.get("kind"), args.get("eta_s")
    if kind not in ("IO_WAIT", "COMPUTE"):
        raise InvalidRequest(f"signal kind must be 'IO_WAIT' or 'COMPUTE', got {kind!r}")
    if eta is not None and (isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta < 1e7):
        raise InvalidRequest(f"eta_s must be a number of seconds >= 0 (or null), got {eta!r}")
    now = time.monotonic()
    if kind == "IO_WAIT":
        engine.data.io_wait(s.sid, now, None if eta is None else float(eta))
    else:
        engine.data.compute(s.sid, now)
    engine.dispatch.dirty = True
    return {"state": engine.data.mem(s.sid).state.name}


@op
def reset_kv(engine, client_id, rid, args):
    s = engine.session(client_id, args)
    engine.data.detach_kv(s, model_id_of(args))
    return {}


@op
def fetch(engine, client_id, rid, args):
    """Tensors (or basic-index views, one index chain per handle) to the client, after its queued edits."""
    s = engine.session(client_id, args)
    engine.runs.apply_edits(s, args.get("edits"))
    handles = str_list(args.get("handles"), "handles")
    indices = args.get("indices") or [None] * len(handles)
    if not isinstance(indices, list) or len(indices) != len(handles):
        raise InvalidRequest("indices must be a list with one index chain (or null) per handle")
    return {"tensors": [read(s.tensor(h), i) for h, i in zip(handles, indices)]}


@op
def free(engine, client_id, rid, args):
    s = engine.session(client_id, args)
    for h in str_list(args.get("handles"), "handles"):
        s.tensors.pop(h, None)
    engine.data.sync(s)
    return {}


@op
def migrate(engine, client_id, rid, args):
    """Moving a session needs another worker: a front serves this op (djinn/server/cluster/front.py)."""
    engine.session(client_id, args)
    raise InvalidRequest("this server has one worker, so a session has nowhere to move; start it with "
                         "--gpus 0,1 (or --device cpu --workers 2)")


@op
def stats(engine, client_id, rid, args):
    now = time.monotonic()
    sessions = {
        s.sid: {
            "name": s.name if s.client_id == client_id else None,
            "mine": s.client_id == client_id,
            **engine.data.stats(s.sid, s),
            "paused": s.state == SessionState.PAUSED,
            "job": engine.dispatch.describe(s.sid, now) if s.client_id == client_id else None,
            "busy": engine.dispatch.job_state(s.sid),  # coarse, for every client, as "state" is
            "tensors": len(s.tensors),
            "graphs": len(s.graphs), "graph_bytes": s.graphs.nbytes,  # constants, part of gpu_bytes
            "max_kv_tokens": s.max_kv_tokens,
            "kv_tokens": {**{mid: int(ids.shape[1]) for mid, (ids, _) in s.restored_kv.items()},
                          **{mid: int(kv.ids.shape[1]) for mid, kv in s.kv.items()}},
            "models": sorted(s.models),
            "idle_s": round(now - s.last_active, 3),
            "paused_bytes": engine.runs.paused_bytes(s.sid),
            "runs": engine.runs.describe(s.sid, now) if s.client_id == client_id else {},
            "quota": quotas.stats(engine, s, s.client_id == client_id),
            "decode": dict(s.decode, eager_why=s.eager_why) if s.client_id == client_id else None,
        }
        for s in engine.sessions
    }
    models = {
        m.model_id: {"architecture": m.arch, "bytes": m.nbytes, "sessions": sorted(m.refs),
                     **({"streaming": m.streamed.stats()} if m.streamed is not None else {}),
                     **({"fast_decode": m.fast.stats()} if m.fast is not None else {}),
                     # fast: its generates decode in the batched step (the one STEP for every architecture)
                     # unless a call's own arguments say otherwise; eager: none has yet (eager_why says why)
                     "decode": {"path": "eager" if m.fast is None else "fast",
                                "step": "hf-generate" if m.fast is None else STEP, "eager_why": m.eager_why},
                     **({"kv_pool": engine.data.pools[m.model_id].plan.as_dict()}
                        if m.model_id in engine.data.pools else {})}
        for m in engine.models
    }
    text_bytes, host_bytes = streaming.segment_bytes(engine.text, engine.models)
    data = sum(v["gpu_bytes"] for v in sessions.values())
    swapped = sum(v["host_bytes"] for v in sessions.values())
    device_memory, workspace = memory.device_memory(engine)
    return {
        "device": str(engine.device),
        "device_memory": device_memory,
        # Stack is `stack` (paused runs' activations, charged to their sessions) plus `workspace` (the
        # steps' own: Note [Device memory agrees]); `data_outside_pools`: Data not in a KV pool.
        "segments": {"text": text_bytes, "data": data, "stack": engine.runs.stack_bytes(), "host": host_bytes + swapped,
                     "uploads_in_flight": engine.uploads.nbytes,
                     "kv_pools": sum(p.nbytes for p in engine.data.pools.values()),
                     "data_outside_pools": engine.data.outside_pools(),
                     "workspace": sum(workspace.values()), "workspace_parts": workspace},
        "kv": engine.data.kv_summary(),
        "scheduler": {"policy": engine.policy.name, "queued": engine.dispatch.queue_length(),
                      "decisions": engine.dispatch.decisions, **engine.data.summary(),
                      "prefill": {"step_tokens": engine.dispatch.prefill.per_turn,
                                  "chunks": engine.dispatch.prefill.chunks, "turns": engine.dispatch.prefill.turns}},
        "quotas": vars(engine.dispatch.quotas).copy(),
        # Note [One ledger]: the caller's own principal's use and caps, and the server-wide ones.
        "principal": _principal_stats(engine, engine.router.principal(client_id) or ""),
        "text_entries": len(engine.text),
        "sessions": sessions,
        "models": models,
        "requests_served": engine.requests_served,
    }


def _principal_stats(engine, principal: str) -> dict:
    """The ledger's caps and the GPU quota of the caller's own principal (Note [Principal GPU quota])."""
    return {**engine.ledger.stats(principal), "gpu_bytes": quotas.principal_stats(engine, principal)}
