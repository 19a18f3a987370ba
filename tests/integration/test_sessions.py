"""Tier 2: sessions against a real server: KV-cache continuation, isolation, reset, closing.

The local reference mirrors djinn/server/execution/executor.generate: one DynamicCache per (session, model),
passed as past_key_values, with the tokens seen so far concatenated in front of each new prompt.
"""
from __future__ import annotations

import gc

import pytest
import torch
from transformers import DynamicCache

import djinn
from djinn.frontend.remote import RemoteModel
from djinn.frontend.session import Session

from ..models import TINY_BUILDERS

P1 = torch.tensor([[1, 17, 42, 99, 5, 250, 7, 64]])
P2 = torch.tensor([[33, 8, 190]])
P3 = torch.tensor([[77, 4]])
Q1 = torch.tensor([[1, 200, 3, 150, 9]])


class LocalSession:
    """What a server session does for one model, done locally."""

    def __init__(self, model, device):
        self.model, self.device = model, device
        self.cache = DynamicCache(config=model.config)
        self.ids = torch.zeros(1, 0, dtype=torch.long, device=device)

    def generate(self, new_ids: torch.Tensor, **kw) -> torch.Tensor:
        ids = torch.cat([self.ids, new_ids.to(self.device)], dim=1)
        with torch.no_grad():
            self.ids = self.model.generate(ids, past_key_values=self.cache, **kw)
        return self.ids.cpu()


@pytest.fixture(scope="module")
def local_models(device):
    return {name: TINY_BUILDERS[name](seed=0, device=device) for name in ("llama", "gpt2")}


@pytest.fixture(params=["llama", "gpt2"])
def model(request, local_models):
    return local_models[request.param]


def _kv_tokens(conn, s: Session) -> dict:
    return conn.stats()["sessions"][s.sid]["kv_tokens"]


def test_kv_continuation_matches_local_cache(conn, model, device):
    with conn.session("kv") as s:
        rm = RemoteModel.from_module(s, model)
        local = LocalSession(model, device)
        r1 = s.generate(rm, P1, max_new_tokens=8)
        assert torch.equal(r1, local.generate(P1, max_new_tokens=8))
        assert r1.shape == (1, P1.shape[1] + 8)
        assert _kv_tokens(conn, s) == {rm.model_id: r1.shape[1]}

        r2 = s.generate(rm, P2, max_new_tokens=8)
        assert torch.equal(r2, local.generate(P2, max_new_tokens=8))
        assert r2.shape == (1, r1.shape[1] + P2.shape[1] + 8)
        assert torch.equal(r2[:, :r1.shape[1]], r1)  # the whole sequence so far
        assert _kv_tokens(conn, s)[rm.model_id] == r2.shape[1]

        # sampling continues the same way, seeded like a local torch.manual_seed
        r3 = s.generate(rm, P3, max_new_tokens=6, do_sample=True, top_k=20, seed=11)
        torch.manual_seed(11)
        assert torch.equal(r3, local.generate(P3, max_new_tokens=6, do_sample=True, top_k=20))
        assert _kv_tokens(conn, s)[rm.model_id] == r3.shape[1]


def test_reset_drops_cache(conn, model, device):
    with conn.session() as s:
        rm = RemoteModel.from_module(s, model)
        s.generate(rm, P1, max_new_tokens=8)
        assert _kv_tokens(conn, s)[rm.model_id] == P1.shape[1] + 8
        data_with_kv = conn.stats()["sessions"][s.sid]["gpu_bytes"]
        assert data_with_kv > 0
        s.reset(rm)
        assert _kv_tokens(conn, s) == {}
        assert conn.stats()["sessions"][s.sid]["gpu_bytes"] < data_with_kv
        # after a reset the session starts from scratch: same as a fresh local cache on P2 alone
        got = s.generate(rm, P2, max_new_tokens=8)
        assert torch.equal(got, LocalSession(model, device).generate(P2, max_new_tokens=8))
        s.reset(rm)
        s.reset(rm)  # resetting an empty cache is fine


def test_stateless_generate_leaves_session_cache(conn, model, device):
    with conn.session() as s:
        rm = RemoteModel.from_module(s, model)
        local = LocalSession(model, device)
        assert torch.equal(s.generate(rm, P1, max_new_tokens=8), local.generate(P1, max_new_tokens=8))
        before = _kv_tokens(conn, s)
        # stateless calls in the same session, plain and streamed, start fresh and keep nothing
        with torch.no_grad():
            ref = model.generate(Q1.to(device), max_new_tokens=5).cpu()
        assert torch.equal(rm.generate(Q1, max_new_tokens=5, session=s), ref)
        stream = rm.generate(Q1, max_new_tokens=5, session=s, stream=True)
        assert list(stream) == ref[0, Q1.shape[1]:].tolist()
        assert rm(Q1, session=s).logits.shape == (1, Q1.shape[1], 256)  # nor does a forward
        assert _kv_tokens(conn, s) == before
        assert torch.equal(s.generate(rm, P2, max_new_tokens=8), local.generate(P2, max_new_tokens=8))


