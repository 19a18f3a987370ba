"""Tier 2: `session.fork()` (Note [Session fork]): the child shares every KV block of the parent, costs
no KV block until one of them writes, and both continue bitwise as separate local sessions would;
a parent swapped to host is brought back first; tensors are copies; closing one keeps the other."""
from __future__ import annotations

import torch

from djinn.frontend.connection import Connection
from djinn.frontend.remote import RemoteModel

from .test_scheduling import BT, GEN, P1, P2, Q2, local_turns, model, sstats, wait_for  # noqa: F401 (fixture)


def _blocks_free(conn, rm) -> int:
    return conn.stats()["kv"]["models"][rm.model_id]["blocks_free"]


def test_forked_sessions_share_blocks_and_continue_bitwise(module_server, model, device):
    srv = module_server(*BT)
    conn = Connection(srv.address, None)
    try:
        a = conn.session("parent")
        rm = RemoteModel.from_module(a, model)
        ref_a = local_turns(model, device, P1, P2)
        ref_b = local_turns(model, device, P1, Q2)
        assert torch.equal(a.generate(rm, P1, **GEN), ref_a[0])          # 16 tokens seen, 15 in KV
        free = _blocks_free(conn, rm)
        b = a.fork("child")
        assert b.sid != a.sid and b.kv_tokens == {rm.model_id: 16}
        assert b.fork_info["shared_blocks"] == 4                           # 15 tokens: 4 blocks of 4
        assert _blocks_free(conn, rm) == free                              # no new KV memory
        assert sstats(conn, a)["kv_shared_blocks"] == sstats(conn, b)["kv_shared_blocks"] == 4
        # Each continues differently: the last, partly written block is copied by whichever writes.
        assert torch.equal(b.generate(rm, Q2, **GEN), ref_b[1])
        assert torch.equal(a.generate(rm, P2, **GEN), ref_a[1])
        assert conn.stats()["kv"]["models"][rm.model_id]["cow_copies"] >= 1
        assert sstats(conn, a)["kv_shared_blocks"] == sstats(conn, b)["kv_shared_blocks"] == 3
        b.close()                                                           # the parent keeps its blocks
        assert torch.equal(a.generate(rm, Q2, **GEN), local_turns(model, device, P1, P2, Q2)[2])
    finally:
        conn.close()


def test_fork_of_a_swapped_parent_brings_it_back_first(start_server, model, device):
    srv = start_server("--policy", "signal", "--swap-on-io-wait", *BT)
    conn = Connection(srv.address, None)
    try:
        a = conn.session()
        rm = RemoteModel.from_module(a, model)
        ref = local_turns(model, device, P1, P2)
        a.generate(rm, P1, **GEN)
        a.signal("IO_WAIT", eta_s=60.0)
        wait_for(lambda: sstats(conn, a)["state"] == "SWAPPED")
        b = a.fork()
        assert sstats(conn, a)["swaps_in"] == 1 and b.fork_info["shared_blocks"] == 4
        assert torch.equal(b.generate(rm, P2, **GEN), ref[1])
        assert torch.equal(a.generate(rm, P2, **GEN), ref[1])
    finally:
        conn.close()


def test_forked_tensors_are_copies(module_server, model):
    srv = module_server(*BT)
    conn = Connection(srv.address, None)
    try:
        a = conn.session()
        rm = RemoteModel.from_module(a, model)
        out = rm(P1)                          # a forward's logits: a tensor the session holds
        logits = out.logits
        b = a.fork()
        (copy,) = [t for t in b.forked_tensors.values() if list(t.shape) == list(logits.shape)]
        want = logits.cpu()
        logits.mul_(0)                        # an in-place edit of the parent's tensor
        assert torch.equal(copy.cpu(), want) and not torch.equal(logits.cpu(), want)
    finally:
        conn.close()
