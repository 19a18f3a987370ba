"""Shared by every benchmark: the environment record (card, versions, commit) and a server process."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch


def git_commit() -> str:
    """The commit measured: $DJINN_COMMIT when run from an exported tree (no .git), else git's HEAD."""
    if os.environ.get("DJINN_COMMIT"):
        return os.environ["DJINN_COMMIT"]
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return (sha or "unknown") + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def environment(device: torch.device) -> dict:
    import msgpack
    import transformers
    import zmq

    env = {
        "commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pyzmq": zmq.__version__,
        "msgpack": ".".join(map(str, msgpack.version)),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                   cuda=torch.version.cuda, driver=_driver_version())
    return env


def _driver_version() -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlSystemGetDriverVersion()
    except Exception:
        return "unknown"


def start_server(device: str, *extra: str):
    """A real server subprocess on a free loopback port (stopped with .stop())."""
    from djinn.frontend.embedded import EmbeddedServer

    return EmbeddedServer(device, 180.0, list(extra))
