"""Tier 1: checkpoint files are private from their first byte, in a directory the server made or
checked, and named so that a directory listing shows no token (djinn/server/handlers/checkpoint.py, Note
[Checkpoint tokens])."""
from __future__ import annotations

import hashlib
import os
import stat

import pytest
import safetensors.torch
import torch

from djinn.config import ServerConfig
from djinn.protocol.errors import InvalidRequest
from djinn.server.handlers import checkpoint


def _dir_cfg(d) -> ServerConfig:
    return ServerConfig(checkpoint_dir=str(d))


def _mode(p) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


@pytest.fixture
def open_umask():
    """The most permissive umask: nothing may rely on it to make files private."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_a_missing_directory_is_created_0700(tmp_path, open_umask):
    d = tmp_path / "parent" / "ckpt"
    assert checkpoint.checked_directory(_dir_cfg(d)) == d
    assert _mode(d) == 0o700


@pytest.mark.parametrize("mode", [0o777, 0o755, 0o750, 0o701, 0o500])
def test_our_directory_with_another_mode_is_set_to_0700(tmp_path, mode):
    d = tmp_path / "ckpt"
    d.mkdir()
    os.chmod(d, mode)
    checkpoint.checked_directory(_dir_cfg(d))
    assert _mode(d) == 0o700


def test_a_symlink_or_a_file_in_its_place_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    link = tmp_path / "ckpt"
    link.symlink_to(elsewhere)
    with pytest.raises(InvalidRequest, match=r"is not a directory \(a symlink or a file\)"):
        checkpoint.checked_directory(_dir_cfg(link))
    f = tmp_path / "plain"
    f.write_text("x")
    with pytest.raises(InvalidRequest, match="is not a directory"):
        checkpoint.checked_directory(_dir_cfg(f))


def test_a_directory_of_another_user_is_refused(tmp_path, monkeypatch):
    d = tmp_path / "ckpt"
    d.mkdir(mode=0o700)
    owner = os.lstat(d).st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner + 1)  # the server runs as someone else
    with pytest.raises(InvalidRequest, match=rf"belongs to uid {owner}, not to this server's \({owner + 1}\)"):
        checkpoint.checked_directory(_dir_cfg(d))
    assert _mode(d) == 0o700  # left as it was


def test_files_are_0600_before_the_first_byte_and_named_by_the_token_hash(tmp_path, open_umask, monkeypatch):
    d = checkpoint.checked_directory(_dir_cfg(tmp_path / "ckpt"))
    token = checkpoint.new_token()
    assert checkpoint._TOKEN.match(token) and len(token) == 43 and token != checkpoint.new_token()
    seen = []
    real_save = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        seen.append(_mode(filename))  # the file exists, already private, when the writer opens it
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    path = checkpoint.write(d, checkpoint.file_name(token), {"t": torch.arange(6)}, {"format": checkpoint.FORMAT})
    assert seen == [0o600]
    assert _mode(path) == 0o600
    assert os.listdir(d) == [hashlib.sha256(token.encode()).hexdigest() + ".safetensors"]
    assert safetensors.torch.load_file(path)["t"].tolist() == list(range(6))


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    d = checkpoint.checked_directory(_dir_cfg(tmp_path / "ckpt"))

    def broken(tensors, filename, metadata=None):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.write(d, checkpoint.file_name(checkpoint.new_token()), {"t": torch.zeros(1)}, {})
    assert os.listdir(d) == []


def test_only_a_private_regular_file_of_ours_is_restored_from(tmp_path):
    d = checkpoint.checked_directory(_dir_cfg(tmp_path / "ckpt"))
    good = checkpoint.write(d, "a.safetensors", {"t": torch.zeros(1)}, {})
    assert checkpoint._own_file(good)
    assert not checkpoint._own_file(d / "missing.safetensors")
    os.chmod(good, 0o644)
    assert not checkpoint._own_file(good)
    outside = tmp_path / "planted.safetensors"
    safetensors.torch.save_file({"t": torch.zeros(1)}, str(outside))
    os.chmod(outside, 0o600)
    (d / "link.safetensors").symlink_to(outside)
    assert not checkpoint._own_file(d / "link.safetensors")
