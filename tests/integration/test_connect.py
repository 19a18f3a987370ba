"""Tier 2: what `djinn.connect` and the module-level API do with addresses, against real servers.

Note [No silent fallback] (djinn/api.py): a connection made to an address stays on it; when that
server is gone the next call raises ServerUnavailable instead of starting an embedded server.
"""
from __future__ import annotations

import socket
import time

import pytest
import torch

import djinn
from djinn import api
from djinn.frontend.embedded import EmbeddedServer

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("form", ["localhost:{port}", "tcp://localhost:{port}", " 127.0.0.1:{port} "])
def test_host_port_forms_connect(server, no_env, form):
    port = server.address.rsplit(":", 1)[1]
    conn = djinn.connect(form.format(port=port))
    assert conn.ping() > 0
    assert conn.address == f"tcp://{form.strip().removeprefix('tcp://').format(port=port)}"


@pytest.mark.parametrize("address,why", [
    ("nothing listens", "nothing listens at tcp://127.0.0.1:{port} \\(connection refused\\)"),
    ("no-such-host.invalid:5556", "resolve the host name 'no-such-host.invalid'"),
])
def test_a_dead_or_unknown_address_fails_within_a_second(no_env, address, why):
    port = _free_port()
    if address == "nothing listens":
        address = f"127.0.0.1:{port}"
    t0 = time.monotonic()
    with pytest.raises(djinn.ServerUnavailable, match=why.format(port=port)) as info:
        djinn.connect(address)
    assert time.monotonic() - t0 < 1.5
    assert "djinn.connect() with no address" in info.value.message  # what to do instead
    assert api._conn is None


def test_djinn_server_env_is_kept_too(no_env, monkeypatch):
    monkeypatch.setenv("DJINN_SERVER", f"127.0.0.1:{_free_port()}")
    t0 = time.monotonic()
    with pytest.raises(djinn.ServerUnavailable, match="nothing listens"):
        djinn.remote(tiny_gpt2())
    assert time.monotonic() - t0 < 1.5 and api._conn is None  # no embedded server in its place


@pytest.mark.parametrize("address", ["localhost", "ipc:///tmp/djinn", "tcp://localhost:http", "localhost:0",
                                     "tcp://*:5556", ":5556"])
def test_malformed_addresses_say_the_form(no_env, address):
    with pytest.raises(djinn.InvalidRequest, match="host:port|listens on TCP"):
        djinn.connect(address)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_a_missing_gpu_is_reported_at_once(no_env):
    t0 = time.monotonic()
    with pytest.raises(djinn.InvalidRequest, match="has no CUDA GPU"):
        djinn.connect(device="cuda:0")
    assert time.monotonic() - t0 < 1.0


def test_an_embedded_server_that_exits_is_reported_as_exited():
    t0 = time.monotonic()
    with pytest.raises(djinn.ServerUnavailable, match="exited with status 2 before it was ready") as info:
        EmbeddedServer("cpu", 120.0, ["--no-such-flag"])
    assert "--no-such-flag" in info.value.message  # the server's own complaint, from its log
    assert time.monotonic() - t0 < 60


@pytest.mark.parametrize("model,got", [(None, "got None"), (42, "got a int"), ({"n_layer": 2}, "got a dict")])
def test_remote_of_something_that_is_not_a_model(no_env, model, got):
    with pytest.raises(djinn.InvalidRequest, match=f"an nn.Module .* {got}"):
        djinn.remote(model)
    assert api._conn is None  # refused before any server was started


@pytest.mark.parametrize("name", ["gpt2", "meta-llama/Llama-2-7b-hf"])
def test_hub_ids_are_refused_with_what_to_do(server, no_env, name):
    djinn.connect(server.address)
    with pytest.raises(djinn.InvalidRequest, match=f"'{name}' looks like a Hugging Face hub id") as info:
        djinn.remote(name)
    assert "AutoConfig.from_pretrained" in info.value.message and "no network" in info.value.message
