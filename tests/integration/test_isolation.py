"""Tier 2: isolation between clients and between sessions of one client (issue 8), against a real server.

A victim client holds a session with everything a handle can name: a tensor (a forward's logits), a
KV cache, a paused run with its stop tensors, and a model only it has. An intruder (another
Connection, i.e. another client id) and a second session of the victim's own client send raw requests
through `conn.transport.call` with the victim's ids. Every one must fail with a typed error
(SessionNotFound / HandleNotFound / InvalidRequest), answered exactly as for an id that never existed,
with no data in the reply, and the victim's state must be untouched afterwards: its tensors read back
bitwise, its run resumes from the same stop, its KV continues bitwise.
"""
from __future__ import annotations

import gc
import re
import secrets
import time

import pytest
import torch

import djinn
from djinn.frontend.connection import Connection
from djinn.frontend.remote import RemoteModel
from djinn.protocol import structure
from djinn.protocol.errors import HandleNotFound, InvalidRequest, SessionNotFound

from ..models import tiny_llama
from .test_sessions import LocalSession

IDS = torch.tensor([[1, 17, 42, 99, 5, 250, 7, 64]])
P2 = torch.tensor([[33, 8, 190]])
GEN = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def shared_model(device):
    return tiny_llama(seed=0, device=device)


@pytest.fixture(scope="module")
def private_model(device):
    return tiny_llama(seed=11, device=device)  # only the victim remotes these weights


class Victim:
    """A client with one session holding a tensor, a KV cache, a paused run, and a private model."""

    def __init__(self, address: str, shared_model, private_model, device):
        self.conn = Connection(address, secret=None)
        self.s = self.conn.session("victim")
        self.rm = RemoteModel.from_module(self.s, shared_model)
        self.private = RemoteModel.from_module(self.s, private_model)
        self.out = self.rm(IDS)                                   # a tensor handle in the session
        with torch.no_grad():
            self.ref_logits = shared_model(IDS.to(device)).logits.cpu()
        self.local = LocalSession(shared_model, device)
        assert torch.equal(self.s.generate(self.rm, IDS, **GEN), self.local.generate(IDS, **GEN))
        self.run = self.s.start(self.rm, IDS, breakpoints=[0, 1])
        self.stop = self.run.wait()                               # paused: stop tensors are handles
        self.ref_stop = self.stop.activation.cpu()

    @property
    def hid(self) -> str:
        return self.out.logits.hid

    @property
    def stop_hid(self) -> str:
        return self.stop.activation.hid

    def snapshot(self) -> dict:
        st = self.conn.stats()["sessions"][self.s.sid]
        return {k: st[k] for k in ("tensors", "kv_tokens", "models", "paused", "gpu_bytes", "paused_bytes")}

    def check_untouched(self, before: dict) -> None:
        assert self.snapshot() == before
        assert torch.equal(self.out.logits.cpu(), self.ref_logits)
        assert torch.equal(self.stop.activation.cpu(), self.ref_stop)
        assert self.run.state == "paused" and self.stop.live

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def victim(server, shared_model, private_model, device):
    v = Victim(server.address, shared_model, private_model, device)
    yield v
    v.close()


@pytest.fixture
def intruder(server, shared_model):
    """Another client, with a session of its own that holds the shared model (same weights, same id)."""
    c = Connection(server.address, secret=None)
    c.own = c.session("intruder")
    c.rm = RemoteModel.from_module(c.own, shared_model)
    yield c
    c.close()


def _pass(obj):
    return NotImplemented


def refused(conn: Connection, op: str, args: dict, err: type) -> str:
    """The call fails with exactly `err`; returns its message (no result, hence no data, came back)."""
    with pytest.raises(djinn.DjinnError) as info:
        conn.transport.call(op, args)
    assert type(info.value) is err, (op, info.value)
    return info.value.message


def same_as_unknown(msg_foreign: str, msg_unknown: str, foreign: str, unknown: str) -> None:
    """A foreign id is answered exactly like an id that never existed (nothing to learn from the text)."""
    assert msg_foreign.replace(foreign, "ID") == msg_unknown.replace(unknown, "ID")


# -- ids ------------------------------------------------------------------------------------------
def test_ids_are_unguessable(victim):
    """Session, tensor, stop and run ids are random hex of at least 64 bits, all distinct."""
    v = victim
    more = [v.rm(IDS).logits for _ in range(3)]
    run2 = v.s.start(v.rm, IDS, breakpoints=[1])
    stop2 = run2.wait()
    ids = {"session": [v.s.sid, v.conn.session().sid], "tensor": [v.hid, *(t.hid for t in more)],
           "stop": [v.stop_hid, stop2.activation.hid], "run": [v.run.run_id, run2.run_id]}
    for kind, values in ids.items():
        for x in values:
            assert re.fullmatch(r"[0-9a-f]+", x) and len(x) * 4 >= 64, (kind, x)
    flat = [x for values in ids.values() for x in values]
    assert len(set(flat)) == len(flat)
    run2.cancel()


