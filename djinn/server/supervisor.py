"""The supervisor: runs the server as a worker process and restarts it when it dies (DESIGN.md §10).

`python -m djinn.server.server_main ...` is this supervisor unless `--no-supervise` is given. It starts
`server_main --worker ...` as a child, relays the child's ready line, and, when the child exits with a
failure (killed, a crash, or exit code 3: a sticky CUDA error that leaves the device unusable, see
engine.Engine.fatal), starts a new one on the same address. Clients see the connection drop: their
calls in flight fail with SessionLost, they reconnect (HELLO again) and learn from the new boot id that
the server-side state of their old sessions is gone (frontend/transport.py).

It imports neither torch nor zmq: it must stay up when the worker's libraries are what broke.

Note [Same address after a restart]
    With `--port 0` the first worker picks a free port and prints it in its ready line; the supervisor
    reads it there and starts every later worker with that port, so clients reconnect to the address
    they know. Restarts are rate limited (MAX_RESTARTS in WINDOW_S): a worker that dies at start-up
    every time (a bad config, a dead GPU) ends the supervisor with its exit code rather than looping.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

from ..protocol.messages import READY_PREFIX

log = logging.getLogger("djinn.supervisor")

MAX_RESTARTS = 5
WINDOW_S = 60.0
EXIT_FATAL_DEVICE = 3


class Supervisor:
    def __init__(self, worker_argv: list[str], drain_s: float):
        self.argv = list(worker_argv)
        self.drain_s = drain_s
        self.stop = threading.Event()
        self.child: subprocess.Popen | None = None
        self.address: str | None = None
        self.restarts: list[float] = []

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stop.set())
        parent = _parent_pid(self.argv)
        while True:
            ready = threading.Event()
            self.child = self._spawn(ready)
            code = self._watch(parent)
            if self.stop.is_set() or code == 0:
                return code or 0
            if self.address is None:  # never became ready: a start-up failure, not worth a retry
                log.error("server worker exited with %s before it was ready", code)
                return code if code > 0 else 1
            now = time.monotonic()
            self.restarts = [t for t in self.restarts if now - t < WINDOW_S] + [now]
            if len(self.restarts) > MAX_RESTARTS:
                log.error("server worker died %d times in %.0f s; giving up", len(self.restarts), WINDOW_S)
                return code if code > 0 else 1
            why = "a fatal device error" if code == EXIT_FATAL_DEVICE else f"exit status {code}"
            log.warning("server worker died (%s); restarting it on %s", why, self.address)
            time.sleep(0.2)

    def _spawn(self, ready: threading.Event) -> subprocess.Popen:
        argv = _drop_flag(self.argv, "--parent-pid")  # the worker watches us; we watch the parent
        if self.address is not None:  # Note [Same address after a restart]
            argv = [*_drop_flag(argv, "--port"), "--port", self.address.rsplit(":", 1)[1]]
        cmd = [sys.executable, "-m", "djinn.server.server_main", "--worker", "--parent-pid", str(os.getpid()),
               *argv]
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, bufsize=1)
        threading.Thread(target=self._relay, args=(child, ready), daemon=True).start()
        return child

    def _relay(self, child: subprocess.Popen, ready: threading.Event) -> None:
        """Copy the worker's stdout; the first ready line is ours to print (later ones are logged)."""
        for line in child.stdout:
            if line.startswith(READY_PREFIX):
                m = re.match(re.escape(READY_PREFIX) + r"(\S+)", line)
                if self.address is None:
                    self.address = m.group(1) if m else None
                    sys.stdout.write(line)
                    sys.stdout.flush()
                else:
                    log.info("restarted worker ready: %s", line.strip())
                ready.set()
            else:
                sys.stdout.write(line)
                sys.stdout.flush()

    def _watch(self, parent: int | None) -> int:
        child = self.child
        while True:
            code = child.poll()
            if code is not None:
                return code
            if self.stop.is_set() or (parent is not None and not _alive(parent)):
                self.stop.set()
                child.send_signal(signal.SIGTERM)  # the worker drains (bounded) and tells clients
                try:
                    return child.wait(timeout=self.drain_s + 10)
                except subprocess.TimeoutExpired:
                    child.kill()
                    return child.wait()
            self.stop.wait(0.1)  # a SIGTERM's handler sets it: relayed to the worker at once


def _parent_pid(argv: list[str]) -> int | None:
    for i, a in enumerate(argv):
        if a == "--parent-pid" and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith("--parent-pid="):
            return int(a.split("=", 1)[1])
    return None


def _drop_flag(argv: list[str], flag: str) -> list[str]:
    """argv without `flag VALUE` and `flag=VALUE`."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
