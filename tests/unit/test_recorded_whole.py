"""Recurrent layers and fused attention on the graph path: recorded as the aten op eager runs, so a
graph run is bitwise-equal to a local call (Note [RNNs recorded whole] and Note [Composite ops] in
srg/ops.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from djinn.server.execution.interpreter import Interpreter, compile_graph
from djinn.srg import from_wire
from djinn.srg.capture import capture_module
from djinn.srg.tree import tensor_leaves

from .test_srg import _names, _wire_roundtrip


def _run(m: nn.Module, args: tuple, kwargs: dict | None = None):
    """Capture `m(*args, **kwargs)`, send its graph through the wire form, run it as the server does."""
    names = _names(m)
    cap = capture_module(m, args, kwargs or {}, names)
    c = compile_graph(from_wire(_wire_roundtrip(cap.wire)), torch.device("cpu"))
    # as the server holds them: plain tensors (the capture says which stand-ins required grad)
    by_hash = {names[n]: t.detach().clone() for n, t in list(m.named_parameters()) + list(m.named_buffers())}
    ins = tensor_leaves((tuple(args), dict(kwargs or {})))
    return cap, c, Interpreter(c).run(ins, [by_hash[h] for _, h in c.weights])


class _Seq(nn.Module):
    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn

    def forward(self, x, *h):
        out, state = self.rnn(x, *h)
        return (out, *state) if isinstance(state, tuple) else (out, state)


RNNS = {
    "lstm": lambda: nn.LSTM(8, 16, batch_first=True),
    "lstm_2layer_bidir": lambda: nn.LSTM(8, 16, num_layers=2, bidirectional=True),
    "lstm_proj": lambda: nn.LSTM(8, 16, proj_size=4, batch_first=True),
    "gru": lambda: nn.GRU(8, 16, batch_first=True),
    "gru_2layer_bidir": lambda: nn.GRU(8, 16, num_layers=2, bidirectional=True, batch_first=True),
    "rnn_tanh": lambda: nn.RNN(8, 16, batch_first=True),
    "rnn_relu_nobias": lambda: nn.RNN(8, 16, nonlinearity="relu", bias=False, batch_first=True),
}


@pytest.mark.parametrize("name", sorted(RNNS))
def test_rnns_are_recorded_whole_and_bitwise(name):
    torch.manual_seed(0)
    m = _Seq(RNNS[name]()).eval()
    x = torch.randn(3, 7, 8)
    cap, c, out = _run(m, (x,))
    aten = {"lstm": "aten.lstm.input", "gru": "aten.gru.input", "rnn": None}[name[:name.index("_")] if "_" in name
                                                                             else name]
    ops = [n.op for n in cap.graph.nodes if n.op.startswith("aten.")]
    want = aten or ("aten.rnn_relu.input" if "relu" in name else "aten.rnn_tanh.input")
    assert ops.count(want) == 1 and not any(op.startswith("aten.unsafe_split") for op in ops), ops
    with torch.no_grad():
        ref = m(x)
    assert len(out) == len(ref) and all(torch.equal(a, b) for a, b in zip(out, ref))
    assert not cap.graph.random


def test_lstm_with_initial_state_and_its_cost():
    torch.manual_seed(0)
    m = _Seq(nn.LSTM(8, 16, num_layers=2, batch_first=True)).eval()
    x, h, cst = torch.randn(3, 7, 8), torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    cap, c, out = _run(m, (x, (h, cst)))
    with torch.no_grad():
        ref = m(x, (h, cst))
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    # 2 flops per weight element per token: layer 0 reads 64x8 + 64x16, layer 1 64x16 + 64x16
    tokens = 3 * 7
    assert c.flops >= 2 * tokens * (64 * 8 + 64 * 16 + 64 * 16 + 64 * 16)


def test_rnn_dropout_in_training_marks_the_graph_random():
    m = _Seq(nn.GRU(8, 16, num_layers=2, dropout=0.5, batch_first=True)).train()
    cap = capture_module(m, (torch.randn(2, 5, 8),), {}, _names(m))
    assert cap.graph.random


@pytest.mark.parametrize("grad", [True, False])
def test_weights_keep_their_requires_grad_for_the_kernel(grad):
    """GRU's CPU kernel rounds differently when a weight requires grad (even under no_grad): the "$w"
    nodes say so, and the server runs the op with the client's flags."""
    torch.manual_seed(0)
    m = _Seq(nn.GRU(32, 32, batch_first=True)).eval().requires_grad_(grad)
    x = torch.randn(2, 8, 32)
    cap, c, out = _run(m, (x,))
    marked = [n.kwargs.get("grad", False) for n in cap.graph.nodes if n.op == "$w"]
    assert marked == [grad] * 4
    with torch.no_grad():
        ref = m(x)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))


