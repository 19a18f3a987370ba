"""Weight streaming on the CPU: model layouts, budgets, Text residency, and the clear errors where a
GPU is needed (the CUDA path itself is tests/gpu/test_streaming.py)."""
from __future__ import annotations

import pytest
import torch

from djinn.config import ServerConfig
from djinn.protocol.errors import InvalidRequest
from djinn.protocol.hashing import weight_hash
from djinn.server.models.tensors import named_tensors
from djinn.server.models.streaming import (
    GIB, budget_bytes, check_device, find_decoder_layers, layout_of, plan_for, stream_module, upload_residency,
)
from djinn.vmu.planner import pack
from djinn.vmu.ring_buffer import PinnedLayers, RingStreamer
from djinn.vmu.text import DEVICE, HOST, PINNED, TextSegment

from ..models import _build, tiny_gpt2, tiny_llama


def deep_llama(layers: int = 6, seed: int = 0):
    """tiny_llama with enough layers that a budget can stream most of them."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2)
    return _build(cfg, seed, "cpu")


def meta_copy(model):
    with torch.device("meta"):
        return type(model)(model.config).eval()


@pytest.mark.parametrize("build, path", [(tiny_llama, "model.layers"), (tiny_gpt2, "transformer.h")])
def test_find_decoder_layers(build, path):
    model = build()
    found, layers = find_decoder_layers(model)
    assert found == path and layers is model.get_submodule(path) and len(layers) == 2


def test_no_decoder_layers_is_a_clear_error():
    with pytest.raises(InvalidRequest, match="has no decoder layers"):
        find_decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_layout_splits_fixed_and_layers_and_dedups_keys_within_a_layer():
    model = tiny_llama()
    hashes = {name: weight_hash(t) for name, t in named_tensors(model)}
    layout = layout_of(model, hashes.__getitem__)
    assert layout.layers_path == "model.layers"
    fixed_names = [n for n, _ in layout.fixed]
    assert fixed_names == ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                           "model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"]
    names0 = [n for n, _ in layout.layers[0]]
    assert names0 == [f"model.layers.0.{n}" for n in (
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
        "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
        "input_layernorm.weight", "post_attention_layernorm.weight")]
    # Both norms of a fresh model are all ones: one Text entry, placed once per layer.
    assert len(layout.keys(0)) == 8 and layout.keys(0)[-1] == hashes["model.layers.0.input_layernorm.weight"]
    assert layout.fixed_keys() == tuple(dict.fromkeys(hashes[n] for n in fixed_names))


def test_plan_for_uses_real_sizes():
    model = deep_llama(6)
    hashes = {name: weight_hash(t) for name, t in named_tensors(model)}
    sizes = {hashes[n]: t.numel() * t.element_size() for n, t in named_tensors(model)}
    layout = layout_of(model, hashes.__getitem__)
    fixed = sum(sizes[k] for k in layout.fixed_keys())
    layer = [sizes[k] for k in layout.keys(0)]
    footprint = pack(layer, 512)[1]
    plan = plan_for(layout, sizes.__getitem__, fixed + 2 * footprint)
    assert [s.layer for s in plan.streamed] == [0, 1, 2, 3, 4, 5] and plan.resident == ()
    assert plan.fixed_bytes == fixed and plan.streamed_bytes == 6 * sum(layer)
    plan = plan_for(layout, sizes.__getitem__, fixed + 2 * footprint + 3 * sum(layer))
    assert plan.resident == (1, 3, 5) and [s.layer for s in plan.streamed] == [0, 2, 4]
    with pytest.raises(InvalidRequest, match="smallest budget that works is"):
        plan_for(layout, sizes.__getitem__, fixed + 2 * footprint - 1)
    assert not plan_for(layout, sizes.__getitem__, 10 * GIB).streaming


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_a_plan_that_fits_binds_on_the_cpu_and_runs_bitwise(build):
    model = build(seed=4)
    by_name = dict(named_tensors(model))
    layout = layout_of(model, lambda n: n)
    plan = plan_for(layout, lambda n: by_name[n].numel() * by_name[n].element_size(), GIB)
    rebuilt = meta_copy(model)
    sm = stream_module(rebuilt, layout, plan, torch.device("cpu"), resident=by_name.__getitem__,
                       source=by_name.__getitem__)
    assert sm.streamer is None and sm.stats()["streamed_layers"] == 0
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(rebuilt(ids).logits, model(ids).logits)


def test_streaming_on_the_cpu_is_a_clear_error():
    model = deep_llama(4)
    by_name = dict(named_tensors(model))
    layout = layout_of(model, lambda n: n)
    size = lambda n: by_name[n].numel() * by_name[n].element_size()  # noqa: E731
    fixed = sum(size(n) for n, _ in layout.fixed)
    plan = plan_for(layout, size, fixed + 2 * pack([size(k) for k in layout.keys(0)], 512)[1])
    assert plan.streaming
    with pytest.raises(InvalidRequest, match="weight streaming needs a CUDA device: this server runs on cpu"):
        stream_module(meta_copy(model), layout, plan, torch.device("cpu"), resident=by_name.__getitem__,
                      source=by_name.__getitem__)
    with pytest.raises(ValueError, match="weight streaming needs a CUDA device, got cpu"):
        RingStreamer(plan, [torch.empty(0, dtype=torch.uint8)] * 4, torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="pinned host memory needs CUDA"):
            PinnedLayers([100], 64)


def test_check_device_and_budget_parsing():
    check_device(torch.device("cpu"), None)
    check_device(torch.device("cuda", 0), 1)
    with pytest.raises(InvalidRequest, match="needs a CUDA device"):
        check_device(torch.device("cpu"), 1)
    assert budget_bytes(None, None) is None
    assert budget_bytes(12, None) == 12 * GIB and budget_bytes(None, 0.5) == GIB // 2
    assert budget_bytes(2, 8.0) == 2 * GIB  # the request's budget wins over the server default
    for bad in (0, -1, True, "12", float("inf"), float("nan"), [1]):
        with pytest.raises(InvalidRequest, match="weight_budget_gb must be a number of GiB > 0"):
            budget_bytes(bad, None)


def test_upload_residency():
    assert upload_residency(torch.device("cpu"), None) == DEVICE
    assert upload_residency(torch.device("cpu"), "host") == DEVICE  # the CPU is the device
    assert upload_residency(torch.device("cuda", 0), "host") == HOST
    assert upload_residency(torch.device("cuda", 0), None) == DEVICE
    assert upload_residency(torch.device("cuda", 0), None, 12.0) == HOST  # the server's default budget
    assert upload_residency(torch.device("cpu"), None, 12.0) == DEVICE
    with pytest.raises(InvalidRequest, match="upload stage must be 'host'"):
        upload_residency(torch.device("cuda", 0), "gpu")


def test_server_config_budget_validation():
    assert ServerConfig(weight_budget_gb=12).validate().weight_budget_gb == 12
    assert ServerConfig().weight_budget_gb is None
    for bad in (0, -2.5, True, "12"):
        with pytest.raises(ValueError, match="weight_budget_gb=.* must be a number of GiB > 0"):
            ServerConfig(weight_budget_gb=bad).validate()


def test_text_residency_accounting():
    seg = TextSegment()
    a, b, c = torch.ones(10), torch.zeros(4, dtype=torch.float16), torch.arange(6, dtype=torch.int64)
    ha, hb, hc = weight_hash(a), weight_hash(b), weight_hash(c)
    seg.add(ha, a)
    seg.add(hb, b, HOST)
    seg.add(hc, c, HOST)
    assert (seg.device_nbytes, seg.host_nbytes, seg.pinned_nbytes, seg.nbytes) == (40, 56, 0, 96)
    assert seg.add(hb, torch.zeros(4, dtype=torch.float16), DEVICE) is b  # dedup keeps the first copy
    assert seg.entry(hb).residency == HOST and seg.refs(hb) == 2
    # to_device promotes once; on a CPU "device" the bytes are simply recounted
    t = seg.to_device(hb, torch.device("cpu"))
    assert seg.entry(hb).residency == DEVICE and torch.equal(t, b)
    assert (seg.device_nbytes, seg.host_nbytes) == (48, 48)
    assert seg.to_device(hb, torch.device("cpu")) is t
    view = torch.empty(64, dtype=torch.uint8)[16:64].view(torch.int64)
    view.copy_(c)
    seg.rehome(hc, view, PINNED)
    assert seg.get(hc) is view and (seg.host_nbytes, seg.pinned_nbytes) == (0, 48)
    with pytest.raises(ValueError, match="cannot rehome"):
        seg.rehome(hc, torch.zeros(5, dtype=torch.int64), HOST)
    with pytest.raises(ValueError, match="residency"):
        seg.add("x" * 64, a, "gpu")
    seg.release(hc)
    assert (seg.pinned_nbytes, len(seg)) == (0, 2)
    seg.release(hb)
    seg.release(hb)
    seg.release(ha)
    assert (seg.nbytes, seg.device_nbytes, seg.host_nbytes, len(seg)) == (0, 0, 0, 0)
