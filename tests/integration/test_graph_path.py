"""Tier 2: the graph path (DESIGN.md section 4.2) against a real server: a zoo of modules the server
cannot build, and tiny GPT-2 / Llama forced onto it, each bitwise-equal to local execution."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import djinn
from djinn.frontend.graph_model import GraphModel
from djinn.frontend.remote import RemoteModel
from djinn.frontend.tensor import RemoteTensor

from ..conftest import DEVICE
from ..models import tiny_bert, tiny_gpt2, tiny_gpt_neox, tiny_gptj, tiny_llama, tiny_t5

PROMPT = torch.tensor([[1, 17, 42, 99, 5, 250, 7, 64, 31, 128]])


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))  # residual


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(Block(8), Block(8))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        if x.shape[-1] > 4:  # Python control flow on a shape: part of the input signature
            x = nn.functional.max_pool2d(x, 2)
        return self.head(x.mean(dim=(2, 3)))


class InPlaceViews(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("offset", torch.arange(8, dtype=torch.float32) / 8)

    def forward(self, x):
        y = self.lin(x).clone()
        y[:, :4].mul_(2.0)            # in place through a view
        y.t()[0].add_(self.offset[0])  # a view of a view
        z = y.view(-1, 2, 4).transpose(1, 2).contiguous()
        z.add_(self.offset.view(2, 4).t())
        y.relu_()
        return y, z.sum(-1)


class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(6, 12)
        self.ln = nn.LayerNorm(12)

    def forward(self, x, scale: float = 1.0):
        h = self.ln(self.enc(x)) * scale
        return {"hidden": h, "pooled": h.max(dim=1).values, "probs": h.softmax(-1), "n": x.shape[0]}


def _seeded(cls, seed=0):
    torch.manual_seed(seed)
    m = cls().eval()
    for mod in m.modules():  # non-trivial batch-norm statistics
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 1.5)
    return m


def _local(m, *args, **kwargs):
    """The reference: the same module run eagerly on the server's device, results back on the CPU."""
    import copy

    from torch.utils._pytree import tree_map

    dev = torch.device(DEVICE)
    if dev.type != "cpu":
        m = copy.deepcopy(m).to(dev)
        args, kwargs = tree_map(lambda t: t.to(dev) if isinstance(t, torch.Tensor) else t, (args, kwargs))
    with torch.no_grad():
        out = m(*args, **kwargs)
    return tree_map(lambda t: t.cpu() if isinstance(t, torch.Tensor) else t, out) if dev.type != "cpu" else out


@pytest.fixture
def session(conn):
    return conn.default_session()


def test_mlp_auto_graph_path(session):
    m = _seeded(MLP)
    rm = djinn.remote(m, session=session)  # the server cannot build an MLP: the graph path, automatically
    assert isinstance(rm, GraphModel) and rm.path == "graph"
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    out = rm(x)
    assert isinstance(out, RemoteTensor) and out.shape == (5, 4)
    assert torch.equal(out.cpu(), _local(m, x))


def test_cnn_batchnorm_residual(session):
    m = _seeded(SmallCNN)
    rm = djinn.remote(m, session=session)
    for size in (8, 4):  # two input signatures, two graphs (the pooling branch differs)
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        assert torch.equal(rm(x).cpu(), _local(m, x))
    assert rm.counters["captures"] == 2


def test_inplace_and_views(session):
    m = _seeded(InPlaceViews)
    rm = djinn.remote(m, session=session)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    y, z = rm(x)
    ry, rz = _local(m, x)
    assert torch.equal(y.cpu(), ry) and torch.equal(z.cpu(), rz)


