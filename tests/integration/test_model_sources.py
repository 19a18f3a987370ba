"""Tier 2: what a client can make the server read or run when it builds a model.

Model directories are read only under `model_roots`, every file after its symlinks are resolved
(djinn/server/models/registry.py, Note [Model roots]); attention implementations come from the server's own
allow-list, whether named in the request or inside the config (Note [Attention implementations]).
"""
from __future__ import annotations

import json
import os

import pytest
import torch

import djinn
from djinn.frontend.connection import Connection
from djinn.frontend.remote import RemoteModel

from ..conftest import DEVICE
from ..models import tiny_gpt2, tiny_llama

PROMPT = torch.tensor([[1, 17, 42, 99, 5]])


@pytest.fixture(scope="module")
def rooted(tmp_path_factory):
    """A server whose model_roots is one directory; a model saved in it; another model outside it."""
    from ..conftest import ServerProcess

    base = tmp_path_factory.mktemp("sources")
    root, outside = base / "root", base / "outside"
    model = tiny_gpt2(seed=4)
    model.save_pretrained(root / "good")
    model.save_pretrained(outside / "private")
    config = base / "server.yaml"
    config.write_text(f"model_roots: [{json.dumps(str(root))}]\n")
    srv = ServerProcess("--config", str(config))
    yield srv, root, outside, model
    srv.stop()


def _copy_with_links(src, dst, links: dict[str, str]) -> None:
    """dst holds src's files, those named in `links` as symlinks to the given targets instead."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name in links:
            (dst / f.name).symlink_to(links[f.name])
        else:
            (dst / f.name).write_bytes(f.read_bytes())


def test_files_linked_from_outside_the_roots_are_refused(rooted):
    srv, root, outside, model = rooted
    conn = Connection(srv.address, secret=None)
    try:
        s = conn.session()
        rm = RemoteModel.from_path(s, str(root / "good"))
        with torch.no_grad():
            assert torch.equal(rm(PROMPT).logits.cpu(), model.to(DEVICE)(PROMPT.to(DEVICE)).logits.cpu())
        private = outside / "private"
        weights = next(private.glob("*.safetensors")).name
        cases = {
            "weights_link": {weights: str(private / weights)},
            "config_link": {"config.json": str(private / "config.json")},
            "relative_link": {weights: os.path.relpath(private / weights, root / "relative_link")},
        }
        for name, links in cases.items():
            _copy_with_links(root / "good", root / name, links)
            with pytest.raises(djinn.InvalidRequest, match="outside the server's model_roots"):
                RemoteModel.from_path(s, str(root / name))
        (root / "dir_link").symlink_to(private)  # the directory itself
        with pytest.raises(djinn.InvalidRequest, match="outside the server's model_roots"):
            RemoteModel.from_path(s, str(root / "dir_link"))
        with pytest.raises(djinn.InvalidRequest, match="outside the server's model_roots"):
            RemoteModel.from_path(s, str(root / ".." / "outside" / "private"))
        # A link that stays inside a root is fine.
        _copy_with_links(root / "good", root / "inner_link", {weights: str(root / "good" / weights)})
        rm2 = RemoteModel.from_path(s, str(root / "inner_link"))
        assert torch.equal(rm2(PROMPT).logits.cpu(), rm(PROMPT).logits.cpu())
        assert conn.ping() > 0
    finally:
        conn.close()


def _llama_args(**config_extra) -> dict:
    from transformers import AutoModelForCausalLM

    cfg = tiny_llama(seed=0).config
    return {"arch": type(AutoModelForCausalLM.from_config(cfg)).__name__,
            "config": dict(json.loads(cfg.to_json_string(use_diff=False)), **config_extra), "dtype": None, "seed": 0}


@pytest.mark.parametrize("impl", ["flash_attention_2", "flash_attention_3", "flex_attention",
                                  "kernels-community/flash-attn", "kernels-community/vllm-flash-attn3",
                                  "paged|flash_attention_2", "someone/any-kernel"])
def test_attention_implementations_come_from_the_servers_list(conn, impl):
    """Named in the request or set inside the config: refused at registration, before any build."""
    s = conn.default_session()
    with pytest.raises(djinn.InvalidRequest, match="not allowed on this server"):
        s.call("init_model", dict(_llama_args(), attn_impl=impl))
    with pytest.raises(djinn.InvalidRequest, match="not allowed on this server"):
        s.call("init_model", _llama_args(attn_implementation=impl))
    model = tiny_llama(seed=1)
    model.config._attn_implementation = impl  # what the client sends apart from the config's JSON
    with pytest.raises(djinn.InvalidRequest, match="not allowed on this server"):
        RemoteModel.from_module(s, model)
    assert conn.ping() > 0


@pytest.mark.parametrize("impl", ["eager", "sdpa", None])
def test_the_servers_own_attention_implementations_build(conn, device, impl):
    s = conn.default_session()
    model = tiny_llama(seed=2).to(device)
    if impl is not None:
        model.config._attn_implementation = impl
    rm = RemoteModel.from_module(s, model)
    with torch.no_grad():
        assert torch.equal(rm(PROMPT).logits.cpu(), model(PROMPT.to(device)).logits.cpu())
    init = s.call("init_model", dict(_llama_args(), attn_impl=impl))
    assert init["model_id"]
