"""Tier 2: a zoo of architectures against one real server, each bitwise-equal to local execution.

For every Hugging Face architecture (tiny seeded configs: 2 layers, hidden 32-64, vocabulary 256) and a
few custom modules: a forward on a padded batch with its attention_mask (where the model takes one), a
breakpoint at a layer (`layer=1`, or a module path for custom modules) whose activation is read and
steered (a vector added), compared with the same forward hook run locally, and greedy generate where
the model generates. `djinn.remote(model)` picks the path: the module path for the architectures the
server builds, the graph path for the rest. What does not work yet is a strict xfail naming why, so it
flips to a failure the day it starts working (and the mark must go).
"""
from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import djinn
from djinn.frontend.connection import Connection
from djinn.frontend.tensor import RemoteTensor
from djinn.srg.layers import layer_path

from ..conftest import ServerProcess
from ..models import (VOCAB, tiny_bert, tiny_gpt2, tiny_gpt_neox, tiny_gptj, tiny_llama, tiny_mistral, tiny_qwen2,
                      tiny_t5)

# -- tiny builders the shared tests/models.py does not have --------------------------------------
_DEC = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _from_config(auto: str, cfg) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    return getattr(transformers, auto).from_config(cfg).eval()


def _causal(config_cls: str, **kw) -> Callable[[], nn.Module]:
    def build():
        import transformers

        return _from_config("AutoModelForCausalLM", getattr(transformers, config_cls)(**{**_DEC, **kw}))
    return build


def _opt():
    from transformers import OPTConfig

    return _from_config("AutoModelForCausalLM", OPTConfig(
        vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, word_embed_proj_dim=64, bos_token_id=1, eos_token_id=2, pad_token_id=0))


def _falcon():
    from transformers import FalconConfig

    return _from_config("AutoModelForCausalLM", FalconConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, bos_token_id=1,
        eos_token_id=2, pad_token_id=0))


def _bloom():
    from transformers import BloomConfig

    return _from_config("AutoModelForCausalLM", BloomConfig(
        vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2, pad_token_id=0))


def _roberta():
    from transformers import RobertaConfig

    return _from_config("AutoModel", RobertaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, pad_token_id=1))


def _bart():
    from transformers import BartConfig

    return _from_config("AutoModelForSeq2SeqLM", BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None))


def _vit():
    from transformers import ViTConfig

    return _from_config("AutoModel", ViTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64))


def _whisper():
    from transformers import WhisperConfig

    return _from_config("AutoModelForSpeechSeq2Seq", WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=16, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_source_positions=16, max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1, begin_suppress_tokens=None, suppress_tokens=None))


# -- custom modules (the graph path) ---------------------------------------------------------------
class RNN(nn.Module):
    """An LSTM or a GRU over embedded tokens."""

    def __init__(self, cell: type):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 32)
        self.rnn = cell(32, 32, batch_first=True)
        self.head = nn.Linear(32, VOCAB)

    def forward(self, ids):
        h, _ = self.rnn(self.emb(ids))
        return self.head(h)


class WithLoss(nn.Module):
    """A loss computed inside forward, as HF models do when given labels."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 32)
        self.proj = nn.Linear(32, VOCAB)

    def forward(self, ids, labels):
        logits = self.proj(self.emb(ids))
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten()), logits


class Upsample(nn.Module):
    """Convolutions around F.interpolate (nearest and bilinear)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        h = F.interpolate(self.conv(x), scale_factor=2, mode="nearest")
        h = F.interpolate(h, size=(12, 12), mode="bilinear", align_corners=False)
        return self.out(h)


class Constants(nn.Module):
    """Tensors made inside forward from Python data (Note [Tensors made in a forward])."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        scale = torch.tensor([1.0, 2.0, 3.0, 4.0], device=x.device)
        shift = x.new_tensor(0.5)
        return self.lin(x * scale) + shift + torch.arange(4, device=x.device)


def _seeded(cls, *args) -> Callable[[], nn.Module]:
    def build():
        torch.manual_seed(0)
        return cls(*args).eval()
    return build


# -- inputs ----------------------------------------------------------------------------------------
def _ids(pad: int = 0, left: bool = True, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of 2 with the second row padded by 3 (left for decoders, right for encoders)."""
    ids = torch.randint(3, VOCAB, (2, n), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    cols = slice(0, 3) if left else slice(n - 3, n)
    mask[1, cols] = 0
    ids[1, cols] = pad
    return ids, mask


def _decoder_inputs():
    ids, mask = _ids()
    return {"input_ids": ids, "attention_mask": mask}


def _encoder_inputs(pad: int = 0):
    def inputs():
        ids, mask = _ids(pad, left=False)
        return {"input_ids": ids, "attention_mask": mask}
    return inputs


def _seq2seq_inputs():
    ids, mask = _ids(left=False)
    dec = torch.randint(3, VOCAB, (2, 4), generator=torch.Generator().manual_seed(2))
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec}


