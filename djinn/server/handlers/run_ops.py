"""The breakpoint ops (DESIGN.md sections 7 and 10): start, resume, fork, cancel_run, edit.

Registered in the op registry (registry.py) like every other op; they live here to keep ops.py about plain calls. start,
resume and fork reply when the run parks at a breakpoint or ends, with server-side timings.

Note [A run that cannot stop is a generate]
    A breakpoint spec of a generate run whose step is at or past the most forward calls the generate
    can make (`breakpoints.generate_calls`: step 0 is the prefill, then one call per new token, counted
    from the effective arguments as admission counts them) can never fire: it is dropped, and its
    module gets no hook. A generate run left with no spec that can fire (none given, or all dropped;
    a spec with step=None fires in every call) is not a Run at all: `start` makes it the dispatcher
    job a plain stateless generate would be (`ops.generate_job`): the decode fast path where
    `why_eager_of` allows, batched with other sessions' rows, else eager HF generate stepped one decode
    step per engine turn among the other jobs. So the engine never blocks on it (an inline run ran
    its whole generate on the engine thread) and it costs what the generate costs. The start is
    answered when the job ends, with the reply a run that never paused gets: `{run, state:
    "finished", output: sequences, timing}`; `deterministic=True` keeps it on the eager path, as for
    a plain generate (a run that can stop is eager, so bitwise, anyway). Its run id is a tombstone
    ("finished") from then on, so a late resume or cancel_run says it ended. As a job it keeps the job's guarantees: the session's
    later requests wait behind it (Note [Per-session order]), its KV is admitted and reserved like a
    stateless generate's, quotas are the generate's (checked at start; quota_queued_requests counts
    it; it is not a live run, so max_runs_* do not), a closed session fails it with SessionNotFound,
    and stats count it in the session's `decode` (fast/eager) and show it as the session's job (op
    "start"). Like every run it takes and publishes no cached prompt blocks (Note [Prefix sharing]).
    Tokens: those of the same generate without breakpoints on the same server (the same path, the
    same seeded stream), so bitwise a run's on a CPU server, where generate is eager.

Note [The tail of a run]
    A generate run that can stop gains nothing from running eagerly after its last possible stop (the
    largest `step` of its specs): `start` cuts its generate there (`_cut_after`:
    max_new_tokens = step + 1, min_new_tokens no more than that; the call's own kwargs stay in
    `Call.full_kwargs`, so a fork, which executes the same Call, is cut alike). When that generate
    ends without having ended the whole one (not eos, not short: `Run._keep_for_tail`), the run thread
    keeps its scratch KV (`Run.kept`) instead of releasing it, and the start or resume that ended the
    eager part becomes the job of the tail (`_tail_job`, `ops.generate_job(kv=...)`): the remaining
    tokens over the same block table and token ids, as a session's generate continues its KV, on the
    path a plain generate takes (the fast path where `why_eager_of` allows, batched with other
    sessions), answered when it ends with the run's reply (state finished, the whole sequence). The
    run itself is finished and tombstoned when its eager part ends: a resume or cancel_run waits
    behind the job (Note [Per-session order]) and is then told it ended; stats count the tail in the
    session's `decode` and show it as the session's job (op "start" or "resume"). Quotas are the
    tail's generate's (its whole table, checked when it is made; the finished run no longer counts).
    The table is released exactly once: by the run thread when there is no tail (or it failed or was
    cancelled), else by the job's release (end, cancel, closed session), or by `_answer` when the job
    cannot be made. Kept eager to the end (no cut): any spec with step=None, deterministic=True,
    batch > 1, beams or num_return_sequences > 1, an attention_mask (a continued generate takes none),
    an encoder-decoder. Tokens: greedy, the eager run's (bitwise on a CPU server, tested; on a GPU the
    tail's first step is the first forward of a new generate call, which, as for a fork from the KV
    (Note [Fork replays the prefix]), need not be bitwise the eager loop's step); sampled, on
    the eager path the tail draws on from the run's own stream (Note [Random streams]; a seeded run is
    bitwise the eager run on a CPU server, tested); on the fast path from a generator seeded from that
    stream, reproducible for a seed on one server but not the eager tokens (deterministic=True keeps
    those).

Note [The head of a run]
    Symmetrically, the steps before a generate run's first possible stop (the smallest `step` of its
    specs, when it is 1 or more and the run could be cut for a tail: `_in_steps`) cannot stop either.
    Where the fast path takes the run's generate, `start` makes them a generate job (`_between_stops`):
    max_new_tokens = first step, over a scratch table the job hands back when it ends well
    (`generate_job(hand_back=True)`), batched with the other sessions' rows. The job's reply is a
    `dispatch.Then`: once the job has ended, the engine starts the run from that table at its first
    stop's step (`RunTable.start(resume_from=ResumePoint(...))`, the way a fork starts from its
    parent's KV) and answers the start with the run's reply. A head that ends the generate (eos)
    answers as a run that never stopped. So a stop at step 200 costs 200 batched steps, not 200
    eager ones. Forks of such a run fork from its KV even where forks re-execute
    (`run_fork_from_kv: false`): re-executed from the prompt, their first steps would be eager ones.
    Tokens: greedy, the eager run's (on a GPU the step at the stop is the first forward of a new
    generate call, as for a tail); sampled, the head draws from a generator seeded from the call's
    seed (reproducible on one server, not the eager stream; a deterministic=True run is eager
    throughout). Not taken: a spec with step=None (it can stop in every step) and what `_in_steps`
    excludes.

Note [Between stops]
    And so for the steps between two stops: where the fast path takes the generate, a run's eager
    generate is cut after the segment of consecutive stop steps it is in (`_segment_end`: stops at
    steps 4, 5 and 9 make segments 4-5 and 9), not after its last stop. When the segment's generate
    ends without ending the whole one, `_answer` finds the next stop's step: the steps up to it are a
    job like the head's (`_between_stops`, over the run's table, handed back), whose Then starts the
    run again from that table at that step, with the same run id (its tombstone dropped), its hit
    count, and a random stream drawn on past the job's seed, its generate cut after that stop's
    segment; the resume is answered with its next stop (or, past the last, the tail as above). So
    the eager part of a run is its stop steps and nothing else, and each stop sees what the all-eager
    run sees (tested with edits at four stops). Between two segments the run is not in the table
    (stats show the session's job, op "resume"); a cancel_run waits behind the job and cancels the
    run it started. The table goes back once: by the job if it fails or is dropped (a closed
    session), by the run thread, or by the tail's job.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from ...protocol.errors import InvalidRequest
from .. import quotas
from ..execution import executor
from ..dispatch import Then
from ..execution.breakpoints import Call, ResumePoint, eos_ids, generate_calls, parse_breakpoints, reachable
from ..execution.rng import Stream
from ..execution.graph_runs import GraphModule
from ..execution.kv_pools import pool_for as kv_pool_for
from ..execution.validate import check_forward, check_generate
from .args import check_prefill, model_of, require_module, seed_of
from .graph_ops import graph_call
from .ops import generate_job, why_eager_of
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
    seed = seed_of(args, engine.meta)
    specs = parse_breakpoints(entry.module, args.get("breakpoints", []), method)
    kv_pool = None
    if method == "generate":
        check_prefill(engine, call_args[0], "a generate run", entry.module)
        ids = call_args[0]
        prompt = executor.decoder_prompt(entry.module, int(ids.shape[1]))  # Note [Encoder-decoder generate]
        specs = reachable(specs, generate_calls(entry.module, prompt, call_kwargs))
        deterministic = args.get("deterministic", False)  # a run that can stop is eager (so bitwise) anyway
        if not isinstance(deterministic, bool):
            raise InvalidRequest(f"deterministic must be true or false, got {deterministic!r}")
        if entry.tp:  # Note [Tensor-parallel sessions]: run whole on each worker, its KV HF's own
            if not specs:
                raise InvalidRequest("this generate run can never stop: on a tensor-parallel model call "
                                     "generate instead")
            deterministic = True  # no tail job (Note [The tail of a run]): the run ends the call itself
        elif not specs:  # Note [A run that cannot stop is a generate]
            return _generate_job(engine, client_id, rid, s, entry, ids, call_kwargs, seed, deterministic, t0)
    if method == "generate" and not entry.tp:
        kv_pool = kv_pool_for(engine, entry)
        # Its KV blocks are reserved when it starts and held while it is paused (Note [Session quotas]).
        tokens = prompt + executor.new_tokens(entry.module, prompt, call_kwargs)
        grown = kv_pool.bytes_for(tokens, int(ids.shape[0]))
        cross = executor.cross_kv_bytes(entry.module, kv_pool.shape, ids)
        quotas.check_gpu(engine, s, quotas.gpu_used(engine, s) + grown + cross, "a generate run",
                         f"{grown} bytes of KV for {tokens} tokens x batch {int(ids.shape[0])}"
                         + (f", {cross} bytes of cross-attention KV" if cross else ""))
    full = None
    steps = method == "generate" and not deterministic and _in_steps(entry.module, ids, call_kwargs, specs)
    fast = steps and why_eager_of(engine, entry, s, ids, call_kwargs, False, False) is None
    first = min(b.step for b in specs) if steps else 0
    if steps:  # Notes [The tail of a run] and [Between stops]: eager up to its last stop, or its first's segment
        upto = _segment_end(specs, first) if fast else max(b.step for b in specs)
        call_kwargs, full = _cut_after(entry.module, prompt, call_kwargs, upto)
    call = Call(entry.module, method, call_args, call_kwargs, seed, engine.device, kv_pool, full)
    held = set(s.tensors)
    if fast and first >= 1:  # Note [The head of a run]
        from ..sessions import KVState

        return _between_stops(engine, client_id, rid, s, entry, call, specs, KVState.empty(kv_pool, executor.empty_ids(ids)),
                              ids, first, run_id=None, hits=0, rng=None, seed=seed, held=held, t0=t0, t_edits=None,
                              op_name="start")
    run = engine.runs.start(s, entry.model_id, call, specs)
    return _answer(engine, client_id, rid, s, run, held, t0, None, "start")


def _in_steps(module, ids, kwargs: dict, specs) -> bool:
    """Whether a generate run can be cut into steps where no stop can fire (a head before its first
    possible stop, the steps between two stops, a tail after its last): every spec names its step, one
    sequence, no beams, no mask (a continued generate takes none), a decoder-only model."""
    if any(b.step is None for b in specs) or int(ids.shape[0]) != 1 or executor.is_encoder_decoder(module):
        return False
    eff = executor.effective_kwargs(module, kwargs)
    return "attention_mask" not in kwargs and (eff.get("num_beams") or 1) == 1 \
        and (eff.get("num_return_sequences") or 1) == 1


def _segment_end(specs, step: int) -> int:
    """The last of the consecutive stop steps from `step` on (stops at steps 4, 5 and 9: 5 for 4)."""
    steps = {b.step for b in specs}
    while step + 1 in steps:
        step += 1
    return step


def _cut_after(module, prompt: int, kwargs: dict, step: int) -> tuple[dict, dict | None]:
    """The kwargs that end the run's generate right after step `step`, and its own (None, kwargs
    unchanged: the generate ends there anyway, the run is eager to its end)."""
    if step + 1 >= executor.new_tokens(module, prompt, kwargs):
        return kwargs, None
    return _tokens(kwargs, 0, step + 1), kwargs  # step k makes the (k+1)-th token


def _tokens(kwargs: dict, done: int, upto: int) -> dict:
    """The generate's kwargs for its new tokens done + 1 .. upto, `done` of them made before: what is
    left of min_new_tokens, no more than those."""
    out = {k: v for k, v in kwargs.items() if k != "max_length"}
    out["max_new_tokens"] = upto - done
    if kwargs.get("min_new_tokens"):
        out["min_new_tokens"] = min(max(0, int(kwargs["min_new_tokens"]) - done), upto - done)
    return out


def _between_stops(engine, client_id, rid, s, entry, call: Call, specs, state, new_ids: torch.Tensor, upto: int, *,
                   run_id: str | None, hits: int, rng, seed: int | None, held: set, t0: float,
                   t_edits: float | None, op_name: str, log: dict | None = None):
    """Notes [The head of a run] and [Between stops]: the generate's steps from where `state` and
    `new_ids` stand up to step `upto` - 1 as a generate job over the run's table (handed back when it
    ends), and then (dispatch.Then) the run, `run_id` or a new one, from that table at step `upto`,
    its generate cut after that stop's segment. The job owns the table from here on."""
    full = call.full_kwargs if call.full_kwargs is not None else call.kwargs
    prompt = int(call.args[0].shape[1])
    done = int(state.ids.shape[1]) + int(new_ids.shape[1]) - prompt  # tokens generated before this job
    kwargs = _tokens(full, done, upto)  # step k makes the (k+1)-th token: up to step upto - 1
    dev = call.args[0].device
    job = None

    def then(result: dict):
        seq = result["sequences"].to(dev)
        table = state.table
        if int(seq.shape[1]) - prompt < upto or int(seq[0, -1]) in eos_ids(call.module, full):  # the generate ended
            call.kv_pool.release(table)
            return _finished_without_stop(engine, s, run_id or s.new_id(12), seq.cpu(), t0, job)
        assert table.length >= seq.shape[1] - 1, (table.length, seq.shape)
        table.length = int(seq.shape[1]) - 1  # step `upto`'s input is fed by the run
        cut, _ = _cut_after(call.module, prompt, full, _segment_end(specs, upto))
        seg = dataclasses.replace(call, kwargs=cut, full_kwargs=None if cut is full else full)
        run = engine.runs.start(s, entry.model_id, seg, specs, ResumePoint(call.kv_pool, table, seq, upto, hits, rng),
                                run_id=run_id, log=log)
        return _answer(engine, client_id, rid, s, run, held, t0, t_edits, op_name)

    job = generate_job(engine, client_id, rid, s, entry, new_ids, kwargs, seed, use_kv=False, prefix=False,
                       what="a generate run", reply=lambda result: Then(lambda: then(result)), kv=state,
                       hand_back=True, rng=rng.copy() if rng is not None else None)
    job.op = op_name
    return job


