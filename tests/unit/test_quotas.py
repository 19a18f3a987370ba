"""Tier 1: the per-principal GPU quota (Note [Principal GPU quota] in djinn/server/quotas.py), with exact
bytes. All sessions of a principal, whatever client ids opened them, share one quota of device bytes,
counted as the per-session quota counts one session (its Data segment: KV blocks, tensors it holds,
graph constants; plus its paused runs' Stack), and a generate admitted but not yet started counts at
the peak it was admitted at. A refusal is QuotaExceeded naming quota_principal_gpu_gb, changes nothing,
and other principals are checked against their own bytes only."""
from __future__ import annotations

import threading

import pytest
import torch

from djinn.config import ServerConfig
from djinn.protocol.errors import QuotaExceeded
from djinn.server import quotas
from djinn.server.dispatch import Job
from djinn.server.engine import Engine

ALICE, BOB = "curve:" + "a" * 40, "curve:" + "b" * 40
CPU = torch.device("cpu")
LIMIT = 8192


def engine(**settings) -> Engine:
    """An engine that is never started: its tables, Data segment and dispatcher, as ops see them."""
    return Engine(None, ServerConfig(**settings).validate(), CPU, threading.Event())


def hold(e: Engine, s, handle: str, nbytes: int) -> None:
    """The session holds a tensor of `nbytes` (a multiple of 512: no alignment rounding)."""
    s.tensors[handle] = torch.zeros(nbytes, dtype=torch.uint8)
    e.data.sync(s)


@pytest.fixture
def eng() -> Engine:
    return engine(quota_principal_gpu_gb=LIMIT / 2**30)  # exact: int(gb * 2**30) gives LIMIT back


def test_the_quota_comes_from_the_config_and_is_validated():
    assert ServerConfig().quota_principal_gpu_gb is None
    assert engine().dispatch.quotas.principal_gpu_bytes is None
    assert engine(quota_principal_gpu_gb=0.5).dispatch.quotas.principal_gpu_bytes == 1 << 29
    for bad in (-1, "1", True):
        with pytest.raises(ValueError, match=rf"^quota_principal_gpu_gb={bad!r} must be a number of GiB >= 0"):
            ServerConfig(quota_principal_gpu_gb=bad).validate()


def test_all_sessions_of_a_principal_share_its_quota(eng):
    a1, a2 = eng.sessions.open("alice-1", None, ALICE), eng.sessions.open("alice-2", None, ALICE)
    b = eng.sessions.open("bob", None, BOB)
    hold(eng, a1, "x", 4096)
    hold(eng, a2, "y", 2048)
    assert quotas.principal_used(eng, ALICE) == 6144 and quotas.principal_used(eng, BOB) == 0
    # a2 at a peak of 2048 + 2048: with a1's 4096 exactly the limit, which is allowed.
    quotas.check_gpu(eng, a2, 4096, "generate", "2048 bytes of KV")
    with pytest.raises(QuotaExceeded) as info:
        quotas.check_gpu(eng, a2, 4097, "generate", "2049 bytes of KV")
    assert info.value.message == (
        "generate would take this principal (curve) to 8193 bytes on the device over all its sessions (2049 "
        "bytes of KV), over its GPU quota of 8192 bytes (quota_principal_gpu_gb); free tensors, close sessions "
        "or ask for less")
    # A third session of the same tenant (another client id) is no way around it.
    a3 = eng.sessions.open("alice-3", None, ALICE)
    with pytest.raises(QuotaExceeded, match="quota_principal_gpu_gb"):
        quotas.check_principal(eng, ALICE, 2049, "fork_session", "a copy")
    quotas.check_gpu(eng, a3, 2048, "generate", "2048 bytes of KV")
    # Bob is checked against his own sessions only: his whole quota is his.
    quotas.check_gpu(eng, b, LIMIT, "generate", "all of it")
    with pytest.raises(QuotaExceeded, match=r"to 8193 bytes"):
        quotas.check_gpu(eng, b, LIMIT + 1, "generate", "one more")
    # Freeing makes room again.
    del a1.tensors["x"]
    eng.data.sync(a1)
    quotas.check_gpu(eng, a2, 2048 + 6144, "generate", "the rest")
    assert quotas.principal_stats(eng, ALICE) == {"limit": LIMIT, "used": 2048}


