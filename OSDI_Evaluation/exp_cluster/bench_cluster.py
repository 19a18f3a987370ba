"""Several GPUs behind one server (Note [One server, several workers] in djinn/server/cluster/front.py).

`python OSDI_Evaluation/exp_cluster/bench_cluster.py --gpus 0,1 --out results/cluster_h100x2.json`
measures, on one server with a worker per GPU and the one-GPU baseline in the same job:
  - migration: a 13B-shape session holding a `--prefix`-token KV (2048: ~1.7 GB fp16) moves GPU to
    GPU (`s.migrate()`, server seconds and bytes), several times, then continues bitwise as a twin
    that never moved (#19: <= 50 ms);
  - tensor parallelism: 13B-shape bs1 greedy decode with tp=2 against the same config on one GPU
    (the fast path), tok/s and the ratio (#19: >= 1.5x), and whether the greedy tokens agree;
  - a model too large for one card (`--big`, default the 34B shape) served with tp=2: built, and
    its decode speed.
`--tiny` runs the same on the CPU with two gloo workers and a toy Llama (the CI checks the script).
Failures are rows with `ok: false` and the error: a failed row is a failed row, not a footnote.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from OSDI_Evaluation.common import environment, start_server  # noqa: E402
from OSDI_Evaluation.exp_decode.bench_decode import SHAPES, config  # noqa: E402

SHAPES = dict(SHAPES, **{
    "34b": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=48, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=32000),
})
TARGETS = {"migrate_ms": 50.0, "tp2_x_tp1": 1.5}


def _config(shape: str):
    cfg = config("tiny" if shape == "tiny" else "13b")
    for k, v in SHAPES[shape].items():
        setattr(cfg, k, v)
    return cfg


def _row(name: str, fn) -> dict:
    t = time.perf_counter()
    try:
        out = {"ok": True, **fn()}
    except Exception as e:  # a failed measurement is reported as such, with why
        out = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
    out["wall_s"] = round(time.perf_counter() - t, 2)
    print(f"[{name}] " + json.dumps({k: v for k, v in out.items() if k != "traceback"}), flush=True)
    return out


def migration(conn, shape: str, dtype, prefix: int, moves: int) -> dict:
    from djinn.frontend.remote import RemoteModel

    cfg = _config(shape)
    moving, twin = conn.session("moving"), conn.session("twin")
    rms = {s.sid: RemoteModel.from_config(s, cfg, seed=0, dtype=dtype) for s in (moving, twin)}
    ids = torch.randint(3, cfg.vocab_size, (1, prefix), generator=torch.Generator().manual_seed(1))
    for s in (moving, twin):
        s.generate(rms[s.sid], ids, max_new_tokens=1, do_sample=False)
    kv_bytes = conn.stats()["sessions"][moving.sid]["gpu_bytes"]
    times, nbytes = [], 0
    for _ in range(moves):
        r = moving.migrate()
        if not r["moved"]:
            raise RuntimeError(f"the session did not move: {r}")
        times.append(r["seconds"] * 1e3)
        nbytes = r["bytes"]
    more = torch.randint(3, cfg.vocab_size, (1, 4), generator=torch.Generator().manual_seed(2))
    a = moving.generate(rms[moving.sid], more, max_new_tokens=8, do_sample=False)
    b = twin.generate(rms[twin.sid], more, max_new_tokens=8, do_sample=False)
    times.sort()
    return {"kv_bytes": kv_bytes, "bytes_moved": nbytes, "moves": moves, "ms_p50": round(times[len(times) // 2], 2),
            "ms_max": round(times[-1], 2), "target_ms": TARGETS["migrate_ms"],
            "meets_target": times[len(times) // 2] <= TARGETS["migrate_ms"], "continues_bitwise": bool(torch.equal(a, b))}


def _decode(s, rm, vocab: int, tokens: int) -> tuple[float, torch.Tensor]:
    ids = torch.randint(3, vocab, (1, 32), generator=torch.Generator().manual_seed(3))
    rm.generate(ids, session=s, max_new_tokens=4, do_sample=False)  # warm-up; stateless calls
    t = time.perf_counter()
    out = rm.generate(ids, session=s, max_new_tokens=tokens, do_sample=False)
    return tokens / (time.perf_counter() - t), out


def tensor_parallel(conn, shape: str, dtype, tokens: int, baseline: bool) -> dict:
    from djinn.frontend.remote import RemoteModel

    cfg = _config(shape)
    tp = conn.session("tp", tp=2)
    rm2 = RemoteModel.from_config(tp, cfg, seed=0, dtype=dtype, tp=2)
    tok2, out2 = _decode(tp, rm2, cfg.vocab_size, tokens)
    # which path each generate took (Note [Tensor-parallel decode]): {"fast": n, "eager": n}
    row = {"shape": shape, "tp2_tok_s": round(tok2, 2), "tp2_decode": conn.stats()["sessions"][tp.sid]["decode"]}
    if baseline:  # the same config on one GPU (the fast path), in the same server
        one = conn.session("one")
        rm1 = RemoteModel.from_config(one, cfg, seed=0, dtype=dtype)
        tok1, out1 = _decode(one, rm1, cfg.vocab_size, tokens)
        # On a GPU the sharded model's weights are drawn on the CPU, the other's on the GPU: the
        # tokens are compared only where both drew alike (the CPU).
        row.update(tp1_tok_s=round(tok1, 2), tp2_x_tp1=round(tok2 / tok1, 3), target=TARGETS["tp2_x_tp1"],
                   meets_target=tok2 / tok1 >= TARGETS["tp2_x_tp1"],
                   tokens_equal=bool(torch.equal(out1, out2)) if conn.info["device"].startswith("cpu") else None)
        one.close()
    tp.close()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", default="0,1")
    p.add_argument("--tiny", action="store_true", help="CPU, two gloo workers, a toy Llama")
    p.add_argument("--shape", default="13b")
    p.add_argument("--big", default="34b", help="a shape too large for one card, served at tp=2 ('' skips)")
    p.add_argument("--prefix", type=int, default=2048)
    p.add_argument("--moves", type=int, default=5)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    from djinn.frontend.connection import Connection

    if args.tiny:
        args.shape, args.big, args.prefix, args.tokens = "tiny", "", 64, 8
        device, server_args, dtype = "cpu", ["--workers", "2", "--fast-decode", "on"], torch.float32
    else:
        device, server_args, dtype = "cuda:0", ["--gpus", args.gpus], torch.float16
    result = {"environment": environment(torch.device(device)), "args": vars(args), "rows": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every row: a job cut short by its time limit keeps what it measured
        result["failed_rows"] = [k for k, v in result["rows"].items() if not v["ok"]]
        out.write_text(json.dumps(result, indent=1))

    srv = start_server(device, *server_args)
    try:
        conn = Connection(srv.address, secret=None)
        result["server"] = {"workers": [w.get("device_name") for w in conn.info.get("workers") or []]}
        rows = result["rows"]
        rows["migration"] = _row("migration", lambda: migration(conn, args.shape, dtype, args.prefix, args.moves))
        save()
        rows["tensor_parallel"] = _row("tensor_parallel", lambda: tensor_parallel(conn, args.shape, dtype, args.tokens, True))
        save()
        if args.big:  # each worker draws the whole model on its CPU first: minutes for a 34B shape
            rows["too_large_for_one_card"] = _row(args.big, lambda: tensor_parallel(conn, args.big, dtype, args.tokens, False))
            save()
        conn.close()
    finally:
        srv.stop()
    save()
    print(f"wrote {args.out}; failed rows: {result['failed_rows'] or 'none'}")


if __name__ == "__main__":
    main()
