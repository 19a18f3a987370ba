"""Experiment 3: white-box debugging on a shared GPU: pause at a layer, read and edit, resume.

    python OSDI_Evaluation/exp3_whitebox_debugging/run_exp3.py [--device cuda:0] [--models gpt2,llama7b]
    python OSDI_Evaluation/exp3_whitebox_debugging/run_exp3.py --tiny          # CPU, < 60 s

Starts a server subprocess on loopback and keeps a local copy of each model in this process, on the
same device, as the reference for bitwise checks. Models have random weights (no hub access):
GPT-2-small (fp32, uploaded) and a Llama-2-7B-shaped fp16 model (built on the GPU, saved with
save_pretrained to a temporary directory and loaded by the server with RemoteModel.from_path).
--tiny uses 12-layer toy shapes of both on the CPU.

Measures, per model (issue 6 targets in brackets):
  accuracy      generate with breakpoints at layers [3, 6, 9] on every step, no edits, vs uninterrupted
                (100 %, bitwise); forward logits likewise, and remote vs the local copy
  latency       pause -> resume at every layer of a forward: server-side overhead (server time minus
                the model's own compute; [<= 1 ms]) and client-seen p50/p99 of resume and of
                read-a-slice + resume, minus compute [<= 2 ms p50]
  steering      add a vector at a layer (forward, and generate at one step) == the same edit done
                locally with a forward hook (bitwise)
  recompute     an interactive session of M read-then-edit rounds during one generate: one paused run
                vs recomputing from scratch for every round (what nnsight-style tools do); and the
                cost of a fork (which replays the prefix, DESIGN.md section 10)
  hooks         overhead of the machinery with no breakpoint hit [<= 1 %]: a run without breakpoints,
                a generate whose breakpoint never fires, and another session's forward through a
                module with a paused run's hooks on it
  neighbour     a second client's per-token decode latency, alone and while the first is paused
Writes JSON (environment: card, versions, commit) to $OUT or results/, and a plot if matplotlib imports.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from common import environment, start_server  # noqa: E402

from djinn import Breakpoint  # noqa: E402
from djinn.frontend.connection import Connection  # noqa: E402
from djinn.frontend.remote import RemoteModel  # noqa: E402

LAYERS = [3, 6, 9]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


def summary(xs: list[float]) -> dict:
    return {"n": len(xs), "p50": round(pct(xs, 50), 4), "p99": round(pct(xs, 99), 4),
            "mean": round(statistics.fmean(xs), 4)}


# -- models ---------------------------------------------------------------------------------------
def build(name: str, device: torch.device, tiny: bool):
    """(config label, local model on `device`) with seeded random weights."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(0)
    if name == "gpt2":
        cfg = GPT2Config(n_layer=12, n_embd=64, n_head=4, vocab_size=256, n_positions=512) if tiny else GPT2Config()
        dtype = torch.float32
    else:
        cfg = (LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=12,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512) if tiny else
               LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096))
        dtype = torch.float32 if tiny else torch.float16
    with torch.device(device):  # random init where the weights live: no slow CPU init of 7B weights
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    label = f"{'tiny-' if tiny else ''}{'gpt2-small' if name == 'gpt2' else 'llama-2-7b-shape'} {str(dtype)[6:]}"
    return label, model.eval()


def remote(session, model, how: str, tmp: str) -> tuple[RemoteModel, float]:
    t = time.perf_counter()
    if how == "upload":
        rm = RemoteModel.from_module(session, model)
    else:
        path = Path(tmp) / "model"
        model.save_pretrained(path)
        rm = RemoteModel.from_path(session, str(path))
        _match_server_buffers(model)
    return rm, time.perf_counter() - t


def _match_server_buffers(model) -> None:
    # A checkpoint does not hold init-time buffers (rotary inv_freq): the server recomputes them on the
    # CPU (models._fill_missing). Do the same here, or the local reference differs in the last bits.
    for m in model.modules():
        if hasattr(m, "inv_freq") and hasattr(m, "config"):
            with torch.device("cpu"):
                fresh = type(m)(config=m.config)
            for name, buf in fresh.named_buffers(recurse=False):
                setattr(m, name, buf.to(getattr(m, name).device))