def _gen(n: int = 16) -> torch.Generator:
    return torch.Generator().manual_seed(n)


# -- the zoo ---------------------------------------------------------------------------------------
GRAPH_GENERATE = "the graph path runs forward only: generate needs the module path, which does not build {}"


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], dict]
    stop: Any = 1                       # a layer number, or a module path for custom modules
    generate: dict | None = None        # generate's inputs; None: not a generative model
    xfail: dict = field(default_factory=dict)  # "forward" | "breakpoint" | "generate" -> the reason

    def __repr__(self) -> str:
        return self.name


def _hf(name, build, inputs=_decoder_inputs, generate="decoder", xfail=None):
    if generate == "decoder":
        generate = {}  # the forward inputs, max_new_tokens=4, greedy
    return Case(name, build, inputs, generate=generate, xfail=xfail or {})


def _graph_gen(arch: str) -> dict:
    return {"generate": GRAPH_GENERATE.format(arch)}


ZOO = [
    # decoder-only: the module path builds these
    _hf("gpt2", tiny_gpt2),
    _hf("llama", tiny_llama),
    _hf("mistral", tiny_mistral),
    _hf("qwen2", tiny_qwen2),
    _hf("qwen3", _causal("Qwen3Config", head_dim=16)),
    _hf("gpt_neox", tiny_gpt_neox),
    _hf("opt", _opt),
    _hf("phi", _causal("PhiConfig")),
    _hf("phi3", _causal("Phi3Config")),
    _hf("gemma", _causal("GemmaConfig", head_dim=16)),
    _hf("gemma2", _causal("Gemma2Config", head_dim=16)),
    _hf("falcon", _falcon),
    _hf("gptj", tiny_gptj),
    _hf("bloom", _bloom),
    # mixture of experts
    _hf("mixtral", _causal("MixtralConfig", num_local_experts=4, num_experts_per_tok=2)),
    _hf("qwen2_moe", _causal("Qwen2MoeConfig", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                             shared_expert_intermediate_size=32)),
    # encoders
    _hf("bert", tiny_bert, _encoder_inputs(), generate=None),
    _hf("roberta", _roberta, _encoder_inputs(pad=1), generate=None),
    # encoder-decoders
    _hf("t5", tiny_t5, _seq2seq_inputs, generate={"drop": ["decoder_input_ids"]}),
    _hf("bart", _bart, _seq2seq_inputs, generate={"drop": ["decoder_input_ids"]}),
    # vision, audio
    _hf("vit", _vit, lambda: {"pixel_values": torch.randn(2, 3, 32, 32, generator=_gen())}, generate=None),
    _hf("whisper", _whisper,
        lambda: {"input_features": torch.randn(2, 16, 32, generator=_gen()),
                 "decoder_input_ids": torch.tensor([[1, 5, 6], [1, 7, 8]])},
        generate={"drop": ["decoder_input_ids"]}),
    # custom modules
    Case("lstm", _seeded(RNN, nn.LSTM), lambda: {"ids": _ids()[0]}, stop="rnn"),
    Case("gru", _seeded(RNN, nn.GRU), lambda: {"ids": _ids()[0]}, stop="rnn"),
    Case("cross_entropy", _seeded(WithLoss), lambda: {"ids": _ids()[0], "labels": _ids()[0].roll(1, 1)},
         stop="proj"),
    Case("interpolate", _seeded(Upsample), lambda: {"x": torch.randn(2, 3, 5, 5, generator=_gen())}, stop="conv"),
    Case("tensor_constants", _seeded(Constants), lambda: {"x": torch.randn(3, 4, generator=_gen())}, stop="lin"),
]


# -- fixtures --------------------------------------------------------------------------------------
_LOCAL: dict[str, nn.Module] = {}
_REMOTE: dict[str, Any] = {}


