"""Forking a session: a new session with the parent's KV, shared block by block (DESIGN.md section 3).

Note [Session fork]
    `fork_session` opens a session for the same client that holds what the parent holds: its models,
    a copy of its named tensors (same handles), its declared KV budget, and per model a block table
    that shares every written block of the parent's (`KVPool.fork`: ref counts, nothing copied) with
    the same token ids. Whichever session next writes into a shared block copies that block first
    (`KVPool.ensure_private`), so parent and child continue independently, each bitwise as if it
    alone held the KV, and the fork costs no KV memory until one of them writes (then one block per
    block written). The session accounting charges each session its blocks, shared or not (a
    scheduler that swaps one of them out frees only what no other table holds; erring that way never
    over-admits). A parent whose KV is away (swapped to host or moving) is brought back first: the
    fork is then a job of the parent's session, scheduled like a generate that needs its KV on the
    device, which takes no step. Paused breakpoint runs are not part of a session fork (`stop.fork()`
    forks a run). A tensor-parallel session forks on every worker of its block (the front names the
    child and relays the fork to each): each worker's child shares that worker's share of the heads.
"""
from __future__ import annotations

import logging
import time

from ...protocol.errors import InvalidRequest
from ...protocol.tensors import dtype_name
from ...vmu.data import aligned
from .. import quotas
from ..dispatch import Job
from ..execution.paged_cache import PagedCache
from ..execution.tasks import InstantTask
from ..sessions import KVState, Session
from .model_ops import attach
from .registry import op

log = logging.getLogger("djinn.fork")


@op
def fork_session(engine, client_id, rid, args):
    """{sid, name?}: a new session sharing the parent's KV blocks (Note [Session fork])."""
    parent = engine.session(client_id, args)
    name = args.get("name")
    if name is not None and (not isinstance(name, str) or len(name) > 200):
        raise InvalidRequest("session name must be a string of at most 200 characters")
    if not engine.data.away(parent):
        return _fork(engine, parent, name)
    job = Job(parent, next(iter(parent.kv), ""), engine.data.kv_bytes_home(parent), None, None, engine.device)
    job.make_task = lambda: InstantTask(lambda: _fork(engine, parent, name))
    return job


def _fork(engine, parent: Session, name: str | None) -> dict:
    t0 = time.perf_counter()
    nbytes = _fork_bytes(engine, parent)  # Note [Principal GPU quota]: checked before anything is shared or copied
    quotas.check_principal(engine, parent.principal, nbytes, "fork_session",
                           f"{nbytes} bytes of KV blocks and tensor copies for the fork")
    child = engine.sessions.open(parent.client_id, name, parent.principal, sid=engine.meta.get("new_sid"))
    try:
        child.max_kv_tokens = parent.max_kv_tokens
        child.tp = parent.tp  # a tensor-parallel parent's child spans the same workers, each its share
        for mid in parent.models:
            attach(engine, child, engine.models.get(mid))
        for hid, t in parent.tensors.items():
            child.tensors[hid] = t.clone()
        child.restored_kv = dict(parent.restored_kv)
        shared = 0
        for mid, kv in parent.kv.items():
            pool = engine.data.pools[mid]
            table = pool.fork(kv.table)
            shared += table.blocks
            engine.data.attach_kv(child, mid, KVState(PagedCache(pool, table), kv.ids.clone()))
    except BaseException:
        engine.close_session(child, "fork failed")
        raise
    engine.data.sync(child)  # its tensors, charged by the first attach_kv or, holding no KV, here
    ms = (time.perf_counter() - t0) * 1e3
    log.info("session %s forked from %s: %d KV blocks shared, %.3f ms", child.sid[:8], parent.sid[:8], shared, ms)
    return {"sid": child.sid, "name": name, "kv_tokens": {mid: int(kv.ids.shape[1]) for mid, kv in child.kv.items()},
            "shared_blocks": shared, "fork_ms": round(ms, 4),
            "tensors": {hid: {"dtype": dtype_name(t.dtype), "shape": list(t.shape)} for hid, t in child.tensors.items()}}


def _fork_bytes(engine, parent: Session) -> int:
    """Device bytes the fork will be charged: every block of its tables, shared or not (Note [Session
    fork]), and a copy of each of the parent's tensors."""
    kv = 0
    for mid, state in parent.kv.items():
        pool = engine.data.pools[mid]
        kv += len(state.table.rows) * pool.blocks_for(state.table.length) * pool.block_bytes
    return kv + sum(aligned(t.numel() * t.element_size()) for t in parent.tensors.values())