def test_dict_output_and_python_scalars(session):
    m = _seeded(DictOut)
    rm = djinn.remote(m, session=session)
    x = torch.randn(4, 3, 6, generator=torch.Generator().manual_seed(3))
    got = rm(x, scale=0.5)
    ref = _local(m, x, scale=0.5)
    assert set(got) == set(ref) and got["n"] == 4
    for k in ("hidden", "pooled", "probs"):
        assert torch.equal(got[k].cpu(), ref[k]), k
    rm(x, scale=2.0)  # another scalar: another signature
    assert rm.counters["captures"] == 2


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_hf_forced_graph_equals_local_and_module_path(session, build):
    model = build(seed=0)
    rg = djinn.remote(model, session=session, path="graph")
    rmod = djinn.remote(model, session=session)
    assert isinstance(rg, GraphModel) and type(rmod) is RemoteModel
    got = rg(PROMPT)
    ref = _local(model, PROMPT).logits
    assert type(got).__name__ == type(_local(model, PROMPT)).__name__
    assert torch.equal(got.logits.cpu(), ref)
    assert torch.equal(got.logits.cpu(), rmod(PROMPT).logits.cpu())


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_hf_kv_cache_across_calls_on_the_graph_path(session, build):
    """A manual greedy decode loop on the graph path: the cache a call returns holds RemoteTensors (the
    KV stays on the server, captured as Data) and goes into the next call; logits bitwise-equal local."""
    import copy
    import warnings

    model = build(seed=3)
    rg = djinn.remote(model, session=session, path="graph")
    local = copy.deepcopy(model).to(DEVICE).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers >= 5.25 renames past_key_values
        out = rg(PROMPT, use_cache=True)
        with torch.no_grad():
            ref = local(PROMPT.to(DEVICE), use_cache=True)
        for step in range(3):
            assert torch.equal(out.logits.cpu(), ref.logits.cpu()), step
            keys = out.past_key_values.layers[0].keys
            assert isinstance(keys, RemoteTensor) and keys.shape[-2] == PROMPT.shape[1] + step
            nxt = ref.logits[:, -1:].argmax(-1).cpu()
            out = rg(nxt, past_key_values=out.past_key_values, use_cache=True)
            with torch.no_grad():
                ref = local(nxt.to(DEVICE), past_key_values=ref.past_key_values, use_cache=True)
    assert torch.equal(out.logits.cpu(), ref.logits.cpu())


@pytest.mark.parametrize("build", [tiny_bert, tiny_gptj, tiny_gpt_neox, tiny_llama],
                         ids=["bert", "gptj", "gpt_neox", "llama"])
def test_hf_attention_mask_all_ones_and_padded(session, build):
    """Note [Input values]: transformers asks whether the mask is all ones; the capture guards on the
    answer, so an all-ones mask and padded batches each get their graph, reused while it holds."""
    model = build(seed=5)
    rg = djinn.remote(model, session=session, path="graph")
    ids = torch.randint(3, 200, (2, 6), generator=torch.Generator().manual_seed(14))
    ones = torch.ones(2, 6, dtype=torch.long)
    left = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    for mask in (ones, left, right, ones.clone()):
        got = rg(ids, attention_mask=mask)
        assert torch.equal(got[0].cpu(), _local(model, ids, attention_mask=mask)[0])
    assert rg.counters["captures"] == 2   # all ones, padded: the second padded batch reuses its graph


def test_graph_reused_by_signature(conn, session):
    m = _seeded(MLP)
    rm = djinn.remote(m, session=session)
    x1, x2 = torch.randn(5, 16), torch.randn(5, 16)
    before = conn.transport.call("graph_stats", {})
    a = rm(x1).cpu()
    b = rm(x2).cpu()
    after = conn.transport.call("graph_stats", {})
    assert rm.counters == {"captures": 1, "calls": 2, "graphs_sent": 1, "probes": 0}
    assert after["compiled"] - before["compiled"] == 1 and after["hits"] - before["hits"] == 1
    assert torch.equal(a, _local(m, x1)) and torch.equal(b, _local(m, x2))
    rm(torch.randn(7, 16))  # a new shape: a new capture
    assert rm.counters["captures"] == 2


def test_remote_tensor_input_and_output_handles(session):
    m1, m2 = _seeded(MLP), _seeded(MLP, seed=1)
    m2.fc1 = nn.Linear(4, 32)
    torch.manual_seed(5)
    m2.fc1.reset_parameters()
    r1, r2 = djinn.remote(m1, session=session), djinn.remote(m2, session=session)
    x = torch.randn(2, 16)
    h = r1(x)  # stays on the server
    assert torch.equal(r2(h).cpu(), _local(m2, _local(m1, x)))


def test_dropout_seeded_on_server(session):
    m = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5)).train()
    rm = djinn.remote(m, session=session)
    x = torch.randn(4, 8)
    torch.manual_seed(11)
    ref = _local(m, x)
    assert torch.equal(rm(x, seed=11).cpu(), ref)


