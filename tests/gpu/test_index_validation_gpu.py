"""Tier 3: on a CUDA server, out-of-range ids of every kind fail only the request (issue 15, item 2).

Before the checks (djinn/server/execution/validate.py, Note [Index inputs are checked before the device sees
them]) one tenant's token id 10^6 was a device-side assert: the worker restarted and every other
tenant's session was lost. Here a tenant sends every bad index of tests/integration/test_index_validation
(forward, generate on its session's KV and stateless, breakpoint runs) plus out-of-range indices through
the graph path, to a supervised CUDA server; each is a typed error, the worker's pid never changes, and a
bystander's session keeps its KV cache and its results bitwise.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import djinn
from djinn.frontend.connection import Connection
from djinn.frontend.remote import RemoteModel

from ..conftest import ServerProcess
from ..integration.test_index_validation import BUILD, FORWARD_CASES, GENERATE_CASES, IDS, _ids

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_server():
    # Supervised: a device-side assert would restart the worker. CUDA_LAUNCH_BLOCKING: were one to happen,
    # the server's log (shown on failure) names the kernel and the request, not a later synchronization.
    s = ServerProcess(device="cuda:0", env={"CUDA_LAUNCH_BLOCKING": "1"})
    yield s
    s.stop()


class Lookup(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 4)

    def forward(self, ids):
        return self.emb(ids).sum() + self.emb.weight.index_select(0, ids.flatten()).sum()


def test_out_of_range_ids_of_every_kind_fail_only_the_request(cuda_server):
    try:
        _every_kind(cuda_server)
    except BaseException as e:
        raise AssertionError(f"{type(e).__name__}: {e}\nserver log:\n{cuda_server.log_tail(80)}") from e


def _every_kind(cuda_server):
    tenant, other = Connection(cuda_server.address, None), Connection(cuda_server.address, None)
    try:
        pid, generation = tenant.info["pid"], tenant.transport.generation
        b = other.session("bystander")
        brm = RemoteModel.from_module(b, BUILD["llama"](seed=9, device="cuda:0"))
        logits = brm(IDS).logits.cpu()
        held = b.generate(brm, IDS, max_new_tokens=4, do_sample=False, deterministic=True)

        s = tenant.session("tenant")
        remote = {arch: RemoteModel.from_module(s, build(seed=5, device="cuda:0")) for arch, build in BUILD.items()}
        refused = 0
        for case, archs, args, kwargs, match in FORWARD_CASES:
            for arch in archs.split():
                with pytest.raises(djinn.InvalidRequest, match=match):
                    remote[arch](*args, **kwargs).logits.cpu()
                refused += 1
        for case, archs, ids, kwargs, match in GENERATE_CASES:
            for arch in archs.split():
                with pytest.raises(djinn.InvalidRequest, match=match):
                    remote[arch].generate(ids, do_sample=False, **kwargs)
                with pytest.raises(djinn.InvalidRequest, match=match):
                    s.generate(remote[arch], ids, do_sample=False, **kwargs)
                refused += 2
        for arch in BUILD:
            with pytest.raises(djinn.InvalidRequest, match="input_ids holds 1000000"):
                s.start(remote[arch], _ids(10**6), breakpoints=[0]).wait()
            refused += 1
        g = djinn.remote(Lookup().cuda(), session=s, path="graph")     # the graph path checks its index ops
        for bad in (16, -17, 10**6):
            with pytest.raises(djinn.RemoteExecutionError, match="out of bounds|out of range"):
                g(torch.tensor([[1, 2, bad]])).cpu()
            refused += 1
        assert refused == 21 + 2 * 11 + 2 + 3  # forward cases x archs, generate x 2 ways, runs, graph

        assert tenant.info["pid"] == pid and tenant.transport.generation == generation  # never restarted
        assert not b.lost
        assert torch.equal(brm(IDS).logits.cpu(), logits)
        assert other.stats()["sessions"][b.sid]["kv_tokens"] == {brm.model_id: int(held.shape[1])}
        more = b.generate(brm, IDS[:, :2], max_new_tokens=2, do_sample=False, deterministic=True)
        assert more.shape == (1, held.shape[1] + 4) and torch.equal(more[:, :held.shape[1]], held)
        assert remote["gpt2"](IDS).logits.shape == (1, 8, 256)  # and the tenant itself goes on
    finally:
        tenant.close()
        other.close()