def _answer(engine, client_id, rid, s, run, held: set, t0: float, t_edits: float | None, op_name: str):
    """The reply of start or resume: the run's; or, where its cut generate did not end where it was cut,
    the job of the steps to its next stop (Note [Between stops]) or of its tail (Note [The tail of a run])."""
    if run.kept is None:
        return _reply(engine, s, run, held, t0, t_edits)
    kept, run.kept, run.output = run.kept, None, None
    try:
        prompt = int(run.call.args[0].shape[1])
        done = int(kept.ids.shape[1]) - prompt  # the next model call is step `done`
        nxt = min((b.step for b in run.specs if b.step is not None and b.step >= done), default=None)
        if nxt is None:
            return _tail_job(engine, client_id, rid, s, run, kept, t0, t_edits, op_name)
        from ..sessions import KVState

        fed = kept.table.length
        # The job samples from a generator seeded from the run's stream, which goes on past that draw
        g = _generator(run.rng.cpu)
        seed = int(torch.randint(0, 2**62, (1,), generator=g))
        rng = Stream(run.rng.device, g.get_state(), run.rng.cuda)
        entry = engine.models.get(run.model_id)
        return _between_stops(engine, client_id, rid, s, entry, run.call, run.specs,
                              KVState(kept.cache, kept.ids[:, :fed]), kept.ids[:, fed:], nxt, run_id=run.run_id,
                              hits=run.hits, rng=rng, seed=seed, held=held, t0=t0, t_edits=t_edits, op_name=op_name,
                              log=run.log)
    except BaseException:
        kept.cache.pool.release(kept.table)  # the job never took it
        raise


