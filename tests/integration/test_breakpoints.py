"""Tier 2: breakpoints and steering against a real server (issue 6, DESIGN.md section 7).

Every activation read, every resumed output and every steered output is compared bitwise with the same
model run locally with forward hooks that capture or edit the same tensors in the same order.
"""
from __future__ import annotations

import gc
import time

import pytest
import torch

import djinn
from djinn import Breakpoint
from djinn.frontend.connection import Connection
from djinn.frontend.remote import RemoteModel

from ..conftest import ServerProcess
from ..models import tiny_gpt2, tiny_llama

IDS = torch.tensor([[1, 17, 42, 99, 5, 250, 7, 64]])
P = IDS.shape[1]
LAYERS = {"llama": "model.layers", "gpt2": "transformer.h"}


@pytest.fixture(scope="module")
def local_models(device):
    return {"llama": tiny_llama(seed=0, device=device), "gpt2": tiny_gpt2(seed=0, device=device)}


@pytest.fixture(params=["llama", "gpt2"])
def arch(request):
    return request.param


@pytest.fixture
def pair(arch, local_models, conn):
    """(arch, local model, RemoteModel of the same weights in a fresh session of conn)."""
    model = local_models[arch]
    s = conn.session(arch)
    yield arch, model, RemoteModel.from_module(s, model)
    s.close()


