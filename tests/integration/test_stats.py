"""Tier 2: what the server holds, as `stats()` reports it: weight dedup, freeing, tensor handles.

Tests that assert absolute Text-segment sizes use a server of this module's own (`module_server`, not the
shared one), and first wait until it holds no weights, so weights other tests left (e.g. all-ones norm
weights every tiny model has) cannot change the expected bytes.
"""
from __future__ import annotations

import gc
import time
from unittest import mock

import pytest
import torch

from djinn.frontend.connection import Connection
from djinn.frontend.remote import RemoteModel
from djinn.frontend import upload
from djinn.frontend.tensor import RemoteTensor
from djinn.frontend.upload import named_tensors
from djinn.protocol.hashing import weight_hash

from ..models import tiny_gpt2, tiny_llama

PROMPT = torch.tensor([[1, 17, 42, 99, 5, 250, 7, 64]])


@pytest.fixture(scope="module")
def gpt2_a(device):
    return tiny_gpt2(seed=0, device=device)


@pytest.fixture(scope="module")
def gpt2_b(device):
    return tiny_gpt2(seed=1, device=device)


@pytest.fixture(scope="module")
def llama(device):
    return tiny_llama(seed=3, device=device)


def unique_weights(model) -> dict[str, int]:
    """weight hash -> bytes, for every distinct tensor the model consists of."""
    return {weight_hash(t): t.numel() * t.element_size() for _, t in named_tensors(model)}


def text_bytes(conn) -> int:
    return conn.stats()["segments"]["text"]


