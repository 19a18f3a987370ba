"""Tier 2: what `djinn.connect` and the module-level API do with addresses, against real servers.

Note [No silent fallback] (djinn/api.py): a connection made to an address stays on it; when that
server is gone the next call raises ServerUnavailable instead of starting an embedded server.
"""
from __future__ import annotations

import time

import pytest
import torch

import djinn
from djinn import api

from ..models import tiny_gpt2

IDS = torch.tensor([[1, 17, 42, 99, 5]])


def wait_for(pred, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("DJINN_SERVER", raising=False)
    monkeypatch.delenv("DJINN_SECRET", raising=False)
    yield
    djinn.disconnect()


def test_an_address_is_kept_when_its_server_is_gone(start_server, no_env):
    srv = start_server("--no-supervise")
    conn = djinn.connect(srv.address)
    model = tiny_gpt2(seed=3)
    rm = djinn.remote(model)
    assert torch.equal(rm(IDS).logits.cpu(), model(IDS).logits.detach())
    srv.stop()
    assert wait_for(lambda: conn.transport.dead is not None, 10)
    for call in (lambda: djinn.remote(model), lambda: djinn.session("after"), djinn.stats):
        with pytest.raises(djinn.ServerUnavailable, match=f"the djinn server at {srv.address} is gone"):
            call()
    with pytest.raises(djinn.ServerUnavailable):
        rm(IDS)  # the model's own session is on the same connection
    assert api._conn is conn and conn.embedded is None  # nothing was started in its place