# -- local references -----------------------------------------------------------------------------
def local_generate(model, ids, edits: dict | None = None, path: str | None = None, **kw) -> torch.Tensor:
    """generate with in-place edits {step: fn(tensor)} on `path`'s output, done with forward hooks."""
    calls = [-1]
    handles = [model.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))]
    if edits:
        def hook(m, a, out):
            fn = edits.get(calls[0])
            if fn is not None:
                fn(out if isinstance(out, torch.Tensor) else out[0])
        handles.append(model.get_submodule(path).register_forward_hook(hook))
    try:
        with torch.no_grad():
            return model.generate(ids, **kw).cpu()
    finally:
        for h in handles:
            h.remove()


# -- experiments ----------------------------------------------------------------------------------
def exp_accuracy(s, rm, model, ids, new_tokens: int) -> dict:
    ref = rm.generate(ids, max_new_tokens=new_tokens)
    local = local_generate(model, ids.to(model.device), max_new_tokens=new_tokens)
    run = s.start(rm, ids, method="generate", max_new_tokens=new_tokens,
                  breakpoints=[Breakpoint(layer=n) for n in LAYERS])
    pauses = 0
    stop = run.wait()
    while stop is not None:
        pauses += 1
        stop = run.resume()
    gen, base = run.output[:, ids.shape[1]:], ref[:, ids.shape[1]:]
    fwd = s.start(rm, ids, breakpoints=LAYERS)
    while fwd.wait() is not None:
        fwd.resume()
    with torch.no_grad():
        local_logits = model(ids.to(model.device)).logits.cpu()
    return {
        "new_tokens": new_tokens, "pauses": pauses,
        "token_accuracy": float((gen == base).float().mean()),
        "generate_bitwise": torch.equal(run.output, ref),
        "remote_equals_local_generate": torch.equal(ref, local),
        "forward_logits_bitwise": torch.equal(fwd.output.logits.cpu(), rm(ids).logits.cpu()),
        "remote_equals_local_forward": torch.equal(fwd.output.logits.cpu(), local_logits),
        "logits_finite": bool(torch.isfinite(local_logits).all()),
    }


def exp_latency(s, rm, ids, n_layers: int, reps: int) -> dict:
    """Stop at every layer of a forward; resume (a) straight away, (b) after reading a small slice."""
    out = {}
    for mode in ("resume", "read_then_resume"):
        client, server_over, handoff, compute, read = [], [], [], [], []
        for rep in range(reps + 1):
            run = s.start(rm, ids, breakpoints=list(range(n_layers)))
            stop = run.wait()
            while stop is not None:
                t0 = time.perf_counter()
                if mode == "read_then_resume":
                    stop.activation[0, -1, :8].cpu()
                    t1 = time.perf_counter()
                stop = run.resume()
                t2 = time.perf_counter()
                if rep == 0 or stop is None:
                    continue  # warm-up; and the last resume runs the model's tail, not one layer
                tm = run.timing
                client.append((t2 - t0) * 1e3 - tm["compute_us"] / 1e3)
                server_over.append((tm["server_us"] - tm["compute_us"]) / 1e3)
                handoff.append(tm["handoff_us"] / 1e3)
                compute.append(tm["compute_us"] / 1e3)
                if mode == "read_then_resume":
                    read.append((t1 - t0) * 1e3)
        out[mode] = {"client_minus_compute_ms": summary(client), "server_overhead_ms": summary(server_over),
                     "handoff_ms": summary(handoff), "compute_ms": summary(compute)}
        if read:
            out[mode]["read_slice_ms"] = summary(read)
    return out


