"""Core micro-benchmarks: call round trip, weight upload bandwidth, remote vs local forward.

    python OSDI_Evaluation/micro/bench_core.py [--device cuda:0] [--out results.json] [--quick]

Starts its own server subprocess on loopback (or uses --server), runs the local baseline in this
process on the same device, and writes JSON with the hardware, versions and commit.
Targets (issue "Djinn core"): round-trip p50 <= 150 us, upload >= 1 GB/s on loopback.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import environment, start_server  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_round_trip(conn, n: int) -> dict:
    for _ in range(200):
        conn.ping()
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        conn.transport.call("ping", {})
        lat.append((time.perf_counter() - t) * 1e6)
    return {"calls": n, "p50_us": pct(lat, 50), "p99_us": pct(lat, 99), "mean_us": statistics.fmean(lat)}


def bench_signal(conn, n: int) -> dict:
    """IO_WAIT / COMPUTE acks on an idle server (target p99 <= 1 ms on loopback, issue 4)."""
    s = conn.session("signals")
    lat = []
    try:
        for i in range(n):
            t = time.perf_counter()
            s.signal("IO_WAIT" if i % 2 == 0 else "COMPUTE", eta_s=5.0 if i % 2 == 0 else None)
            lat.append((time.perf_counter() - t) * 1e6)
    finally:
        s.close()
    lat = lat[n // 10:]  # the first tenth warms up
    return {"calls": len(lat), "p50_us": pct(lat, 50), "p99_us": pct(lat, 99), "target_p99_us": 1000}


def gpt2_small(seed: int, device):
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(GPT2Config()).to(device).eval()


def tiny_gpt2(device):
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=256)
    return AutoModelForCausalLM.from_config(cfg).to(device).eval()


def bench_upload(conn, device, seed: int) -> dict:
    from djinn.frontend.remote import RemoteModel
    from djinn.frontend.upload import named_tensors

    model = gpt2_small(seed, "cpu")  # weights start in host memory, as in a notebook
    s = conn.session("upload-bench")
    t = time.perf_counter()
    for _, tensor in named_tensors(model):
        conn.hashes(tensor)
    hash_s = time.perf_counter() - t
    t = time.perf_counter()
    rm = RemoteModel.from_module(s, model)
    upload_s = time.perf_counter() - t
    nbytes = rm.upload.bytes_uploaded
    t = time.perf_counter()
    again = RemoteModel.from_module(conn.session("upload-bench-2"), model)
    dedup_s = time.perf_counter() - t
    return {
        "model": "gpt2-small fp32", "bytes": nbytes, "hash_s": hash_s,
        "hash_GBps": nbytes / hash_s / 1e9,
        "upload_s": upload_s, "upload_GBps": nbytes / upload_s / 1e9,
        "second_remote_s": dedup_s, "second_remote_bytes": again.upload.bytes_uploaded,
    }


def bench_forward(conn, name: str, model, device, seq: int, iters: int) -> dict:
    from djinn.frontend.remote import RemoteModel

    s = conn.session(f"fwd-{name}")
    rm = RemoteModel.from_module(s, model)
    ids = torch.randint(0, model.config.vocab_size, (1, seq), device=device)
    with torch.no_grad():
        for _ in range(5):
            model(ids)
        sync(device)
        local = []
        for _ in range(iters):
            t = time.perf_counter()
            model(ids)
            sync(device)
            local.append((time.perf_counter() - t) * 1e3)
    for _ in range(5):
        rm(ids)
    remote, remote_fetch = [], []
    for _ in range(iters):
        t = time.perf_counter()
        out = rm(ids)
        remote.append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter()
        out = rm(ids)
        out.logits.cpu()
        remote_fetch.append((time.perf_counter() - t) * 1e3)
    with torch.no_grad():
        equal = torch.equal(rm(ids).logits.cpu(), model(ids).logits.cpu())
    return {
        "model": name, "seq": seq, "iters": iters, "bitwise_equal": equal,
        "local_ms_p50": pct(local, 50), "remote_ms_p50": pct(remote, 50),
        "remote_plus_fetch_logits_ms_p50": pct(remote_fetch, 50),
        "overhead_ms_p50": pct(remote, 50) - pct(local, 50),
        "logits_bytes": int(torch.Size([1, seq, model.config.vocab_size]).numel() * 4),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="server and baseline device (default cuda:0 if present)")
    p.add_argument("--server", help="use a running server instead of starting one")
    p.add_argument("--out", help="JSON output path")
    p.add_argument("--quick", action="store_true", help="fewer iterations, no GPT-2-small (CI smoke)")
    args = p.parse_args()
    device = torch.device(args.device or ("cuda:0" if torch.cuda.is_available() else "cpu"))

    from djinn.frontend.connection import Connection

    server = None if args.server else start_server(str(device))
    conn = Connection(args.server or server.address, None)
    try:
        results = {"environment": environment(device), "device": str(device)}
        results["round_trip"] = bench_round_trip(conn, 500 if args.quick else 5000)
        print(f"round trip: p50 {results['round_trip']['p50_us']:.0f} us, p99 {results['round_trip']['p99_us']:.0f} us")
        results["signal"] = bench_signal(conn, 500 if args.quick else 5000)
        print(f"signal ack: p50 {results['signal']['p50_us']:.0f} us, p99 {results['signal']['p99_us']:.0f} us")
        results["forward"] = [bench_forward(conn, "tiny-gpt2", tiny_gpt2(device), device, 32, 20 if args.quick else 200)]
        if not args.quick:
            results["upload"] = bench_upload(conn, device, seed=int(time.time()))
            u = results["upload"]
            print(f"upload: {u['bytes'] / 1e6:.0f} MB at {u['upload_GBps']:.2f} GB/s "
                  f"(client hashing {u['hash_GBps']:.2f} GB/s, second remote {u['second_remote_s'] * 1e3:.0f} ms)")
            results["forward"].append(bench_forward(conn, "gpt2-small", gpt2_small(1, device), device, 128, 50))
        for f in results["forward"]:
            print(f"forward {f['model']} seq {f['seq']}: local {f['local_ms_p50']:.2f} ms, remote "
                  f"{f['remote_ms_p50']:.2f} ms, +fetch logits {f['remote_plus_fetch_logits_ms_p50']:.2f} ms, "
                  f"bitwise equal: {f['bitwise_equal']}")
    finally:
        conn.close()
        if server:
            server.stop()
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"core_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
