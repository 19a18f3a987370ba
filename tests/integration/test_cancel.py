"""Tier 2: cancelling a generate (Note [Cancel] in djinn/server/dispatch.py). Leaving a `stream=True`
loop or interrupting `s.generate` stops the generate on the server, and the session holds exactly the
tokens the client consumed: the next call continues bitwise as a local session that saw only those.
On the batched fast path and on the eager path (deterministic=True)."""
from __future__ import annotations

import _thread
import signal
import threading
import time

import pytest
import torch

from djinn.frontend.connection import Connection
from djinn.frontend.remote import RemoteModel

from ..conftest import DEVICE, ServerProcess
from ..models import tiny_llama

LONG = 3000  # new tokens asked for: seconds of decode on the CPU, so the cancel always comes first
P1 = torch.tensor([[5, 17, 42, 99, 8, 61, 7]])
P2 = torch.tensor([[33, 8, 190]])


@pytest.fixture(scope="module")
def srv():
    s = ServerProcess("--fast-decode", "on", "--fast-decode-max-len", "4096", "--fast-decode-max-batch", "2")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=5).eval()


def _interrupt_once_running(address: str, sid: str) -> None:
    """Ctrl-C in the main thread once the server says the session's generate runs, plus 0.2 s: a
    fixed delay from the call failed once under load (the interrupt came late or not at all)."""
    watcher = Connection(address, None)  # another client: it sees whether the session is busy

    def running() -> bool:
        return watcher.stats()["sessions"][sid]["busy"] == "generate running"

    try:
        deadline = time.monotonic() + 30
        while not running() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        if running():  # never an interrupt that could land in later code: the test then fails on its own
            _thread.interrupt_main()
    finally:
        watcher.close()


def _local(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    m, ids = model.to(DEVICE), ids.to(DEVICE)
    with torch.no_grad():
        return m.generate(ids, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids)).cpu()


@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "eager"])
def test_leaving_a_stream_keeps_exactly_the_consumed_tokens(srv, model, deterministic):
    conn = Connection(srv.address, None)
    try:
        s = conn.session()
        rm = RemoteModel.from_module(s, model)
        got = []
        stream = s.generate(rm, P1, stream=True, max_new_tokens=LONG, do_sample=False, deterministic=deterministic)
        for tok in stream:
            got.append(tok)
            if len(got) == 5:
                break
        assert stream.consumed == 5 and repr(stream) == "TokenStream(cancelled)"
        assert got == _local(model, P1, 5)[0, P1.shape[1]:].tolist()
        seen = torch.cat([P1, torch.tensor([got])], dim=1)
        out = s.generate(rm, P2, max_new_tokens=6, do_sample=False, deterministic=deterministic)
        assert torch.equal(out, _local(model, torch.cat([seen, P2], dim=1), 6))  # nothing past the 5 tokens
        st = conn.stats()["sessions"][s.sid]
        assert st["kv_tokens"][rm.model_id] == out.shape[1]
    finally:
        conn.close()


@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "eager"])
def test_interrupting_generate_stops_it_and_keeps_nothing_of_it(srv, model, deterministic, request):
    conn = Connection(srv.address, None)
    try:
        s = conn.session()
        rm = RemoteModel.from_module(s, model)
        first = s.generate(rm, P1, max_new_tokens=4, do_sample=False, deterministic=deterministic)
        # A process started in the background by a non-interactive shell inherits SIGINT ignored, and
        # then Python's Ctrl-C (interrupt_main) does nothing: give this test Python's own handler.
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
        timer = threading.Thread(target=_interrupt_once_running, args=(srv.address, s.sid))
        timer.start()  # Ctrl-C while the long generate runs
        with pytest.raises(KeyboardInterrupt):
            s.generate(rm, P2, max_new_tokens=LONG, do_sample=False, deterministic=deterministic)
        timer.join()
        # The session is as before the interrupted call: the next one continues from `first`.
        out = s.generate(rm, P2, max_new_tokens=5, do_sample=False, deterministic=deterministic)
        assert torch.equal(out, _local(model, torch.cat([first, P2], dim=1), 5))
        dec = conn.stats()["sessions"][s.sid]["decode"]
        assert dec["fast" if not deterministic else "eager"] == 3
    finally:
        conn.close()


def test_cancel_of_an_unknown_or_finished_generate_changes_nothing(srv, model):
    conn = Connection(srv.address, None)
    try:
        s = conn.session()
        rm = RemoteModel.from_module(s, model)
        out = s.generate(rm, P1, max_new_tokens=4, do_sample=False)
        assert s.call("cancel_generate", {"rid": 10**6, "keep": 3}) == {"cancelled": False, "kept": 0}
        assert conn.stats()["sessions"][s.sid]["kv_tokens"][rm.model_id] == out.shape[1]
    finally:
        conn.close()