def exp_steering(s, rm, model, ids, layer: int, path: str, hidden: int) -> dict:
    steer = torch.randn(hidden, generator=torch.Generator().manual_seed(3)) * 4.0
    run = s.start(rm, ids, breakpoints=[layer])
    run.wait().activation.add_(steer)
    assert run.resume() is None
    h = model.get_submodule(path).register_forward_hook(lambda m, a, o: o.add_(steer.to(o.device)))
    try:
        with torch.no_grad():
            local = model(ids.to(model.device)).logits.cpu()
    finally:
        h.remove()
    with torch.no_grad():
        plain = model(ids.to(model.device)).logits.cpu()
    step = 2
    gen = s.start(rm, ids, method="generate", max_new_tokens=8, breakpoints=[Breakpoint(layer=layer, step=step)])
    gen.wait().activation[:, -1] += steer
    assert gen.resume() is None
    local_gen = local_generate(model, ids.to(model.device), {step: lambda t: t[:, -1].add_(steer.to(t.device))},
                               path, max_new_tokens=8)
    return {"layer": layer, "forward_bitwise": torch.equal(run.output.logits.cpu(), local),
            "forward_changed": not torch.equal(local, plain),
            "generate_step": step, "generate_bitwise": torch.equal(gen.output, local_gen)}


def _edit_from(read: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """The user's decision at a pause: a steering vector scaled by what was read."""
    return base * float(read.float().abs().mean())


def exp_recompute(s, rm, ids, layer: int, hidden: int, rounds: int, new_tokens: int) -> dict:
    """M rounds of (read the activation at step k_i, decide an edit, apply it) during one generate."""
    steps = [2 * (i + 1) for i in range(rounds)]
    base = torch.randn(hidden, generator=torch.Generator().manual_seed(4))
    bps = [Breakpoint(layer=layer, step=k) for k in steps]

    t = time.perf_counter()
    run = s.start(rm, ids, method="generate", max_new_tokens=new_tokens, breakpoints=bps)
    stop, edits = run.wait(), []
    while stop is not None:
        e = _edit_from(stop.activation[0, -1, :64].cpu(), base)
        edits.append(e)
        stop.activation[:, -1] += e
        stop = run.resume()
    djinn_s = time.perf_counter() - t

    t = time.perf_counter()
    known: list[torch.Tensor] = []
    for i in range(rounds + 1):  # round i re-executes from scratch up to step k_i; the last to the end
        run2 = s.start(rm, ids, method="generate", max_new_tokens=new_tokens, breakpoints=bps[:i + 1])
        stop = run2.wait()
        for e in known:
            stop.activation[:, -1] += e
            stop = run2.resume()
        if i < rounds:
            known.append(_edit_from(stop.activation[0, -1, :64].cpu(), base))
            run2.cancel()  # stopping early favours the baseline: a full re-trace would run to the end
    recompute_s = time.perf_counter() - t

    t = time.perf_counter()
    run3 = s.start(rm, ids, method="generate", max_new_tokens=new_tokens, breakpoints=bps[-1:])
    stop = run3.wait()
    pause_s = time.perf_counter() - t
    t = time.perf_counter()
    fork = stop.fork()
    fork.wait()
    fork_s = time.perf_counter() - t
    fork.cancel()
    run3.cancel()
    return {
        "rounds": rounds, "steps": steps, "new_tokens": new_tokens,
        "paused_run_s": djinn_s, "recompute_per_edit_s": recompute_s, "speedup": recompute_s / djinn_s,
        "same_output": torch.equal(run.output, run2.output),
        "fork_ms": fork_s * 1e3, "run_to_last_stop_ms": pause_s * 1e3,
    }


def exp_late_stop(s, rm, ids, layer: int, new_tokens: int, reps: int) -> dict:
    """A stop late in a generate (step new_tokens - 2): the steps before it as one batched fast generate
    (Note [The head of a run]) against the same run kept eager (deterministic=True), in the same job:
    the time to the stop, whether the two stops see the same activation, and their tokens after. On a
    server without the fast path (a CPU one) both are eager."""
    step = new_tokens - 2
    bps = [Breakpoint(layer=layer, step=step)]
    out: dict = {"step": step}
    for label, det in (("eager", True), ("head", False)):
        ms, act, tokens = [], None, None
        for _ in range(reps + 1):  # the first is a warm-up
            t = time.perf_counter()
            run = s.start(rm, ids, method="generate", max_new_tokens=new_tokens, deterministic=det, breakpoints=bps)
            stop = run.wait()
            ms.append((time.perf_counter() - t) * 1e3)
            act = stop.activation[0, -1].cpu().float()
            assert run.resume() is None
            tokens = run.output
        out[f"{label}_to_stop_ms"] = summary(ms[1:])
        out[f"{label}_activation"], out[f"{label}_tokens"] = act, tokens
    a, b = out.pop("eager_activation"), out.pop("head_activation")
    out["activation_max_rel_diff"] = float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))
    out["same_tokens"] = torch.equal(out.pop("eager_tokens"), out.pop("head_tokens"))
    out["speedup_to_stop"] = out["eager_to_stop_ms"]["p50"] / out["head_to_stop_ms"]["p50"]
    return out


