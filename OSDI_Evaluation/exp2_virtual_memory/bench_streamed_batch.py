"""Batched streaming (issue 17): N sessions decoding a weight-streamed model share its passes.

    python OSDI_Evaluation/exp2_virtual_memory/bench_streamed_batch.py [--shape 13b] [--budget-gb 12]
        [--sessions 1,16] [--out DIR]

A real server on the GPU; the model is built there from its config (Llama-2-13B shape, fp16, seeded
random weights) with a GPU weight budget, so most decoder layers stream through the ring every forward
(Note [Batched streaming] in djinn/server/execution/fast_task.py). Each round: N sessions, each on its
own connection and thread, generate `--new-tokens` greedy tokens at once from their own prompts. The
baseline is the same server with one session; the issue's target: 16 sessions reach >= 12x the
aggregate tok/s of one. Also reported: the ring's passes per round (one per step if the rows share
them) and the decode path each session took. Writes streamed_batch_<card>.json under --out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "OSDI_Evaluation" / "exp_decode"))
from OSDI_Evaluation.common import environment, start_server  # noqa: E402
from bench_decode import config, remote_round  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="13b", help="7b, 13b or tiny")
    p.add_argument("--budget-gb", type=float, default=12.0, dest="budget_gb")
    p.add_argument("--sessions", default="1,16")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=16, dest="new_tokens")
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--out", default=".")
    args = p.parse_args()
    from djinn.frontend.connection import Connection
    from djinn.frontend.remote import RemoteModel

    device = torch.device(args.device)
    counts = [int(n) for n in args.sessions.split(",")]
    g = torch.Generator().manual_seed(1)
    vocab = config(args.shape).vocab_size
    prompts = [torch.randint(0, vocab, (1, args.prompt), generator=g) for _ in range(max(counts))]
    res = {"experiment": "streamed_batch", "environment": environment(device), "args": vars(args), "rounds": []}
    srv = start_server(str(device), "--log-level", "WARNING")
    holder = Connection(srv.address, secret=None)
    try:
        def remote(s):
            return RemoteModel.from_config(s, config(args.shape), seed=0, dtype=torch.float16,
                                           weight_budget_gb=args.budget_gb)

        mid = remote(holder.session("holder")).model_id
        print(f"[{args.shape}] built on the server with a {args.budget_gb} GiB weight budget: "
              f"{holder.stats()['models'][mid]['streaming']}", flush=True)
        remote_round(srv.address, remote, prompts[:1], 2)  # warm-up: the pool, the first passes
        for n in counts:
            before = holder.stats()["models"][mid]["streaming"]["forwards"]
            r = remote_round(srv.address, remote, prompts[:n], args.new_tokens)
            r["ring_passes"] = holder.stats()["models"][mid]["streaming"]["forwards"] - before
            r.pop("tokens_row0", None)
            res["rounds"].append(r)
            print(f"[{args.shape}] {n} sessions: {r['aggregate_tok_s']:.2f} tok/s aggregate, "
                  f"{min(r['per_session_tok_s']):.2f}-{max(r['per_session_tok_s']):.2f} per session, "
                  f"{r['ring_passes']} passes for {n * args.new_tokens} tokens, fast {r['fast']} eager {r['eager']}",
                  flush=True)
        res["streaming"] = holder.stats()["models"][mid]["streaming"]
    finally:
        holder.close()
        srv.stop()
    one = res["rounds"][0]["aggregate_tok_s"]
    res["aggregate_x_one_session"] = {r["sessions"]: r["aggregate_tok_s"] / one for r in res["rounds"]}
    print(json.dumps(res["aggregate_x_one_session"]))
    card = (res["environment"].get("gpu") or "cpu").split()[1].lower() if device.type == "cuda" else "cpu"
    out = Path(args.out) / f"streamed_batch_{card}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