# -- another client ---------------------------------------------------------------------------------
def test_other_client_cannot_use_the_session(victim, intruder):
    v, sid = victim, victim.s.sid
    before = v.snapshot()
    unknown = secrets.token_hex(12)
    edit = [{"h": v.stop_hid, "i": [], "op": "add", "v": 1.0}]
    ops = [
        ("forward", {"model_id": v.rm.model_id, "args": [IDS], "kwargs": {"$d": {}}}),
        ("generate", {"model_id": v.rm.model_id, "input_ids": IDS, "use_session_kv": True,
                      "kwargs": structure.pack(GEN, _pass)}),
        ("fetch", {"handles": [v.hid]}),
        ("fetch", {"handles": [v.stop_hid], "edits": edit}),
        ("free", {"handles": [v.hid, v.stop_hid]}),
        ("edit", {"edits": edit}),
        ("start", {"model_id": v.rm.model_id, "args": [IDS], "kwargs": {"$d": {}}, "breakpoints": [0]}),
        ("resume", {"run": v.run.run_id}),
        ("fork", {"run": v.run.run_id}),
        ("cancel_run", {"run": v.run.run_id}),
        ("reset_kv", {"model_id": v.rm.model_id}),
        ("release_model", {"model_id": v.private.model_id}),
        ("attach_model", {"model_id": v.private.model_id}),
        ("has_weights", {"hashes": []}),
        ("register_model", {"tensors": {}}),
        ("signal", {"kind": "IO_WAIT", "eta_s": 5.0}),
        ("close_session", {}),
    ]
    for op, args in ops:
        msg = refused(intruder, op, dict(args, sid=sid), SessionNotFound)
        same_as_unknown(msg, refused(intruder, op, dict(args, sid=unknown), SessionNotFound), sid, unknown)
    v.check_untouched(before)
    assert v.conn.stats()["sessions"][sid]["state"] == "ACTIVE"  # the IO_WAIT signal did not land
    # The victim's session goes on: its run resumes from the same stop, its KV continues bitwise.
    assert v.run.resume() is not None and v.run.resume() is None
    assert torch.equal(v.run.output.logits.cpu(), v.ref_logits)
    assert torch.equal(v.s.generate(v.rm, P2, **GEN), v.local.generate(P2, **GEN))


def test_other_client_cannot_use_handles_runs_or_models(victim, intruder):
    v, own = victim, intruder.own.sid
    before = v.snapshot()
    fake_h, fake_run = secrets.token_hex(8), secrets.token_hex(12)
    # tensors: the victim's logits and its paused stop, read, used as input, edited, or edited from
    for hid in (v.hid, v.stop_hid):
        msg = refused(intruder, "fetch", {"sid": own, "handles": [hid]}, HandleNotFound)
        same_as_unknown(msg, refused(intruder, "fetch", {"sid": own, "handles": [fake_h]}, HandleNotFound), hid, fake_h)
        refused(intruder, "fetch", {"sid": own, "handles": [hid], "indices": [[[0, 1, None]]]}, HandleNotFound)
        refused(intruder, "forward", {"sid": own, "model_id": intruder.rm.model_id, "args": [{"$h": hid}],
                                      "kwargs": {"$d": {}}}, HandleNotFound)
        refused(intruder, "generate", {"sid": own, "model_id": intruder.rm.model_id, "input_ids": {"$h": hid},
                                       "kwargs": structure.pack(GEN, _pass)}, HandleNotFound)
        refused(intruder, "start", {"sid": own, "model_id": intruder.rm.model_id, "args": [{"$h": hid}],
                                    "kwargs": {"$d": {}}, "breakpoints": [0]}, HandleNotFound)
        refused(intruder, "edit", {"sid": own, "edits": [{"h": hid, "i": [], "op": "mul", "v": 0.0}]}, HandleNotFound)
        mine = intruder.rm(IDS, session=intruder.own).logits  # a tensor of its own, edited from the victim's
        refused(intruder, "edit", {"sid": own, "edits": [{"h": mine.hid, "i": [], "op": "copy",
                                                          "v": {"h": hid, "i": []}}]}, HandleNotFound)
        # a free of a foreign handle is a no-op in the caller's own session
        assert intruder.transport.call("free", {"sid": own, "handles": [hid]}) == {}
    # runs: the victim's paused run, from the intruder's own session
    for op in ("resume", "fork", "cancel_run"):
        msg = refused(intruder, op, {"sid": own, "run": v.run.run_id}, InvalidRequest)
        same_as_unknown(msg, refused(intruder, op, {"sid": own, "run": fake_run}, InvalidRequest),
                        v.run.run_id, fake_run)
    # models: one only the victim holds
    mid = v.private.model_id
    refused(intruder, "attach_model", {"sid": own, "model_id": mid}, InvalidRequest)
    refused(intruder, "forward", {"sid": own, "model_id": mid, "args": [IDS], "kwargs": {"$d": {}}}, InvalidRequest)
    refused(intruder, "generate", {"sid": own, "model_id": mid, "input_ids": IDS, "use_session_kv": True,
                                   "kwargs": structure.pack(GEN, _pass)}, InvalidRequest)
    refused(intruder, "start", {"sid": own, "model_id": mid, "args": [IDS], "kwargs": {"$d": {}},
                                "breakpoints": [0]}, InvalidRequest)
    refused(intruder, "attach_model", {"sid": own, "model_id": ["not", "a", "string"]}, InvalidRequest)
    assert intruder.transport.call("release_model", {"sid": own, "model_id": mid}) == {}  # not its own: no-op
    assert intruder.transport.call("reset_kv", {"sid": own, "model_id": v.rm.model_id}) == {}  # its own cache
    # The intruder's stats show the victim's session without its name, runs or job.
    theirs = intruder.stats()["sessions"][v.s.sid]
    assert (theirs["mine"], theirs["name"], theirs["runs"], theirs["job"]) == (False, None, {}, None)
    assert theirs["quota"]["queued_requests"]["used"] is None
    v.check_untouched(before)
    assert mid in v.conn.stats()["models"] and v.private(IDS).logits.shape == (1, IDS.shape[1], 256)
    assert torch.equal(v.s.generate(v.rm, P2, **GEN), v.local.generate(P2, **GEN))