def exp_hooks(s, other, rm, ids, reps: int, new_tokens: int) -> dict:
    def forward_ms(sess):
        t = time.perf_counter()
        rm(ids, session=sess).logits[0, -1, :4].cpu()  # the fetch waits for the device
        return (time.perf_counter() - t) * 1e3

    def run_ms(sess, bps, method="forward"):
        t = time.perf_counter()
        if method == "forward":
            r = sess.start(rm, ids, breakpoints=bps)
            assert r.wait() is None
            r.output.logits[0, -1, :4].cpu()
        else:
            r = sess.start(rm, ids, method="generate", max_new_tokens=new_tokens, breakpoints=bps)
            assert r.wait() is None
        return (time.perf_counter() - t) * 1e3

    def generate_ms(sess):
        t = time.perf_counter()
        rm.generate(ids, max_new_tokens=new_tokens, session=sess)
        return (time.perf_counter() - t) * 1e3

    never = [Breakpoint(layer=n, step=10**6) for n in LAYERS]  # hooks on, thread on, never parks
    cases = {
        "plain_forward": lambda: forward_ms(other),
        "run_without_breakpoints": lambda: run_ms(other, []),
        "plain_generate": lambda: generate_ms(other),
        "generate_run_breakpoints_never_hit": lambda: run_ms(other, never, "generate"),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    times["forward_while_other_run_paused_on_same_module"] = []
    for _ in range(2):
        cases["plain_forward"]()
    for rep in range(reps):  # interleaved, so drift hits every case alike
        for k, fn in cases.items():
            times[k].append(fn())
        paused = s.start(rm, ids, breakpoints=LAYERS)
        paused.wait()
        times["forward_while_other_run_paused_on_same_module"].append(forward_ms(other))
        paused.cancel()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "reps": reps, "median_ms": med,
        "overhead_pct": {
            "run_without_breakpoints": 100 * (med["run_without_breakpoints"] / med["plain_forward"] - 1),
            "generate_breakpoints_never_hit": 100 * (med["generate_run_breakpoints_never_hit"] / med["plain_generate"] - 1),
            "forward_through_paused_runs_hooks": 100 * (med["forward_while_other_run_paused_on_same_module"]
                                                        / med["plain_forward"] - 1),
        },
    }


def _token_gaps(rm_b, ids, new_tokens: int) -> list[float]:
    stream = rm_b.generate(ids, max_new_tokens=new_tokens, stream=True)
    gaps, last = [], time.perf_counter()
    for _ in stream:
        now = time.perf_counter()
        gaps.append((now - last) * 1e3)
        last = now
    return gaps[1:]  # the first gap includes the prefill


def _neighbour(sa, rm_a, rm_b, ids, new_tokens: int, reps: int) -> dict:
    _token_gaps(rm_b, ids, 4)
    alone, beside = [], []
    for _ in range(reps):
        alone += _token_gaps(rm_b, ids, new_tokens)
        run = sa.start(rm_a, ids, method="generate", max_new_tokens=new_tokens,
                       breakpoints=[Breakpoint(layer=LAYERS[1], step=3)])
        stop = run.wait()
        beside += _token_gaps(rm_b, ids, new_tokens)
        paused_bytes = stop.paused_bytes
        run.cancel()
    return {"decode_ms_alone": summary(alone), "decode_ms_while_other_paused": summary(beside),
            "other_paused_bytes": paused_bytes}


