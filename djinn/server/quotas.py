"""Per-session quotas on device memory: what a session holds, and the checks every op makes against it.

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
"""
from __future__ import annotations

from ..protocol.errors import QuotaExceeded
from ..vmu.accounting import DATA, HOST


def gpu_used(engine, s) -> int:
    """Device bytes the session holds now (Note [Session quotas])."""
    held = {t.untyped_storage().data_ptr() for t in s.tensors.values()}  # a stop may be a handle itself
    return engine.data.acct.session(s.sid)[DATA] + engine.runs.paused_bytes(s.sid, exclude=held)


def check_gpu(engine, s, peak: int, what: str, detail: str) -> None:
    """Raise QuotaExceeded if the session would hold `peak` bytes on the device, over its GPU quota."""
    limit = engine.dispatch.quotas.gpu_bytes
    if limit is not None and peak > limit:
        raise QuotaExceeded(f"{what} would take session {s.sid[:8]} to {peak} bytes on the device ({detail}), "
                            f"over its GPU quota of {limit} bytes (quota_gpu_gb); free tensors, reset the cache "
                            "or ask for less")


def over_gpu(engine, s, held: set, what: str) -> QuotaExceeded | None:
    """After a call added outputs to the session (its tensors were `held` before): if the session is now
    over its GPU quota, free the new outputs and return the error to raise; else None."""
    limit = engine.dispatch.quotas.gpu_bytes
    if limit is None:
        return None
    used = gpu_used(engine, s)
    new = [h for h in s.tensors if h not in held]
    if used <= limit or not new:
        return None
    for h in new:
        del s.tensors[h]
    engine.data.sync(s)
    return QuotaExceeded(f"the outputs of {what} would take session {s.sid[:8]} to {used} bytes on the GPU, over "
                         f"its quota of {limit} bytes (quota_gpu_gb); they were freed. Free tensors you hold, "
                         "or ask for less (e.g. fewer positions, no hidden states)")


def stats(engine, s, mine: bool) -> dict:
    q = engine.dispatch.quotas
    return {
        "gpu_bytes": {"limit": q.gpu_bytes, "used": gpu_used(engine, s)},
        "host_bytes": {"limit": q.host_bytes, "used": engine.data.acct.session(s.sid)[HOST]},
        "queued_requests": {"limit": q.queued_requests, "used": engine.dispatch.queued(s.sid) if mine else None},
    }