def wait_for(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_dedup_and_free(module_server, gpt2_a, gpt2_b):
    srv = module_server()
    c1 = Connection(srv.address, secret=None)
    c2 = Connection(srv.address, secret=None)
    try:
        assert wait_for(lambda: text_bytes(c1) == 0)  # no other test's weights
        wa, wb = unique_weights(gpt2_a), unique_weights(gpt2_b)

        s1 = c1.session("first")
        rm1 = RemoteModel.from_module(s1, gpt2_a)
        assert rm1.upload.uploaded == len(wa) and rm1.upload.bytes_uploaded == sum(wa.values())
        assert text_bytes(c1) == sum(wa.values())
        assert rm1.nbytes == sum(wa.values())
        base = text_bytes(c1)

        # the same model again: another session of this connection, then another connection
        s2 = c1.session("second")
        rm2 = RemoteModel.from_module(s2, gpt2_a)
        assert rm2.upload.uploaded == 0 and rm2.upload.bytes_uploaded == 0
        assert rm2.model_id == rm1.model_id
        assert text_bytes(c1) == base
        s3 = c2.session("other client")
        rm3 = RemoteModel.from_module(s3, gpt2_a)
        assert rm3.upload.uploaded == 0 and rm3.upload.bytes_uploaded == 0
        assert rm3.model_id == rm1.model_id
        st = c1.stats()
        assert st["segments"]["text"] == base
        assert sorted(st["models"][rm1.model_id]["sessions"]) == sorted([s1.sid, s2.sid, s3.sid])

        # a different model adds exactly the bytes of the weights it does not share
        new = {h: n for h, n in wb.items() if h not in wa}
        assert 0 < len(new) < len(wb)  # norm weights/biases (ones, zeros) are shared
        s4 = c1.session("b")
        rm4 = RemoteModel.from_module(s4, gpt2_b)
        assert rm4.model_id != rm1.model_id
        assert rm4.upload.uploaded == len(new) and rm4.upload.bytes_uploaded == sum(new.values())
        assert text_bytes(c1) == base + sum(new.values())
        rm4b = RemoteModel.from_module(s1, gpt2_b)  # s1 holds both models now
        assert rm4b.upload.uploaded == 0 and text_bytes(c1) == base + sum(new.values())

        # closing every session that uses gpt2_b frees its unique bytes; shared ones stay
        s4.close()
        assert text_bytes(c1) == base + sum(new.values())  # s1 still holds it
        assert torch.equal(rm4b(PROMPT).logits.cpu(), rm4b(PROMPT).logits.cpu())
        c1.transport.call("release_model", {"sid": s1.sid, "model_id": rm4.model_id})
        st = c1.stats()
        assert st["segments"]["text"] == base
        assert rm4.model_id not in st["models"]

        # gpt2_a lives until its last session, across both clients, goes
        s1.close()
        s2.close()
        assert text_bytes(c1) == base
        c2.close()  # goodbye: the server reclaims the other client's session
        assert wait_for(lambda: text_bytes(c1) == 0)
        st = c1.stats()
        assert st["models"] == {} and st["text_entries"] == 0
        assert st["segments"]["uploads_in_flight"] == 0
    finally:
        c1.close()
        c2.close()


def test_from_path_dedups_with_upload(module_server, llama, device, tmp_path):
    llama.save_pretrained(tmp_path)
    srv = module_server()
    c = Connection(srv.address, secret=None)
    try:
        assert wait_for(lambda: text_bytes(c) == 0)  # no other test's weights
        with c.session("upload") as s1:
            rm_up = RemoteModel.from_module(s1, llama)
            base = text_bytes(c)
            assert base == sum(unique_weights(llama).values())
            with c.session("load") as s2:
                rm_dir = RemoteModel.from_path(s2, str(tmp_path))
                assert rm_dir.arch == "LlamaForCausalLM" and rm_dir.source == str(tmp_path)
                assert text_bytes(c) == base  # the checkpoint's weights are the uploaded ones
                with torch.no_grad():
                    ref = llama(PROMPT.to(device)).logits.cpu()
                assert torch.equal(rm_dir(PROMPT).logits.cpu(), ref)
                assert torch.equal(rm_up(PROMPT).logits.cpu(), ref)
            assert text_bytes(c) == base
        assert text_bytes(c) == 0

        # loading first, then uploading the same weights, uploads nothing
        with c.session("load first") as s3:
            RemoteModel.from_path(s3, str(tmp_path))
            loaded = text_bytes(c)
            assert loaded == base
            rm = RemoteModel.from_module(s3, llama)
            assert rm.upload.uploaded == 0 and text_bytes(c) == loaded
    finally:
        c.close()


def test_remote_tensor_metadata_without_fetch(conn, llama):
    s = conn.default_session()
    rm = RemoteModel.from_module(s, llama)
    out = rm(PROMPT, output_hidden_states=True)
    logits = out.logits
    before = conn.stats()["requests_served"]
    assert isinstance(logits, RemoteTensor)
    assert logits.shape == torch.Size([1, PROMPT.shape[1], 256]) and logits.size(-1) == 256
    assert logits.dtype == torch.float32 and logits.dim() == 3 and logits.ndim == 3
    assert logits.numel() == PROMPT.shape[1] * 256 and len(logits) == 1
    assert torch.device(logits.device).type == torch.device(conn.device).type
    assert len(out.hidden_states) == llama.config.num_hidden_layers + 1
    assert all(isinstance(h, RemoteTensor) and h.shape == (1, PROMPT.shape[1], 64) for h in out.hidden_states)
    assert "remote" in repr(logits)
    with pytest.raises(TypeError):
        iter(logits)
    after = conn.stats()["requests_served"]
    assert after == before + 1  # only the stats call itself reached the server
    # materializing does fetch, and agrees with itself
    assert torch.equal(logits.cpu(), torch.tensor(logits.tolist()))
    assert torch.equal(torch.from_numpy(logits.numpy()), logits.cpu())


def test_handles_freed_after_gc(conn, llama):
    with conn.session("handles") as s:
        rm = RemoteModel.from_module(s, llama)

        def held():
            return conn.stats()["sessions"][s.sid]["tensors"]

        assert held() == 0
        out1 = rm(PROMPT, output_hidden_states=True)  # logits + 3 hidden states
        keep = rm(PROMPT).logits
        assert held() == 1 + len(out1.hidden_states) + 1
        data = conn.stats()["sessions"][s.sid]["gpu_bytes"]
        del out1
        gc.collect()
        assert held() == 1 + 3 + 1  # frees wait for the session's next request
        keep.cpu()  # that request carries them
        assert held() == 1
        assert conn.stats()["sessions"][s.sid]["gpu_bytes"] < data
        emb = rm(PROMPT, output_hidden_states=True).hidden_states[0]  # the output's other tensors go
        gc.collect()
        s.reset(rm)
        assert held() == 2
        del keep, emb
        gc.collect()
        s.reset(rm)
        assert held() == 0 and conn.stats()["sessions"][s.sid]["gpu_bytes"] == 0


def test_second_remote_skips_hashing_and_inplace_change_reuploads(conn, device):
    """Hashes are cached per tensor: remoting a module again hashes nothing; a weight changed in
    place (version counter) is hashed and uploaded again, and only that weight."""
    model = tiny_gpt2(seed=5, device=device)  # private: this test modifies it
    hashed = []
    real = upload.weight_hash
    with mock.patch.object(upload, "weight_hash", side_effect=lambda t: hashed.append(1) or real(t)):
        with conn.session("one") as s1, conn.session("two") as s2:
            rm1 = RemoteModel.from_module(s1, model)
            objects = {id(t) for _, t in named_tensors(model)}
            assert len(objects) == rm1.upload.tensors - 1  # lm_head.weight is wte.weight
            assert len(hashed) == len(objects)  # each tensor object once, a tied one too
            n = len(hashed)
            rm2 = RemoteModel.from_module(s2, model)
            assert len(hashed) == n and rm2.upload.uploaded == 0 and rm2.model_id == rm1.model_id

            w = model.transformer.h[0].mlp.c_fc.weight
            with torch.no_grad():
                w.add_(1.0)
            rm3 = RemoteModel.from_module(s2, model)
            assert len(hashed) == n + 1
            assert rm3.upload.uploaded == 1 and rm3.upload.bytes_uploaded == w.numel() * w.element_size()
            assert rm3.model_id != rm1.model_id
            with torch.no_grad():
                ref = model(PROMPT.to(device)).logits.cpu()
            assert torch.equal(rm3(PROMPT).logits.cpu(), ref)
            assert not torch.equal(rm1(PROMPT).logits.cpu(), ref)  # the old model is untouched