def test_streamed_session_generate(conn, model, device):
    with conn.session() as s:
        rm = RemoteModel.from_module(s, model)
        local = LocalSession(model, device)
        s.generate(rm, P1, max_new_tokens=8)
        local.generate(P1, max_new_tokens=8)
        stream = s.generate(rm, P2, max_new_tokens=8, stream=True)
        tokens = list(stream)
        ref = local.generate(P2, max_new_tokens=8)
        assert torch.equal(stream.sequences, ref)
        assert tokens == ref[0, -8:].tolist()
        assert _kv_tokens(conn, s)[rm.model_id] == ref.shape[1]


def test_two_sessions_keep_separate_caches(conn, model, device):
    with conn.session("a") as a, conn.session("b") as b:
        rm = RemoteModel.from_module(a, model)
        la, lb = LocalSession(model, device), LocalSession(model, device)
        assert torch.equal(a.generate(rm, P1, max_new_tokens=8), la.generate(P1, max_new_tokens=8))
        assert torch.equal(b.generate(rm, Q1, max_new_tokens=4), lb.generate(Q1, max_new_tokens=4))
        assert _kv_tokens(conn, a)[rm.model_id] == P1.shape[1] + 8
        assert _kv_tokens(conn, b)[rm.model_id] == Q1.shape[1] + 4
        assert torch.equal(a.generate(rm, P2, max_new_tokens=8), la.generate(P2, max_new_tokens=8))
        b.reset(rm)
        assert rm.model_id in _kv_tokens(conn, a) and _kv_tokens(conn, b) == {}
        assert torch.equal(a.generate(rm, P3, max_new_tokens=4), la.generate(P3, max_new_tokens=4))


def test_session_cache_batch_mismatch(conn, local_models):
    with conn.session() as s:
        rm = RemoteModel.from_module(s, local_models["llama"])
        s.generate(rm, P1, max_new_tokens=2)
        with pytest.raises(djinn.InvalidRequest):
            s.generate(rm, torch.cat([P2, P2]), max_new_tokens=2)
        with pytest.raises(djinn.InvalidRequest):
            s.generate(rm, P2, max_new_tokens=2, attention_mask=torch.ones_like(P2))
        assert _kv_tokens(conn, s)[rm.model_id] == P1.shape[1] + 2  # failed calls change nothing


def test_failed_generate_leaves_no_stale_cache(conn, local_models, device):
    """A generate that fails after the cache grew (sampling at a temperature so small that the scores
    overflow to inf: the prefill has run, then the sampling check refuses the scores, Note [Scores are
    checked before sampling]) must not leave a cache that no longer matches the session's tokens: the
    positions the failed call wrote are not part of the sequence, and the session goes on from the
    tokens it had. (This used to run gpt2 past n_positions=256 mid-decode; that is now refused before
    anything runs: test_index_validation.py.)"""
    model = local_models["gpt2"]
    long_prompt = torch.randint(3, 256, (1, 200), generator=torch.Generator().manual_seed(2))
    with conn.session() as s:
        rm = RemoteModel.from_module(s, model)
        s.generate(rm, long_prompt, max_new_tokens=8)
        assert _kv_tokens(conn, s) == {rm.model_id: 208}
        with pytest.raises(djinn.InvalidRequest, match="sampling refused"):
            s.generate(rm, P1, max_new_tokens=8, do_sample=True, temperature=1e-40)
        st = conn.stats()["sessions"][s.sid]
        assert st["kv_tokens"] == {rm.model_id: 208} and st["gpu_bytes"] == 13 * 16 * 2 * 2 * 64 * 4  # 207 fed
        got = s.generate(rm, P2, max_new_tokens=8)  # goes on from the 208 tokens, consistently
        local = LocalSession(model, device)
        local.generate(long_prompt, max_new_tokens=8)
        assert torch.equal(got, local.generate(P2, max_new_tokens=8))
        assert conn.stats()["sessions"][s.sid]["kv_tokens"] == {rm.model_id: got.shape[1]}