@pytest.fixture(scope="module")
def zoo_conn(device):
    """One server for the zoo; the local models are built while it starts (2 cores: both are busy)."""
    started: dict = {}

    def start():
        try:  # a small Stack to measure: each generate model's first KV pool measures a forward this long
            started["srv"] = ServerProcess("--max-prefill-tokens", "256", "--prefill-step-tokens", "256")
        except BaseException as e:  # noqa: BLE001 - re-raised on the test's thread
            started["error"] = e

    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    for case in ZOO:
        _LOCAL[case.name] = case.build().to(device)
    thread.join()
    if "error" in started:
        raise started["error"]
    srv = started["srv"]
    c = Connection(srv.address, secret=None)
    yield c
    c.close()
    srv.stop()
    _LOCAL.clear()
    _REMOTE.clear()


@pytest.fixture
def pair(request, zoo_conn):
    """(the case, the local model, its remote twin in the case's own session), remoted once per module."""
    case: Case = request.param
    model = _LOCAL[case.name]
    if case.name not in _REMOTE:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the graph path's one-line warning for HF models
            _REMOTE[case.name] = djinn.remote(model, session=zoo_conn.session(case.name))
    yield case, model, _REMOTE[case.name]


def _params(what: str):
    out = []
    for case in ZOO:
        if what == "generate" and case.generate is None:
            continue
        why = case.xfail.get(what)
        marks = [pytest.mark.xfail(reason=why, strict=True)] if why else []
        out.append(pytest.param(case, id=case.name, marks=marks))
    return out


def _on(device, inputs: dict) -> dict:
    return {k: v.to(device) for k, v in inputs.items()}


def _leaves(out) -> list:
    """The tensors of an output, in order (ModelOutputs and tuples walked; Nones skipped)."""
    if isinstance(out, (torch.Tensor, RemoteTensor)):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _leaves(v)]
    return []


def _assert_same(got, ref) -> None:
    got, ref = _leaves(got), _leaves(ref)
    assert len(got) == len(ref) > 0
    for g, r in zip(got, ref):
        assert isinstance(g, RemoteTensor)
        g = g.cpu()
        assert g.dtype == r.dtype and g.shape == r.shape
        assert torch.equal(g, r.cpu())


def _stop_path(case: Case, model: nn.Module) -> str:
    return layer_path(model, case.stop) if isinstance(case.stop, int) else case.stop


def _steer(t: torch.Tensor) -> torch.Tensor:
    return torch.randn(t.shape[-1], generator=torch.Generator().manual_seed(7))


# -- the checks ------------------------------------------------------------------------------------
@pytest.mark.parametrize("pair", _params("forward"), indirect=True)
def test_forward(pair, device):
    case, model, rm = pair
    inputs = case.inputs()
    with torch.no_grad():
        ref = model(**_on(device, inputs))
    _assert_same(rm(**inputs), ref)


@pytest.mark.parametrize("pair", _params("breakpoint"), indirect=True)
def test_breakpoint_steers_as_a_local_hook(pair, device):
    case, model, rm = pair
    inputs = case.inputs()
    path = _stop_path(case, model)
    seen = []

    def hook(module, args, output):
        t = output if isinstance(output, torch.Tensor) else output[0]
        seen.append(t.clone())
        t += _steer(t).to(t.device)

    h = model.get_submodule(path).register_forward_hook(hook)
    try:
        with torch.no_grad():
            ref = model(**_on(device, inputs))
    finally:
        h.remove()
    run = rm.session.start(rm, breakpoints=[case.stop], **inputs)
    stop = run.wait()
    assert stop.path == path
    assert torch.equal(stop.activation.cpu(), seen[0].cpu())
    stop.activation += _steer(seen[0])
    assert run.resume() is None
    _assert_same(run.output, ref)


@pytest.mark.parametrize("pair", _params("generate"), indirect=True)
def test_greedy_generate(pair, device):
    case, model, rm = pair
    inputs = {k: v for k, v in case.inputs().items() if k not in case.generate.get("drop", ())}
    first = inputs.pop(next(iter(inputs)))  # positional, as generate's first parameter (input_features too)
    kw = dict(max_new_tokens=4, do_sample=False)
    got = rm.generate(first, **inputs, **kw)  # first: where it is not supported yet, fail before the local work
    with torch.no_grad():
        ref = model.generate(first.to(device), **_on(device, inputs), **kw)
    assert torch.equal(got.cpu() if isinstance(got, RemoteTensor) else got, ref.cpu())


