"""An embedded local server: a subprocess started by `djinn.connect()` when no address is given.

It serves on GPU 0 if present, else the CPU, on a free loopback port, exits when this process does
(--parent-pid), and is stopped at interpreter exit. Its log goes to a temporary file that is shown
if it fails to start.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading

from ..protocol.errors import ServerUnavailable
from ..protocol.messages import READY_PREFIX


class EmbeddedServer:
    def __init__(self, device: str | None = None, timeout_s: float = 120.0, extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None):
        _check_device(device)
        self.log = tempfile.NamedTemporaryFile(prefix="djinn-server-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "djinn.server.server_main", "--port", "0", "--bind", "127.0.0.1",
               "--parent-pid", str(os.getpid())]
        if device:
            cmd += ["--device", device]
        cmd += extra_args or []
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     start_new_session=True, env={**os.environ, **env} if env else None)
        self.address = self._wait_ready(timeout_s)

    def _wait_ready(self, timeout_s: float) -> str:
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout_s)
        line = box[0] if box else ""
        if not line.startswith(READY_PREFIX):
            # An empty line is the end of its stdout: the server exited (a bad flag, no such device),
            # which is not the same failure as a server still starting after timeout_s.
            try:
                status = self.proc.wait(5) if box else self.proc.poll()
            except subprocess.TimeoutExpired:  # it closed its stdout but lives on: report the timeout
                status = None
            tail = self.log_tail()
            self.stop()
            if status is not None:
                raise ServerUnavailable(f"the embedded djinn server exited with status {status} before it was "
                                        f"ready; its log ends:\n{tail}")
            raise ServerUnavailable(f"the embedded djinn server did not start within {timeout_s:.0f}s:\n{tail}")
        return line[len(READY_PREFIX):].split()[0]

    def log_text(self) -> str:
        try:
            with open(self.log.name) as f:
                return f.read()
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "".join(self.log_text().splitlines(keepends=True)[-lines:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        self.log.close()
        try:
            os.unlink(self.log.name)
        except OSError:
            pass

    def __repr__(self) -> str:
        state = "running" if self.proc.poll() is None else f"exited {self.proc.returncode}"
        return f"EmbeddedServer({self.address}, pid={self.proc.pid}, {state})"


def _check_device(device: str | None) -> None:
    """Refuse at once a device this machine lacks: the server would find out only after its imports,
    seconds later. The embedded server runs here, so what torch sees here is what it would see."""
    if device is None:
        return
    import torch

    from ..protocol.errors import InvalidRequest

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidRequest(f"device={device!r} is not a torch device: use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type != "cuda":
        return
    if not torch.cuda.is_available():
        build = " (this torch is a CPU build)" if torch.version.cuda is None else ""
        raise InvalidRequest(f"device={device!r}: this machine has no CUDA GPU that torch can use{build}; use "
                             "device='cpu', or leave device out (GPU 0 if present, else the CPU)")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise InvalidRequest(f"device={device!r}: this machine has {count} CUDA GPU(s), numbered from 0")
