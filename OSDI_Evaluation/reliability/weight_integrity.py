"""Hostile graphs over shared weights (issue 15, item 1): no weight byte ever changes.

    python OSDI_Evaluation/reliability/weight_integrity.py [--n 100000] [--short] [--seed 0]
        [--check-every 1000] [--device cpu] [--out results.json]

A victim client runs a tiny GPT-2 on the module path; an attacker client remotes the same module on the
graph path (the same Text entries) and sends --n random graphs (tests/srg_builder.random_graph): views
with and without alias annotations, list-returning views, in-place ops and batch norm in training mode
on anything in reach, weights as outputs. Each output handle is then edited; every fifth graph is
started as a run that stops at a module call returning a random tensor, whose stop is edited, then
cancelled. Every --check-every graphs the weights are read back through a graph and hashed, and the
victim's logits are compared bitwise with the local model's. Any change is a violation (the script
exits 1). Writes JSON with the outcome counts, the rate, the environment and the commit.
(Note [Weights are read-only at run time] in djinn/vmu/readonly.py.)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "OSDI_Evaluation"))
sys.path.insert(0, str(ROOT))

from common import environment, start_server  # noqa: E402

import djinn  # noqa: E402
from djinn.frontend.connection import Connection  # noqa: E402
from djinn.frontend.remote import RemoteModel  # noqa: E402
from tests.models import tiny_gpt2  # noqa: E402
from tests.srg_builder import Builder, random_graph  # noqa: E402

NAMES = ["transformer.wpe.weight", "transformer.ln_f.weight", "transformer.h.0.ln_1.bias",
         "transformer.h.1.mlp.c_proj.weight", "transformer.h.0.attn.c_attn.bias"]
IDS = torch.tensor([[1, 17, 42, 99, 5, 250, 7, 64]])


def digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--short", action="store_true", help="2,000 graphs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check-every", type=int, default=1000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "weight_integrity_cpu.json"))
    a = ap.parse_args()
    n = 2000 if a.short else a.n
    torch.set_num_threads(1)  # the client builds tiny stand-in tensors; libgomp's wake-up would dominate
    srv = start_server(a.device)
    try:
        model = tiny_gpt2(seed=21, device=a.device)
        victim = Connection(srv.address, secret=None)
        vm = RemoteModel.from_module(victim.session("victim"), model)
        with torch.no_grad():
            ref = model(IDS.to(a.device)).logits.cpu()
        attacker = Connection(srv.address, secret=None)
        s = attacker.session("attacker")
        gm = djinn.remote(model, session=s, path="graph")
        state = {k: v for k, v in model.state_dict(keep_vars=True).items()}
        weights = {name: (gm.hashes[name], state[name]) for name in NAMES}
        expected = digest([state[name].detach().cpu() for name in NAMES])

        def send(b: Builder, outs, op="run_graph", **extra) -> dict:
            sig, wire = b.wire(*outs)
            return s.call(op, {"sig": sig, "graph": wire, "model_id": gm.model_id, "inputs": [], **extra})

        def edit(hid: str) -> None:
            s.call("edit", {"edits": [{"h": hid, "i": [], "op": "add", "v": 1.0}]})

        def check(i: int) -> list[str]:
            b = Builder()
            refs = [b.weight(h, t, name) for name, (h, t) in weights.items()]
            got = send(b, refs, fetch=list(range(len(refs))))["tensors"]
            bad = [] if digest(got) == expected else [f"weights changed by graph {i}"]
            if not torch.equal(vm(IDS).logits.cpu(), ref):
                bad.append(f"victim logits changed by graph {i}")
            return bad

        rng = np.random.default_rng(a.seed)
        outcome: Counter = Counter()
        violations: list[str] = []
        t0 = time.perf_counter()
        for i in range(n):
            start = i % 5 == 0
            b, outs, path = random_graph(rng, weights, calls=start)
            try:
                if start:
                    res = send(b, outs, op="start", breakpoints=[{"path": path}])
                    try:
                        edit(res["stop"]["activation"]["$t"][0])
                        outcome["stop_edited"] += 1
                    except djinn.WeightWriteRefused:
                        outcome["stop_refused"] += 1
                    s.call("cancel_run", {"run": res["run"]})
                else:
                    res = send(b, outs)
                    hids = [o["$t"][0] for o in res["outputs"]]
                    for hid in hids:
                        edit(hid)
                    s.call("free", {"handles": hids})
                    outcome["ran"] += 1
            except djinn.WeightWriteRefused:
                outcome["refused"] += 1
            except djinn.DjinnError as e:
                outcome[type(e).__name__] += 1
            if (i + 1) % a.check_every == 0 or i == n - 1:
                violations += check(i)
                rate = (i + 1) / (time.perf_counter() - t0)
                print(f"{i + 1} graphs, {rate:.0f}/s, {dict(outcome)}, violations: {len(violations)}", flush=True)
        elapsed = time.perf_counter() - t0
        result = {"graphs": n, "seed": a.seed, "elapsed_s": round(elapsed, 1), "graphs_per_s": round(n / elapsed, 1),
                  "outcomes": dict(outcome), "violations": violations, "checks": -(-n // a.check_every),
                  "environment": environment(torch.device(a.device))}
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k != "environment"}))
        victim.close()
        attacker.close()
        return 1 if violations else 0
    finally:
        srv.stop()


if __name__ == "__main__":
    sys.exit(main())
