"""Quotas on device memory: what a session, and all sessions of a principal, hold; the checks every op
makes against them.

Note [Session quotas]
    quota_gpu_gb caps what one session holds on the device, counted one way for every path
    (`gpu_used`): its Data segment (KV blocks, the tensors it holds handles to, the constants of the
    graphs it sent: `engine.data.acct.session(sid)["data"]`) plus the Stack its paused breakpoint runs
    keep (stop tensors and a generate run's KV blocks, each storage once). Weights are shared and never
    count. A request is checked against what the session will hold at its peak, before anything is
    queued or allocated (`check_gpu`):
      generate on the session's KV   what it holds, with this model's KV replaced by the KV the call
                                     reserves (`need`: prompt + new tokens, as the scheduler reserves it)
      stateless generate             what it holds plus the call's scratch KV blocks: they come from the
                                     same pool and are held until the call ends
      a generate breakpoint run      what it holds plus the run's KV blocks (held while it is paused)
      a graph (run_graph, start)     what it holds plus the peak of the graph's intermediates and
                                     outputs, estimated from the SRG's shapes (interpreter.peak_bytes);
                                     a new graph's constants are checked before they are copied in
    A forward (or a finished forward run, or a graph) whose new outputs would pass the quota has them
    freed at once (`over_gpu`). Either way the reply is QuotaExceeded and the session holds what it held
    before. quota_host_gb is the Data segment's (Note [Host quota] in djinn/vmu/data.py);
    quota_queued_requests the dispatcher's (Note [Queue quota and ownership] in djinn/server/dispatch.py).
    `stats` shows each session's limits and use.

Note [Principal GPU quota]
    quota_principal_gpu_gb caps what all sessions of one principal (Note [Principals] in principals.py:
    a Curve key, everyone with the shared secret, or every client of an open loopback server) hold on
    the device together, so a tenant cannot multiply quota_gpu_gb by opening more sessions or client
    ids. It counts the same bytes as the session quota, at the same points: `check_gpu` and `over_gpu`
    check the principal after the session, with the request's session at its peak and every other
    session of the principal at `committed`: what it holds now or, while it has a generate admitted
    (queued or running), the peak that generate was admitted at (`Job.peak`), whichever is more. A
    queued generate reserves its KV blocks only when the scheduler starts it, so without that promise
    several sessions could each pass the check against what the others hold before any of them
    reserved, and together pass the quota (within one session requests run one at a time: Note
    [Per-session order] in dispatch.py). A fork_session or restore_session, which makes the principal
    hold a new session's bytes, is checked before it copies anything (`check_principal`).
    The bytes are read from the Data segment's accounting at each check, not counted a second time in
    the Ledger (Note [One ledger]): KV grows in decode steps and moves with swaps without passing any
    take/give point, and the Data segment already owns those bytes, so a second count could only drift
    from it. A refusal is QuotaExceeded naming quota_principal_gpu_gb; the request changes nothing,
    and other principals are checked against their own sessions only. `stats()["principal"]` shows the
    caller's principal's limit and use.
"""
from __future__ import annotations

from ..protocol.errors import QuotaExceeded
from ..vmu.accounting import DATA, HOST
from .principals import kind_of


def gpu_used(engine, s) -> int:
    """Device bytes the session holds now (Note [Session quotas])."""
    held = {t.untyped_storage().data_ptr() for t in s.tensors.values()}  # a stop may be a handle itself
    return engine.data.acct.session(s.sid)[DATA] + engine.runs.paused_bytes(s.sid, exclude=held)


def committed(engine, s) -> int:
    """Device bytes the session counts for against its principal's quota (Note [Principal GPU quota])."""
    return max(gpu_used(engine, s), engine.dispatch.promised(s.sid))


def principal_used(engine, principal: str, but=None) -> int:
    """Device bytes of all the principal's sessions but `but`, each as `committed` counts it."""
    return sum(committed(engine, t) for t in engine.sessions.of_principal(principal) if t is not but)


