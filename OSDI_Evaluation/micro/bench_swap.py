"""KV swap micro-benchmark: swap bandwidth by cache size, and the first decode step after a prefetch.

    python OSDI_Evaluation/micro/bench_swap.py --device cuda:0 [--out swap.json] [--quick]

Runs the server's own Data segment (djinn.vmu.data.DataSegment: the pinned host pool, the side-stream
swapper, DynamicCache release/restore) in this process, without the RPC layer, so it measures the
mechanism. Targets (issue "VMU and semantic scheduler"):
- swap bandwidth >= 45 GB/s each way for caches >= 256 MB (Llama-2-13B-shape caches, fp16);
- a prefetched session's first decode step within 5 % of a never-swapped one's (Llama-2-7B shape,
  2048-token context: the step after the cache came back vs the step on a cache that never left).
The pinned host-to-device and device-to-host peaks of one 1 GiB copy are measured in the same job.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "OSDI_Evaluation"))
from common import environment  # noqa: E402

from djinn.server.sessions import KVState, Session  # noqa: E402
from djinn.vmu.data import GIB, DataSegment  # noqa: E402


def llama(layers: int, hidden: int, inter: int, heads: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096)


def filled_cache(cfg, tokens: int, device, dtype=torch.float16):
    from transformers import DynamicCache

    cache = DynamicCache(config=cfg)
    hd = cfg.hidden_size // cfg.num_attention_heads
    for i in range(cfg.num_hidden_layers):
        k = torch.randn(1, cfg.num_key_value_heads, tokens, hd, dtype=dtype, device=device)
        cache.update(k, torch.randn_like(k), i)
    return cache


def session(sid: str, cache, tokens: int, device) -> Session:
    s = Session(sid, "bench", None)
    s.kv["m"] = KVState(cache, torch.zeros(1, tokens, dtype=torch.long, device=device))
    return s


def timed_swap(seg: DataSegment, s: Session, direction: str) -> tuple[float, int]:
    ok = seg.swap_out(s) if direction == "out" else seg.prefetch(s)
    assert ok, f"swap {direction} refused"
    h = seg.mem(s.sid).handle
    h.wait()
    secs, n = h.elapsed_s(), h.nbytes
    assert seg.poll() == [s.sid]
    return secs, n


def bench_bandwidth(device, sizes: list[int], reps: int, seg: DataSegment) -> list[dict]:
    cfg = llama(40, 5120, 13824, 40)  # Llama-2-13B shape: 800 KiB of KV per token
    rows = []
    for tokens in sizes:
        s = session(f"bw{tokens}", filled_cache(cfg, tokens, device), tokens, device)
        seg.sync(s)
        ref = [t.clone() for t in _tensors(s)]
        outs, ins = [], []
        for _ in range(reps):
            secs, n = timed_swap(seg, s, "out")
            outs.append(n / secs / 1e9)
            secs, n = timed_swap(seg, s, "in")
            ins.append(n / secs / 1e9)
        assert all(torch.equal(a, b) for a, b in zip(_tensors(s), ref)), "swap round trip changed the cache"
        rows.append({"tokens": tokens, "cache_mb": round(n / 1e6, 1), "tensors": len(ref),
                     "out_gbps": _summary(outs), "in_gbps": _summary(ins)})
        print(f"  {tokens:5d} tokens {n / 1e6:8.1f} MB: out {max(outs):5.1f} GB/s, in {max(ins):5.1f} GB/s", flush=True)
        seg.close(s)
        del ref, s
        torch.cuda.empty_cache()
    return rows


def bench_first_step(device, context: int, reps: int, seg: DataSegment) -> dict:
    """The decode step on a cache that came back from host memory vs on one that never left."""
    from transformers import AutoModelForCausalLM, DynamicCache

    cfg = llama(32, 4096, 11008, 32)  # Llama-2-7B shape
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).eval()
    ids = torch.randint(3, 32000, (1, context), device=device)
    base = DynamicCache(config=cfg)
    with torch.no_grad():
        logits = model(ids, past_key_values=base, use_cache=True).logits
    nxt = logits[:, -1:].argmax(-1)

    def step(cache) -> tuple[float, torch.Tensor]:
        torch.cuda.synchronize(device)
        t = time.perf_counter()
        with torch.no_grad():
            out = model(nxt, past_key_values=cache, use_cache=True).logits
        torch.cuda.synchronize(device)
        return time.perf_counter() - t, out

    def copy_of(cache):
        c = DynamicCache(config=cfg)
        for i, layer in enumerate(cache.layers):
            c.update(layer.keys.clone(), layer.values.clone(), i)
        return c

    for _ in range(3):
        step(copy_of(base))  # warm the kernels for this shape
    never, prefetched, miss, swap_in_s = [], [], [], []
    same_logits = {"never_vs_never": True, "prefetched_vs_never": True}
    for _ in range(reps):
        t, ref_logits = step(copy_of(base))
        never.append(t)
        _, again = step(copy_of(base))
        same_logits["never_vs_never"] &= torch.equal(again, ref_logits)
        s = session("step", copy_of(base), context, device)
        before = [t.clone() for t in _tensors(s)]
        seg.sync(s)
        timed_swap(seg, s, "out")
        secs, _ = timed_swap(seg, s, "in")  # the prefetch, done before the request
        swap_in_s.append(secs)
        assert all(torch.equal(a, b) for a, b in zip(_tensors(s), before)), "the swap round trip changed the cache"
        del before
        t, out = step(s.kv["m"].cache)
        prefetched.append(t)
        same_logits["prefetched_vs_never"] &= torch.equal(out, ref_logits)
        # A miss: the request finds the cache on the host and waits for the swap-in.
        timed_swap(seg, s, "out")
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        seg.prefetch(s)
        seg.mem(s.sid).handle.wait()
        seg.poll()
        t, _ = step(s.kv["m"].cache)
        miss.append(time.perf_counter() - t0)
        seg.close(s)
        del s
    med = {k: statistics.median(v) for k, v in (("never", never), ("prefetched", prefetched), ("miss", miss))}
    return {"model": "llama-2-7b-shape fp16", "context": context,
            "kv_mb": round(2 * 32 * 4096 * 2 * context / 1e6, 1),
            "step_ms": {k: round(v * 1e3, 3) for k, v in med.items()},
            "prefetched_vs_never": round(med["prefetched"] / med["never"], 4),
            "miss_vs_never": round(med["miss"] / med["never"], 3),
            "swap_in_ms_median": round(statistics.median(swap_in_s) * 1e3, 3),
            "cache_bitwise_after_round_trip": True,
            # The fp16 7B decode step itself is not always bitwise repeatable on these GPUs (exp2 saw
            # the same for 13B): equal logits are reported, not required; the cache's bits are checked.
            "logits_equal": same_logits, "reps": reps}


def peak(device, direction: str) -> float:
    host = torch.empty(GIB, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(GIB, dtype=torch.uint8, device=device)
    best = 0.0
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        (dev.copy_(host, non_blocking=True) if direction == "in" else host.copy_(dev, non_blocking=True))
        b.record()
        b.synchronize()
        best = max(best, GIB / (a.elapsed_time(b) / 1e3) / 1e9)
    return round(best, 2)


def _tensors(s: Session) -> list[torch.Tensor]:
    from djinn.vmu.swap import cache_tensors

    return list(cache_tensors(s.kv["m"].cache).values())


def _summary(xs: list[float]) -> dict:
    return {"max": round(max(xs), 2), "median": round(statistics.median(xs), 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--out", help="JSON file to write")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type != "cuda":
        raise SystemExit("bench_swap measures CUDA copies; run it on a GPU (the CPU path is covered by tests)")
    torch.cuda.set_device(device)
    sizes = [320, 2048] if a.quick else [80, 320, 1024, 2048]   # 13B shape: 66 MB .. 1.7 GB
    seg = DataSegment(device, 4 * GIB, budget_bytes=None, swap_bw=25e9)
    print(f"swap bench on {torch.cuda.get_device_name(device)}; pool pinned: {seg.pool.pinned}", flush=True)
    result = {"environment": environment(device), "host_pool_pinned": seg.pool.pinned,
              "peak_gbps": {"h2d": peak(device, "in"), "d2h": peak(device, "out")}}
    print(f"  peak 1 GiB copies: {result['peak_gbps']}", flush=True)
    result["bandwidth"] = bench_bandwidth(device, sizes, 3 if a.quick else 5, seg)
    result["first_step"] = bench_first_step(device, 2048, 5 if a.quick else 10, seg)
    big = [r for r in result["bandwidth"] if r["cache_mb"] >= 256]
    result["targets"] = {
        "swap_gbps_min_over_caches_ge_256mb": min(min(r["out_gbps"]["max"], r["in_gbps"]["max"]) for r in big),
        "swap_target_gbps": 45,
        "prefetched_first_step_ratio": result["first_step"]["prefetched_vs_never"],
        "first_step_target_ratio": 1.05,
    }
    print(json.dumps(result["first_step"]), json.dumps(result["targets"]), flush=True)
    seg.close_all()
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
