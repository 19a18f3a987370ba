"""Tier 2: the server command line: ready line, clean exit on SIGTERM/SIGINT, clear startup errors."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import djinn
from djinn.config import ClientConfig
from djinn.frontend.connection import Connection
from djinn.protocol.messages import READY_PREFIX

from ..conftest import DEVICE

SERVER = [sys.executable, "-m", "djinn.server.server_main"]
READY_RE = re.compile(r"^" + re.escape(READY_PREFIX) + r"(tcp://127\.0\.0\.1:(\d+)) \(device ([^,]+), (.+)\)$")


def _wait_exit(proc: subprocess.Popen, timeout_s: float) -> int | None:
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        return None


def _read_line(proc: subprocess.Popen, timeout_s: float) -> str:
    box: list[str] = []
    t = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout_s)
    return box[0] if box else ""


def _parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _run_cli(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DJINN_SECRET"}
    return subprocess.run([*SERVER, *args], capture_output=True, text=True, timeout=timeout_s, env=env)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_ready_line_then_clean_exit_on_signal(sig):
    proc = subprocess.Popen([*SERVER, "--port", "0", "--device", DEVICE], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    conn = None
    try:
        # The ready line names the address clients connect to, and the device.
        line = _read_line(proc, 120).rstrip("\n")
        m = READY_RE.match(line)
        assert m, f"unexpected ready line {line!r}"
        address, port, device = m.group(1), int(m.group(2)), m.group(3)
        assert 0 < port < 65536 and device == str(torch.device(DEVICE))
        conn = Connection(address, secret=None, cfg=ClientConfig(liveness_s=2.0))
        # The command runs a supervisor; the worker serving us is its child and exits with it.
        worker = conn.info["pid"]
        assert _parent_pid(worker) == proc.pid and conn.info["device"] == device
        sess = conn.session("open-at-shutdown")  # shut down with a client and a session still open
        assert sess.sid in conn.stats()["sessions"]

        t0 = time.monotonic()
        proc.send_signal(sig)
        rc = _wait_exit(proc, 15)
        assert rc is not None, f"server did not exit within 15s of {sig.name}"
        assert time.monotonic() - t0 < 10
        err = proc.stderr.read()
        assert rc == 0, err
        assert "Traceback" not in err, err
        assert "stopped" in err, err
        assert not _pid_alive(worker), "the worker outlived its supervisor"

        # The client notices the server is gone and fails fast from then on.
        with pytest.raises(djinn.ServerUnavailable):
            conn.transport.call("ping", {}, timeout=30)
        t0 = time.monotonic()
        with pytest.raises(djinn.ServerUnavailable):
            conn.ping()
        assert time.monotonic() - t0 < 1.0
    finally:
        if conn is not None:
            conn.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


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
    assert "cannot listen" in r.stderr and "in use" in r.stderr.lower(), r.stderr
    assert server.alive()