def test_foreign_request_does_not_wait_behind_the_sessions_job(victim, intruder):
    """A request naming another client's busy session is refused at once, not queued behind its job
    (where it would wait, learn that the session is busy, and count against its queue)."""
    v = victim
    from .test_scheduling import submit_generate

    fut = submit_generate(v.s, v.rm, P2, max_new_tokens=200, do_sample=False, pad_token_id=0)
    deadline = time.monotonic() + 10
    while v.conn.stats()["sessions"][v.s.sid]["job"] is None and time.monotonic() < deadline:
        time.sleep(0.002)
    for op, args in [("fetch", {"handles": [v.hid]}), ("reset_kv", {"model_id": v.rm.model_id}),
                     ("close_session", {})]:
        refused(intruder, op, dict(args, sid=v.s.sid), SessionNotFound)
    still = v.conn.stats()["sessions"][v.s.sid]["job"]
    assert still is not None and "running_s" in still, still  # answered while the job still ran
    ref = v.local.generate(P2, max_new_tokens=200, do_sample=False, pad_token_id=0)
    assert torch.equal(fut.result(timeout=120)["sequences"], ref)


# -- another session of the same client --------------------------------------------------------------
def test_second_session_of_the_same_client(victim, shared_model, device):
    v = victim
    before = v.snapshot()
    s2 = v.conn.session("sibling")
    fake_run = secrets.token_hex(12)
    rm2 = RemoteModel.from_module(s2, shared_model)  # same weights: the same model, attached to s2
    assert rm2.model_id == v.rm.model_id
    for hid in (v.hid, v.stop_hid):
        refused(v.conn, "fetch", {"sid": s2.sid, "handles": [hid]}, HandleNotFound)
        refused(v.conn, "forward", {"sid": s2.sid, "model_id": rm2.model_id, "args": [{"$h": hid}],
                                    "kwargs": {"$d": {}}}, HandleNotFound)
        refused(v.conn, "edit", {"sid": s2.sid, "edits": [{"h": hid, "i": [], "op": "add", "v": 1.0}]},
                HandleNotFound)
        assert v.conn.transport.call("free", {"sid": s2.sid, "handles": [hid]}) == {}
    for op in ("resume", "fork", "cancel_run"):
        msg = refused(v.conn, op, {"sid": s2.sid, "run": v.run.run_id}, InvalidRequest)
        same_as_unknown(msg, refused(v.conn, op, {"sid": s2.sid, "run": fake_run}, InvalidRequest),
                        v.run.run_id, fake_run)
    # The same client may attach a model it holds in another of its sessions.
    assert v.conn.transport.call("attach_model", {"sid": s2.sid, "model_id": v.private.model_id}) == {}
    assert torch.equal(v.private(IDS, session=s2).logits.cpu(), v.private(IDS).logits.cpu())
    del before["tensors"], before["gpu_bytes"]  # the victim session made one more forward just now
    after = v.snapshot()
    assert {k: after[k] for k in before} == before
    assert torch.equal(v.out.logits.cpu(), v.ref_logits)
    assert torch.equal(v.stop.activation.cpu(), v.ref_stop)
    # The sibling's KV is its own: it starts from scratch; the victim's continues.
    assert torch.equal(s2.generate(rm2, P2, **GEN), LocalSession(shared_model, device).generate(P2, **GEN))
    assert torch.equal(v.s.generate(v.rm, P2, **GEN), v.local.generate(P2, **GEN))
    assert v.run.resume() is not None
    s2.close()
    gc.collect()