def vec(seed: int, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


class LocalHooks:
    """Forward hooks on a local model: record (path, where, call index, tensor) in call order, and apply
    edits {(path, where, call index): fn(tensor)} in place, as a steering user would do locally."""

    def __init__(self, model, points, edits=None):
        self.model, self.records, self.edits = model, [], edits or {}
        self.calls = -1
        self._handles = [model.register_forward_pre_hook(self._count)]
        for path, where in points:
            mod = model.get_submodule(path)
            if where == "before":
                self._handles.append(mod.register_forward_pre_hook(self._before(path), with_kwargs=True))
            else:
                self._handles.append(mod.register_forward_hook(self._after(path)))

    def _count(self, module, args):
        self.calls += 1

    def _visit(self, path, where, t):
        fn = self.edits.get((path, where, self.calls))
        if fn is not None:
            fn(t)
        self.records.append((path, where, self.calls, t.clone()))

    def _before(self, path):
        def hook(module, args, kwargs):
            self._visit(path, "before", args[0] if args else next(iter(kwargs.values())))
        return hook

    def _after(self, path):
        def hook(module, args, output):
            self._visit(path, "after", output if isinstance(output, torch.Tensor) else output[0])
        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()


def local_forward(model, points=(), edits=None):
    with LocalHooks(model, points, edits) as hooks, torch.no_grad():
        logits = model(IDS.to(model.device)).logits
    return logits.cpu(), hooks.records


def local_generate(model, points=(), edits=None, **kw):
    with LocalHooks(model, points, edits) as hooks, torch.no_grad():
        out = model.generate(IDS.to(model.device), **kw)
    return out.cpu(), hooks.records


def drain(run) -> list:
    stops = []
    stop = run.wait()
    while stop is not None:
        stops.append(stop)
        stop = run.resume()
    return stops


def session_stats(conn, s) -> dict:
    return conn.stats()["sessions"][s.sid]


# -- hitting breakpoints --------------------------------------------------------------------------
def test_stops_at_paths_in_order_and_reads_bitwise(pair):
    arch, model, rm = pair
    layers = LAYERS[arch]
    s = rm.session
    run = s.start(rm, IDS, breakpoints=[0, Breakpoint(layer=-1, where="before"), "lm_head"])
    points = [(f"{layers}.0", "after"), (f"{layers}.1", "before"), ("lm_head", "after")]
    ref_logits, records = local_forward(model, points)
    seen = []
    stop = run.wait()
    while stop is not None:
        seen.append((stop.path, stop.where, stop.step, stop.hit))
        path, where, _, ref = records[stop.hit]
        assert (stop.path, stop.where) == (path, where)
        assert stop.activation.shape == ref.shape and stop.activation.dtype == ref.dtype
        assert torch.equal(stop.activation.cpu(), ref.cpu())
        assert torch.equal(stop.activation[0, -1].cpu(), ref[0, -1].cpu())   # only a slice crosses
        assert torch.equal(stop.activation[:, 2:6][0].cpu(), ref[:, 2:6][0].cpu())  # a chain of views
        assert session_stats(s.conn, s)["paused"] is True
        stop = run.resume()
    assert seen == [(f"{layers}.0", "after", 0, 0), (f"{layers}.1", "before", 0, 1), ("lm_head", "after", 0, 2)]
    assert run.state == "finished" and run.wait() is None
    assert torch.equal(run.output.logits.cpu(), ref_logits)  # no edits: bitwise the uninterrupted run
    assert session_stats(s.conn, s)["paused"] is False


def test_generate_steps(pair):
    """step=k stops only in the k-th forward call of generate (0 = prefill); no step stops in every one."""
    arch, model, rm = pair
    layers = LAYERS[arch]
    run = rm.session.start(rm, IDS, method="generate", max_new_tokens=5,
                           breakpoints=[Breakpoint(layer=0), Breakpoint(f"{layers}.1", step=2, where="before")])
    ref, records = local_generate(model, [(f"{layers}.0", "after"), (f"{layers}.1", "before")], max_new_tokens=5)
    expect = [r for r in records if r[0].endswith(".0") or r[2] == 2]
    stops = []
    stop = run.wait()
    while stop is not None:
        stops.append((stop.path, stop.where, stop.step, tuple(stop.activation.shape)))
        assert torch.equal(stop.activation.cpu(), expect[stop.hit][3].cpu())
        stop = run.resume()
    l0, l1 = f"{layers}.0", f"{layers}.1"
    assert stops == [(l0, "after", 0, (1, P, 64)), (l0, "after", 1, (1, 1, 64)), (l0, "after", 2, (1, 1, 64)),
                     (l1, "before", 2, (1, 1, 64)), (l0, "after", 3, (1, 1, 64)), (l0, "after", 4, (1, 1, 64))]
    assert torch.equal(run.output, ref)
    assert torch.equal(run.output, rm.generate(IDS, max_new_tokens=5))


def test_no_breakpoints_and_breakpoints_never_hit(pair):
    arch, model, rm = pair
    run = rm.session.start(rm, IDS)
    assert run.wait() is None and run.state == "finished"
    assert torch.equal(run.output.logits.cpu(), local_forward(model)[0])
    run = rm.session.start(rm, IDS, method="generate", breakpoints=[Breakpoint(layer=1, step=50)], max_new_tokens=3)
    assert run.wait() is None
    assert torch.equal(run.output, local_generate(model, max_new_tokens=3)[0])


# -- steering -------------------------------------------------------------------------------------
def test_steering_forward_equals_local_hooks(pair):
    arch, model, rm = pair
    l0, l1 = f"{LAYERS[arch]}.0", f"{LAYERS[arch]}.1"
    v, w, row = vec(1, 64), vec(2, 64, scale=3.0), vec(3, 64)
    run = rm.session.start(rm, IDS, breakpoints=[l0, Breakpoint(l1, "before"), l1])
    stop = run.wait()
    stop.activation[:, -1] += w                  # slice assignment with +=
    stop.activation.mul_(0.5)
    stop = run.resume()
    stop.activation[0, 2] = row                   # setitem with a local tensor
    stop.activation[0, 3].copy_(stop.activation[0, 4])  # copy from a view of the same tensor
    stop = run.resume()
    stop.activation.add_(v)                       # whole-tensor add
    assert run.resume() is None

    def at_l0(t):
        t[:, -1] += w.to(t.device)
        t.mul_(0.5)

    def at_l1_in(t):
        t[0, 2] = row.to(t.device)
        t[0, 3].copy_(t[0, 4])

    ref, _ = local_forward(model, [(l0, "after"), (l1, "before"), (l1, "after")],
                           {(l0, "after", 0): at_l0, (l1, "before", 0): at_l1_in,
                            (l1, "after", 0): lambda t: t.add_(v.to(t.device))})
    got = run.output.logits.cpu()
    assert torch.equal(got, ref)
    assert not torch.equal(got, local_forward(model)[0])  # the edits did something


def test_steering_generate_at_one_step(pair):
    arch, model, rm = pair
    l1 = f"{LAYERS[arch]}.1"
    steer = vec(4, 64, scale=8.0)
    run = rm.session.start(rm, IDS, method="generate", breakpoints=[Breakpoint(layer=1, step=2)], max_new_tokens=6)
    stop = run.wait()
    assert (stop.path, stop.step) == (l1, 2)
    stop.activation[:, -1] += steer
    assert run.resume() is None
    ref, _ = local_generate(model, [(l1, "after")], {(l1, "after", 2): lambda t: t[:, -1].add_(steer.to(t.device))},
                            max_new_tokens=6)
    plain = local_generate(model, max_new_tokens=6)[0]
    assert torch.equal(run.output, ref)
    assert torch.equal(run.output[:, :P + 2], plain[:, :P + 2])  # steps 0 and 1 made these: unchanged
    assert not torch.equal(run.output, plain)


def test_edits_are_read_back_in_order_and_checked(pair):
    arch, model, rm = pair
    run = rm.session.start(rm, IDS, breakpoints=[1])
    stop = run.wait()
    before = stop.activation.cpu()
    stop.activation[0, 0] = 1.5
    stop.activation[0, 0].add_(1.0)
    stop.activation[0, 1].zero_()
    got = stop.activation[0, :3].cpu()  # the fetch carries the queued edits: read-your-writes
    assert got[0].tolist() == [2.5] * 64 and got[1].tolist() == [0.0] * 64
    assert torch.equal(got[2], before[0, 2])
    with pytest.raises(djinn.InvalidRequest, match=r"shape \[3\] does not broadcast to the target's \[1, 8, 64\]"):
        stop.activation.add_(torch.ones(3))
    with pytest.raises(IndexError):
        stop.activation[0, 99]
    # An index by value reads a copy (a lazy op), equal to the same basic slice.
    assert torch.equal(stop.activation[:, torch.tensor([0, 2])].cpu(), stop.activation[:, 0:3:2].cpu())
    assert run.resume() is None


# -- fork -----------------------------------------------------------------------------------------
def test_fork_two_continuations_from_one_pause(pair):
    """Edits at an earlier stop and at the fork point carry into the fork; after the fork the two runs
    are independent: same prefix, different continuations, each equal to local steering."""
    arch, model, rm = pair
    l0, l1 = f"{LAYERS[arch]}.0", f"{LAYERS[arch]}.1"
    v1, v0, va, vb = vec(5, 64), vec(6, 64), vec(7, 64, scale=10.0), vec(8, 64, scale=10.0)
    run = rm.session.start(rm, IDS, method="generate", max_new_tokens=6,
                           breakpoints=[Breakpoint(l0, step=1), Breakpoint(l1, step=3)])
    stop = run.wait()
    stop.activation.add_(v1)
    stop = run.resume()
    assert (stop.path, stop.step, stop.hit) == (l1, 3, 1)
    stop.activation.add_(v0)
    run2 = stop.fork()
    stop2 = run2.wait()
    assert run2.run_id != run.run_id
    assert (stop2.path, stop2.where, stop2.step, stop2.hit) == (l1, "after", 3, 1)
    assert torch.equal(stop2.activation.cpu(), stop.activation.cpu())  # the parent's edits included
    stop.activation[:, -1] += va
    stop2.activation[:, -1] += vb
    assert run2.resume() is None and run.resume() is None

    def ref(v):
        edits = {(l0, "after", 1): lambda t: t.add_(v1.to(t.device)),
                 (l1, "after", 3): lambda t: (t.add_(v0.to(t.device)), t[:, -1].add_(v.to(t.device)))}
        return local_generate(model, [(l0, "after"), (l1, "after")], edits, max_new_tokens=6)[0]

    assert torch.equal(run.output, ref(va)) and torch.equal(run2.output, ref(vb))
    assert torch.equal(run.output[:, :P + 3], run2.output[:, :P + 3])
    assert not torch.equal(run.output, run2.output)


def test_fork_in_a_decode_step_shares_the_kv_and_executes_only_when_resumed(pair):
    """Note [Fork replays the prefix]: a fork of a generate paused in decode step 4 takes no KV block
    and runs nothing until resumed; then it starts from the parent's KV blocks (copy on write) at
    step 4, not from the prompt; its stop may be edited before it executes; both continuations equal
    local runs (the parent unedited, the fork with the edit at step 4)."""
    arch, model, rm = pair
    s = rm.session
    l1 = f"{LAYERS[arch]}.1"
    v = vec(9, 64, scale=10.0)
    run = s.start(rm, IDS, method="generate", max_new_tokens=8, breakpoints=[Breakpoint(l1)])
    stop = run.wait()
    while stop.step < 4:
        stop = run.resume()
    kv = s.conn.stats()["kv"]["models"][rm.model_id]
    child = stop.fork()
    cstop = child.wait()
    assert child.timing["compute_us"] == 0.0                              # nothing executed yet
    assert s.conn.stats()["kv"]["models"][rm.model_id]["blocks_free"] == kv["blocks_free"]
    info = session_stats(s.conn, s)["runs"][child.run_id]
    assert (info["executed"], info["from_kv_at_step"]) == (False, 4)
    assert (cstop.path, cstop.step, cstop.hit) == (l1, 4, stop.hit)
    assert torch.equal(cstop.activation.cpu(), stop.activation.cpu())
    cstop.activation[:, -1] += v                                          # edit the fork before it runs
    assert [x.step for x in drain(child)] == [x.step for x in drain(run)] == [4, 5, 6, 7]
    plain = local_generate(model, [(l1, "after")], max_new_tokens=8)[0]
    edited = local_generate(model, [(l1, "after")], {(l1, "after", 4): lambda t: t[:, -1].add_(v.to(t.device))},
                            max_new_tokens=8)[0]
    assert torch.equal(run.output, plain) and torch.equal(child.output, edited)
    assert not torch.equal(plain, edited)


def test_sampling_runs_keep_their_rng(local_models, conn):
    """A sampled generate paused while other sessions sample gives the tokens of an uninterrupted
    one with the same seed, and so does a fork of it."""
    model = local_models["llama"]
    with conn.session("sampler") as s, conn.session("noise") as other:
        rm = RemoteModel.from_module(s, model)
        kw = dict(max_new_tokens=8, do_sample=True, top_k=50)
        ref = rm.generate(IDS, seed=5, **kw)
        run = s.start(rm, IDS, method="generate", seed=5, breakpoints=[Breakpoint(layer=0, step=3)], **kw)
        stop = run.wait()
        rm.generate(IDS, seed=9, session=other, **kw)  # draws from the same global generator
        fork = stop.fork()
        fork.wait()
        rm.generate(IDS, session=other, **kw)
        assert fork.resume() is None and run.resume() is None
        assert torch.equal(run.output, ref) and torch.equal(fork.output, ref)


# -- sharing the server while paused -------------------------------------------------------------
def test_other_clients_run_while_paused(local_models, conn, server):
    model = local_models["llama"]
    s = conn.session("paused")
    rm = RemoteModel.from_module(s, model)
    run = s.start(rm, IDS, method="generate", breakpoints=[Breakpoint(layer=1, step=1)], max_new_tokens=4)
    stop = run.wait()
    other = Connection(server.address, secret=None)
    try:
        s2 = other.session("busy")
        rm2 = RemoteModel.from_module(s2, model)
        assert rm2.model_id == rm.model_id  # the same module object, with the paused run's hooks on it
        for _ in range(3):
            assert torch.equal(rm2(IDS).logits.cpu(), local_forward(model)[0])
            assert torch.equal(rm2.generate(IDS, max_new_tokens=4), local_generate(model, max_new_tokens=4)[0])
        assert other.stats()["sessions"][s.sid]["paused"] is True  # visible to others, not its details
        assert other.stats()["sessions"][s.sid]["runs"] == {}
    finally:
        other.close()
    assert stop.live and run.resume() is None
    assert torch.equal(run.output, local_generate(model, max_new_tokens=4)[0])
    s.close()


# -- freeing paused state -------------------------------------------------------------------------
def test_resume_and_cancel_free_the_stop(local_models, conn):
    model = local_models["llama"]
    with conn.session("cancel") as s:
        rm = RemoteModel.from_module(s, model)
        run = s.start(rm, IDS, method="generate", breakpoints=[Breakpoint(layer=1, step=2), Breakpoint(layer=0, step=3)],
                      max_new_tokens=5)
        stop = run.wait()
        st = session_stats(conn, s)
        kv = -(-(P + 5) // 16) * 16 * 512  # the run's KV blocks, reserved for its prompt and 5 new tokens
        assert st["paused"] is True and st["paused_bytes"] == 64 * 4 + kv
        assert st["runs"][run.run_id] == {"state": "PAUSED", "method": "generate", "model_id": rm.model_id,
                                          "executed": True, "path": "model.layers.1", "where": "after", "step": 2, "hit": 0,
                                          "paused_s": st["runs"][run.run_id]["paused_s"], "paused_bytes": 64 * 4 + kv}
        assert conn.stats()["segments"]["stack"] == 64 * 4 + kv
        old = stop
        stop = run.resume()
        assert not old.live and stop.live
        with pytest.raises(djinn.HandleNotFound):
            old.activation.cpu()  # a stop's tensors live only while the run is paused there
        run.cancel()
        assert run.state == "cancelled" and not stop.live
        st = session_stats(conn, s)
        assert (st["paused"], st["paused_bytes"], st["runs"]) == (False, 0, {})
        assert conn.stats()["segments"]["stack"] == 0
        with pytest.raises(djinn.HandleNotFound):
            stop.activation.cpu()
        with pytest.raises(djinn.InvalidRequest, match="is cancelled"):
            run.resume()
        with pytest.raises(djinn.InvalidRequest, match="has ended: cancelled by the client"):
            s.call("resume", {"run": run.run_id})
        with pytest.raises(djinn.InvalidRequest, match="has no output"):
            run.output
        run.cancel()  # twice: a no-op
        with s.start(rm, IDS, breakpoints=[0]) as r:  # a context manager cancels what is left
            r.wait()
        assert session_stats(conn, s)["runs"] == {}


def test_paused_run_timeout_frees_its_state(local_models):
    srv = ServerProcess("--paused-run-timeout", "1")
    c = Connection(srv.address, secret=None)
    try:
        s = c.session("slow user")
        rm = RemoteModel.from_module(s, local_models["gpt2"])
        run = s.start(rm, IDS, breakpoints=[1])
        run.wait()
        assert session_stats(c, s)["paused_bytes"] == P * 64 * 4
        deadline = time.monotonic() + 10
        while session_stats(c, s)["runs"] and time.monotonic() < deadline:
            time.sleep(0.1)
        st = session_stats(c, s)
        assert (st["paused"], st["paused_bytes"], st["runs"]) == (False, 0, {})
        assert c.stats()["segments"]["stack"] == 0
        with pytest.raises(djinn.InvalidRequest, match=r"paused for more than 1s without a resume"):
            run.resume()
        run.cancel()  # the server already ended it: a no-op
        again = s.start(rm, IDS, breakpoints=[1])  # the server keeps serving, the model is still there
        again.wait()
        assert again.resume() is None
        assert torch.equal(again.output.logits.cpu(), local_forward(local_models["gpt2"])[0])
    finally:
        c.close()
        srv.stop()


def test_closing_session_or_client_cancels_paused_runs(local_models, conn, server):
    model = local_models["llama"]
    s = conn.session("closing")
    rm = RemoteModel.from_module(s, model)
    runs = [s.start(rm, IDS, breakpoints=[0]),
            s.start(rm, IDS, method="generate", breakpoints=[Breakpoint(layer=1, step=1)], max_new_tokens=3)]
    for r in runs:
        r.wait()
    assert len(session_stats(conn, s)["runs"]) == 2
    s.close()
    assert s.sid not in conn.stats()["sessions"]

    other = Connection(server.address, secret=None)
    s2 = other.session("dies")
    rm2 = RemoteModel.from_module(s2, model)
    s2.start(rm2, IDS, breakpoints=[1]).wait()
    assert conn.stats()["sessions"][s2.sid]["paused_bytes"] == P * 64 * 4
    other.close()  # BYE: the server reclaims the client's sessions and unwinds the paused run
    deadline = time.monotonic() + 10
    while s2.sid in conn.stats()["sessions"] and time.monotonic() < deadline:
        time.sleep(0.05)
    st = conn.stats()
    assert s2.sid not in st["sessions"]
    assert sum(v["paused_bytes"] for v in st["sessions"].values()) == st["segments"]["stack"]
    with conn.session("after") as s3:  # the worker threads unwound: the same module still runs, hooks gone
        rm3 = RemoteModel.from_module(s3, model)
        run = s3.start(rm3, IDS, breakpoints=[1])
        assert run.wait().hit == 0 and run.resume() is None
        assert torch.equal(run.output.logits.cpu(), local_forward(model)[0])


# -- errors and reprs -----------------------------------------------------------------------------
def test_bad_breakpoints_and_calls(local_models, conn):
    model = local_models["llama"]
    with conn.session("errors") as s:
        rm = RemoteModel.from_module(s, model)
        with pytest.raises(djinn.InvalidRequest, match=r"has no module 'model.layer.1'; its decoder layers are model.layers.0"):
            s.start(rm, IDS, breakpoints=["model.layer.1"]).wait()
        with pytest.raises(djinn.InvalidRequest, match=r"layer=2 is out of range: LlamaForCausalLM has 2 layers at model.layers"):
            s.start(rm, IDS, breakpoints=[2]).wait()
        with pytest.raises(djinn.InvalidRequest, match="a forward run has only step 0"):
            s.start(rm, IDS, breakpoints=[Breakpoint(layer=0, step=1)]).wait()
        with pytest.raises(djinn.InvalidRequest, match="generate does not accept"):
            s.start(rm, IDS, method="generate", breakpoints=[0], streamer=1).wait()
        with pytest.raises(ValueError, match="where must be one of"):
            Breakpoint("model.layers.0", where="inside")
        with pytest.raises(ValueError, match="exactly one of path and layer"):
            Breakpoint("model.layers.0", layer=0)
        with pytest.raises(TypeError):
            s.start(rm, IDS, breakpoints=[1.5])
        run = s.start(rm, IDS, breakpoints=[0])
        stop = run.wait()
        fork = stop.fork()
        assert run.resume() is None
        with pytest.raises(djinn.InvalidRequest, match="cannot resume run .*: it is finished"):
            run.resume()
        with pytest.raises(djinn.InvalidRequest, match="is not where its run is paused"):
            stop.fork()
        fork.cancel()
        assert session_stats(conn, s)["runs"] == {}


def test_reprs(local_models, conn):
    with conn.session("repr") as s:
        rm = RemoteModel.from_module(s, local_models["gpt2"])
        run = s.start(rm, IDS, method="generate", breakpoints=[Breakpoint(layer=1, step=1)], max_new_tokens=2)
        stop = run.wait()
        rid = run.run_id
        assert repr(run) == f"Run({rid}, GPT2LMHeadModel.generate, paused at transformer.h.1 (after, step 1))"
        assert repr(stop) == f"Stop(transformer.h.1 after, step 1, hit 0: activation float32[1, 1, 64], run {rid})"
        view = stop.activation[0, -1:]
        assert repr(view) == (f"RemoteView(<{stop.activation.hid[:8]}>[0, -1:], shape=[1, 64], "
                              "dtype=torch.float32, remote)")
        run.resume()
        assert repr(run) == f"Run({rid}, GPT2LMHeadModel.generate, finished)"
        assert repr(stop).endswith(f"run {rid}, gone)")
    del run, stop, view
    gc.collect()


def test_a_run_sees_every_position_of_a_prompt_whose_blocks_are_cached(pair):
    """Note [Prefix sharing]: after a session generated with the same prompt (its full blocks are now
    cached), a generate run's prefill stop still covers every prompt position, bitwise the local one:
    runs never take cached blocks, so nothing they observe or edit is silently skipped."""
    arch, model, rm = pair
    layers = LAYERS[arch]
    s = rm.session
    long_ids = torch.cat([IDS] * 4, 1)  # 4 x P tokens: at least one full 16-token block
    s.generate(rm, long_ids, max_new_tokens=2)
    other = s.conn.session()
    try:
        orm = RemoteModel.from_module(other, model)
        other.generate(orm, long_ids, max_new_tokens=2)
        assert session_stats(s.conn, other)["prefix_tokens_reused"] >= 16  # the blocks are cached
        run = other.start(orm, long_ids, method="generate", max_new_tokens=2, breakpoints=[Breakpoint(layer=0, step=0)])
        stop = run.wait()
        with LocalHooks(model, [(f"{layers}.0", "after")]) as hooks, torch.no_grad():
            model(long_ids.to(model.device))
        assert tuple(stop.activation.shape)[:2] == (1, long_ids.shape[1])
        assert torch.equal(stop.activation.cpu(), hooks.records[0][3].cpu())
        run.cancel()
    finally:
        other.close()