def test_the_session_quota_is_checked_first_and_both_apply():
    e = engine(quota_gpu_gb=4096 / 2**30, quota_principal_gpu_gb=LIMIT / 2**30)
    a1, a2 = e.sessions.open("alice-1", None, ALICE), e.sessions.open("alice-2", None, ALICE)
    hold(e, a1, "x", 4096)
    with pytest.raises(QuotaExceeded, match=r"session .* to 4608 bytes .*\(quota_gpu_gb\)"):
        quotas.check_gpu(e, a2, 4608, "generate", "KV")
    quotas.check_gpu(e, a2, 4096, "generate", "KV")  # within both: 4096 + 4096 = the principal's limit
    hold(e, a2, "y", 4096)
    with pytest.raises(QuotaExceeded, match=r"to 8704 bytes .*\(quota_principal_gpu_gb\)"):
        quotas.check_gpu(e, e.sessions.open("alice-3", None, ALICE), 512, "generate", "KV")


def test_an_admitted_generate_counts_at_its_peak_before_it_reserves(eng):
    """A queued generate has reserved no KV blocks yet; it counts at the peak it was admitted at, so two
    sessions cannot both be admitted against bytes the other has not reserved yet."""
    a1, a2 = eng.sessions.open("alice-1", None, ALICE), eng.sessions.open("alice-2", None, ALICE)
    hold(eng, a1, "x", 1024)
    job = Job(a1, "m", 4096, None, None, CPU, peak=1024 + 4096)
    eng.dispatch.submit(job, None)  # queued: the scheduler has not started it
    assert job.task is None and quotas.gpu_used(eng, a1) == 1024
    assert quotas.committed(eng, a1) == 5120 and quotas.principal_used(eng, ALICE) == 5120
    quotas.check_gpu(eng, a2, 3072, "generate", "KV")  # 5120 + 3072 = 8192
    with pytest.raises(QuotaExceeded, match=r"to 8704 bytes"):
        quotas.check_gpu(eng, a2, 3584, "generate", "KV")
    # What the session holds counts when it is more than the promise.
    hold(eng, a1, "y", 6144)
    assert quotas.committed(eng, a1) == 7168


def test_outputs_over_the_principals_quota_are_freed_and_others_kept(eng):
    a1, a2 = eng.sessions.open("alice-1", None, ALICE), eng.sessions.open("alice-2", None, ALICE)
    b = eng.sessions.open("bob", None, BOB)
    hold(eng, a1, "x", 6144)
    hold(eng, a2, "kept", 1024)
    held = set(a2.tensors)
    hold(eng, a2, "new", 1536)  # an op's outputs: 6144 + 1024 + 1536 = 8704
    err = quotas.over_gpu(eng, a2, held, "forward")
    assert err is not None and err.message == (
        "the outputs of forward would take this principal (curve) to 8704 bytes on the GPU over all its "
        "sessions, over its quota of 8192 bytes (quota_principal_gpu_gb); they were freed. Free tensors you "
        "hold, close sessions, or ask for less")
    assert set(a2.tensors) == {"kept"} and quotas.gpu_used(eng, a2) == 1024
    assert quotas.principal_used(eng, ALICE) == 7168
    held = set(a2.tensors)
    hold(eng, a2, "fits", 1024)  # exactly the limit: kept
    assert quotas.over_gpu(eng, a2, held, "forward") is None and "fits" in a2.tensors
    held = set(b.tensors)
    hold(eng, b, "bobs", LIMIT)  # Bob's outputs are his own
    assert quotas.over_gpu(eng, b, held, "forward") is None


def test_no_quota_checks_nothing():
    e = engine()
    s = e.sessions.open("alice", None, ALICE)
    held = set(s.tensors)
    hold(e, s, "big", 1 << 20)
    quotas.check_gpu(e, s, 1 << 40, "generate", "KV")
    assert quotas.over_gpu(e, s, held, "forward") is None
    assert quotas.principal_stats(e, ALICE) == {"limit": None, "used": 1 << 20}
