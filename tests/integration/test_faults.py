"""Tier 2 fault tolerance: clients and servers that die, sessions that are closed or abandoned.

What must hold: a dead client's sessions (and the weights only they used) are reclaimed; a dead
server makes every pending and later call fail fast with ServerUnavailable instead of hanging.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

import djinn
from djinn.config import ClientConfig
from djinn.frontend.connection import Connection
from djinn.frontend.remote import RemoteModel

from ..conftest import DEVICE, ServerProcess
from ..models import VOCAB, tiny_gpt2, tiny_llama

REPO = Path(__file__).resolve().parents[2]
CLIENT_TIMEOUT_S = 2.0


def poll(predicate, timeout_s: float, interval_s: float = 0.05):
    """Call predicate until it returns something truthy; return (value, seconds waited)."""
    t0 = time.monotonic()
    while True:
        value = predicate()
        elapsed = time.monotonic() - t0
        if value or elapsed > timeout_s:
            return value, elapsed
        time.sleep(interval_s)


def ids_for(seed: int, batch: int = 1, tokens: int = 8) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, tokens), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@pytest.fixture(scope="module")
def fault_server():
    """A private server that reclaims a silent client's sessions after CLIENT_TIMEOUT_S."""
    s = ServerProcess("--client-timeout", str(CLIENT_TIMEOUT_S))
    yield s
    s.stop()


@pytest.fixture
def observer(fault_server):
    c = Connection(fault_server.address, secret=None)
    yield c
    c.close()


# -- a client that dies ---------------------------------------------------------------------------
CHILD = textwrap.dedent("""
    import sys, time, torch
    from djinn.frontend.connection import Connection
    from djinn.frontend.remote import RemoteModel
    from tests.models import tiny_llama
    conn = Connection(sys.argv[1], secret=None)
    s = conn.session("doomed")
    rm = RemoteModel.from_module(s, tiny_llama(seed=1101, device=sys.argv[2]))
    out = rm(torch.arange(3, 11).reshape(1, 8).to(sys.argv[2]))   # leaves a tensor in the session
    print("READY", s.sid, rm.model_id, rm.nbytes, flush=True)
    time.sleep(600)
""")


def _read_line(proc: subprocess.Popen, timeout_s: float) -> str:
    box: list[str] = []
    t = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout_s)
    return box[0] if box else ""


def test_killed_client_sessions_are_reclaimed(fault_server, observer):
    before = observer.stats()
    # A live client that stays idle (heartbeats only) through the whole reclaim: it must keep its session.
    quiet = Connection(fault_server.address, secret=None)
    quiet_model = tiny_gpt2(seed=1201, device=DEVICE)
    quiet_session = quiet.session("quiet")
    quiet_rm = RemoteModel.from_module(quiet_session, quiet_model)
    quiet_ids = ids_for(1)
    with torch.no_grad():
        quiet_ref = quiet_model(quiet_ids).logits.cpu()
    quiet_since = time.monotonic()
    with_quiet = observer.stats()

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    child_err = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty child never blocks
    child = subprocess.Popen([sys.executable, "-c", CHILD, fault_server.address, DEVICE], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=child_err, text=True)
    try:
        line = _read_line(child, 120)
        if not line.startswith("READY "):
            child.kill()
            child.wait()
            child_err.seek(0)
            pytest.fail(f"client subprocess did not get ready: {line!r}\n{child_err.read()[-3000:]}")
        _, sid, model_id, nbytes = line.split()
        nbytes = int(nbytes)

        st = observer.stats()
        assert sid in st["sessions"] and model_id in st["models"]
        theirs = st["sessions"][sid]
        assert theirs["mine"] is False and theirs["name"] is None and theirs["tensors"] == 1
        # Its weights are in the Text segment (minus any bytes it shares with the quiet client's model).
        assert with_quiet["segments"]["text"] < st["segments"]["text"] <= with_quiet["segments"]["text"] + nbytes
        data_with_child = st["segments"]["data"]

        child.send_signal(signal.SIGKILL)
        child.wait(10)
        t_kill = time.monotonic()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        child_err.close()

    gone, waited = poll(lambda: sid not in observer.stats()["sessions"], timeout_s=10, interval_s=0.1)
    assert gone, "the killed client's session was never reclaimed"
    assert waited < CLIENT_TIMEOUT_S + 3, f"reclaimed only after {waited:.1f}s"
    st = observer.stats()
    assert model_id not in st["models"]
    assert st["segments"]["text"] == with_quiet["segments"]["text"]  # its weights are freed
    assert st["text_entries"] == with_quiet["text_entries"]
    assert st["segments"]["data"] < data_with_child

    # The quiet client was idle longer than the client timeout, yet heartbeats kept it alive.
    assert time.monotonic() - quiet_since > CLIENT_TIMEOUT_S
    assert quiet_session.sid in st["sessions"] and quiet_rm.model_id in st["models"]
    assert torch.equal(quiet_rm(quiet_ids).logits.cpu(), quiet_ref)
    quiet.close()
    st, _ = poll(lambda: (lambda x: x if quiet_session.sid not in x["sessions"] else None)(observer.stats()), 10)
    assert st["segments"]["text"] == before["segments"]["text"]
    assert st["segments"]["data"] == before["segments"]["data"]
    assert st["text_entries"] == before["text_entries"]
    assert fault_server.alive()


