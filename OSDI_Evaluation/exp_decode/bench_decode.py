"""Decode speed: the fast path (djinn/server/execution/fastpath.py) against Hugging Face eager generate.

For each model shape (Llama-2-7B and 13B, fp16, seeded random weights), in one job:
  * HBM bandwidth (a device copy) and the floor it sets: (weights + KV read) / bandwidth per step;
  * HF `generate` eager, batch 1: ms/token of decode (prefill excluded) and its greedy tokens;
  * the fast path in this process (DecodePool on the same module): ms/token at batch 1 and the
    aggregate tokens/s of 1..64 rows in one step, plus greedy-token agreement with HF eager;
  * the fast path behind a real server (loopback): 1..64 concurrent sessions, each its own client
    connection and generate call; per-session and aggregate tokens/s, and the remote overhead per
    token at one session (remote ms/token minus in-process ms/token).

    python OSDI_Evaluation/exp_decode/bench_decode.py --shapes 7b,13b --out results/decode_h200.json
    python OSDI_Evaluation/exp_decode/bench_decode.py --tiny --device cpu --out /tmp/decode_cpu.json
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from OSDI_Evaluation.common import environment, start_server  # noqa: E402

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
}
TARGETS = {"7b": {"tok_s_batch1": 110, "x_eager": 7}, "13b": {"tok_s_batch1": 70},
           "aggregate_32_x_one": 10, "remote_overhead_ms_p50": 0.3}


def config(shape: str):
    from transformers import LlamaConfig

    # No eos: random weights would stop at arbitrary points and every path must make the same count.
    return LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, bos_token_id=None, eos_token_id=None,
                       pad_token_id=None)


def build_local(shape: str, device: torch.device, dtype: torch.dtype, seed: int):
    """The server's init_model recipe (djinn/server/handlers/init_ops.py), so both hold the same bits."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config(shape), dtype=dtype)
    return model.eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hbm_gbps(device) -> float | None:
    if device.type != "cuda":
        return None
    x = torch.empty(1 << 31, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync(device)
    return 2 * x.numel() * 10 / (time.perf_counter() - t0) / 1e9


def kv_bytes_per_token(model) -> int:
    c = model.config
    head = c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers * 2 * c.num_key_value_heads * head * next(model.parameters()).element_size()


def eager(model, prompt: torch.Tensor, new: int, device) -> dict:
    kw = dict(do_sample=False, attention_mask=torch.ones_like(prompt))
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=2, **kw)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        model.generate(prompt, max_new_tokens=1, **kw)
        sync(device)
        t1 = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new, **kw)
        sync(device)
        t2 = time.perf_counter()
    ms = ((t2 - t1) - (t1 - t0)) / (new - 1) * 1e3
    return {"ms_per_token": ms, "tok_s": 1e3 / ms, "prefill_s": t1 - t0, "tokens": out[0, prompt.shape[1]:].tolist()}


def _against_plain(plain_runs: list[dict], r: dict, name: str) -> None:
    """r's speed (`x_<name>`) and greedy tokens (`greedy_match_vs_<name>`) against the plain in-process
    run of the same rows and attention, where there is one."""
    plain = [x for x in plain_runs if x["rows"] == r["rows"] and x["attention"] == r["attention"]]
    if plain:
        r[f"x_{name}"] = plain[-1]["ms_per_step"] / r["ms_per_step"]
        k = min(len(r["tokens_row0"]), len(plain[-1]["tokens_row0"]))
        r[f"greedy_match_vs_{name}"] = _prefix(r["tokens_row0"][:k], plain[-1]["tokens_row0"][:k])


