"""Tier 3: the core on a real GPU server (run on the GPU machines; skipped elsewhere)."""
from __future__ import annotations

import pytest
import torch

import djinn
from djinn.frontend.connection import Connection
from djinn.frontend.remote import RemoteModel

from ..conftest import ServerProcess
from ..models import TINY_BUILDERS

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_server():
    s = ServerProcess(device="cuda:0")
    yield s
    s.stop()


@pytest.fixture
def gconn(gpu_server):
    c = Connection(gpu_server.address, None)
    yield c
    c.close()


@pytest.mark.parametrize("arch", sorted(TINY_BUILDERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_and_generate_bitwise_on_gpu(gconn, arch, dtype):
    model = TINY_BUILDERS[arch](seed=3, device="cuda:0").to(dtype)
    rm = RemoteModel.from_module(gconn.default_session(), model)
    ids = torch.randint(3, 256, (2, 24), device="cuda:0")
    with torch.no_grad():
        ref = model(ids).logits
        ref_gen = model.generate(ids, max_new_tokens=16, do_sample=False)
    out = rm(ids)
    assert out.logits.device.type == "cuda"
    assert torch.equal(out.logits.cpu(), ref.cpu())
    assert torch.equal(rm.generate(ids, max_new_tokens=16, do_sample=False), ref_gen.cpu())


def test_sampling_seed_on_gpu(gconn):
    model = TINY_BUILDERS["llama"](seed=4, device="cuda:0")
    rm = RemoteModel.from_module(gconn.default_session(), model)
    ids = torch.randint(3, 256, (1, 8), device="cuda:0")
    torch.manual_seed(99)
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=20, do_sample=True, top_k=40)
    assert torch.equal(rm.generate(ids, max_new_tokens=20, do_sample=True, top_k=40, seed=99), ref.cpu())


def test_an_input_past_the_stack_reserve_is_refused_and_server_keeps_serving(gconn):
    """Before the VMU sized a Stack reserve this forward was a CUDA OOM (typed); now it is refused before
    any kernel, since no call may feed more tokens at once than the reserve was measured for."""
    model = TINY_BUILDERS["gpt2"](seed=5, device="cuda:0")
    rm = RemoteModel.from_module(gconn.default_session(), model)
    huge = torch.zeros((1 << 18, 256), dtype=torch.long)  # activations and logits far beyond 140 GB
    with pytest.raises(djinn.InvalidRequest, match="over max_prefill_tokens"):
        rm(huge)
    ids = torch.randint(3, 256, (1, 8), device="cuda:0")
    with torch.no_grad():
        ref = model(ids).logits
    assert torch.equal(rm(ids).logits.cpu(), ref.cpu())
    assert gconn.stats()["device"] == "cuda:0"
