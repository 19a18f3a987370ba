"""Tier 2: index inputs of the module path are range-checked before any kernel (issue 15, item 2).

On CUDA an out-of-range token id reaches the embedding kernel as a device-side assert that restarts the
worker and loses every tenant's sessions; on the CPU it is an IndexError. Either way it must never get
that far: every index-like input (input_ids, position_ids, cache_position, token_type_ids, labels,
logits_to_keep, decoder_input_ids, a 2-D attention mask a model counts positions with, generate's
special token ids and its length against a learned position table) is refused with InvalidRequest
naming the input, the value and the allowed range, on forward, generate and a breakpoint run, while a
bystander tenant's forward and generate stay bitwise what they were. Rotary models have no position
table: long sequences and large positions still run there. (Note [Index inputs are checked before the
device sees them] in djinn/server/execution/validate.py.) The same cases run on a CUDA server in
tests/gpu/test_index_validation_gpu.py, which checks the worker never restarts.
"""
from __future__ import annotations

import pytest
import torch

import djinn
from djinn.frontend.connection import Connection
from djinn.frontend.remote import RemoteModel

from ..conftest import DEVICE
from ..models import VOCAB, tiny_gpt2, tiny_llama
from .test_sessions import LocalSession

BUILD = {"gpt2": tiny_gpt2, "llama": tiny_llama}
IDS = torch.tensor([[1, 17, 42, 99, 5, 250, 7, 64]])   # 8 tokens; VOCAB = 256 = GPT-2's n_positions
POS = 256


def _ids(last: int) -> torch.Tensor:
    ids = IDS.clone()
    ids[0, -1] = last
    return ids


def _long(n: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(n))