def inproc(model, prompts: list[torch.Tensor], steps: int, device, max_len: int, attention: str = "auto",
           compile: bool = False, overlap: bool = False) -> dict:
    """DecodePool in this process over a KV block pool of its own: prefill each prompt into its blocks,
    join all rows, time `steps` batched steps with the given decode attention (gather or flex)."""
    from djinn.server.execution.fastpath import DecodePool, Row, Sampler
    from djinn.server.execution.paged_cache import PagedCache
    from djinn.vmu.kv_pool import KVPool, KVShape

    bt = 16
    kv = KVPool(KVShape.of_module(model), len(prompts) * -(-max_len // bt) + 1, bt, device)
    pool = DecodePool(model, kv, len(prompts), max_len, attention=attention, compile=compile, overlap=overlap)
    rows, firsts = [], []
    sync(device)
    t_pre = time.perf_counter()
    for p in prompts:
        table = kv.new_table(1)
        assert kv.reserve(table, min(max_len, p.shape[1] + steps + 3))
        with torch.inference_mode():
            out = model(p, past_key_values=PagedCache(kv, table), use_cache=True, logits_to_keep=1)
        first = int(out.logits[0, -1].argmax())
        firsts.append(first)
        row = Row(first, p.shape[1], p.shape[1], steps + 3, Sampler(False), frozenset())
        pool.join(row, table)
        rows.append(row)
    sync(device)
    prefill_s = time.perf_counter() - t_pre  # one prompt a forward, as a simple in-process loop would
    t_cap = time.perf_counter()
    for _ in range(2):  # captures the graph of this bucket (and the next length bucket's, if crossed)
        pool.step()
    sync(device)
    warm_s = time.perf_counter() - t_cap  # the compile (Note [Compiled step]) and the captures
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        pool.step()
    pool.drain()  # Note [Overlapped steps]: the last step's tokens
    sync(device)
    dt = (time.perf_counter() - t0) / steps
    res = {"rows": len(rows), "context": prompts[0].shape[1], "attention": pool.attention_kind,
           "compiled": compile, "overlap": overlap, "warm_s": warm_s,
           "ms_per_step": dt * 1e3, "aggregate_tok_s": len(rows) / dt, "prefill_s": prefill_s,
           "tokens_row0": [firsts[0], *rows[0].new]}
    # The last prefill's output holds a PagedCache over `kv` too (an H100 ran out of memory at 32 rows x
    # 2k tokens with it alive: the next run's 33 GiB pool came on top of this one's).
    del pool, kv, rows, table, out
    gc.collect()  # the pool's attention and graphs form reference cycles: free its KV before the next run
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def remote_round(address: str, model_id_cfg, prompts, new: int, steer: dict | None = None) -> dict:
    """N sessions, each on its own connection and thread, generate at once; wall times per session.
    `steer`: session 0's generate adds it (Note [Steering]), the others are unsteered. The server's own
    decode steps of the round (from its stats): how much of the wall they took."""
    from djinn.frontend.connection import Connection

    conns = [Connection(address, secret=None) for _ in prompts]
    try:
        sessions = [c.session() for c in conns]
        rms = [model_id_cfg(s) for s in sessions]
        before = _fast_stats(conns[0], rms[0].model_id)
        times, outs, errors = [0.0] * len(prompts), [None] * len(prompts), []
        barrier = threading.Barrier(len(prompts))

        def run(i):
            try:
                barrier.wait()
                t0 = time.perf_counter()
                kw = {"steer": steer} if steer and i == 0 else {}
                outs[i] = rms[i].generate(prompts[i], max_new_tokens=new, do_sample=False, session=sessions[i], **kw)
                times[i] = time.perf_counter() - t0
            except Exception as e:
                errors.append(repr(e))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        if errors:
            raise RuntimeError(errors[0])
        paths = [c.stats()["sessions"][s.sid]["decode"] for c, s in zip(conns, sessions)]
        after = _fast_stats(conns[0], rms[0].model_id)
        steps = after["steps"] - before["steps"]
        server = {"steps": steps, "rows_per_step": (after["rows_stepped"] - before["rows_stepped"]) / max(1, steps),
                  "step_s": after["step_s"] - before["step_s"]}
        return {"sessions": len(prompts), "wall_s": wall, "per_session_tok_s": [new / t for t in times],
                "aggregate_tok_s": len(prompts) * new / wall, "tokens_row0": outs[0][0].tolist(),
                "fast": sum(p["fast"] for p in paths), "eager": sum(p["eager"] for p in paths), "server": server}
    finally:
        for c in conns:
            c.close()


def _fast_stats(conn, model_id: str) -> dict:
    fast = conn.stats()["models"][model_id].get("fast_decode") or {}
    return {k: fast.get(k, 0) for k in ("steps", "rows_stepped", "step_s")}


def same_batch_in_process(inproc_rows: list[dict], remote: dict, attention: str, new: int) -> dict | None:
    """The remote round against the same batch in process (issue: remote >= 90 % of it): its prompts
    prefilled, then `new` tokens each at the in-process step time of that many rows and attention."""
    same = [r for r in inproc_rows if r["rows"] == remote["sessions"] and r["attention"] == attention]
    if not same:
        return None
    r = same[-1]
    wall = r["prefill_s"] + new * r["ms_per_step"] / 1e3
    inproc_tok_s = r["rows"] * new / wall
    return {"attention": attention, "inproc_end_to_end_tok_s": inproc_tok_s,
            "remote_x_inproc_end_to_end": remote["aggregate_tok_s"] / inproc_tok_s,
            "remote_x_inproc_steady_steps": remote["aggregate_tok_s"] / r["aggregate_tok_s"],
            # of the remote wall: the server's decode steps, and the rest (prefills, replies, ramp, tail)
            "remote_step_share_of_wall": remote["server"]["step_s"] / remote["wall_s"]}


def bench_shape(shape: str, args, device, dtype) -> dict:
    from djinn.frontend.remote import RemoteModel

    print(f"[{shape}] building the local model", flush=True)
    model = build_local(shape, device, dtype, args.seed)
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    kvt = kv_bytes_per_token(model)
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    conc = [n for n in args.concurrency if n <= args.max_sessions]
    prompts = [torch.randint(0, vocab, (1, args.prompt), generator=g).to(device) for _ in range(max(conc))]
    res: dict = {"shape": shape, "weight_bytes": weights, "kv_bytes_per_token": kvt, "prompt": args.prompt,
                 "new_tokens": args.new_tokens}
    bw = hbm_gbps(device)
    if bw:
        ctx = args.prompt + args.new_tokens // 2
        res["hbm_gbps"] = bw
        res["floor_ms_per_token"] = {n: (weights + n * ctx * kvt) / (bw * 1e9) * 1e3 for n in conc}
    print(f"[{shape}] HF eager generate", flush=True)
    res["eager"] = eager(model, prompts[0], args.eager_tokens, device)
    print(f"[{shape}] eager {res['eager']['tok_s']:.1f} tok/s", flush=True)
    res["inproc"] = []
    for attention in args.attentions:
        for n in conc:
            r = inproc(model, prompts[:n], args.steps, device, args.max_len, attention)
            res["inproc"].append(r)
            print(f"[{shape}] in-process fast path ({r['attention']}), {n} rows: {r['ms_per_step']:.2f} ms/step, "
                  f"{r['aggregate_tok_s']:.0f} tok/s", flush=True)
    if args.overlap:  # Note [Overlapped steps]: the same steps, each launched before the last one's tokens are read
        for n in conc:
            attention = args.attentions[-1]
            r = inproc(model, prompts[:n], args.steps, device, args.max_len, attention, overlap=True)
            _against_plain(res["inproc"], r, "plain_steps")
            res.setdefault("inproc_overlap", []).append(r)
            print(f"[{shape}] in-process overlapped ({r['attention']}), {n} rows: {r['ms_per_step']:.2f} ms/step, "
                  f"{r['aggregate_tok_s']:.0f} tok/s ({r.get('x_plain_steps', float('nan')):.3f}x plain steps)",
                  flush=True)
    for n in args.compile_rows:  # Note [Compiled step]: the same step compiled, the server's attention
        attention = args.attentions[-1]
        r = inproc(model, prompts[:n], args.steps, device, args.max_len, attention, compile=True)
        _against_plain(res["inproc"], r, "uncompiled")
        res.setdefault("inproc_compiled", []).append(r)
        print(f"[{shape}] in-process compiled ({r['attention']}), {n} rows: {r['ms_per_step']:.2f} ms/step, "
              f"{r['aggregate_tok_s']:.0f} tok/s ({r.get('x_uncompiled', float('nan')):.3f}x uncompiled; "
              f"compile and capture {r['warm_s']:.0f} s)", flush=True)
    if args.long_prompt:
        # Agent-sized contexts, where reading the KV is a large share of the step (Note [Why FlexAttention]).
        n = max(conc)
        long = [torch.randint(0, vocab, (1, args.long_prompt), generator=g).to(device) for _ in range(n)]
        res["inproc_long"] = []
        for attention in args.attentions:
            r = inproc(model, long, args.steps, device, args.long_prompt + args.steps + 8, attention)
            res["inproc_long"].append(r)
            print(f"[{shape}] in-process, {n} rows at {args.long_prompt} tokens ({r['attention']}): "
                  f"{r['ms_per_step']:.2f} ms/step, {r['aggregate_tok_s']:.0f} tok/s", flush=True)
        del long
        kinds = {r["attention"]: r for r in res["inproc_long"]}
        if len(kinds) == 2:
            k = min(len(kinds["flex"]["tokens_row0"]), len(kinds["gather"]["tokens_row0"]))
            res["greedy_match_long_flex_vs_gather"] = _prefix(kinds["flex"]["tokens_row0"][:k],
                                                              kinds["gather"]["tokens_row0"][:k])
    # The last attention's one-row result is the headline (the server's default on CUDA is flex).
    one = [r for r in res["inproc"] if r["rows"] == conc[0]][-1]
    k = min(len(one["tokens_row0"]), len(res["eager"]["tokens"]))
    res["greedy_match_inproc_vs_eager"] = _prefix(one["tokens_row0"][:k], res["eager"]["tokens"][:k])
    res["greedy_match_inproc_vs_eager_by_attention"] = {
        r["attention"]: _prefix(r["tokens_row0"][:k], res["eager"]["tokens"][:k])
        for r in res["inproc"] if r["rows"] == conc[0]}
    res["greedy_compared"] = k
    if args.in_process_only:
        res["fast_x_eager_batch1"] = 1e3 / one["ms_per_step"] / res["eager"]["tok_s"]
        return res
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()

    print(f"[{shape}] starting a server", flush=True)
    srv = start_server(str(device), "--fast-decode", "on", "--fast-decode-max-batch", str(max(conc)),
                       "--fast-decode-max-len", str(args.max_len), "--log-level", "WARNING",
                       "--fast-decode-attention", args.server_attention,
                       *(["--fast-decode-compile"] if args.server_compile else []),
                       *(["--fast-decode-overlap"] if args.overlap else []))
    from djinn.frontend.connection import Connection

    holder = Connection(srv.address, secret=None)  # keeps the model (and its decode pool) between rounds
    try:
        def remote(s):
            return RemoteModel.from_config(s, config(shape), seed=args.seed, dtype=dtype)

        remote_id = remote(holder.session("holder")).model_id

        res["remote"] = []
        for n in conc:
            remote_round(srv.address, remote, [p.cpu() for p in prompts[:n]], args.new_tokens)  # warm-up
            r = remote_round(srv.address, remote, [p.cpu() for p in prompts[:n]], args.new_tokens)
            r["per_session_tok_s_p50"] = sorted(r["per_session_tok_s"])[len(r["per_session_tok_s"]) // 2]
            server_attention = holder.stats()["models"][remote_id]["fast_decode"]["attention"]
            r["vs_same_batch_in_process"] = same_batch_in_process(res["inproc"], r, server_attention, args.new_tokens)
            res["remote"].append(r)
            vs = r["vs_same_batch_in_process"] or {}
            print(f"[{shape}] remote, {n} sessions: {r['per_session_tok_s_p50']:.1f} tok/s per session, "
                  f"{r['aggregate_tok_s']:.0f} aggregate (fast {r['fast']}, eager {r['eager']}); "
                  f"{vs.get('remote_x_inproc_end_to_end', float('nan')):.3f}x the same batch in process, "
                  f"{vs.get('remote_x_inproc_steady_steps', float('nan')):.3f}x its steady steps; "
                  f"server steps {r['server']['step_s']:.3f} s of {r['wall_s']:.3f} s, "
                  f"{r['server']['rows_per_step']:.1f} rows a step", flush=True)
        # Remote overhead per token at one session: decode ms/token through the server minus in-process.
        few = remote_timed(srv.address, remote, prompts[0].cpu(), 2)
        before = _fast_stats(holder, remote_id)
        many = remote_timed(srv.address, remote, prompts[0].cpu(), args.new_tokens)
        after = _fast_stats(holder, remote_id)
        remote_ms = (many - few) / (args.new_tokens - 2) * 1e3
        res["remote_ms_per_token_batch1"] = remote_ms
        res["remote_overhead_ms_per_token"] = remote_ms - one["ms_per_step"]
        # Inside the server's step (its graph replay and token read) vs around it (the engine's turn):
        # which side of the step the remote overhead is on.
        steps = max(1, after["steps"] - before["steps"])
        res["remote_batch1_server_step_ms"] = (after["step_s"] - before["step_s"]) / steps * 1e3
        # A steered generate (one vector added at the middle layer, Note [Steering]) on the same fast path.
        cfg = config(shape)
        vec = torch.randn(cfg.hidden_size, generator=torch.Generator().manual_seed(3))
        steer = {cfg.num_hidden_layers // 2: vec}
        s_few = remote_timed(srv.address, remote, prompts[0].cpu(), 2, steer=steer)
        s_many = remote_timed(srv.address, remote, prompts[0].cpu(), args.new_tokens, steer=steer)
        res["remote_ms_per_token_batch1_steered"] = (s_many - s_few) / (args.new_tokens - 2) * 1e3
        res["steered_x_unsteered"] = res["remote_ms_per_token_batch1_steered"] / remote_ms
        # Reading that layer's output at every position as well (Note [Recorded activations]).
        r_few = remote_timed(srv.address, remote, prompts[0].cpu(), 2, steer=steer, record=list(steer))
        r_many = remote_timed(srv.address, remote, prompts[0].cpu(), args.new_tokens, steer=steer, record=list(steer))
        res["remote_ms_per_token_batch1_steered_recorded"] = (r_many - r_few) / (args.new_tokens - 2) * 1e3
        res["steered_recorded_x_unsteered"] = res["remote_ms_per_token_batch1_steered_recorded"] / remote_ms
        # The largest round again with session 0 steered: the batch keeps its speed, the steered row its place.
        n = max(conc)
        r = remote_round(srv.address, remote, [p.cpu() for p in prompts[:n]], args.new_tokens, steer=steer)
        res["remote_one_steered"] = {k: r[k] for k in ("sessions", "wall_s", "aggregate_tok_s", "fast", "eager")}
        same = [x for x in res["remote"] if x["sessions"] == n][0]
        res["remote_one_steered"]["aggregate_x_unsteered"] = r["aggregate_tok_s"] / same["aggregate_tok_s"]
        print(f"[{shape}] remote, {n} sessions, one steered: {r['aggregate_tok_s']:.0f} tok/s aggregate "
              f"({res['remote_one_steered']['aggregate_x_unsteered']:.3f}x unsteered)", flush=True)
        print(f"[{shape}] remote, 1 session: {remote_ms:.2f} ms/token ({res['remote_batch1_server_step_ms']:.2f} ms "
              f"of it inside the server's step, {one['ms_per_step']:.2f} in process)", flush=True)
        print(f"[{shape}] remote, 1 session: steered "
              f"{res['remote_ms_per_token_batch1_steered']:.2f} ({res['steered_x_unsteered']:.3f}x), steered and "
              f"recorded {res['remote_ms_per_token_batch1_steered_recorded']:.2f} "
              f"({res['steered_recorded_x_unsteered']:.3f}x)", flush=True)
        toks = res["remote"][0]["tokens_row0"][args.prompt:]
        k2 = min(len(toks), len(res["eager"]["tokens"]))
        res["greedy_match_remote_vs_eager"] = _prefix(toks[:k2], res["eager"]["tokens"][:k2])
    finally:
        holder.close()
        srv.stop()
    one_remote = res["remote"][0]["aggregate_tok_s"]
    res["aggregate_x_one_session"] = {r["sessions"]: r["aggregate_tok_s"] / one_remote for r in res["remote"]}
    res["fast_x_eager_batch1"] = 1e3 / one["ms_per_step"] / res["eager"]["tok_s"]
    return res


def remote_timed(address, remote, prompt, new: int, reps: int = 3, steer: dict | None = None,
                 record: list | None = None) -> float:
    """Median seconds of one session's generate of `new` tokens (after one warm-up); `steer` adds a
    vector at a layer (Note [Steering])."""
    from djinn.frontend.connection import Connection

    c = Connection(address, secret=None)
    try:
        s = c.session()
        rm = remote(s)
        kw = {**({"steer": steer} if steer else {}), **({"record": record} if record else {})}
        rm.generate(prompt, max_new_tokens=new, do_sample=False, session=s, **kw)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            rm.generate(prompt, max_new_tokens=new, do_sample=False, session=s, **kw)
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[len(ts) // 2]
    finally:
        c.close()


def _prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="7b,13b")
    p.add_argument("--tiny", action="store_true", help="the tiny shape on the CPU: checks the script runs")
    p.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    p.add_argument("--concurrency", default="1,4,16,32,64")
    p.add_argument("--max-sessions", type=int, default=64)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--eager-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=64, help="timed steps in process")
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attentions", default="gather,flex",
                   help="decode attentions timed in process (the first one's batch-1 row is the headline)")
    p.add_argument("--long-prompt", type=int, default=0,
                   help="also time the largest row count in process at this context length (0: skip)")
    p.add_argument("--server-attention", default="auto", help="the server's --fast-decode-attention")
    p.add_argument("--compile-rows", default="", dest="compile_rows",
                   help="row counts to time again with the step compiled (Note [Compiled step]), e.g. 1,32")
    p.add_argument("--overlap", action="store_true",
                   help="also time the in-process steps overlapped, and serve with --fast-decode-overlap")
    p.add_argument("--server-compile", action="store_true", dest="server_compile",
                   help="the server compiles its decode step (--fast-decode-compile, Note [Compiled step])")
    p.add_argument("--in-process-only", action="store_true", dest="in_process_only",
                   help="skip the server rounds")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    args.concurrency = [int(x) for x in args.concurrency.split(",")]
    args.attentions = args.attentions.split(",")
    args.compile_rows = [int(x) for x in args.compile_rows.split(",") if x]
    if args.tiny:
        args.shapes = "tiny"
        args.prompt, args.new_tokens, args.eager_tokens, args.steps = 16, 16, 8, 8
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    out = {"env": environment(device), "targets": TARGETS, "args": vars(args), "shapes": {}}
    for shape in args.shapes.split(","):
        out["shapes"][shape] = bench_shape(shape, args, device, dtype)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({s: {k: v for k, v in r.items() if k in ("fast_x_eager_batch1", "remote_overhead_ms_per_token",
                                                                 "greedy_match_inproc_vs_eager", "greedy_compared")}
                      for s, r in out["shapes"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
