"""Shared fixtures. Tier 2 tests talk to a real server process on loopback (no mocks).

DJINN_TEST_DEVICE selects the server's device (default cpu); local references are computed on the
same device so outputs can be compared bitwise, e.g. DJINN_TEST_DEVICE=cuda:0 on a GPU machine.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest
import torch

from djinn.frontend.connection import Connection
from djinn.protocol.messages import READY_PREFIX

from .models import TINY_BUILDERS  # noqa: F401  (re-exported for tests)

DEVICE = os.environ.get("DJINN_TEST_DEVICE", "cpu")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class ServerProcess:
    """A real `python -m djinn.server.server_main` subprocess on a free loopback port."""

    def __init__(self, *extra: str, device: str = DEVICE, env: dict | None = None):
        cmd = [sys.executable, "-m", "djinn.server.server_main", "--port", "0", "--device", device, *extra]
        # The log goes to a file: a pipe nobody reads would block the server once it fills up.
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env={**os.environ, **(env or {})})
        line = self.proc.stdout.readline()
        if not line.startswith(READY_PREFIX):
            self.proc.kill()
            self.proc.wait()
            self.log.seek(0)
            raise RuntimeError(f"server did not start: {line!r}\n{self.log.read()}")
        self.address = line[len(READY_PREFIX):].split()[0]
        self.device = device

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        self.log.close()

    def log_text(self) -> str:
        self.log.seek(0)
        return self.log.read()


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device(DEVICE)


@pytest.fixture(scope="session")
def server():
    """One shared server for tests that do not kill or reconfigure it."""
    s = ServerProcess()
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


@pytest.fixture
def conn(server):
    """A fresh client connection to the shared server."""
    c = Connection(server.address, secret=None)
    yield c
    c.close()