# -- sessions closed by the client -------------------------------------------------------------
def test_closed_session_frees_its_data_and_weights(fault_server, observer):
    before = observer.stats()
    model = tiny_gpt2(seed=1301, device=DEVICE)
    ids = ids_for(2)
    with torch.no_grad():
        ref = model(ids).logits.cpu()

    s1 = observer.session("first")
    rm = RemoteModel.from_module(s1, model)
    out = rm(ids)
    s1.generate(rm, ids, max_new_tokens=3, do_sample=False)
    st = observer.stats()
    mine = st["sessions"][s1.sid]
    assert mine["tensors"] == 1 and mine["gpu_bytes"] > 0 and mine["kv_tokens"][rm.model_id] > 0
    with_model = st["segments"]["text"]
    assert before["segments"]["text"] < with_model <= before["segments"]["text"] + rm.nbytes

    # A second session using the same model keeps it (and its weights) alive when the first closes.
    s2 = observer.session("second")
    assert torch.equal(rm(ids, session=s2).logits.cpu(), ref)
    s1.close()
    st = observer.stats()
    assert s1.sid not in st["sessions"] and s2.sid in st["sessions"]
    assert st["models"][rm.model_id]["sessions"] == [s2.sid]
    assert st["segments"]["text"] == with_model
    with pytest.raises(djinn.DjinnError):
        out.logits.cpu()  # its tensors went with it
    with pytest.raises(djinn.SessionNotFound):
        observer.transport.call("fetch", {"sid": s1.sid, "handles": [out.logits.hid]})
    s1.close()  # closing twice is harmless

    assert torch.equal(rm(ids, session=s2).logits.cpu(), ref)
    s2.close()
    st = observer.stats()
    assert s2.sid not in st["sessions"] and rm.model_id not in st["models"]
    assert st["segments"]["text"] == before["segments"]["text"]
    assert st["segments"]["data"] == before["segments"]["data"]
    assert st["text_entries"] == before["text_entries"]


def test_bye_reclaims_sessions_at_once(fault_server, observer):
    before = observer.stats()
    c = Connection(fault_server.address, secret=None)
    s = c.session("leaving")
    other = c.session()
    rm = RemoteModel.from_module(s, tiny_gpt2(seed=1401, device=DEVICE))
    rm(ids_for(3))
    st = observer.stats()
    assert {s.sid, other.sid} <= set(st["sessions"]) and rm.model_id in st["models"]

    t0 = time.monotonic()
    c.close()  # says BYE
    gone, _ = poll(lambda: not ({s.sid, other.sid} & set(observer.stats()["sessions"])), timeout_s=10)
    elapsed = time.monotonic() - t0
    assert gone
    assert elapsed < 1.5, f"sessions reclaimed {elapsed:.2f}s after BYE (client timeout is {CLIENT_TIMEOUT_S}s)"
    st = observer.stats()
    assert rm.model_id not in st["models"]
    assert st["segments"]["text"] == before["segments"]["text"]
    assert st["segments"]["data"] == before["segments"]["data"]

    # A closed connection fails fast with a typed error (not a raw zmq error on a closed socket).
    for call in (c.ping, c.stats, lambda: s.call("ping"), lambda: c.session("after-close"), lambda: rm(ids_for(3))):
        t0 = time.monotonic()
        with pytest.raises(djinn.ServerUnavailable, match="closed"):
            call()
        assert time.monotonic() - t0 < 0.5
    c.close()  # closing twice is harmless