def check_gpu(engine, s, peak: int, what: str, detail: str) -> None:
    """Raise QuotaExceeded if the session would hold `peak` bytes on the device, over its GPU quota or,
    with its principal's other sessions, over the principal's (Note [Principal GPU quota])."""
    limit = engine.dispatch.quotas.gpu_bytes
    if limit is not None and peak > limit:
        raise QuotaExceeded(f"{what} would take session {s.sid[:8]} to {peak} bytes on the device ({detail}), "
                            f"over its GPU quota of {limit} bytes (quota_gpu_gb); free tensors, reset the cache "
                            "or ask for less")
    check_principal(engine, s.principal, peak, what, detail, but=s)


def check_principal(engine, principal: str, extra: int, what: str, detail: str, but=None) -> None:
    """Raise QuotaExceeded if the principal's sessions (`but` left out) and `extra` more bytes would pass
    the principal's GPU quota (Note [Principal GPU quota])."""
    limit = engine.dispatch.quotas.principal_gpu_bytes
    if limit is None:
        return
    total = principal_used(engine, principal, but) + extra
    if total > limit:
        raise QuotaExceeded(f"{what} would take this principal ({kind_of(principal)}) to {total} bytes on the "
                            f"device over all its sessions ({detail}), over its GPU quota of {limit} bytes "
                            "(quota_principal_gpu_gb); free tensors, close sessions or ask for less")


def over_gpu(engine, s, held: set, what: str) -> QuotaExceeded | None:
    """After a call added outputs to the session (its tensors were `held` before): if the session is now
    over its GPU quota, or its principal over the principal's, free the new outputs and return the error
    to raise; else None."""
    q = engine.dispatch.quotas
    new = [h for h in s.tensors if h not in held]
    if not new or (q.gpu_bytes is None and q.principal_gpu_bytes is None):
        return None
    err = _over_session(engine, s, what) or _over_principal(engine, s, what)
    if err is None:
        return None
    for h in new:
        del s.tensors[h]
    engine.data.sync(s)
    return err


def _over_session(engine, s, what: str) -> QuotaExceeded | None:
    limit, used = engine.dispatch.quotas.gpu_bytes, gpu_used(engine, s)
    if limit is None or used <= limit:
        return None
    return QuotaExceeded(f"the outputs of {what} would take session {s.sid[:8]} to {used} bytes on the GPU, over "
                         f"its quota of {limit} bytes (quota_gpu_gb); they were freed. Free tensors you hold, "
                         "or ask for less (e.g. fewer positions, no hidden states)")


def _over_principal(engine, s, what: str) -> QuotaExceeded | None:
    limit = engine.dispatch.quotas.principal_gpu_bytes
    if limit is None:
        return None
    total = gpu_used(engine, s) + principal_used(engine, s.principal, but=s)
    if total <= limit:
        return None
    return QuotaExceeded(f"the outputs of {what} would take this principal ({kind_of(s.principal)}) to {total} bytes "
                         f"on the GPU over all its sessions, over its quota of {limit} bytes "
                         "(quota_principal_gpu_gb); they were freed. Free tensors you hold, close sessions, or "
                         "ask for less")


def principal_stats(engine, principal: str) -> dict:
    """`stats()["principal"]["gpu_bytes"]`: the caller's own principal's GPU quota and use."""
    return {"limit": engine.dispatch.quotas.principal_gpu_bytes, "used": principal_used(engine, principal)}


def stats(engine, s, mine: bool) -> dict:
    q = engine.dispatch.quotas
    return {
        "gpu_bytes": {"limit": q.gpu_bytes, "used": gpu_used(engine, s)},
        "host_bytes": {"limit": q.host_bytes, "used": engine.data.acct.session(s.sid)[HOST]},
        "queued_requests": {"limit": q.queued_requests, "used": engine.dispatch.queued(s.sid) if mine else None},
    }
