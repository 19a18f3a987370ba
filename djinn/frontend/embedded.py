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
            tail = self.log_tail()
            self.stop()
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