def test_closed_session_raises(conn, local_models):
    model = local_models["llama"]
    s = conn.session("short-lived")
    rm = RemoteModel.from_module(s, model)
    rm(P1)
    s.close()
    assert s.closed and s.sid not in conn.stats()["sessions"]
    with pytest.raises(djinn.DjinnError):
        rm(P1)
    with pytest.raises(djinn.DjinnError):
        s.generate(rm, P1, max_new_tokens=2)
    s.close()  # closing twice is a no-op

    # the server itself refuses a session it closed, even if the client still thinks it is open
    s2 = conn.session()
    conn.transport.call("close_session", {"sid": s2.sid})
    with pytest.raises(djinn.SessionNotFound):
        s2.call("forward", {"model_id": rm.model_id, "args": [], "kwargs": {"$d": {}}})
    with pytest.raises(djinn.SessionNotFound):
        RemoteModel.from_module(s2, model)

    # a session of another client does not exist for this one
    other = djinn.Connection(conn.address, secret=None)
    try:
        s3 = other.session()
        with pytest.raises(djinn.SessionNotFound):
            conn.transport.call("reset_kv", {"sid": s3.sid, "model_id": "x"})
    finally:
        other.close()
    # the connection still works (every session that held the model is closed: it uploads again)
    with conn.session() as s4:
        rm4 = RemoteModel.from_module(s4, model)
        assert rm4.model_id == rm.model_id
        with torch.no_grad():
            ref = model(P1.to(model.device)).logits.cpu()
        assert torch.equal(rm4(P1).logits.cpu(), ref)


def test_remote_tensor_bound_to_its_session(conn, local_models):
    model = local_models["llama"]
    with conn.session("a") as a, conn.session("b") as b:
        rm = RemoteModel.from_module(a, model)
        out_a = rm(P1)
        emb = rm(P1, output_hidden_states=True, session=a).hidden_states[0]
        with pytest.raises(djinn.InvalidRequest):
            rm(inputs_embeds=emb, session=b)
        with pytest.raises(djinn.InvalidRequest):
            b.generate(rm, P1, max_new_tokens=2, attention_mask=out_a.logits)
        # the server also refuses another session's handle id
        rm(P1, session=b)  # attach rm to b
        with pytest.raises(djinn.HandleNotFound):
            b.call("forward", {"model_id": rm.model_id, "args": [], "kwargs": {"$d": {"inputs_embeds": {"$h": emb.hid}}}})
        assert torch.equal(rm(inputs_embeds=emb, session=a).logits.cpu(), out_a.logits.cpu())
    del out_a, emb
    gc.collect()


def test_sessions_with_a_common_prompt_prefix_share_its_blocks_bitwise(conn, local_models, device):
    """Note [Prefix sharing]: a second session whose prompt starts with the first one's 32 tokens (two
    full 16-token blocks) holds those two blocks by reference, computes only its own tokens, and its
    greedy generate is bitwise the local one over its whole prompt; the first session is unchanged."""
    model = local_models["llama"]
    system = torch.randint(3, 256, (1, 32), generator=torch.Generator().manual_seed(11))
    own_a, own_b = torch.tensor([[7, 9, 11, 13, 15]]), torch.tensor([[21, 23, 25]])
    with conn.session() as a, conn.session() as b:
        rm = RemoteModel.from_module(a, model)
        out_a = a.generate(rm, torch.cat([system, own_a], 1), max_new_tokens=6)
        out_b = b.generate(RemoteModel.from_module(b, model), torch.cat([system, own_b], 1), max_new_tokens=6)
        st = conn.stats()
        sa, sb = st["sessions"][a.sid], st["sessions"][b.sid]
        assert sb["prefix_tokens_reused"] == 32 and sa["prefix_tokens_reused"] == 0
        assert sa["kv_shared_blocks"] == sb["kv_shared_blocks"] == 2
        for ids, out in ((torch.cat([system, own_a], 1), out_a), (torch.cat([system, own_b], 1), out_b)):
            assert torch.equal(out, LocalSession(model, device).generate(ids, max_new_tokens=6))
        more = torch.tensor([[5, 6]])  # b goes on past the shared blocks; a's view of them is unchanged
        want_b = LocalSession(model, device)
        want_b.generate(torch.cat([system, own_b], 1), max_new_tokens=6)
        assert torch.equal(b.generate(RemoteModel.from_module(b, model), more, max_new_tokens=4),
                           want_b.generate(more, max_new_tokens=4))
        want_a = LocalSession(model, device)
        want_a.generate(torch.cat([system, own_a], 1), max_new_tokens=6)
        assert torch.equal(a.generate(rm, more, max_new_tokens=4), want_a.generate(more, max_new_tokens=4))