# -- Note [Fast paths] ------------------------------------------------------------------------------
class _SelfAttn(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, **kw)

    def forward(self, x, pad=None, need_weights=True):
        return self.attn(x, x, x, key_padding_mask=pad, need_weights=need_weights)


class _Cross(_SelfAttn):
    def forward(self, x, y, pad=None):
        return self.attn(x, y, y, key_padding_mask=pad, need_weights=False)


PAD = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])


def _fused(cap) -> list[str]:
    return [n.op for n in cap.graph.nodes if "native_multi_head" in n.op or "encoder_layer_fwd" in n.op
            or "scaled_dot_product" in n.op]


@pytest.mark.parametrize("pad", [None, PAD], ids=["nomask", "padmask"])
@pytest.mark.parametrize("need_weights", [True, False])
def test_eval_mha_batch_first_records_the_fused_op(pad, need_weights):
    torch.manual_seed(0)
    m = _SelfAttn(batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    cap, c, out = _run(m, (x, pad, need_weights))
    assert _fused(cap) == ["aten._native_multi_head_attention.default"]
    with torch.no_grad():
        ref = m(x, pad, need_weights)
    ref = [t for t in ref if t is not None]
    assert len(out) == len(ref) and all(torch.equal(a, b) for a, b in zip(out, ref))


@pytest.mark.parametrize("kind", ["train", "seq_first", "cross"])
def test_mha_slow_paths_stay_bitwise(kind):
    torch.manual_seed(0)
    m = (_Cross if kind == "cross" else _SelfAttn)(batch_first=kind != "seq_first", dropout=0.0)
    m.train(kind == "train")
    x = torch.randn(2, 5, 16)
    args = (x, torch.randn(2, 5, 16)) if kind == "cross" else (x,)
    cap, c, out = _run(m, args)
    assert "aten._native_multi_head_attention.default" not in _fused(cap)
    with torch.no_grad():
        ref = m(*args)
    ref = [t for t in ref if t is not None]
    assert all(torch.equal(a, b) for a, b in zip(out, ref))


class _Encoder(nn.Module):
    def __init__(self, nested: bool, **kw):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True, **kw)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested)

    def forward(self, x, pad=None):
        return self.enc(x, src_key_padding_mask=pad)


@pytest.mark.parametrize("pad", [None, PAD], ids=["nomask", "padmask"])
@pytest.mark.parametrize("kw", [{}, {"norm_first": True, "activation": "gelu"}], ids=["post", "pre_gelu"])
def test_transformer_encoder_records_each_layers_fused_op(pad, kw):
    torch.manual_seed(0)
    m = _Encoder(nested=False, **kw).eval()
    x = torch.randn(2, 5, 16)
    cap, c, out = _run(m, (x, pad))
    assert _fused(cap) == ["aten._transformer_encoder_layer_fwd.default"] * 2
    with torch.no_grad():
        assert torch.equal(out[0], m(x, pad))


def test_transformer_encoder_over_nested_tensors_is_refused_with_the_fix():
    from djinn.protocol.errors import CaptureError

    m = _Encoder(nested=True).eval()
    with pytest.raises(CaptureError, match="enable_nested_tensor=False"):
        _run(m, (torch.randn(2, 5, 16), PAD))
    torch.manual_seed(0)
    m = _Encoder(nested=True).eval()  # no mask: no nested tensors, each layer's fast path
    x = torch.randn(2, 5, 16)
    cap, c, out = _run(m, (x,))
    with torch.no_grad():
        assert torch.equal(out[0], m(x))
    assert not any(type(mod).__dict__.get("forward") is not mod.forward.__func__ for mod in m.modules()
                   if "forward" in vars(mod))  # the capture's forwards are gone
