"""Tier 2: lazy ops recorded on a paused run's tensors run before the run moves on (issue #16 item 9).

`saved = stop.activation.clone()` is a pending op that reads the stop's tensor; the stop's tensors are
freed when the run resumes or is cancelled, so the pending graph is flushed first and `saved` holds the
value at the stop, as it would locally. Module path and graph path, each compared with local hooks.
"""
from __future__ import annotations

import pytest
import torch

import djinn

from ..models import tiny_gpt2, tiny_llama

IDS = torch.tensor([[1, 17, 42, 99, 5, 250, 7, 64]])


def _hooked(model, path: str, edit=None):
    """(the module's output at `path`, as it left the hook, after `edit`; the logits), run locally."""
    seen = []

    def hook(module, args, output):
        t = output if isinstance(output, torch.Tensor) else output[0]
        if edit is not None:
            edit(t)
        seen.append(t.clone())

    h = model.get_submodule(path).register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = model(IDS.to(model.device))
    finally:
        h.remove()
    return seen[0].cpu(), out.logits.cpu()


@pytest.mark.parametrize("path", ["module", "graph"])
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_lazy_ops_on_a_stop_run_before_resume(conn, device, build, path):
    model = build(seed=3, device=device)
    layer = "model.layers.0" if build is tiny_llama else "transformer.h.0"
    steer = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    with conn.session(f"lazy-{path}") as s:
        rm = djinn.remote(model, session=s, path=path)
        assert rm.path == path
        run = s.start(rm, IDS, breakpoints=[0])
        stop = run.wait()
        saved = stop.activation.clone()          # pending: reads the stop's tensor
        norms = stop.activation.norm(dim=-1)     # another pending op on it
        stop.activation[:, -1] += steer          # an edit after them: they see the value before it
        edited = stop.activation[0, -1] * 1      # pending, recorded after the edit: sees it
        assert run.resume() is None
        ref_act, _ = _hooked(model, layer)
        assert torch.equal(saved.cpu(), ref_act)
        assert torch.equal(norms.cpu(), ref_act.norm(dim=-1))

        def edit(t):
            t[:, -1] += steer.to(t.device)

        ref_edited, ref_logits = _hooked(model, layer, edit)
        assert torch.equal(edited.cpu(), ref_edited[0, -1])
        assert torch.equal(run.output.logits.cpu(), ref_logits)


@pytest.mark.parametrize("path", ["module", "graph"])
def test_lazy_ops_on_a_stop_run_before_cancel(conn, device, path):
    model = tiny_llama(seed=3, device=device)
    with conn.session(f"lazy-cancel-{path}") as s:
        rm = djinn.remote(model, session=s, path=path)
        with s.start(rm, IDS, breakpoints=[1]) as run:
            saved = run.wait().activation[:, -2:].clone()
        assert run.state == "cancelled"
        assert torch.equal(saved.cpu(), _hooked(model, "model.layers.1")[0][:, -2:])
        run = s.start(rm, IDS, breakpoints=[1])
        total = run.wait().activation.sum()
        run.cancel()
        assert torch.equal(total.cpu(), _hooked(model, "model.layers.1")[0].sum())


def test_a_stop_gone_before_the_op_is_still_refused_where_written(conn, device):
    model = tiny_llama(seed=3, device=device)
    with conn.session("lazy-gone") as s:
        rm = djinn.remote(model, session=s)
        run = s.start(rm, IDS, breakpoints=[0])
        stop = run.wait()
        assert run.resume() is None
        with pytest.raises(djinn.HandleNotFound, match="this stop is gone"):
            stop.activation.clone()


def test_the_flush_before_a_resume_carries_the_queued_edits(conn, device, monkeypatch):
    """Edits queued before the pending ops apply first, in the flush's own request: a resume with both
    pending costs two requests (run_graph with the edits, resume), not three."""
    model = tiny_llama(seed=3, device=device)
    steer = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    with conn.session("lazy-carry") as s:
        rm = djinn.remote(model, session=s)
        run = s.start(rm, IDS, breakpoints=[0])
        stop = run.wait()
        stop.activation[:, -1] += steer
        edited = stop.activation[0, -1] * 1
        ops = []
        call = conn.transport.call
        monkeypatch.setattr(conn.transport, "call", lambda op, args, **kw: (ops.append(op), call(op, args, **kw))[1])
        assert run.resume() is None
        monkeypatch.undo()
        assert ops == ["run_graph", "resume"]

        def edit(t):
            t[:, -1] += steer.to(t.device)

        ref_edited, ref_logits = _hooked(model, "model.layers.0", edit)
        assert torch.equal(edited.cpu(), ref_edited[0, -1])
        assert torch.equal(run.output.logits.cpu(), ref_logits)
