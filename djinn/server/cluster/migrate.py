"""Moving a session between workers (Note [Migration]); the worker's side of it.

Note [Migration]
    `s.migrate(worker=None)` moves a session that is between requests (idle, waiting on a tool, or
    swapped to the host pool) to another worker; the front picks the one with the most free KV when
    none is named. The front holds the session's requests while it moves and drives four steps:
      1. export (source): the session's state is captured as a checkpoint captures it (token ids, KV
         per layer wherever its blocks are, tensor handles: Note [What a checkpoint holds]), with its
         fields and the recipe of every model it holds (register()'s arguments and the weight hashes);
         the manifest (names, dtypes, shapes) goes back to the front, the tensors wait.
      2. import (destination): says which weight hashes its Text segment lacks, then receives.
      3. send (source): the state and the lacking weights go over the workers' torch.distributed
         group, the state as one flat buffer (one message however many tensors; each piece 64-byte
         aligned), each weight as it is. Over NCCL the state is read from device memory and sent
         from there (GPU to GPU); over gloo it goes through the host.
      4. the destination opens the session under the same id, client and principal, registers its
         models from their recipes (the same model ids: the ids hash the recipe and the weights),
         installs the state as a restored checkpoint's, and says imported. KV that was on the
         source's device goes into this device's blocks at once (if they are short, the import
         fails and the session stays); KV the source had swapped out waits on the host for the
         session's next call, as a restored checkpoint's does; the front points the session at it, tells the
         source to drop its copy and releases the held requests there. Any failure before that leaves
         the session where it was (the source keeps it until told).
    The bytes are the checkpoint's, so the session continues bitwise as if it had not moved. A paused
    breakpoint run moves as a fork of it would be made (Note [Fork replays the prefix]): its call,
    breakpoints, edit log, random stream at its start and a copy of its stop (its handles kept, so the
    client's Stop still reads and edits it); resumed there, it executes its call again, applying the
    logged edits at each stop up to this one, and goes on, bitwise on one kind of device. A run whose
    steps before or between its stops ran batched (Note [Between stops] in handlers/run_ops.py) replays
    them eagerly (its runs' logs carry every stop's edits): greedy, the same tokens; one that samples
    would draw others there and stays, saying so. Not moved:
    a session with a request running or compiled graphs (the client sends them again); those are
    refused with the reason.
    While the tensors move both workers' engine threads wait in the transfer (a stall of the other
    sessions there proportional to the bytes); the front runs one migration at a time.

Note [Models between workers]
    A client that remotes a model in one session and uses it in another (`attach_model`: no upload,
    no rebuild) may find the second session on another worker. The front then copies the model there
    first, as a migration without a session: the worker holding it (one with a session of the same
    client, which is what `attach_model` requires on one worker) exports the model's recipe, the
    destination says which weights it lacks, they cross the group, the destination registers the
    model under the same id, and the front hands it the `attach_model` vouched for ("held_elsewhere").
    Weights never go back to the client or come from it again.
"""
from __future__ import annotations

import itertools
import logging
import time

import torch
import torch.distributed as dist

from ...protocol.errors import InvalidRequest
from ...protocol.tensors import dtype_from_name, dtype_name
from ...vmu.text import DEVICE, HOST
from ..handlers import checkpoint
from ..execution.kv_pools import pool_for as kv_pool_for
from ..handlers.model_ops import adopt
from ..sessions import install_restored
from ...protocol import structure
from ..execution import executor
from ..execution.breakpoints import RunState

log = logging.getLogger("djinn.migrate")

ALIGN = 64


