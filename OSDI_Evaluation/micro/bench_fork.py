"""Forking at a long prefix: `session.fork()` (copy-on-write KV blocks) against `stop.fork()` of a
paused breakpoint run (which re-executes its prefix), in one job on one server.

    python OSDI_Evaluation/micro/bench_fork.py --shape 13b --prefix 2048 --out results/fork_h100.json
    python OSDI_Evaluation/micro/bench_fork.py --tiny --out /tmp/fork_cpu.json

For the session fork it reports the server-side milliseconds (`fork_ms`, measured around the fork in
the engine) and the client round trip, the pool's free blocks before and after (a fork allocates no
block), and after both sessions generate, the blocks copied on write; the child's tokens must equal
the parent's for the same continuation (greedy). For `stop.fork()` of a generate paused at the
middle layer, in decode step 4 and in the prefill: the fork's server milliseconds, its round trip,
the blocks it allocated, and the time to resume the fork to its end (from the parent's KV in a
decode step; re-executing the prompt in the prefill) next to the parent's own resume to its end.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from OSDI_Evaluation.common import environment, start_server  # noqa: E402
from OSDI_Evaluation.exp_decode.bench_decode import SHAPES, config  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="13b", choices=sorted(SHAPES))
    p.add_argument("--tiny", action="store_true", help="the tiny shape on the CPU (checks the script runs)")
    p.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prefix", type=int, default=2048, help="tokens of KV the forked session holds")
    p.add_argument("--forks", type=int, default=20)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if args.tiny:
        args.shape, args.device, args.prefix, args.forks = "tiny", "cpu", 64, 5
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    from djinn.frontend.connection import Connection
    from djinn.frontend.remote import RemoteModel
    from djinn.frontend.run import Breakpoint

    srv = start_server(str(device), "--log-level", "WARNING")
    res: dict = {"benchmark": "fork", "environment": environment(device), "args": vars(args)}
    conn = Connection(srv.address, secret=None)
    try:
        s = conn.session("parent")
        rm = RemoteModel.from_config(s, config(args.shape), seed=0, dtype=dtype)
        vocab = SHAPES[args.shape]["vocab_size"]
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(3, vocab, (1, args.prefix), generator=g)
        s.generate(rm, prompt, max_new_tokens=1, do_sample=False)     # the session now holds the prefix's KV

        def free() -> int:
            return conn.stats()["kv"]["models"][rm.model_id]["blocks_free"]

        rows, children = [], []
        for _ in range(args.forks):
            before = free()
            t0 = time.perf_counter()
            child = s.fork()
            rtt = (time.perf_counter() - t0) * 1e3
            rows.append({"fork_ms_server": child.fork_info["fork_ms"], "rtt_ms": rtt,
                         "shared_blocks": child.fork_info["shared_blocks"], "blocks_allocated": before - free()})
            children.append(child)
        res["session_fork"] = {
            "prefix_tokens": args.prefix + 1,
            "server_ms_p50": statistics.median(r["fork_ms_server"] for r in rows),
            "server_ms_max": max(r["fork_ms_server"] for r in rows),
            "rtt_ms_p50": statistics.median(r["rtt_ms"] for r in rows),
            "shared_blocks": rows[0]["shared_blocks"],
            "blocks_allocated_by_forks": sum(r["blocks_allocated"] for r in rows),
            "rows": rows,
        }
        cont = torch.randint(3, vocab, (1, 8), generator=g)
        cow0 = conn.stats()["kv"]["models"][rm.model_id]["cow_copies"]
        a = s.generate(rm, cont, max_new_tokens=args.new_tokens, do_sample=False)
        b = children[0].generate(rm, cont, max_new_tokens=args.new_tokens, do_sample=False)
        cow = conn.stats()["kv"]["models"][rm.model_id]["cow_copies"] - cow0
        res["session_fork"].update({"child_tokens_equal_parent": bool(torch.equal(a, b)), "cow_copies_after_writes": cow})
        for c in children:
            c.close()
        print(f"session fork at {args.prefix} tokens: server {res['session_fork']['server_ms_p50']:.3f} ms p50, "
              f"round trip {res['session_fork']['rtt_ms_p50']:.2f} ms, blocks allocated "
              f"{res['session_fork']['blocks_allocated_by_forks']}, copies on write {cow}", flush=True)

        layers = SHAPES[args.shape]["num_hidden_layers"]
        mid = layers // 2

        def run_fork(step: int) -> dict:
            """Fork a generate paused at layer `mid` of `step` 3 times; then resume one fork to its end."""
            run = s.start(rm, prompt, method="generate", max_new_tokens=8, do_sample=False,
                          breakpoints=[Breakpoint(layer=mid, step=step)])
            stop = run.wait()
            rows = []
            forks = []
            for _ in range(3):
                before = free()
                t0 = time.perf_counter()
                f = stop.fork()
                rows.append({"rtt_ms": (time.perf_counter() - t0) * 1e3, "server_ms": f.timing["server_us"] / 1e3,
                             "blocks_allocated": before - free()})
                forks.append(f)
            t0 = time.perf_counter()
            assert forks[0].resume() is None
            resume_ms = (time.perf_counter() - t0) * 1e3
            t0 = time.perf_counter()
            assert run.resume() is None
            parent_resume_ms = (time.perf_counter() - t0) * 1e3
            same = bool(torch.equal(forks[0].output, run.output))
            for f in forks[1:]:
                f.cancel()
            return {"stop": f"layer {mid}, step {step}", "prefix_tokens": args.prefix + step,
                    "server_ms_p50": statistics.median(r["server_ms"] for r in rows),
                    "rtt_ms_p50": statistics.median(r["rtt_ms"] for r in rows),
                    "blocks_allocated_by_forks": sum(r["blocks_allocated"] for r in rows),
                    "fork_resume_to_end_ms": resume_ms, "parent_resume_to_end_ms": parent_resume_ms,
                    "fork_output_equals_parent": same, "rows": rows}

        res["run_fork_decode_step"] = run_fork(4)
        res["run_fork_prefill"] = run_fork(0)
        for key, what in (("run_fork_decode_step", "paused in decode step 4"), ("run_fork_prefill", "paused in the prefill")):
            r = res[key]
            print(f"run fork at {args.prefix} tokens, {what}: server {r['server_ms_p50']:.3f} ms, round trip "
                  f"{r['rtt_ms_p50']:.2f} ms, blocks {r['blocks_allocated_by_forks']}; resume to end: fork "
                  f"{r['fork_resume_to_end_ms']:.1f} ms vs parent {r['parent_resume_to_end_ms']:.1f} ms", flush=True)
    finally:
        conn.close()
        srv.stop()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
