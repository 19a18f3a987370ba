"""Tier 2: every request is answered (Note [Every request is answered] in djinn/server/engine.py), and
tensors of any layout cross the wire both ways (Note [Any layout travels] in djinn/protocol/tensors.py).

A one-element tensor with a stride other than 1 (a column of a batch-1 output) once could not be
encoded: the server logged the failure and never answered, the client waited out its timeout; the
same tensor as an input or a weight failed on the client with an untyped RuntimeError. The calls here
use a short timeout, so a missing reply fails the test in seconds.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import djinn
from djinn.config import ClientConfig
from djinn.frontend.connection import Connection
from djinn.frontend.remote import RemoteModel

from ..models import tiny_llama

SHORT = ClientConfig(call_timeout_s=20.0, retries=0)
PROMPT = torch.tensor([[1, 17, 42, 99, 5, 250, 7, 64, 31, 128]])


@pytest.fixture
def short_conn(server):
    c = Connection(server.address, secret=None, cfg=SHORT)
    yield c
    c.close()


def test_a_column_of_a_batch_1_output_comes_back(short_conn, device):
    """`rm(x)[:, 2].cpu()` of a [1, 5] output (stride 5, offset 2), on the graph path and the module path."""
    torch.manual_seed(0)
    lin = nn.Linear(5, 5)
    x = torch.randn(1, 5)
    rm = djinn.remote(lin, session=short_conn.session())
    with torch.no_grad():
        want = lin(x)
    assert torch.equal(rm(x)[:, 2].cpu(), want[:, 2])
    assert torch.equal(rm(x)[:, 2:3].cpu(), want[:, 2:3])
    assert rm(x)[:, 4].item() == want[0, 4].item()

    model = tiny_llama(seed=3, device=device)
    rl = RemoteModel.from_module(short_conn.session(), model)
    with torch.no_grad():
        logits = model(PROMPT.to(device)).logits.cpu()
    out = rl(PROMPT).logits
    assert torch.equal(out[:, -1, 7].cpu(), logits[:, -1, 7])
    assert torch.equal(out[:, 3].cpu(), logits[:, 3])


def test_odd_layout_inputs_and_weights_go_up(short_conn):
    """The same layouts as an input and as weights: sent, hashed and uploaded by value."""
    torch.manual_seed(1)
    lin = nn.Linear(1, 1)
    lin.bias = nn.Parameter(torch.randn(1, 5)[:, 2])                      # [1], stride 5, offset 2
    lin.weight = nn.Parameter(torch.randn(9).as_strided((1, 1), (7, 3), 4))  # [1, 1], strides (7, 3)
    x = torch.randn(1, 5)[:, 2]                                             # [1], stride 5, offset 2
    rm = djinn.remote(lin, session=short_conn.session())
    with torch.no_grad():
        want = lin(x)
    assert torch.equal(rm(x).cpu(), want)


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory):
    from ..conftest import ServerProcess

    cfg = tmp_path_factory.mktemp("replies") / "faults.yaml"
    cfg.write_text("fault_injection: true\n")
    s = ServerProcess("--config", str(cfg))
    yield s
    s.stop()


def test_a_reply_that_cannot_be_encoded_is_a_typed_error(fault_server):
    """A reply the codec refuses is answered at once with ProtocolError naming the op; requests taken in
    the same turn, and later ones, are answered too."""
    c = Connection(fault_server.address, secret=None, cfg=SHORT)
    try:
        s = c.session()
        before = [s.submit("ping", {}) for _ in range(3)]
        bad = s.submit("ping", {"_fault": "unencodable_reply"})
        after = [s.submit("ping", {}) for _ in range(3)]
        with pytest.raises(djinn.ProtocolError, match="ping: the server could not encode its reply"):
            bad.result(20)
        assert all("time" in f.result(20) for f in before + after)
        rm = djinn.remote(nn.Linear(4, 2), session=s)
        assert rm(torch.ones(1, 4)).cpu().shape == (1, 2)
    finally:
        c.close()
