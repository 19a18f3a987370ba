"""Tier 2: the server command line: ready line, clean exit on SIGTERM/SIGINT, clear startup errors."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import djinn
from djinn.frontend.connection import Connection
from djinn.protocol.messages import READY_PREFIX

from ..conftest import DEVICE, ServerProcess

SERVER = [sys.executable, "-m", "djinn.server.server_main"]
READY_RE = re.compile(r"^" + re.escape(READY_PREFIX) + r"(tcp://127\.0\.0\.1:(\d+)) \(device ([^,]+), (.+)\)$")


def _wait_exit(proc: subprocess.Popen, timeout_s: float) -> int | None:
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        return None


def _run_cli(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DJINN_SECRET"}
    return subprocess.run([*SERVER, *args], capture_output=True, text=True, timeout=timeout_s, env=env)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_ready_line_then_clean_exit_on_signal(sig):
    s = ServerProcess()  # waits for the ready line
    try:
        # The ready line names the address clients connect to.
        assert s.address.startswith("tcp://127.0.0.1:")
        conn = Connection(s.address, secret=None)
        info = conn.info
        assert info["pid"] == s.proc.pid and info["device"] == str(torch.device(DEVICE))
        sess = conn.session("open-at-shutdown")  # shutdown with a client and a session still open
        assert sess.sid in conn.stats()["sessions"]

        t0 = time.monotonic()
        s.proc.send_signal(sig)
        rc = _wait_exit(s.proc, 15)
        assert rc is not None, f"server did not exit within 15s of {sig.name}"
        assert rc == 0, s.proc.stderr.read()
        assert time.monotonic() - t0 < 10
        err = s.proc.stderr.read()
        assert "Traceback" not in err, err
        assert "stopped" in err

        # The client notices the server is gone and fails fast from then on.
        with pytest.raises(djinn.ServerUnavailable):
            conn.transport.call("ping", {}, timeout=30)
        t0 = time.monotonic()
        with pytest.raises(djinn.ServerUnavailable):
            conn.ping()
        assert time.monotonic() - t0 < 1.0
        conn.close()
    finally:
        s.stop()


def test_ready_line_format():
    proc = subprocess.Popen([*SERVER, "--port", "0", "--device", DEVICE], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline().rstrip("\n")
        m = READY_RE.match(line)
        assert m, line
        assert 0 < int(m.group(2)) < 65536
        assert m.group(3) == str(torch.device(DEVICE))
        conn = Connection(m.group(1), secret=None)
        try:
            assert conn.ping() > 0
        finally:
            conn.close()
    finally:
        proc.terminate()
        assert _wait_exit(proc, 15) == 0
        proc.stdout.close()


def test_gpu_without_cuda_exits_with_clear_message():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; --gpu 0 would start a server")
    r = _run_cli("--gpu", "0", "--port", "0")
    assert r.returncode != 0
    assert READY_PREFIX not in r.stdout
    assert "CUDA" in r.stderr and "--device cpu" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr


def test_port_in_use_exits_with_clear_message(server):
    port = server.address.rsplit(":", 1)[1]
    r = _run_cli("--port", port, "--device", DEVICE)
    assert r.returncode != 0
    assert READY_PREFIX not in r.stdout
    assert "cannot listen" in r.stderr and "Address already in use" in r.stderr, r.stderr
    assert server.alive()


@pytest.mark.parametrize("args, needle", [
    (["--client-timeout", "0.5"], "client_timeout_s"),
    (["--port", "70000"], "port"),
], ids=["client_timeout_below_heartbeats", "port_out_of_range"])
def test_bad_settings_exit_2_with_message(args, needle):
    r = _run_cli(*args, "--device", DEVICE)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and r.stderr.startswith("djinn server:"), r.stderr
    assert "Traceback" not in r.stderr, r.stderr
