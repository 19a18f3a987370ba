"""Tier 1: the server address forms a user may write (djinn/frontend/address.py)."""
from __future__ import annotations

import pytest

from djinn.frontend.address import Address, parse
from djinn.protocol.errors import InvalidRequest


@pytest.mark.parametrize("text,host,port,url", [
    ("localhost:5556", "localhost", 5556, "tcp://localhost:5556"),
    ("tcp://gpu-box.lan:7000", "gpu-box.lan", 7000, "tcp://gpu-box.lan:7000"),
    (" 10.0.0.5:1 ", "10.0.0.5", 1, "tcp://10.0.0.5:1"),
    ("[::1]:5556", "::1", 5556, "tcp://[::1]:5556"),
    ("tcp://[fe80::1]:65535", "fe80::1", 65535, "tcp://[fe80::1]:65535"),
])
def test_accepted_forms(text, host, port, url):
    a = parse(text)
    assert a == Address(host, port) and a.url == url


@pytest.mark.parametrize("text,why", [
    ("localhost", "is not 'host:port'"), (":5556", "is not 'host:port'"), ("h:0", "is not 'host:port'"),
    ("h:65536", "is not 'host:port'"), ("h:port", "is not 'host:port'"), ("tcp://*:5556", "is not 'host:port'"),
    ("[::1]", "is not 'host:port'"), ("ipc:///tmp/x", "listens on TCP"), ("http://h:80", "listens on TCP"),
])
def test_refused_forms_say_the_form(text, why):
    with pytest.raises(InvalidRequest, match=why):
        parse(text)


def test_not_a_string():
    with pytest.raises(InvalidRequest, match="got int"):
        parse(5556)