def test_a_loss_target_out_of_range_is_refused_and_the_server_keeps_serving(zoo_conn):
    """F.cross_entropy reads logits[i, labels[i]]: on CUDA a label past the classes is a device-side
    assert for every tenant, so the interpreter checks targets before the kernel (check_indices)."""
    model = _seeded(WithLoss)()
    rm = djinn.remote(model, session=zoo_conn.session("bad labels"))
    ids = _ids()[0]
    labels = ids.clone()
    labels[1, 2] = VOCAB
    with pytest.raises(djinn.RemoteExecutionError, match=f"index {VOCAB} is out of bounds for the classes with size {VOCAB}"):
        rm(ids, labels)[0].cpu()
    labels[1, 2] = -100  # cross_entropy's ignore_index
    loss, _ = rm(ids, labels)
    with torch.no_grad():
        assert torch.equal(loss.cpu(), model(ids, labels)[0])


def test_bart_positions_past_its_table_are_refused_and_the_server_keeps_serving(zoo_conn):
    """BART's learned position tables (64 rows here, offset 2) are index tables: an encoder input or a
    generate that would read past them is refused before any kernel (on CUDA it would be a device-side
    assert for every tenant), and the same model then generates as local."""
    model = _bart()
    rm = djinn.remote(model, session=zoo_conn.session("bart limits"))
    with pytest.raises(djinn.InvalidRequest):
        rm.generate(torch.randint(3, VOCAB, (1, 70), generator=_gen()), max_new_tokens=2)
    with pytest.raises(djinn.InvalidRequest):
        rm.generate(torch.randint(3, VOCAB, (1, 8), generator=_gen()), max_new_tokens=80, min_new_tokens=80)
    ids = torch.randint(3, VOCAB, (1, 8), generator=_gen())
    got = rm.generate(ids, max_new_tokens=4, do_sample=False)
    want = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(got.cpu() if isinstance(got, RemoteTensor) else got, want)


def test_whisper_generates_as_local_and_refuses_what_it_cannot(zoo_conn):
    """Note [Whisper generate]: Whisper's own generate runs on the server over the paged blocks, greedy
    and sampled (temperature > 0, seeded) bitwise to local, shorter audio zero-padded as locally. A
    generate past its decoder's learned table (32 positions: the start token + 31 new), input_features
    of the wrong shape (mel bins, or more frames than 2 x max_source_positions: long-form) and Whisper
    arguments the server does not run (timestamps, language) are a typed InvalidRequest before any
    kernel (a position past the table would be a device-side assert on CUDA), and the server keeps
    serving."""
    model = _whisper()
    rm = djinn.remote(model, session=zoo_conn.session("whisper limits"))
    feats = torch.randn(2, 16, 32, generator=_gen())

    def same(x, seed=None, **kw):
        got = rm.generate(x, seed=seed, **kw)
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad():
            want = model.generate(x, **kw)
        assert torch.equal(got.cpu() if isinstance(got, RemoteTensor) else got, want)
        return want

    same(feats, max_new_tokens=31, do_sample=False)                     # the last position of the table
    sampled = same(feats, seed=3, max_new_tokens=12, temperature=0.8)   # Whisper samples iff temperature > 0
    assert len(set(sampled[0].tolist())) > 1
    same(feats[:1, :, :20], seed=1, max_new_tokens=6, temperature=0.9, suppress_tokens=[5, 9])  # short audio
    same(feats, max_new_tokens=4, decoder_start_token_id=7)
    with pytest.raises(djinn.InvalidRequest, match=r"= 33 positions.*learned position table of 32"):
        rm.generate(feats, max_new_tokens=32)
    with pytest.raises(djinn.InvalidRequest, match="15 mel bins.*num_mel_bins=16"):
        rm.generate(torch.randn(1, 15, 32, generator=_gen()), max_new_tokens=2)
    with pytest.raises(djinn.InvalidRequest, match="33 frames.*long-form"):
        rm.generate(torch.randn(1, 16, 33, generator=_gen()), max_new_tokens=2)
    with pytest.raises(djinn.InvalidRequest, match="needs input_features"):
        rm.generate(torch.ones(1, 16, 32, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(djinn.InvalidRequest, match="30 frames.*exactly 32"):
        rm(input_features=feats[:, :, :30], decoder_input_ids=torch.tensor([[1], [1]])).logits.cpu()
    for arg in ({"return_timestamps": True}, {"language": "en"}, {"temperature": [0.0, 0.5]}):
        with pytest.raises(djinn.InvalidRequest, match=next(iter(arg))):
            rm.generate(feats, max_new_tokens=2, **arg)
    same(feats, max_new_tokens=4, do_sample=False)