def export(engine, sid: str, client_id: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(manifest, tensors by key) of a session that may move, or a DjinnError saying why not."""
    s = engine.sessions.get(sid, client_id)
    if engine.dispatch.job_state(sid) is not None:
        raise InvalidRequest("a session moves between requests: this one has a request running or queued")
    runs = engine.runs.of_session(sid)
    if any(r.state != RunState.PAUSED for r in runs):
        raise InvalidRequest("a session moves between requests: one of its breakpoint runs is running")
    if any(r.batched and executor.effective_kwargs(r.call.module, r.call.kwargs).get("do_sample") for r in runs):
        # A moved run executes its call again (below); steps that ran batched would be eager steps there,
        # drawing other samples (Note [Between stops] in handlers/run_ops.py).
        raise InvalidRequest("a session whose paused breakpoint run samples and took batched steps does not move; "
                             "cancel the run, or start it with deterministic=True, to move the session")
    if s.tp:
        raise InvalidRequest("a tensor-parallel session is sharded over its block of workers: it does not move")
    if len(s.graphs):
        raise InvalidRequest("a session holding compiled graphs does not move; send them again after moving")
    models = []
    for mid in sorted(s.models):
        entry = engine.models.get(mid)
        if entry.recipe is None:
            raise InvalidRequest(f"model {mid[:12]} was not registered from a recipe (a graph-path model)")
        models.append({"model_id": mid, **entry.recipe, "tensors": entry.hashes})
    # Over NCCL the KV and tensors go from device memory as they are; over gloo through the host.
    state = checkpoint.state(engine.data, s, host=transfer_device(engine).type == "cpu")
    packed_runs = [_pack_run(r, state) for r in runs]
    weights = {h: engine.text.get(h) for m in models for h in m["tensors"].values()}
    manifest = {
        "session": {"sid": s.sid, "client_id": s.client_id, "name": s.name, "principal": s.principal,
                    "max_kv_tokens": s.max_kv_tokens, "checkpoint_token": s.checkpoint_token,
                    "decode": dict(s.decode), "resident": not engine.data.away(s)},
        "models": models, "state": specs(state), "weights": specs(weights), "runs": packed_runs,
    }
    return manifest, {**{f"s/{k}": t for k, t in state.items()}, **{f"w/{h}": t for h, t in weights.items()}}


def specs(tensors: dict[str, torch.Tensor]) -> dict[str, list]:
    return {k: [dtype_name(t.dtype), list(t.shape)] for k, t in tensors.items()}


def lacking(engine, manifest: dict) -> list[str]:
    """The weight hashes this worker's Text segment does not hold."""
    return sorted(h for h in manifest["weights"] if h not in engine.text)


def send(state: list[torch.Tensor], weights: list[torch.Tensor], dst: int, device: torch.device) -> int:
    """To rank `dst`, in order: the state as one flat buffer (one message however many small tensors),
    then each weight as it is (a flat copy of a model's weights would double them); the bytes sent."""
    flat = torch.empty(_layout([(t.dtype, list(t.shape)) for t in state])[1], dtype=torch.uint8, device=device)
    off = 0
    for t in state:
        n = t.numel() * t.element_size()
        flat[off:off + n].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
        off = _aligned(off + n)
    dist.send(flat, dst)
    sent = flat.numel()
    for w in weights:
        w = w.detach().contiguous().to(device)
        dist.send(w, dst)
        sent += w.numel() * w.element_size()
    return sent


def receive(state: list, weights: list, src: int, device: torch.device) -> tuple[list, list]:
    """What `send` sent from rank `src`: the state and weight tensors of the specs ([dtype name,
    shape] each, in order)."""
    parsed = [(dtype_from_name(d), shape) for d, shape in state]
    offsets, total = _layout(parsed)
    flat = torch.empty(total, dtype=torch.uint8, device=device)
    dist.recv(flat, src)
    out = []
    for (dt, shape), off in zip(parsed, offsets):
        n = _numel(shape) * torch.empty((), dtype=dt).element_size()
        out.append(flat[off:off + n].view(dt).reshape(shape).clone())
    ws = []
    for d, shape in weights:
        w = torch.empty(shape, dtype=dtype_from_name(d), device=device)
        dist.recv(w, src)
        ws.append(w)
    return out, ws


def install(engine, manifest: dict, got: dict[str, torch.Tensor]) -> None:
    """Open the moved session here (Note [Migration], step 4), or only register the models of a
    model-only manifest (Note [Models between workers]); a DjinnError leaves nothing behind."""
    info = manifest["session"]
    if info is None:
        for m in manifest["models"]:
            pins = _pin(engine, m, got)
            try:
                _register(engine, m)
            finally:
                for h in pins:  # the model holds its own references now
                    engine.text.release(h)
        return
    s = engine.sessions.open(info["client_id"], info["name"], info["principal"], sid=info["sid"])
    try:
        s.max_kv_tokens, s.checkpoint_token = info["max_kv_tokens"], info["checkpoint_token"]
        s.decode.update(info.get("decode") or {})
        for m in manifest["models"]:
            s.text_pins.update(_pin(engine, m, got))
            adopt(engine, s, _register(engine, m), m["tensors"])
        checkpoint._install(engine, s, {k[2:]: t for k, t in got.items()
                                        if k.startswith("s/") and not k.startswith("s/run/")})
        if info.get("resident"):  # its KV was on the source's device: into this one's blocks now, not
            for mid in list(s.restored_kv):  # at its next call (OutOfMemory here: it stays where it was)
                entry = engine.models.get(mid)
                install_restored(engine, s, entry, kv_pool_for(engine, entry))
        for r in manifest.get("runs") or []:
            _install_run(engine, s, r, {k[2:]: t for k, t in got.items() if k.startswith("s/run/")})
        engine.data.sync(s)
    except BaseException:
        engine.close_session(s, "migration failed")
        raise


def _pack_run(run, tensors: dict[str, torch.Tensor]) -> dict:
    """A paused run as its fork would be made (Note [Fork replays the prefix]): its call, breakpoints,
    edit log and random stream at its start, and a copy of its stop; tensors go into `tensors` (the
    state sent as one buffer) under run/<id>/<n>, named in the values as handle tags."""
    prefix, n = f"run/{run.run_id}", itertools.count()

    def put(t: torch.Tensor) -> dict:
        key = f"{prefix}/{next(n)}"
        tensors[key] = t.detach().cpu().contiguous()
        return {"$h": key}

    def leaf(obj):
        if isinstance(obj, torch.Tensor):
            return put(obj)
        if any(c.__name__ == "Cache" for c in type(obj).__mro__):
            return None
        return NotImplemented

    c, st = run.call, run.stop
    exposed = {i: put(t) for i, t in enumerate(st.tensors)}
    by_id = dict(zip(st.origin, range(len(st.tensors))))

    def out_leaf(obj):  # the module's output, pointing at the stop's exposed tensors
        if isinstance(obj, torch.Tensor):
            return exposed[by_id[id(obj)]] if id(obj) in by_id else None
        return leaf(obj)

    return {
        "run_id": run.run_id, "model_id": run.model_id, "method": c.method, "seed": c.seed,
        "args": structure.pack(c.args, leaf), "kwargs": structure.pack(c.kwargs, leaf),
        "full_kwargs": None if c.full_kwargs is None else structure.pack(c.full_kwargs, leaf),
        "kv_pool": c.kv_pool is not None,
        "specs": [[b.path, b.where, b.step] for b in run.specs],
        "log": [[hit, [[e.position, structure.pack(e.chain, leaf), e.op, structure.pack(e.value, leaf)] for e in es]]
                for hit, es in run.log.items()],
        "rng0": [put(run.rng0.cpu), None if run.rng0.cuda is None else put(run.rng0.cuda)],
        "stop": {"spec": [st.spec.path, st.spec.where, st.spec.step], "step": st.step, "hit": st.hit,
                 "tensors": [exposed[i] for i in range(len(st.tensors))], "readonly": sorted(st.readonly),
                 "outputs": None if st.outputs is None else structure.pack(st.outputs, out_leaf),
                 "hids": list(run.stop_hids)},
    }


def _install_run(engine, s, r: dict, got: dict[str, torch.Tensor]) -> None:
    """The moved run, paused at its stop as a lazy fork is: resumed, it executes its call again,
    applying its logged edits at each stop up to this one (Note [Fork replays the prefix])."""
    from transformers import modeling_outputs

    from ..execution.breakpoints import BreakpointSpec, Call, LoggedEdit, Replay, Run, StopPoint
    from ..execution.rng import Stream

    dev = engine.device

    cache: dict[str, torch.Tensor] = {}

    def tag(name, key):  # one tensor per key: the stop's outputs alias its exposed tensors, as they did
        if key not in cache:
            cache[key] = got[key].to(dev)
        return cache[key]

    def model_output(name, d):
        cls = getattr(modeling_outputs, name, None)
        if cls is None:
            raise InvalidRequest(f"a moved run's output type {name!r} is not a transformers model output")
        return cls(**d)

    def value(v):
        return structure.unpack(v, tag, model_output)

    entry = engine.models.get(r["model_id"])
    call = Call(entry.module, r["method"], value(r["args"]), value(r["kwargs"]), r["seed"], dev,
                kv_pool_for(engine, entry) if r["kv_pool"] else None,
                None if r["full_kwargs"] is None else value(r["full_kwargs"]))
    log = {int(hit): [LoggedEdit(pos, value(chain), op, value(v)) for pos, chain, op, v in es] for hit, es in r["log"]}
    # torch keeps generator states as CPU byte tensors, the CUDA generator's too; over NCCL they came in
    # device memory
    cpu, cuda = (None if x is None else got[x["$h"]].cpu() for x in r["rng0"])
    stream = Stream(dev, cpu, cuda)
    st = r["stop"]
    spec = BreakpointSpec(*st["spec"])
    tensors = [value(t) for t in st["tensors"]]
    outputs = None if st["outputs"] is None else value(st["outputs"])
    snapshot = StopPoint(spec, st["step"], st["hit"], tensors, outputs, tuple(id(t) for t in tensors),
                         frozenset(st["readonly"]))
    run = Run(r["run_id"], s, r["model_id"], call, [BreakpointSpec(*b) for b in r["specs"]],
              Replay(log, st["hit"], stream, spec, st["step"]), resume_from=None, snapshot=snapshot)
    engine.runs.adopt(run, st["hids"])


def _pin(engine, m: dict, got: dict) -> list[str]:
    """One reference on each of the model's weights, received ones stored first (as an upload would)."""
    budget, pins = m.get("weight_budget"), []
    for h in set(m["tensors"].values()):
        if h in engine.text:
            engine.text.acquire(h)
        else:
            t = got[f"w/{h}"]
            engine.text.add(h, t.cpu() if budget is not None else t.to(engine.device), HOST if budget is not None else DEVICE)
        pins.append(h)
    return pins


def _register(engine, m: dict):
    entry, _ = engine.models.register(m["arch"], m["config"], m["attn_impl"], m["tensors"],
                                      m["generation_config"], m.get("weight_budget"))
    if entry.model_id != m["model_id"]:
        raise InvalidRequest(f"model {m['model_id'][:12]} registered here as {entry.model_id[:12]}")
    return entry


def export_model(engine, mid: str, client_id: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """A model-only manifest (Note [Models between workers]): the model must be held by a session of
    the client that asks, here, as `attach_model` requires on one worker."""
    if not any(mid in s.models for s in engine.sessions.of_client(client_id)):
        raise InvalidRequest(f"model {str(mid)[:12]} is not held by any session of this client here")
    entry = engine.models.get(mid)
    if entry.recipe is None:
        raise InvalidRequest(f"model {mid[:12]} was not registered from a recipe (a graph-path model)")
    weights = {h: engine.text.get(h) for h in entry.hashes.values()}
    manifest = {"session": None, "models": [{"model_id": mid, **entry.recipe, "tensors": entry.hashes}],
                "state": {}, "weights": specs(weights)}
    return manifest, {f"w/{h}": t for h, t in weights.items()}


def transfer_device(engine) -> torch.device:
    """Where the flat buffer lives: NCCL sends device memory, gloo host memory."""
    return engine.device if dist.get_backend() == "nccl" else torch.device("cpu")


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _layout(spec) -> tuple[list[int], int]:
    offsets, off = [], 0
    for dt, shape in spec:
        offsets.append(off)
        off = _aligned(off + _numel(shape) * torch.empty((), dtype=dt).element_size())
    return offsets, max(off, 1)


# -- the engine's side of the front's messages (engine thread) -----------------------------------------
CONTROL_OPS = frozenset({"export", "export_model", "import", "send", "drop", "keep"})


def control(engine, op: str, f: dict) -> None:
    """One step of Note [Migration] on this worker; every failure goes back to the front as
    `migrate_failed`, typed, and leaves the session where it was."""
    link, mig = engine.router, f.get("mig")
    pending = link.exports  # mig -> (sid, tensors) until drop or keep
    try:
        if op == "export":
            manifest, tensors = export(engine, f["sid"], f["client"])
            pending[mig] = (f["sid"], tensors)
            link.control("exported", mig=mig, manifest=manifest)
        elif op == "export_model":
            manifest, tensors = export_model(engine, f["model_id"], f["client"])
            pending[mig] = (None, tensors)
            link.control("exported", mig=mig, manifest=manifest)
        elif op == "import":
            manifest = f["manifest"]
            want = lacking(engine, manifest)
            link.control("want", mig=mig, hashes=want)
            t0 = time.perf_counter()
            keys = list(manifest["state"])
            state, weights = receive([manifest["state"][k] for k in keys], [manifest["weights"][h] for h in want],
                                     int(f["src"]), transfer_device(engine))
            got = {**{f"s/{k}": t for k, t in zip(keys, state)}, **{f"w/{h}": w for h, w in zip(want, weights)}}
            install(engine, manifest, got)
            nbytes = sum(t.numel() * t.element_size() for t in got.values())
            link.control("imported", mig=mig, seconds=time.perf_counter() - t0, bytes=nbytes)
        elif op == "send":
            sid, tensors = pending[mig]
            state = [t for k, t in tensors.items() if k.startswith("s/")]
            sent = send(state, [tensors[f"w/{h}"] for h in f["hashes"]], int(f["dst"]), transfer_device(engine))
            link.control("sent", mig=mig, bytes=sent)
        elif op == "drop":
            sid, _ = pending.pop(mig, (None, None))
            s = engine.sessions.find(sid) if sid else None
            if s is not None:
                engine.close_session(s, "moved to another worker")
        elif op == "keep":
            pending.pop(mig, None)
    except Exception as e:
        log.warning("migration %s: %s failed: %s", mig, op, e)
        code = getattr(e, "code", "RemoteExecutionError")
        link.control("migrate_failed", mig=mig, step=op, code=code, message=str(getattr(e, "message", e))[:500])
