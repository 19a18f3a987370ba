"""Shared fixtures. Tier 2 tests talk to a real server process on loopback (no mocks).

DJINN_TEST_DEVICE selects the server's device (default cpu); local references are computed on the
same device so outputs can be compared bitwise, e.g. DJINN_TEST_DEVICE=cuda:0 on a GPU machine.
"""
from __future__ import annotations

import os

import pytest
import torch

from djinn.frontend.connection import Connection
from djinn.frontend.embedded import EmbeddedServer

from ._serverfork import ForkedServer
from .models import TINY_BUILDERS  # noqa: F401  (re-exported for tests)

DEVICE = os.environ.get("DJINN_TEST_DEVICE", "cpu")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item (`item.rep_call`), for fixtures that show a server's log
    when the test they served failed."""
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def ServerProcess(*extra: str, device: str = DEVICE, env: dict | None = None, supervised: bool = False):
    """A real server process on a free loopback port: forked warm, without the supervisor (Note [Forked
    test servers] in tests/_serverfork.py), or, for tests of the supervisor and servers that need another
    environment, `python -m djinn.server.server_main` started as users start it."""
    # On a GPU the tests run the command users run: a supervisor restarts a worker a device error ends, so
    # the module's later tests still find a server (and the fork server never holds a CUDA context).
    if supervised or env is not None or device != "cpu" or os.environ.get("DJINN_TEST_SUBPROCESS"):
        s = EmbeddedServer(device, 180.0, list(extra), env)
    else:
        s = ForkedServer(device, 180.0, list(extra))
    s.device = device
    return s


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device(DEVICE)


@pytest.fixture(scope="session")
def server():
    """One shared server for tests that do not kill or reconfigure it. On a GPU it runs generate on
    the eager path, whose contract these suites check bitwise (seeded sampling included); the decode
    fast path, the default on CUDA, has its own suite (test_fast_decode.py)."""
    s = ServerProcess(*(() if DEVICE == "cpu" else ("--fast-decode", "off")))
    yield s
    s.stop()


@pytest.fixture
def start_server():
    """Factory for a private server (custom flags, or a test that kills it)."""
    started: list[ServerProcess] = []

    def start(*extra: str, **kw) -> ServerProcess:
        s = ServerProcess(*extra, **kw)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


@pytest.fixture(scope="module")
def module_server():
    """Factory for a server shared by the tests of one module that ask for the same flags: for tests that
    need flags the shared `server` lacks but neither kill it nor depend on being its only user so far
    (each server start costs seconds of imports on a small CI box). Stopped at the module's end."""
    started: dict[tuple, ServerProcess] = {}

    def get(*extra: str) -> ServerProcess:
        s = started.get(extra)
        if s is None or not s.alive():
            s = started[extra] = ServerProcess(*extra)
        return s

    yield get
    for s in started.values():
        s.stop()


@pytest.fixture
def conn(server):
    """A fresh client connection to the shared server."""
    c = Connection(server.address, secret=None)
    yield c
    c.close()