#: (case, architectures, forward args, forward kwargs, the refusal's message).
FORWARD_CASES = [
    ("input_ids>=vocab", "gpt2 llama", (_ids(VOCAB),), {}, r"input_ids holds 256, out of range: allowed range is \[0, 256\)"),
    ("input_ids<0", "gpt2 llama", (_ids(-1),), {}, r"input_ids holds -1, out of range: allowed range is \[0, 256\)"),
    ("input_ids=1e6", "gpt2 llama", (_ids(10**6),), {}, r"input_ids holds 1000000, out of range"),
    ("input_ids_by_keyword", "gpt2 llama", (), {"input_ids": _ids(300)}, r"input_ids holds 300, out of range"),
    ("position_ids>=table", "gpt2", (IDS,), {"position_ids": torch.arange(8)[None] + 250},
     r"position_ids holds 256, out of range: allowed range is \[0, 256\)"),
    ("position_ids<0", "gpt2", (IDS,), {"position_ids": torch.arange(8)[None] - 1},
     r"position_ids holds -1, out of range: allowed range is \[0, 256\)"),
    ("position_ids<0_rotary", "llama", (IDS,), {"position_ids": torch.arange(8)[None] - 1},
     r"position_ids holds -1, out of range: allowed range is \[0, inf\)"),
    ("cache_position>=table", "gpt2", (IDS,), {"cache_position": torch.arange(8) + 256},
     r"cache_position holds 256, out of range: allowed range is \[0, 256\)"),
    ("cache_position<0", "gpt2 llama", (IDS,), {"cache_position": torch.arange(8) - 3},
     r"cache_position holds -3, out of range"),
    ("token_type_ids>=vocab", "gpt2", (IDS,), {"token_type_ids": torch.full((1, 8), VOCAB)},
     r"token_type_ids holds 256, out of range: allowed range is \[0, 256\)"),
    ("labels>=vocab", "gpt2 llama", (IDS,), {"labels": _ids(VOCAB)},
     r"labels holds 256, out of range: allowed range is \[0, 256\) \(or -100, ignored\)"),
    ("logits_to_keep", "gpt2 llama", (IDS,), {"logits_to_keep": torch.tensor([8])},
     r"logits_to_keep holds 8, out of range: allowed range is \[-8, 8\)"),
    ("sequence>table", "gpt2", (_long(POS + 1),), {},
     r"a sequence of 257 tokens needs positions 0..256, but this model's learned position table allows \[0, 256\)"),
    ("mask_not_0_1", "gpt2", (IDS,), {"attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1, 1, 2]])},
     r"attention_mask holds 2; allowed values are 0 and 1"),
]

#: (case, architectures, generate input_ids, generate kwargs, the refusal's message).
GENERATE_CASES = [
    ("input_ids>=vocab", "gpt2 llama", _ids(VOCAB), {"max_new_tokens": 2}, r"input_ids holds 256, out of range"),
    ("input_ids<0", "gpt2 llama", _ids(-7), {"max_new_tokens": 2}, r"input_ids holds -7, out of range"),
    ("past_the_table", "gpt2", _long(200), {"max_new_tokens": 100},
     r"generate: 0 cached \+ 200 new \+ 100 generated tokens = 300 positions, but this model has a learned "
     r"position table of 256"),
    ("max_length_past_the_table", "gpt2", _long(200), {"max_length": 257}, r"= 257 positions"),
    ("pad_token_id", "gpt2 llama", IDS, {"max_new_tokens": 2, "pad_token_id": VOCAB},
     r"generate: pad_token_id=256 is out of range: token ids must be ints in \[0, 256\)"),
    ("eos_token_id", "gpt2 llama", IDS, {"max_new_tokens": 2, "eos_token_id": [2, -5]},
     r"generate: eos_token_id=\[2, -5\] is out of range"),
    ("mask_not_0_1", "gpt2", IDS, {"max_new_tokens": 2, "attention_mask": torch.tensor([[1, 1, 1, 1, 3, 1, 1, 1]])},
     r"attention_mask holds 3; allowed values are 0 and 1"),
]


def _cases(table, arch):
    return [pytest.param(arch, *c[2:], id=f"{arch}-{c[0]}") for c in table if arch in c[1].split()]


class Bystander:
    """Another client, with its own session and model, whose results must not move."""

    def __init__(self, address: str):
        self.conn = Connection(address, secret=None)
        self.s = self.conn.session("bystander")
        self.rm = RemoteModel.from_module(self.s, tiny_llama(seed=9, device=DEVICE))
        self.logits = self.rm(IDS).logits.cpu()
        self.tokens = self.s.generate(self.rm, IDS, max_new_tokens=4, do_sample=False)

    def check(self) -> None:
        assert torch.equal(self.rm(IDS).logits.cpu(), self.logits)
        self.s.call("reset_kv", {"model_id": self.rm.model_id})
        assert torch.equal(self.s.generate(self.rm, IDS, max_new_tokens=4, do_sample=False), self.tokens)


@pytest.fixture(scope="module")
def bystander(server):
    b = Bystander(server.address)
    yield b
    b.conn.close()


@pytest.fixture(scope="module")
def tenant(server):
    """The tenant that sends bad requests: one session per architecture, models made once."""
    conn = Connection(server.address, secret=None)
    s = conn.session("tenant")
    models = {arch: build(seed=5, device=DEVICE) for arch, build in BUILD.items()}
    remote = {arch: RemoteModel.from_module(s, m) for arch, m in models.items()}
    yield s, models, remote
    conn.close()


def _refused(fn, match: str) -> None:
    with pytest.raises(djinn.InvalidRequest, match=match) as info:
        fn()
    assert type(info.value) is djinn.InvalidRequest


@pytest.mark.parametrize("arch,args,kwargs,match", _cases(FORWARD_CASES, "gpt2") + _cases(FORWARD_CASES, "llama"))
def test_forward_index_out_of_range_is_refused(tenant, bystander, arch, args, kwargs, match):
    s, models, remote = tenant
    _refused(lambda: remote[arch](*args, **kwargs).logits.cpu(), match)
    bystander.check()
    out = remote[arch](IDS).logits.cpu()                      # and the same session goes on
    with torch.no_grad():
        assert torch.equal(out, models[arch](IDS.to(DEVICE)).logits.cpu())


@pytest.mark.parametrize("arch,ids,kwargs,match", _cases(GENERATE_CASES, "gpt2") + _cases(GENERATE_CASES, "llama"))
def test_generate_index_out_of_range_is_refused(tenant, bystander, arch, ids, kwargs, match):
    s, models, remote = tenant
    _refused(lambda: remote[arch].generate(ids, do_sample=False, **kwargs), match)   # stateless
    _refused(lambda: s.generate(remote[arch], ids, do_sample=False, **kwargs), match)  # on the session's KV
    bystander.check()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_breakpoint_runs_check_their_inputs(tenant, bystander, arch):
    s, models, remote = tenant
    _refused(lambda: s.start(remote[arch], _ids(10**6), breakpoints=[0]).wait(), r"input_ids holds 1000000")
    _refused(lambda: s.start(remote[arch], IDS, breakpoints=[0], labels=_ids(-2)).wait(), r"labels holds -2")
    _refused(lambda: s.start(remote[arch], _ids(VOCAB), breakpoints=[0], method="generate",
                             max_new_tokens=2).wait(), r"input_ids holds 256")
    if arch == "gpt2":
        _refused(lambda: s.start(remote[arch], _long(250), breakpoints=[0], method="generate",
                                 max_new_tokens=10).wait(), r"= 260 positions")
    assert not s.conn.stats()["sessions"][s.sid]["runs"]  # no run was left behind
    bystander.check()


def test_generate_past_the_table_on_the_session_cache_is_refused_and_the_cache_goes_on(tenant, bystander):
    s, models, remote = tenant
    rm, model = remote["gpt2"], models["gpt2"]
    s.call("reset_kv", {"model_id": rm.model_id})
    local = LocalSession(model, torch.device(DEVICE))
    first, more = _long(240), _long(3)
    assert torch.equal(s.generate(rm, first, max_new_tokens=10, do_sample=False),   # 250 positions held
                       local.generate(first, max_new_tokens=10, do_sample=False))
    _refused(lambda: s.generate(rm, more, max_new_tokens=4, do_sample=False),
             r"generate: 250 cached \+ 3 new \+ 4 generated tokens = 257 positions")
    assert torch.equal(s.generate(rm, more, max_new_tokens=3, do_sample=False),     # 256: fits, same cache
                       local.generate(more, max_new_tokens=3, do_sample=False))
    s.call("reset_kv", {"model_id": rm.model_id})
    bystander.check()


def test_rotary_models_take_long_sequences_and_large_positions(tenant):
    """No learned table, no upper bound: a Llama forward at positions 300.. and a generate past
    max_position_embeddings run and equal local execution."""
    s, models, remote = tenant
    model, rm = models["llama"], remote["llama"]
    pos = torch.arange(8)[None] + 300
    with torch.no_grad():
        ref = model(IDS.to(DEVICE), position_ids=pos.to(DEVICE)).logits.cpu()
        ref_gen = model.generate(_long(250).to(DEVICE), max_new_tokens=10, do_sample=False,
                                 attention_mask=torch.ones(1, 250, dtype=torch.long, device=DEVICE)).cpu()
    assert torch.equal(rm(IDS, position_ids=pos).logits.cpu(), ref)
    assert torch.equal(rm.generate(_long(250), max_new_tokens=10, do_sample=False), ref_gen)


def test_labels_may_be_ignored_with_minus_100(tenant):
    s, models, remote = tenant
    labels = IDS.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        ref = models["gpt2"](IDS.to(DEVICE), labels=labels.to(DEVICE)).loss.cpu()
    assert torch.equal(remote["gpt2"](IDS, labels=labels).loss.cpu(), ref)


def test_decoder_input_ids_of_an_encoder_decoder_model(start_server, tmp_path):
    """An encoder-decoder model (an architecture a server may add to its allow-list): decoder ids are
    checked against the decoder's embedding, decoder lengths against its learned position table."""
    import yaml
    from transformers import BartConfig, BartForConditionalGeneration

    from djinn.config import DEFAULT_ARCHITECTURES

    cfg = tmp_path / "server.yaml"
    cfg.write_text(yaml.safe_dump({"architectures": DEFAULT_ARCHITECTURES + ["BartForConditionalGeneration"]}))
    srv = start_server("--config", str(cfg))
    torch.manual_seed(0)
    model = BartForConditionalGeneration(BartConfig(
        vocab_size=128, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)).to(DEVICE).eval()
    conn = Connection(srv.address, secret=None)
    try:
        rm = RemoteModel.from_module(conn.session(), model)
        ids, dec = torch.tensor([[3, 5, 7, 9]]), torch.tensor([[2, 3, 4]])
        _refused(lambda: rm(ids, decoder_input_ids=torch.tensor([[2, 3, 128]])).logits.cpu(),
                 r"decoder_input_ids holds 128, out of range: allowed range is \[0, 128\)")
        _refused(lambda: rm(ids, decoder_input_ids=torch.full((1, 65), 5)).logits.cpu(),
                 r"a sequence of 65 tokens needs positions 0..64, but this model's learned position table "
                 r"allows \[0, 64\)")
        with torch.no_grad():
            ref = model(ids.to(DEVICE), decoder_input_ids=dec.to(DEVICE)).logits.cpu()
        assert torch.equal(rm(ids, decoder_input_ids=dec).logits.cpu(), ref)
    finally:
        conn.close()


@pytest.mark.parametrize("where", ["call", "generation_config"])
def test_forced_eos_and_bos_ids_are_range_checked_and_work(server, bystander, where):
    """forced_eos_token_id / forced_bos_token_id (set by BART, Marian and mBART configs) were refused
    outright; their logits processors index the scores by them, so now they run when in range (tokens
    bitwise the local generate's) and an id past the scores is InvalidRequest before anything runs."""
    conn = Connection(server.address, secret=None)
    try:
        s = conn.session()
        for name, good in (("forced_eos_token_id", 7), ("forced_bos_token_id", 9)):
            for value, ok in ((good, True), (VOCAB, False), ([good, VOCAB + 3], False)):
                model = tiny_gpt2(seed=5, device=DEVICE)
                kwargs = {name: value} if where == "call" else {}
                if where == "generation_config":
                    setattr(model.generation_config, name, value)
                rm = RemoteModel.from_module(s, model)
                if ok:
                    with torch.no_grad():
                        want = model.generate(IDS.to(DEVICE), max_new_tokens=4, do_sample=False,
                                              attention_mask=torch.ones_like(IDS.to(DEVICE)), **kwargs).cpu()
                    assert torch.equal(rm.generate(IDS, max_new_tokens=4, do_sample=False, **kwargs), want)
                else:
                    _refused(lambda: rm.generate(IDS, max_new_tokens=4, do_sample=False, **kwargs),
                             f"{name}.*out of range")
        bystander.check()
    finally:
        conn.close()
