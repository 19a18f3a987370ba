"""Tier 2: a script with an embedded server exits promptly after its last line.

Its atexit handler (djinn.disconnect) says goodbye and stops the server, waiting for it to end. The
server then stops without draining for a client that is gone (its BYE closed that client's sessions and
their generates), and its processes end without the interpreter's teardown (Note [Exit without
teardown] in djinn/server/server_main.py), which took seconds of finalizing torch on a loaded machine.
The mechanism is checked, not a time: a sitecustomize in the server's processes records every start and
every interpreter teardown (atexit), and a clean stop must show the starts and no teardown.
"""
from __future__ import annotations

import os
import time

import torch

from djinn.frontend.connection import Connection
from djinn.frontend.remote import RemoteModel

from ..conftest import ServerProcess
from ..models import tiny_llama
from .test_scheduling import submit_generate

IDS = torch.tensor([[1, 17, 42, 99, 5]])
SITE = """\
import atexit, os
_mark = os.environ["DJINN_TEST_EXIT_MARKS"]
with open(_mark, "a") as f:
    f.write(f"start {os.getpid()}\\n")
def _teardown():
    with open(_mark, "a") as f:
        f.write(f"teardown {os.getpid()}\\n")
atexit.register(_teardown)
"""


def test_a_stopped_embedded_server_neither_drains_for_a_gone_client_nor_tears_down(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(SITE)
    marks = tmp_path / "marks"
    path = os.pathsep.join([str(tmp_path), os.getcwd(), os.environ.get("PYTHONPATH", "")])
    srv = ServerProcess(env={"PYTHONPATH": path, "DJINN_TEST_EXIT_MARKS": str(marks)})
    conn = Connection(srv.address, None)
    try:
        s = conn.default_session()
        rm = RemoteModel.from_module(s, tiny_llama(seed=4))
        submit_generate(s, rm, IDS, max_new_tokens=240, min_new_tokens=240, do_sample=False, pad_token_id=0)
        deadline = time.monotonic() + 60
        while not (conn.stats()["sessions"][s.sid].get("job") or {}).get("steps") and time.monotonic() < deadline:
            time.sleep(0.01)
        conn.transport.close()  # what djinn.disconnect does first: BYE, sockets closed (linger bounded)
        srv.proc.terminate()    # then EmbeddedServer.stop
        assert srv.proc.wait(60) == 0
        log = srv.log_text()
        # The generate of the client that left was dropped with its session, not drained for.
        assert "closed (client said goodbye)" in log and "drain timed out" not in log
        assert log.index("closed (client said goodbye)") < log.index("djinn.server INFO stopped")
        lines = marks.read_text().split()
        starts = [pid for kind, pid in zip(lines[::2], lines[1::2]) if kind == "start"]
        teardowns = [pid for kind, pid in zip(lines[::2], lines[1::2]) if kind == "teardown"]
        assert len(starts) == 2 and str(srv.proc.pid) in starts  # the supervisor and its worker
        assert teardowns == []  # both ended by exit_process: no interpreter teardown
    finally:
        conn.close()
        srv.stop()
