"""Tier 2: weight budgets against a real server on the CPU, where streaming is refused clearly (the
GPU path is tests/gpu/test_streaming.py). Skipped when the suite targets a GPU server."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import djinn
from djinn.frontend.remote import RemoteModel

from ..conftest import DEVICE
from ..models import tiny_llama

pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="CPU-server behaviour")


def test_a_budget_on_a_cpu_server_is_invalid_and_the_session_goes_on(conn):
    model = tiny_llama(seed=8)
    s = conn.session("budget-on-cpu")
    with pytest.raises(djinn.InvalidRequest, match="weight streaming needs a CUDA device: this server runs on cpu"):
        RemoteModel.from_module(s, model, weight_budget_gb=1)
    # The uploads staged for it are still pinned to the session: remoting without a budget works.
    rm = RemoteModel.from_module(s, model)
    assert rm.upload.uploaded == 0
    ids = torch.tensor([[1, 5, 9, 200]])
    with torch.no_grad():
        ref = model(ids).logits
    assert torch.equal(rm(ids).logits.cpu(), ref)
    assert "streaming" not in conn.stats()["models"][rm.model_id]
    s.close()


def test_from_path_with_a_budget_on_a_cpu_server(conn, tmp_path):
    model = tiny_llama(seed=9)
    model.save_pretrained(tmp_path)
    s = conn.session()
    with pytest.raises(djinn.InvalidRequest, match="weight streaming needs a CUDA device"):
        RemoteModel.from_path(s, str(tmp_path), weight_budget_gb=0.5)
    assert all(s.sid not in m["sessions"] for m in conn.stats()["models"].values())
    s.close()


@pytest.mark.parametrize("bad", [0, -1, "12", True])
def test_bad_budgets_are_invalid(conn, bad):
    s = conn.session()
    with pytest.raises(djinn.InvalidRequest, match="weight_budget_gb must be a number of GiB > 0"):
        s.call("load_model", {"path": "/nonexistent", "weight_budget_gb": bad})
    s.close()


def test_bad_upload_stage_is_invalid(conn):
    s = conn.session()
    with pytest.raises(djinn.InvalidRequest, match="upload stage must be 'host'"):
        s.call("upload", {"items": [], "stage": "vram"})
    s.close()


def test_server_refuses_a_default_budget_on_the_cpu():
    proc = subprocess.run([sys.executable, "-m", "djinn.server.server_main", "--port", "0", "--device", "cpu",
                           "--weight-budget-gb", "12"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "weight_budget_gb=12.0 needs a CUDA device" in proc.stderr and "this server runs on cpu" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "djinn.server.server_main", "--port", "0", "--device", "cpu",
                           "--weight-budget-gb", "-1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "weight_budget_gb=-1.0 must be a number of GiB > 0" in proc.stderr