# -- driver ---------------------------------------------------------------------------------------
def run_model(name: str, args, device, server, tmp: str) -> dict:
    label, model = build(name, device, args.tiny)
    how = "upload" if (name == "gpt2" or args.tiny) else "path"
    conn = Connection(server.address, None)
    try:
        s, other = conn.session(f"exp3-{name}"), conn.session(f"exp3-{name}-other")
        rm, setup_s = remote(s, model, how, tmp)
        cfg = model.config
        n_layers, hidden = cfg.num_hidden_layers, cfg.hidden_size
        path = f"{'transformer.h' if name == 'gpt2' else 'model.layers'}.{LAYERS[1]}"
        ids = torch.randint(3, cfg.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(1))
        res = {"model": label, "layers": n_layers, "remote_via": how, "setup_s": setup_s, "prompt_tokens": args.prompt}
        timers = {}
        for key, fn in [
            ("accuracy", lambda: exp_accuracy(s, rm, model, ids, args.new_tokens)),
            ("latency", lambda: exp_latency(s, rm, ids, n_layers, args.reps)),
            ("steering", lambda: exp_steering(s, rm, model, ids, LAYERS[1], path, hidden)),
            ("recompute", lambda: exp_recompute(s, rm, ids, LAYERS[1], hidden, args.rounds, args.new_tokens)),
            ("late_stop", lambda: exp_late_stop(s, rm, ids, LAYERS[1], args.new_tokens, max(2, args.reps // 3))),
            ("hooks", lambda: exp_hooks(s, other, rm, ids, args.hook_reps, args.new_tokens // 2)),
            ("neighbour", lambda: exp_neighbour(conn, s, rm, model, ids, args.new_tokens, max(1, args.reps // 5))),
        ]:
            t = time.perf_counter()
            res[key] = fn()
            timers[key] = round(time.perf_counter() - t, 2)
            print(f"  {label}: {key} done in {timers[key]:.1f}s", flush=True)
        res["experiment_s"] = timers
        return res
    finally:
        conn.close()
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def exp_neighbour(conn, s, rm, model, ids, new_tokens: int, reps: int) -> dict:
    # Client B is another connection using the same model: by path, or by "uploading" weights the
    # server already holds (has_weights finds them all, nothing is sent).
    b = Connection(conn.address, None)
    try:
        sb = b.session("neighbour")
        rm_b = RemoteModel.from_path(sb, rm.source) if rm.source else RemoteModel.from_module(sb, model)
        assert rm_b.model_id == rm.model_id
        return _neighbour(s, rm, rm_b, ids, new_tokens, reps)
    finally:
        b.close()


def print_summary(res: dict) -> None:
    a, lat, st, rc, hk, nb = (res[k] for k in ("accuracy", "latency", "steering", "recompute", "hooks", "neighbour"))
    rr = lat["read_then_resume"]
    print(f"{res['model']}: token accuracy {a['token_accuracy'] * 100:.1f}% over {a['pauses']} pauses "
          f"(bitwise {a['generate_bitwise']}, forward {a['forward_logits_bitwise']}, remote==local {a['remote_equals_local_forward']})")
    print(f"  resume server overhead p50 {lat['resume']['server_overhead_ms']['p50']:.3f} ms "
          f"(handoff {lat['resume']['handoff_ms']['p50']:.3f}); client resume-compute p50 "
          f"{lat['resume']['client_minus_compute_ms']['p50']:.3f} / p99 {lat['resume']['client_minus_compute_ms']['p99']:.3f} ms; "
          f"read+resume-compute p50 {rr['client_minus_compute_ms']['p50']:.3f} / p99 {rr['client_minus_compute_ms']['p99']:.3f} ms")
    print(f"  steering bitwise: forward {st['forward_bitwise']}, generate {st['generate_bitwise']}")
    print(f"  {rc['rounds']} edit rounds: paused run {rc['paused_run_s']:.3f}s vs recompute {rc['recompute_per_edit_s']:.3f}s "
          f"({rc['speedup']:.1f}x, same output {rc['same_output']}); fork {rc['fork_ms']:.1f} ms")
    ls = res["late_stop"]
    print(f"  stop at step {ls['step']}: {ls['head_to_stop_ms']['p50']:.1f} ms (head on the server's decode path) vs "
          f"{ls['eager_to_stop_ms']['p50']:.1f} ms eager ({ls['speedup_to_stop']:.1f}x), same tokens {ls['same_tokens']}, "
          f"activation max rel diff {ls['activation_max_rel_diff']:.2e}")
    print(f"  hook overhead %: " + ", ".join(f"{k} {v:+.2f}" for k, v in hk["overhead_pct"].items()))
    print(f"  neighbour decode p50 {nb['decode_ms_alone']['p50']:.2f} ms alone, "
          f"{nb['decode_ms_while_other_paused']['p50']:.2f} ms beside a paused run")


def plot(results: dict, out: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    models = results["models"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    names = [m["model"] for m in models]
    x = range(len(models))
    for i, (key, lab) in enumerate([("server_overhead_ms", "server overhead"), ("client_minus_compute_ms", "client: resume"),
                                    ("read", "client: read slice + resume")]):
        p50 = [(m["latency"]["read_then_resume"]["client_minus_compute_ms"] if key == "read"
                else m["latency"]["resume"][key])["p50"] for m in models]
        axes[0].bar([j + i * 0.25 for j in x], p50, width=0.25, label=lab)
    axes[0].set_xticks([j + 0.25 for j in x], names, fontsize=7)
    axes[0].set_ylabel("ms (p50, model compute excluded)")
    axes[0].set_title("pause -> resume")
    axes[0].legend(fontsize=7)
    axes[1].bar([j - 0.2 for j in x], [m["recompute"]["paused_run_s"] for m in models], width=0.4, label="Djinn paused run")
    axes[1].bar([j + 0.2 for j in x], [m["recompute"]["recompute_per_edit_s"] for m in models], width=0.4,
                label="recompute per edit")
    axes[1].set_xticks(list(x), names, fontsize=7)
    axes[1].set_ylabel("s")
    axes[1].set_title(f"{models[0]['recompute']['rounds']} read-then-edit rounds in one generate")
    axes[1].legend(fontsize=7)
    axes[2].bar([j - 0.2 for j in x], [m["neighbour"]["decode_ms_alone"]["p50"] for m in models], width=0.4, label="alone")
    axes[2].bar([j + 0.2 for j in x], [m["neighbour"]["decode_ms_while_other_paused"]["p50"] for m in models], width=0.4,
                label="while another client is paused")
    axes[2].set_xticks(list(x), names, fontsize=7)
    axes[2].set_ylabel("ms per token (p50)")
    axes[2].set_title("second client's decode")
    axes[2].legend(fontsize=7)
    fig.suptitle(f"exp3 on {results['environment'].get('gpu', results['environment']['device'])}")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="server and reference device (default cuda:0 if present, else cpu)")
    p.add_argument("--tiny", action="store_true", help="12-layer toy shapes on the CPU (< 60 s)")
    p.add_argument("--models", default="gpt2,llama7b", help="comma list of gpt2, llama7b")
    p.add_argument("--out", help="output directory (default $OUT, else results/ next to this script)")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=32, dest="new_tokens")
    p.add_argument("--reps", type=int, default=10, help="forward runs with a stop at every layer, per mode")
    p.add_argument("--hook-reps", type=int, default=30, dest="hook_reps")
    p.add_argument("--rounds", type=int, default=4, help="read-then-edit rounds in the recompute comparison")
    args = p.parse_args()
    if args.tiny:
        args.device = args.device or "cpu"
        args.new_tokens, args.reps, args.hook_reps, args.rounds = min(args.new_tokens, 12), 2, 5, 3
        args.prompt = min(args.prompt, 16)
    device = torch.device(args.device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    out_dir = Path(args.out or os.environ.get("OUT") or Path(__file__).parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    server = start_server(str(device))
    results = {"experiment": "exp3_whitebox_debugging", "tiny": args.tiny, "environment": environment(device),
               "args": vars(args), "models": []}
    path = out_dir / f"exp3_{'tiny' if args.tiny else device.type}.json"
    try:
        with tempfile.TemporaryDirectory(prefix="djinn-exp3-") as tmp:
            for name in args.models.split(","):
                print(f"== {name} on {device}", flush=True)
                res = run_model(name, args, device, server, tmp)
                results["models"].append(res)
                print_summary(res)
                results["wall_s"] = time.perf_counter() - t0
                path.write_text(json.dumps(results, indent=2))  # after each model: a later failure keeps it
    finally:
        server.stop()
    print(f"wrote {path}")
    fig = plot(results, path.with_suffix(".png"))
    print(f"wrote {fig}" if fig else "matplotlib not importable: no plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
