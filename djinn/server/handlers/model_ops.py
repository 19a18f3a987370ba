"""The weight and model ops: which weights the server lacks (has_weights), uploads, registering a
model over uploaded weights, loading one from the server's disk, attaching one a client already holds
and releasing it. The helpers here attach a model to a session; init_ops, graph_ops and fork use them."""
from __future__ import annotations

from ...protocol.errors import InvalidRequest
from ..cluster import tensor_parallel
from ..models import streaming
from .args import model_id_of, str_list
from .registry import op


@op
def has_weights(engine, client_id, rid, args):
    """Which of these hashes the server lacks. Present ones are pinned to the session until registration."""
    s = engine.session(client_id, args)
    hashes = str_list(args.get("hashes"), "hashes")
    missing = []
    for h in hashes:
        if h in engine.text:
            if h not in s.text_pins:
                engine.text.acquire(h)
                s.text_pins.add(h)
        else:
            missing.append(h)
    return {"missing": missing}


@op
def upload(engine, client_id, rid, args):
    s = engine.session(client_id, args)
    items = args.get("items")
    if not isinstance(items, list):
        raise InvalidRequest("upload needs a list of items")
    done = 0
    # A model with a GPU weight budget stages its uploads on the host (DESIGN.md section 10).
    residency = streaming.upload_residency(engine.device, args.get("stage"), engine.cfg.weight_budget_gb)
    for item in items:
        if not isinstance(item, dict):
            raise InvalidRequest("upload items must be maps")
        finished = engine.uploads.put(s.sid, item, host=residency != "device", owner=s.principal)
        if finished is None:
            continue
        h, tensor = finished
        if h in s.text_pins:
            continue  # the same bytes sent twice by one session: keep the one pin it has
        engine.text.add(h, tensor, residency)
        s.text_pins.add(h)
        done += 1
    return {"stored": done}


@op
def register_model(engine, client_id, rid, args):
    s = engine.session(client_id, args)
    tensors = pinned_tensors(s, args, "register_model")
    budget = streaming.budget_bytes(args.get("weight_budget_gb"), engine.cfg.weight_budget_gb)
    entry, created = engine.models.register(args.get("arch"), args.get("config"), args.get("attn_impl"),
                                            tensors, args.get("generation_config"), budget, tp_of(s, args))
    adopt(engine, s, entry, tensors)
    return model_info(entry, created)


@op
def load_model(engine, client_id, rid, args):
    s = engine.session(client_id, args)
    path = args.get("path")
    if not isinstance(path, str):
        raise InvalidRequest("load_model needs a path string")
    budget = streaming.budget_bytes(args.get("weight_budget_gb"), engine.cfg.weight_budget_gb)
    entry, created = engine.models.load_dir(path, engine.cfg.model_roots, engine.loopback, budget, tp_of(s, args))
    attach(engine, s, entry)
    return dict(model_info(entry, created), config=entry.config)


@op
def attach_model(engine, client_id, rid, args):
    """Use a model this client already holds in another of its sessions (no upload, no rebuild)."""
    s = engine.session(client_id, args)
    mid = model_id_of(args)
    # A front vouches for a model this client holds on another worker, which it copied here first
    # (Note [Models between workers] in djinn/server/cluster/migrate.py).
    vouched = engine.meta.get("held_elsewhere") == mid and mid in {m.model_id for m in engine.models}
    if not vouched and not any(mid in other.models for other in engine.sessions.of_client(client_id)):
        raise InvalidRequest(f"model {mid!r} is not held by any session of this client; remote it again")
    attach(engine, s, engine.models.get(mid))
    return {}


@op
def release_model(engine, client_id, rid, args):
    s = engine.session(client_id, args)
    mid = model_id_of(args)
    if mid in s.models:
        engine.data.detach_kv(s, mid)
        s.restored_kv.pop(mid, None)
        s.models.discard(mid)
        engine.release_model(mid, s.sid)
    return {}


def tp_of(s, args: dict) -> int | None:
    """A register op's `tp`: only a session spanning that many workers shards a model
    (Note [Tensor-parallel sessions] in djinn/server/cluster/tensor_parallel.py)."""
    tp = tensor_parallel.check(args.get("tp"))
    if tp is not None and tp != s.tp:
        raise InvalidRequest(f"tp={tp!r} needs a session spanning that many workers: open it with "
                             f"conn.session(tp={tp}) (or djinn.remote(model, tp={tp}))")
    return tp


def attach(engine, s, entry) -> None:
    engine.models.acquire(entry, s.sid)
    s.models.add(entry.model_id)


def pinned_tensors(s, args: dict, op_name: str) -> dict:
    """The {name: weight hash} map of a register op, each hash announced or uploaded by this session."""
    tensors = args.get("tensors")
    if not isinstance(tensors, dict) or not all(isinstance(v, str) for v in tensors.values()):
        raise InvalidRequest(f"{op_name} needs tensors: {{name: hash}}")
    unpinned = sorted(set(tensors.values()) - s.text_pins)
    if unpinned:
        raise InvalidRequest(f"{len(unpinned)} weights were not announced or uploaded by this session")
    return tensors


def adopt(engine, s, entry, tensors: dict) -> None:
    """Attach a just-registered model to the session; the model now holds the weights the session
    had pinned for it, so the session's pins are let go."""
    attach(engine, s, entry)
    for h in set(tensors.values()):
        s.text_pins.discard(h)
        engine.text.release(h)


def model_info(entry, created: bool) -> dict:
    return {"model_id": entry.model_id, "arch": entry.arch, "bytes": entry.nbytes, "created": created}
