"""Tier 2: the main job (`python -m djinn.demo`, what `make demo` runs) passes every check with its own
embedded CPU server, so the README's first command keeps working."""
from __future__ import annotations

import os
import subprocess
import sys

from ..conftest import DEVICE


def test_main_job_passes_every_check():
    env = {k: v for k, v in os.environ.items() if k not in ("DJINN_SERVER", "DJINN_SECRET")}
    r = subprocess.run([sys.executable, "-m", "djinn.demo", "--device", DEVICE], capture_output=True,
                       text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    last = [line for line in r.stdout.splitlines() if "checks passed" in line][-1]
    done, total = last.split()[0].split("/")
    assert done == total and int(total) >= 13, last
    assert "[FAIL]" not in r.stdout
