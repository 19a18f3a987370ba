"""Test servers forked from a warm process, so a tier-2 test's server starts in well under a second.

Note [Forked test servers]
    A server process spends most of its start importing torch and transformers (3-7 s of CPU on a
    2-core CI box), and the suite starts dozens. `ForkedServer` runs the same `server_main.main(argv)`
    in a process forked from multiprocessing's fork server, which imports those modules once
    (`PRELOAD`) and never runs an op: it holds no OpenMP pool, CUDA context, zmq context or thread
    for a fork to break. The child is a real server process on a real loopback socket; what it lacks
    is the supervisor (it runs with --no-supervise), so tests of the supervisor and of restarts, and
    servers needing a different environment, start a `subprocess` as users do (tests/conftest.py).
    The ready line comes back over a pipe; stdout and stderr go to the log file, as the embedded
    server's do.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile

from djinn.frontend.embedded import EmbeddedServer
from djinn.protocol.errors import ServerUnavailable
from djinn.protocol.messages import READY_PREFIX

PRELOAD = ["torch", "transformers", "zmq", "msgpack", "transformers.models.llama.modeling_llama",
           "transformers.models.gpt2.modeling_gpt2", "djinn.server.server_main", "djinn.server.engine",
           __name__]

_ctx: mp.context.ForkServerContext | None = None


def _context() -> mp.context.ForkServerContext:
    global _ctx
    if _ctx is None:
        _ctx = mp.get_context("forkserver")
        _ctx.set_forkserver_preload(PRELOAD)
    return _ctx


class _ReadyLine:
    """sys.stdout in the child: every line to the log (fd 1), the ready line also up the pipe."""

    def __init__(self, conn, out):
        self.conn, self.out, self.buf = conn, out, ""

    def write(self, s: str) -> int:
        self.out.write(s)
        self.buf += s
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            if line.startswith(READY_PREFIX) and self.conn is not None:
                self.conn.send(line)
                self.conn.close()
                self.conn = None
        return len(s)

    def flush(self) -> None:
        self.out.flush()

    def __getattr__(self, name):
        return getattr(self.out, name)


def _serve(argv: list[str], conn, log_path: str) -> None:
    """The child: its own session (signals to the test's process group do not reach it), output to the
    log, then the server's own main."""
    os.setsid()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = _ReadyLine(conn, open(1, "w", buffering=1, closefd=False))
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    from djinn.server.server_main import exit_process, main

    exit_process(main(argv))


class _Proc:
    """The parts of subprocess.Popen the tests use, over a multiprocessing Process."""

    def __init__(self, p: mp.process.BaseProcess):
        self.p = p
        self.pid = p.pid
        self.stdout = None

    @property
    def returncode(self) -> int | None:
        return self.p.exitcode

    def poll(self) -> int | None:
        return self.p.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.p.join(timeout)
        if self.p.exitcode is None:
            raise subprocess.TimeoutExpired(f"server pid {self.pid}", timeout)
        return self.p.exitcode

    def send_signal(self, sig: int) -> None:
        if self.p.exitcode is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkedServer(EmbeddedServer):
    """`python -m djinn.server.server_main --no-supervise ...` forked warm (Note [Forked test servers])."""

    def __init__(self, device: str, timeout_s: float, extra_args: list[str]):
        self.log = tempfile.NamedTemporaryFile(prefix="djinn-server-", suffix=".log", delete=False)
        argv = ["--port", "0", "--bind", "127.0.0.1", "--parent-pid", str(os.getpid()), "--device", device,
                "--no-supervise", *extra_args]
        ctx = _context()
        r, w = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_serve, args=(argv, w, self.log.name), daemon=True)
        p.start()
        w.close()
        self.proc = _Proc(p)
        try:
            line = r.recv() if r.poll(timeout_s) else ""
        except EOFError:  # it exited before its ready line
            line = ""
        finally:
            r.close()
        if not line.startswith(READY_PREFIX):
            p.join(5)
            tail = self.log_tail()
            self.stop()
            raise ServerUnavailable(f"the forked test server did not start (exit {p.exitcode}); its log ends:\n{tail}")
        self.address = line[len(READY_PREFIX):].split()[0]
