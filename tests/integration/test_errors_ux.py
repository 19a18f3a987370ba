"""Tier 2: errors as a notebook shows them, from a real server.

str(RemoteExecutionError) is one line (a notebook prints it under the cell); the server's traceback is
an attribute. A stop's tensors read after the run moved on say the stop is gone, not which ids the
server no longer knows.
"""
from __future__ import annotations

import pytest
import torch

import djinn
from djinn import Breakpoint
from djinn.frontend.remote import RemoteModel

from ..models import tiny_gpt2, tiny_llama

IDS = torch.tensor([[1, 17, 42, 99, 5]])
GONE = r"this stop is gone \(the run resumed or ended\)"


def test_remote_execution_error_is_one_line_with_the_traceback_aside(conn):
    rm = RemoteModel.from_module(conn.default_session(), tiny_llama(seed=1))
    with pytest.raises(djinn.RemoteExecutionError) as info:
        rm(torch.zeros(2, 3, 4, dtype=torch.long))  # input_ids of the wrong rank
    e = info.value
    text = str(e)
    assert text.startswith("forward failed: ") and "\n" not in text and "Traceback" not in text
    assert text == e.message.splitlines()[0]
    assert e.remote_traceback.startswith("Traceback (most recent call last)")
    assert "remote_traceback" in e.__notes__[0]  # a notebook shows where the rest is
    assert rm(IDS).logits.shape == (1, 5, 256)  # and the session goes on


def test_a_stale_stop_says_it_is_gone(conn):
    with conn.session("stale") as s:
        rm = RemoteModel.from_module(s, tiny_gpt2(seed=2))
        run = s.start(rm, IDS, method="generate", breakpoints=[Breakpoint(layer=1)], max_new_tokens=3)
        stop = run.wait()
        act = stop.activation
        outs = list(stop.module_outputs) if isinstance(stop.module_outputs, tuple) else [stop.module_outputs]
        pending = act * 2                       # recorded while the stop was live: runs before the resume
        live_value = act.cpu()
        assert live_value.shape == act.shape
        nxt = run.resume()
        assert nxt is not None and nxt.step == 1 and not stop.live
        assert torch.equal(pending.cpu(), live_value * 2)  # Note [Lazy ops on a stop]
        for read in (act.cpu, lambda: stop.activation[:, -1].cpu(), lambda: (act + 1).cpu(),
                     lambda: outs[0].tolist()):
            with pytest.raises(djinn.HandleNotFound, match=GONE):
                read()
        with pytest.raises(djinn.HandleNotFound, match=GONE):
            act[:, -1] += 1.0                   # an edit of a gone stop is refused when written
        assert "gone" in repr(act)
        assert nxt.activation.cpu().shape == (1, 1, 64)  # the live stop still reads
        run.cancel()
        with pytest.raises(djinn.HandleNotFound, match=GONE):
            nxt.activation.cpu()
        assert conn.stats()["sessions"][s.sid]["paused"] is False
