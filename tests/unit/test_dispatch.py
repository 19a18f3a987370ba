"""Tier 1: the dispatcher on its own, with no engine (djinn/server/dispatch.py): it is given the session
table, the Data segment and its config values, and returns what the engine must do (the replies of jobs
that ended, the requests queued behind them) instead of calling back into the engine."""
from __future__ import annotations

import torch

from djinn.config import ServerConfig
from djinn.protocol.errors import GenerateCancelled, QuotaExceeded, SessionNotFound
from djinn.protocol.messages import Message, MsgType
from djinn.scheduler.policies import policy_from_config
from djinn.server.dispatch import Answer, Dispatcher, Job, Quotas
from djinn.server.router import Request
from djinn.server.sessions import SessionTable
from djinn.vmu.data import DataSegment

CPU = torch.device("cpu")


class Steps:
    """A task that ends after `n` steps with `result`."""

    path = "test"
    error = None
    error_traceback = None

    def __init__(self, n: int, result: dict):
        self.n, self.result, self.steps, self.done = n, result, 0, False

    def advance(self) -> bool:
        self.steps += 1
        self.done = self.steps >= self.n
        return self.done

    def cancel(self) -> None:
        pass


def dispatcher(queued_requests: int | None = None) -> tuple[Dispatcher, SessionTable]:
    sessions = SessionTable()
    data = DataSegment(CPU, 1 << 20, 4e9)
    policy = policy_from_config(ServerConfig())
    return Dispatcher(policy, data, sessions, Quotas(queued_requests=queued_requests), 2048, 4096), sessions


def request(client: str, rid: int, op: str, sid: str) -> Request:
    return Request(client, Message(MsgType.REQUEST, {"rid": rid, "op": op, "args": {"sid": sid}}))


def job(s, steps: int, result: dict) -> Job:
    """A generate without session KV: it starts when submitted, no scheduling needed."""
    return Job(s, "m", 0, None, None, CPU, uses_kv=False, make_task=lambda: Steps(steps, result))


def test_it_holds_no_engine():
    d, _ = dispatcher()
    assert not hasattr(d, "engine")


def test_a_job_s_reply_then_its_session_s_queued_requests_in_order():
    d, sessions = dispatcher()
    s = sessions.open("alice", None)
    gen = request("alice", 1, "generate", s.sid)
    d.submit(job(s, 2, {"sequences": [1, 2]}), gen)
    assert d.busy(s.sid, "alice") and not d.busy(s.sid, "bob")  # another client's request is not queued
    fetch, free = request("alice", 2, "fetch", s.sid), request("alice", 3, "free", s.sid)
    assert d.defer(s.sid, fetch) is None and d.defer(s.sid, free) is None
    assert d.step() == [] and d.next_deferred() is None  # one step: the job still runs
    assert d.step() == [Answer(gen, {"sequences": [1, 2]})]
    assert [d.next_deferred(), d.next_deferred(), d.next_deferred()] == [fetch, free, None]
    assert not d.busy(s.sid, "alice") and not d.active()


def test_serving_a_queued_request_that_is_a_job_stops_the_queue():
    d, sessions = dispatcher()
    s = sessions.open("alice", None)
    first, second, fetch = (request("alice", 1, "generate", s.sid), request("alice", 2, "generate", s.sid),
                            request("alice", 3, "fetch", s.sid))
    d.submit(job(s, 1, {"n": 1}), first)
    d.defer(s.sid, second)
    d.defer(s.sid, fetch)
    assert d.step() == [Answer(first, {"n": 1})]
    assert d.next_deferred() is second
    d.submit(job(s, 1, {"n": 2}), second)  # the engine served it: a job again
    assert d.next_deferred() is None       # the fetch waits behind it
    assert d.step() == [Answer(second, {"n": 2})]
    assert d.next_deferred() is fetch and d.next_deferred() is None


def test_the_queue_quota_refusal_is_returned_not_sent():
    d, sessions = dispatcher(queued_requests=2)
    s = sessions.open("alice", None)
    d.submit(job(s, 5, {}), request("alice", 1, "generate", s.sid))
    assert d.defer(s.sid, request("alice", 2, "fetch", s.sid)) is None
    refused = d.defer(s.sid, request("alice", 3, "fetch", s.sid))
    assert refused.served and isinstance(refused.error, QuotaExceeded) and refused.req.header["rid"] == 3
    assert d.defer(s.sid, request("alice", 4, "free", s.sid)) is None  # a free is never refused


def test_a_closed_session_s_requests_get_session_not_found():
    d, sessions = dispatcher()
    s = sessions.open("alice", None)
    gen, fetch = request("alice", 1, "generate", s.sid), request("alice", 2, "fetch", s.sid)
    d.submit(job(s, 5, {}), gen)
    d.defer(s.sid, fetch)
    answers = d.drop_session(s.sid, "closed by client")
    assert [a.req for a in answers] == [gen, fetch]
    assert all(isinstance(a.error, SessionNotFound) and not a.served for a in answers)
    assert d.running() == 0 and d.drop_session(s.sid, "again") == []


def test_cancelling_a_queued_generate_returns_its_reply():
    d, sessions = dispatcher()
    s = sessions.open("alice", None)
    d.submit(job(s, 5, {}), request("alice", 1, "generate", s.sid))
    queued = request("alice", 2, "generate", s.sid)
    d.defer(s.sid, queued)
    result, answers = d.cancel(s.sid, 2, 0)
    assert result == {"cancelled": True, "kept": 0}
    assert [a.req for a in answers] == [queued] and answers[0].served
    assert isinstance(answers[0].error, GenerateCancelled)
    assert d.cancel(s.sid, 99, 0) == ({"cancelled": False, "kept": 0}, [])
