"""Does one flood session's deterministic=True generate equal a local greedy generate when it runs alone?

    python OSDI_Evaluation/micro/flood_reference_check.py [--sessions 0,29] [--data-budget-gb 0.25]

tests/gpu/test_vmu_gpu.py's flood compares two reference sessions with a local DynamicCache generate;
on an H100 (e6e6b3a) session 29's first turn gave other greedy tokens under both policies. This runs
each reference session's first turn alone on a fresh GPU server (same config, budget and prompt) and
prints, per session, whether it matches and at which token the two first differ: it tells a numerics
difference of the paged eager path from an effect of the other sessions.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from djinn.frontend.connection import Connection  # noqa: E402
from djinn.frontend.embedded import EmbeddedServer  # noqa: E402
from djinn.frontend.remote import RemoteModel  # noqa: E402
from tests.gpu.test_vmu_gpu import GEN, flood_config, local_model, prompt  # noqa: E402


def in_process(model, i: int) -> dict:
    """The same generate in this process over a DynamicCache and over a PagedCache of a KV pool (the
    server's eager path): where they first differ, and how far apart the local run's two best scores
    were at that step (a near tie turns on the last bit of any difference)."""
    from djinn.server.execution.paged_cache import PagedCache
    from djinn.vmu.kv_pool import KVPool, KVShape

    ids = prompt(i, 0).to("cuda:0")
    pool = KVPool(KVShape.of_module(model), 64, 16, "cuda:0")
    table = pool.new_table(1)
    assert pool.reserve(table, ids.shape[1] + GEN["max_new_tokens"])
    kw = dict(GEN, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        a = model.generate(ids, **kw)
        b = model.generate(ids, past_key_values=PagedCache(pool, table), **kw)
    diff = (a.sequences != b.sequences).nonzero()
    out = {"paged_equal_dynamic": bool(torch.equal(a.sequences, b.sequences)),
           "first_diff": int(diff[0, 1]) if len(diff) else None}
    step = (int(diff[0, 1]) if len(diff) else None)
    if step is not None:
        k = step - ids.shape[1]
        top = a.scores[k][0].float().topk(2).values
        out["top2_gap_at_diff"] = float(top[0] - top[1])
        out["scores_max_abs_diff_at_diff"] = float((a.scores[k] - b.scores[k]).abs().max())
    same = [float((x - y).abs().max()) for x, y in zip(a.scores, b.scores)]
    out["first_step_scores_differ"] = next((j for j, d in enumerate(same) if d > 0), None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", default="0,29")
    ap.add_argument("--data-budget-gb", default="0.25")
    args = ap.parse_args()
    cfg = flood_config()
    srv = EmbeddedServer("cuda:0", 180.0, ["--data-budget-gb", args.data_budget_gb])
    conn = Connection(srv.address, secret=None)
    rows = {}
    try:
        got = {}
        for i in map(int, args.sessions.split(",")):  # a session each, as in the flood: no KV carried over
            s = conn.session(f"ref{i}")
            rm = RemoteModel.from_config(s, cfg, seed=0, dtype=torch.float16)
            got[i] = s.generate(rm, prompt(i, 0), deterministic=True, **GEN)
    finally:
        conn.close()
        srv.stop()
    model = local_model(cfg)
    for i, out in got.items():
        with torch.no_grad():
            want = model.generate(prompt(i, 0).to("cuda:0"), **GEN).cpu()
        diff = (out != want).nonzero()
        rows[i] = {"equal": bool(torch.equal(out, want)), "first_diff": int(diff[0, 1]) if len(diff) else None,
                   "prompt": int(prompt(i, 0).shape[1]), "in_process": in_process(model, i)}
    print(json.dumps({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows}))


if __name__ == "__main__":
    main()