class Layouts(nn.Module):
    """Reads its inputs' strides and aliasing (Note [Input layout] in srg/layout.py)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, a, b):
        y = x.contiguous()          # a copy for a transposed x, x itself if x arrived contiguous
        y.mul_(2)
        a.add_(1)                   # seen through b when b is a
        return self.lin(x + y), a * b, x.as_strided((2, 2), (1, 2), x.storage_offset() + 1)


def test_inputs_keep_strides_offsets_and_aliasing(session):
    m = _seeded(Layouts)
    rm = djinn.remote(m, session=session)
    base = torch.randn(5, 4, generator=torch.Generator().manual_seed(9))
    x = base.t()[:, 1:]             # strides (1, 4), storage offset 4
    a = torch.randn(3, 3, generator=torch.Generator().manual_seed(10))
    for b_of in (lambda a: a, lambda a: a.clone()):   # the same tensor twice, then two tensors
        a_local = a.clone()
        ref = _local(m, x.clone(), a_local, b_of(a_local))
        got = rm(x, a, b_of(a))
        for g, r in zip(got, ref):
            assert torch.equal(g.cpu(), r)
    assert rm.counters["captures"] == 2   # aliasing is part of the signature


class Knobs(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.scale, self.relu = 2.0, True

    def forward(self, x):
        y = self.lin(x) * self.scale
        return torch.relu(y) if self.relu else y


def test_changed_attribute_recaptures(session):
    """Note [Capture guards]: Python values the forward read are baked into the graph."""
    m = _seeded(Knobs)
    rm = djinn.remote(m, session=session)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(12))
    assert torch.equal(rm(x).cpu(), _local(m, x))
    m.scale, m.relu = -3.0, False
    assert torch.equal(rm(x).cpu(), _local(m, x))
    m.lin.act = nn.Identity()   # a new submodule changes the tree: recapture, still the same result
    assert torch.equal(rm(x).cpu(), _local(m, x))
    assert rm.counters["captures"] == 3
    rm(x)
    assert rm.counters["captures"] == 3


def test_weight_changed_after_remote_is_uploaded_again(session):
    m = _seeded(Knobs)
    rm = djinn.remote(m, session=session)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(13))
    rm(x)
    with torch.no_grad():
        m.lin.weight.mul_(-2.0)                       # in place: its version counter moves
    assert torch.equal(rm(x).cpu(), _local(m, x))
    m.lin.bias = nn.Parameter(torch.full((4,), 0.25))  # replaced by another tensor
    assert torch.equal(rm(x).cpu(), _local(m, x))
    run = session.start(rm, x, breakpoints=["lin"])     # a run sees the new weights too
    run.wait()
    assert run.resume() is None and torch.equal(run.output.cpu(), _local(m, x))


def test_tensors_made_in_forward_and_list_indices(session):
    """Note [Tensors made in a forward]: captured as constants, not "not produced by the capture"."""
    from ..unit.test_forward_tensors import MakesTensors

    m = MakesTensors()
    rm = djinn.remote(m, session=session)
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(15))
    got, ref = rm(x), _local(m, x)
    assert len(got) == len(ref) and all(torch.equal(g.cpu(), r) for g, r in zip(got, ref))


def test_data_dependent_control_flow_probes_the_server(session):
    """Note [Graph breaks]: a branch on a value computed from weights was a CaptureError; the capture now
    probes the server for it and runs the branch the value takes, bitwise."""
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            y = self.lin(x)
            return y * 2 if y.sum() > 0 else y

    torch.manual_seed(0)
    model = Branchy()
    rm = djinn.remote(model, session=session)
    for _ in range(4):
        x = torch.randn(2, 4)
        assert torch.equal(rm(x).cpu(), _local(model, x))
    assert rm.counters["probes"] >= 1


def test_weight_write_refused(session):
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            self.lin.weight.add_(1.0)
            return self.lin(x)

    rm = djinn.remote(Bad(), session=session)
    with pytest.raises(djinn.CaptureError, match="lin.weight"):
        rm(torch.randn(2, 4))


# -- breakpoints on the graph path (server/execution/graph_runs.py) ------------------------------------------------
def _hooked_local(m, args, path, edit=None, kwargs=None):
    """Local reference: the module's output at `path` (and the model output), optionally edited in place
    by a forward hook, as a breakpoint edit does on the server."""
    import copy

    m = copy.deepcopy(m).to(DEVICE)
    seen = []

    def hook(mod, a, out):
        t = out[0] if isinstance(out, tuple) else out
        if edit is not None:
            edit(t)
        seen.append(t.detach().clone())

    h = m.get_submodule(path).register_forward_hook(hook)
    with torch.no_grad():
        out = m(*[a.to(DEVICE) for a in args], **{k: v.to(DEVICE) for k, v in (kwargs or {}).items()})
    h.remove()
    return seen[0].cpu(), out


def test_breakpoints_read_and_steer_any_module(conn, session):
    m = _seeded(MLP)
    rm = djinn.remote(m, session=session)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(6))
    run = session.start(rm, x, breakpoints=["fc1", djinn.Breakpoint("fc2", where="before")])
    stop = run.wait()
    ref_fc1, _ = _hooked_local(m, (x,), "fc1")
    assert stop.path == "fc1" and torch.equal(stop.activation.cpu(), ref_fc1)
    stop.activation[:, :4] += 2.5                      # steering: in place, later nodes read it
    stop2 = run.resume()
    assert stop2.path == "fc2" and stop2.where == "before"
    assert torch.equal(stop2.activation.cpu(), torch.relu(ref_fc1 + torch.nn.functional.pad(
        torch.full((5, 4), 2.5), (0, 28))))
    assert run.resume() is None and run.state == "finished"

    def steer(t):
        t[:, :4] += 2.5

    _, ref = _hooked_local(m, (x,), "fc1", steer)
    assert torch.equal(run.output.cpu(), ref.cpu())
    # With no edits a run's output is the plain call's, and another session is served while one is paused.
    run = session.start(rm, x, breakpoints=["fc1"])
    run.wait()
    other = conn.session("bystander")
    assert torch.equal(djinn.remote(m, session=other)(x).cpu(), _local(m, x))
    assert run.resume() is None and torch.equal(run.output.cpu(), _local(m, x))


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_hf_model_on_the_graph_path_stops_at_a_layer_steers_and_forks(session, build):
    model = build(seed=4)
    rg = djinn.remote(model, session=session, path="graph")
    layer_path = "transformer.h.1" if build is tiny_gpt2 else "model.layers.1"
    run = session.start(rg, PROMPT, breakpoints=[1])   # decoder layer 1, by number
    stop = run.wait()
    ref_act, _ = _hooked_local(model, (PROMPT,), layer_path)
    assert stop.path == layer_path and torch.equal(stop.activation.cpu(), ref_act)
    steer = torch.randn(ref_act.shape[-1], generator=torch.Generator().manual_seed(8))
    fork = stop.fork()                                  # the same stop, to try another edit
    stop.activation[:, -1] += steer
    fork.stop.activation[:, -1] -= steer
    assert run.resume() is None and fork.resume() is None
    for run_, sign in ((run, 1), (fork, -1)):
        def edit(t, sign=sign):
            t[:, -1] += sign * steer.to(t.device)

        _, ref = _hooked_local(model, (PROMPT,), layer_path, edit)
        assert torch.equal(run_.output.logits.cpu(), ref.logits.cpu()), sign


def test_layer_numbers_of_an_encoder_decoder_are_its_decoder_blocks(session):
    """Note [Layer numbers] (srg/layers.py): layer k of T5 is decoder.block.k, not decoder.block.0.layer.k
    (a block's 3 sublayers, the longest ModuleList), and k past the decoder's 2 blocks is refused with the
    ModuleLists there are, not resolved to some other tensor."""
    model = tiny_t5(seed=2)
    rg = djinn.remote(model, session=session, path="graph")  # layer numbers resolved on the client
    inputs = {"input_ids": PROMPT[:, :6], "decoder_input_ids": torch.tensor([[0, 7, 3]])}
    run = session.start(rg, breakpoints=[1], **inputs)
    stop = run.wait()
    ref_act, ref = _hooked_local(model, (), "decoder.block.1", kwargs=inputs)
    assert stop.path == "decoder.block.1" and torch.equal(stop.activation.cpu(), ref_act)
    assert run.resume() is None and torch.equal(run.output.logits.cpu(), ref.logits.cpu())
    with pytest.raises(djinn.InvalidRequest) as e:
        session.start(rg, breakpoints=[djinn.Breakpoint(layer=2)], **inputs).wait()
    assert str(e.value) == (
        "layer=2 is out of range: T5ForConditionalGeneration has 2 layers at decoder.block (its ModuleLists: "
        'encoder.block (2), decoder.block (2)); to stop elsewhere name a module path, e.g. breakpoints=["decoder.block.1"]')
    run = session.start(rg, breakpoints=["decoder.block.0.layer.2"], **inputs)  # a sublayer, by its path
    assert run.wait().path == "decoder.block.0.layer.2"
    run.cancel()


class _Attention(nn.Module):
    """Eval MHA (batch_first, a fused op in eager) and a 2-layer TransformerEncoder (a fused op a layer)."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x, pad=None):
        a, w = self.mha(x, x, x, key_padding_mask=pad)
        return self.enc(a, src_key_padding_mask=pad), w


def test_fused_attention_fast_paths_are_bitwise(session):
    """Note [Fast paths] in srg/fastpaths.py: eager runs _native_multi_head_attention and
    _transformer_encoder_layer_fwd here, and so does the server (not bitwise before: 4.5e-8, 3.6e-7)."""
    m = _seeded(_Attention)
    rm = djinn.remote(m, session=session, path="graph")
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    for args in ((x,), (x, pad)):
        got, ref = rm(*args), _local(m, *args)
        assert all(torch.equal(g.cpu(), r) for g, r in zip(got, ref))