# -- a server that dies -------------------------------------------------------------------------
def _long_generation_model():
    # tiny_llama's rotary embedding has no hard position limit; min_new_tokens keeps EOS from ending early.
    return tiny_llama(seed=1501, device=DEVICE)


def test_server_killed_pending_and_later_calls_fail_fast(start_server):
    srv = start_server("--no-supervise")  # nothing restarts it (test_restart.py covers the supervisor)
    idle = Connection(srv.address, secret=None)
    busy = Connection(srv.address, secret=None)
    watcher = Connection(srv.address, secret=None)  # never calls: must notice from heartbeats alone
    try:
        watcher.session("watching")
        idle_session = idle.session("idle")
        model = _long_generation_model()
        rm = RemoteModel.from_module(busy.session("busy"), model)
        handle = rm(ids_for(4)).logits  # a handle whose session will die with the server

        stream = rm.generate(ids_for(5), stream=True, max_new_tokens=4000, min_new_tokens=4000, do_sample=False)
        first_token = threading.Event()
        outcome: dict = {}

        def consume():
            try:
                for n, _ in enumerate(stream, start=1):
                    outcome["tokens"] = n
                    first_token.set()
                outcome["result"] = "finished"
            except BaseException as e:
                outcome["error"] = e
            outcome["t"] = time.monotonic()
            first_token.set()

        t = threading.Thread(target=consume, daemon=True)
        t.start()
        assert first_token.wait(60), "generation never streamed a token"
        assert "error" not in outcome and "result" not in outcome, outcome

        noticed: dict = {}

        def watch():  # when the watcher's transport declares the server dead, with no call of its own
            while watcher.transport.dead is None and time.monotonic() - t_kill < 30:
                time.sleep(0.01)
            noticed["t"] = time.monotonic()

        t_kill = time.monotonic()
        srv.proc.send_signal(signal.SIGKILL)
        w = threading.Thread(target=watch, daemon=True)
        w.start()
        # The idle client calls right after the kill, before anything could have noticed.
        with pytest.raises(djinn.ServerUnavailable):
            idle.ping()
        t_idle = time.monotonic() - t_kill
        t.join(15)
        assert not t.is_alive(), "the streaming call hung after the server died"
        assert isinstance(outcome.get("error"), djinn.ServerUnavailable), outcome
        assert outcome["tokens"] < 4000
        t_busy = outcome["t"] - t_kill
        assert t_idle < 5.0, f"idle client took {t_idle:.2f}s to see the server die"
        assert t_busy < 5.0, f"waiting client took {t_busy:.2f}s to see the server die"
        srv.proc.wait(10)
        w.join(35)
        dead = watcher.transport.dead
        assert isinstance(dead, djinn.ServerUnavailable) and srv.address in dead.message
        t_watch = noticed["t"] - t_kill
        assert t_watch < 5.0, f"a client that made no call took {t_watch:.2f}s to see the server die"

        # From now on every call fails fast, whatever its path.
        for call in (idle.ping, idle.stats, lambda: idle_session.call("ping"), lambda: idle.session("new"),
                     busy.ping, handle.cpu, lambda: rm(ids_for(6)),
                     lambda: rm.generate(ids_for(7), max_new_tokens=2)):
            t0 = time.monotonic()
            with pytest.raises(djinn.ServerUnavailable):
                call()
            assert time.monotonic() - t0 < 0.5
        with idle_session:  # leaving a session of a dead server does not raise
            pass
        # Connecting anew to the dead address fails within the connect timeout.
        t0 = time.monotonic()
        with pytest.raises(djinn.ServerUnavailable):
            Connection(srv.address, secret=None, cfg=ClientConfig(connect_timeout_s=1.0))
        assert time.monotonic() - t0 < 5.0
    finally:
        t0 = time.monotonic()
        for c in (idle, busy, watcher):
            c.close()
        assert time.monotonic() - t0 < 5.0