def _tail_job(engine, client_id, rid, s, run, kept, t0: float, t_edits: float | None, op_name: str):
    from ..sessions import KVState

    c = run.call
    entry = engine.models.get(run.model_id)
    prompt = int(c.args[0].shape[1])
    full = c.full_kwargs
    total = executor.new_tokens(c.module, prompt, full)
    ids, fed = kept.ids, kept.table.length
    done = int(ids.shape[1]) - prompt
    kwargs = _tokens(full, done, total)
    state = KVState(kept.cache, ids[:, :fed])
    # The fast path samples from a generator of its own: seeded from the run's stream, so a seeded run's
    # tail is reproducible on one server, though not the eager tokens (deterministic=True keeps those).
    seed = int(torch.randint(0, 2**62, (1,), generator=_generator(run.rng.cpu)))
    t = run.timing
    before = (t["park"] - t["wake"]) if "park" in t and "wake" in t else 0.0
    job = None

    def reply(result: dict) -> dict:
        now = time.perf_counter()
        compute = before + (time.monotonic() - job.t_start if job is not None and job.t_start is not None else 0.0)
        return {"run": run.run_id, "state": "finished", "output": result["sequences"],
                "timing": {"server_us": round((now - t0) * 1e6, 1),
                           "edits_us": round(((t_edits or t0) - t0) * 1e6, 1),
                           "handoff_us": round(((t.get("wake", 0) - t.get("release", 0))
                                                + (t.get("back", 0) - t.get("park", 0))) * 1e6, 1),
                           "compute_us": round(compute * 1e6, 1)}}

    job = generate_job(engine, client_id, rid, s, entry, ids[:, fed:], kwargs, seed, use_kv=False, prefix=False,
                       what="the tail of a generate run", reply=reply, kv=state, rng=run.rng.copy())
    job.op = op_name
    return job


