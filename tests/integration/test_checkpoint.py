"""Tier 2: sessions that asked are checkpointed to host memory when the server shuts down and restored
after the restart, continuing bitwise where they were (issue 8, djinn/server/handlers/checkpoint.py)."""
from __future__ import annotations

import os
import signal

import pytest
import torch

import djinn
from djinn.frontend.connection import Connection
from djinn.frontend.remote import RemoteModel
from djinn.server.handlers.checkpoint import file_name

from ..conftest import DEVICE
from ..models import VOCAB, tiny_llama
from .test_restart import wait_for
from .test_scheduling import wait_for as wait_value

GEN = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
A = torch.tensor([[1, 17, 42, 99, 5]])
B = torch.tensor([[7, 64, 31]])


def _local(model, ids, **kw):
    m, i = model.to(DEVICE), ids.to(DEVICE)
    with torch.no_grad():
        return m.generate(i, attention_mask=torch.ones_like(i), **kw).cpu()


def _restart(srv, start_server, conn, *flags: str):
    """Stop the server gracefully (SIGTERM: drain, checkpoint, exit), start a new one on the same port."""
    worker = conn.info["pid"]
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(60) == 0
    new = start_server("--port", srv.address.rsplit(":", 1)[1], *flags)
    assert wait_for(lambda: conn.transport.generation == 1 and conn.transport.dead is None, 60), "no reconnect"
    assert conn.info["pid"] != worker
    return new


@pytest.mark.parametrize("swapped", [False, True], ids=["resident", "swapped"])
def test_checkpointed_session_continues_after_a_restart(start_server, tmp_path, swapped):
    flags = ("--checkpoint-dir", str(tmp_path), "--policy", "signal", "--swap-on-io-wait")
    srv = start_server(*flags)
    model = tiny_llama(seed=9).eval()
    conn = Connection(srv.address, None)
    try:
        s = conn.session("agent", checkpoint=True)
        plain = conn.session("not-saved")
        assert s.checkpoint_token and plain.checkpoint_token is None
        rm = RemoteModel.from_module(s, model)
        out1 = s.generate(rm, A, **GEN)
        logits = rm(out1, session=s).logits  # a tensor handle the session holds
        if swapped:
            s.signal("IO_WAIT", eta_s=60.0)
            wait_value(lambda: conn.stats()["sessions"][s.sid]["state"] == "SWAPPED")
        _restart(srv, start_server, conn, *flags)
        files = list(tmp_path.iterdir())
        assert [f.name for f in files] == [file_name(s.checkpoint_token)]  # only the one that asked
        assert s.checkpoint_token not in files[0].name  # a listing shows no token, only its hash
        assert files[0].stat().st_mode & 0o777 == 0o600 and tmp_path.stat().st_mode & 0o777 == 0o700
        with pytest.raises(djinn.SessionLost):
            s.generate(rm, B, **GEN)

        s2 = conn.restore_session(s.checkpoint_token)
        assert s2.name == "agent" and s2.kv_tokens == {rm.model_id: out1.shape[1]}
        (restored,) = s2.restored_tensors.values()
        assert torch.equal(restored.cpu(), _logits(model, out1))
        rm2 = RemoteModel.from_module(s2, model)  # the same weights: the same model id and its KV
        assert rm2.model_id == rm.model_id
        out2 = s2.generate(rm2, B, **GEN)
        assert torch.equal(out2, _local(model, torch.cat([out1, B], 1), **GEN))  # one long generate
        assert not list(tmp_path.iterdir())  # restored once: the file is gone
        with pytest.raises(djinn.SessionNotFound, match="no checkpoint"):
            conn.restore_session(s.checkpoint_token)
    finally:
        conn.close()


def _logits(model, ids):
    m, i = model.to(DEVICE), ids.to(DEVICE)
    with torch.no_grad():
        return m(i).logits.cpu()


def test_a_restore_past_the_principals_gpu_quota_is_refused_and_keeps_the_file(start_server, tmp_path):
    """Note [Principal GPU quota]: a restore puts the session's tensors on the device, so it is checked
    before it copies them; refused, it opens no session and the checkpoint stays to be restored."""
    flags = ("--checkpoint-dir", str(tmp_path))
    srv = start_server(*flags)
    model = tiny_llama(seed=9).eval()
    conn = Connection(srv.address, None)
    try:
        s = conn.session("agent", checkpoint=True)
        rm = RemoteModel.from_module(s, model)
        logits = rm(A, session=s).logits  # 5 positions x 256 float32: 5120 bytes held
        quota = 4096
        _restart(srv, start_server, conn, *flags, "--quota-principal-gpu-gb", repr(quota / 2**30))
        with pytest.raises(djinn.QuotaExceeded) as info:
            conn.restore_session(s.checkpoint_token)
        assert info.value.message == (
            "restore_session would take this principal (local) to 5120 bytes on the device over all its sessions "
            f"(5120 bytes of restored tensors), over its GPU quota of {quota} bytes (quota_principal_gpu_gb); "
            "free tensors, close sessions or ask for less")
        assert [f.name for f in tmp_path.iterdir()] == [file_name(s.checkpoint_token)]
        assert conn.stats()["principal"]["sessions"]["used"] == 0 and conn.ping() is not None
        del logits
    finally:
        conn.close()


def test_checkpoint_can_be_asked_for_later_and_withdrawn(start_server, tmp_path):
    srv = start_server("--checkpoint-dir", str(tmp_path))
    conn = Connection(srv.address, None)
    try:
        keep, drop = conn.session("keep"), conn.session("drop")
        token = keep.checkpoint_on_shutdown()
        assert len(token) == 43 and keep.checkpoint_on_shutdown() == token  # asking twice: the same token
        drop.checkpoint_on_shutdown()
        assert drop.checkpoint_on_shutdown(False) is None
        _restart(srv, start_server, conn, "--checkpoint-dir", str(tmp_path))
        assert [f.name for f in tmp_path.iterdir()] == [file_name(token)]
        s = conn.restore_session(token, name="renamed")
        assert s.name == "renamed" and s.kv_tokens == {} and s.restored_tensors == {}
    finally:
        conn.close()


@pytest.mark.parametrize("token, err", [("../../etc/passwd", djinn.InvalidRequest), ("x" * 32, djinn.InvalidRequest),
                                        ("/" * 43, djinn.InvalidRequest), (7, djinn.InvalidRequest),
                                        ("0" * 43, djinn.SessionNotFound)])
def test_bad_tokens_are_typed_errors(conn, token, err):
    with pytest.raises(err):
        conn.restore_session(token)
    assert conn.ping() is not None


def test_the_checkpoint_directory_must_be_the_servers_own(start_server, tmp_path):
    """A directory left looser is tightened to 0700; a symlink in its place is refused when a session
    asks to be checkpointed (a typed error then, not a failure at shutdown), and the server serves on."""
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(elsewhere)
    for d, ok in ((loose, True), (link, False)):
        srv = start_server("--checkpoint-dir", str(d))
        conn = Connection(srv.address, None)
        try:
            if ok:
                s = conn.session("a", checkpoint=True)
                assert s.checkpoint_token and d.stat().st_mode & 0o777 == 0o700
            else:
                with pytest.raises(djinn.InvalidRequest, match="is not a directory"):
                    conn.session("a", checkpoint=True)
                with pytest.raises(djinn.InvalidRequest, match="is not a directory"):
                    conn.session("b").checkpoint_on_shutdown()
                assert [v["name"] for v in conn.stats()["sessions"].values()] == ["b"]  # "a" was not kept
            assert conn.ping() > 0
        finally:
            conn.close()
            srv.stop()