def _generator(state: torch.Tensor) -> torch.Generator:
    g = torch.Generator()
    g.set_state(state.clone())
    return g


def _finished_without_stop(engine, s, run_id: str, sequences: torch.Tensor, t0: float, job) -> dict:
    """The reply of a run whose generate ended as a job, without a stop: finished, tombstoned."""
    engine.runs.tombstone(s, run_id, "finished")
    now = time.perf_counter()
    compute = time.monotonic() - job.t_start if job is not None and job.t_start is not None else 0.0
    return {"run": run_id, "state": "finished", "output": sequences,
            "timing": {"server_us": round((now - t0) * 1e6, 1), "edits_us": 0.0, "handoff_us": 0.0,
                       "compute_us": round(compute * 1e6, 1)}}


def _generate_job(engine, client_id, rid, s, entry, ids, kwargs: dict, seed: int | None, deterministic: bool,
                  t0: float):
    """Note [A run that cannot stop is a generate]: the job, answered as a run that ended without a stop."""
    run_id = s.new_id(12)  # as RunTable.start's
    job = None

    def reply(result: dict) -> dict:
        return _finished_without_stop(engine, s, run_id, result["sequences"], t0, job)

    job = generate_job(engine, client_id, rid, s, entry, ids, kwargs, seed, use_kv=False, prefix=False,
                       deterministic=deterministic, what="a generate run", reply=reply)
    job.op = "start"
    return job


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
    return _answer(engine, client_id, rid, s, run, held, t0, t_edits, "resume")


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
