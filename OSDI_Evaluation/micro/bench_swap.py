"""KV swap micro-benchmark: block swap bandwidth by session KV size, and the first decode step after a prefetch.

    python OSDI_Evaluation/micro/bench_swap.py --device cuda:0 [--out swap.json] [--quick]

Runs the server's own Data segment (djinn.vmu.data.DataSegment: the per-model KV pool of fixed-size
blocks, the pinned host pool, the side-stream swapper) in this process, without the RPC layer, so it
measures the mechanism the server runs: a session's KV is its block table in a model's pool, and a
swap moves its blocks as one copy per run of consecutive block ids. Targets (issue "VMU and semantic
scheduler"):
- swap bandwidth >= 45 GB/s each way for session KV >= 256 MB (Llama-2-13B KV shape, fp16, 16-token
  blocks of 12.5 MiB), timed by the swap handles' CUDA events: the bytes of all the session's handles
  over the span from the first one's start event to the last one's end event. Two layouts: the
  session's blocks consecutive (one copy) and interleaved with another session's (every run one block);
- a prefetched session's first decode step within 5 % of a never-swapped one's (Llama-2-7B shape,
  fp16, 2048-token context, through a PagedCache over the pool: the step after the blocks came back
  vs the step on blocks that never left). The miss case (the request finds the KV in host memory and
  waits for the swap-in) is reported too.
The pinned host-to-device and device-to-host peaks of one 1 GiB copy are measured in the same job.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "OSDI_Evaluation"))
from common import environment  # noqa: E402

from djinn.server.sessions import KVState, Session  # noqa: E402
from djinn.vmu.blocks import BlockAllocator  # noqa: E402
from djinn.vmu.data import GIB, DataSegment  # noqa: E402
from djinn.vmu.kv_pool import KVPool, KVShape, KVTable  # noqa: E402

MB = 1e6


@dataclass(frozen=True)
class Sizes:
    """What one run measures: the real sizes, or the tiny ones of `--cpu-check`."""

    bw_shape: KVShape          # the bandwidth sessions' KV shape
    bw_tokens: list[int]       # session KV sizes, in tokens
    bw_reps: int
    step_config: object        # the first-step model's LlamaConfig
    context: int
    step_reps: int
    block_tokens: int
    host_pool_bytes: int
    big_mb: float              # the swap target applies to sessions of at least this much KV
    peak_bytes: int


def llama(layers: int, hidden: int, inter: int, heads: int, vocab: int = 32000, positions: int = 4096):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=positions)


def real_sizes(quick: bool) -> Sizes:
    return Sizes(bw_shape=KVShape(40, 40, 128, torch.float16),   # Llama-2-13B: 800 KiB of KV per token
                 bw_tokens=[320, 2048] if quick else [80, 320, 1024, 2048],   # 62.5 MiB .. 1.6 GiB
                 bw_reps=3 if quick else 5,
                 step_config=llama(32, 4096, 11008, 32),           # Llama-2-7B: 512 KiB of KV per token
                 context=2048, step_reps=5 if quick else 10, block_tokens=16,
                 host_pool_bytes=4 * GIB, big_mb=256, peak_bytes=GIB)


def check_sizes() -> Sizes:
    """`--cpu-check`: tiny shapes, the same code path on the CPU."""
    return Sizes(bw_shape=KVShape(2, 2, 16, torch.float16), bw_tokens=[5, 40], bw_reps=2,
                 step_config=llama(2, 64, 128, 4, vocab=256, positions=256), context=24, step_reps=2,
                 block_tokens=4, host_pool_bytes=1 << 20, big_mb=0, peak_bytes=1 << 20)


# -- timing ---------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def swap_span(handles) -> tuple[float, int]:
    """(seconds, bytes) of one session's swap: the handles' bytes over the span from the first
    handle's start event to the last one's end event (all on the swapper's one side stream, so in
    issue order). On the CPU, where copies are synchronous, the handles' wall times summed."""
    for h in handles:
        h.wait()
    nbytes = sum(h.nbytes for h in handles)
    first, last = handles[0], handles[-1]
    if getattr(first, "_start", None) is None:
        return sum(h.elapsed_s() for h in handles), nbytes
    return first._start.elapsed_time(last._end) / 1e3, nbytes


def timed_swap(seg: DataSegment, s: Session, direction: str) -> tuple[float, int]:
    """Swap the session out or back in, wait for it, let the segment finish it; (seconds, bytes)."""
    ok = seg.swap_out(s) if direction == "out" else seg.prefetch(s)
    assert ok, f"swap {direction} of session {s.sid} refused"
    handles = [h for _, h in seg.mem(s.sid).inflight]
    assert handles and all(h.direction == direction for h in handles), handles
    secs, n = swap_span(handles)
    assert seg.poll() == [s.sid], "the swap did not complete"
    return secs, n


def peak(device: torch.device, direction: str, nbytes: int) -> float:
    """GB/s of one pinned `nbytes` copy, the best of 5 (the link's peak, for reference)."""
    pinned = device.type == "cuda"
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = 0.0
    for _ in range(5):
        if pinned:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
        t0 = time.perf_counter()
        (dev.copy_(host, non_blocking=True) if direction == "in" else host.copy_(dev, non_blocking=True))
        if pinned:
            b.record()
            b.synchronize()
            secs = a.elapsed_time(b) / 1e3
        else:
            secs = time.perf_counter() - t0
        best = max(best, nbytes / max(secs, 1e-9) / 1e9)
    del host, dev
    return round(best, 2)


# -- sessions over a pool ----------------------------------------------------------------------------------
def session(seg: DataSegment, sid: str, pool: KVPool, mid: str, table: KVTable) -> Session:
    """A server Session whose KV for model `mid` is `table` (its token ids: zeros, never read here),
    attached and charged by the Data segment."""
    from djinn.server.execution.paged_cache import PagedCache

    s = Session(sid, "bench", None)
    ids = torch.zeros(table.batch, table.length, dtype=torch.long, device=pool.device)
    seg.attach_kv(s, mid, KVState(PagedCache(pool, table), ids))
    return s


def reserve(pool: KVPool, table: KVTable, tokens: int) -> None:
    assert pool.reserve(table, tokens), f"the bench's KV pool has too few free blocks for {tokens} tokens"


def interleaved_tables(pool: KVPool, tokens: int) -> tuple[KVTable, KVTable]:
    """Two tables of `tokens` tokens whose reservations alternate block by block: every run of
    consecutive ids in either is one block long (what a pool shared by many sessions gives)."""
    a, b = pool.new_table(1), pool.new_table(1)
    for i in range(1, pool.blocks_for(tokens) + 1):
        reserve(pool, a, i * pool.block_tokens)
        reserve(pool, b, i * pool.block_tokens)
    return a, b


def fill(pool: KVPool, table: KVTable, tokens: int, gen: torch.Generator) -> None:
    """Random keys and values for positions 0..tokens-1 of every layer, written with pool.write."""
    sh = pool.shape
    size = (table.batch, sh.kv_heads, tokens, sh.head_dim)
    for layer in range(sh.layers):
        k = torch.randn(size, generator=gen, device=pool.device).to(sh.dtype)
        v = torch.randn(size, generator=gen, device=pool.device).to(sh.dtype)
        pool.write(table, layer, k, v, 0)
    table.length = tokens


def read_all(pool: KVPool, table: KVTable) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [pool.read(table, layer, table.length) for layer in range(pool.shape.layers)]


def same(a: list[tuple[torch.Tensor, torch.Tensor]], b: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def copy_table(pool: KVPool, src: KVTable, reserve_tokens: int) -> KVTable:
    """A new table with the same KV bits as `src` (its written blocks copied), `reserve_tokens` reserved."""
    t = pool.new_table(src.batch)
    reserve(pool, t, reserve_tokens)
    n = pool.blocks_for(src.length)
    for dst_row, src_row in zip(t.rows, src.rows):
        pool.kv[:, :, dst_row[:n]] = pool.kv[:, :, src_row[:n]]
    t.length = src.length
    return t


# -- swap bandwidth ----------------------------------------------------------------------------------------
def bench_bandwidth(device: torch.device, sz: Sizes, seg: DataSegment) -> list[dict]:
    """Block swap out and in of one session's KV, per size and layout, with a bitwise round trip."""
    most = max(sz.bw_tokens)
    pool = KVPool(sz.bw_shape, 2 * -(-most // sz.block_tokens) + 1, sz.block_tokens, device)  # two sessions + scratch
    seg.add_pool("bw", pool)
    gen = torch.Generator(device).manual_seed(0)
    rows = []
    try:
        for tokens in sz.bw_tokens:
            for layout in ("consecutive", "interleaved"):
                # Every case starts from a fresh free list: ids handed out lowest first, as on a new pool.
                assert pool.alloc.held == 0, "the bench leaked KV blocks"
                pool.alloc = BlockAllocator(pool.alloc.num_blocks, reserved=1)
                if layout == "consecutive":
                    table, other = pool.new_table(1), None
                    reserve(pool, table, tokens)
                else:
                    table, other = interleaved_tables(pool, tokens)
                fill(pool, table, tokens, gen)
                s = session(seg, f"bw{tokens}{layout[0]}", pool, "bw", table)
                before = read_all(pool, table)
                # Runs of consecutive ids are gathered into the staging buffer by device copies; the
                # link sees one copy per chunk of stage_blocks (Note [Staged swap]).
                runs = len(pool.runs(table.ids()))
                assert runs == (1 if layout == "consecutive" else table.blocks), (layout, runs)
                copies = {"out": -(-table.blocks // pool.stage_blocks), "gathers": runs}
                outs, ins = [], []
                for _ in range(sz.bw_reps):
                    secs, n = timed_swap(seg, s, "out")
                    outs.append(n / secs / 1e9)
                    secs, n = timed_swap(seg, s, "in")
                    ins.append(n / secs / 1e9)
                    copies["in"] = -(-table.blocks // pool.stage_blocks)
                assert same(read_all(pool, table), before), f"{tokens}-token {layout} swap round trip changed the KV"
                blocks = table.blocks
                rows.append({"tokens": tokens, "layout": layout, "cache_mb": round(n / MB, 1), "blocks": blocks,
                             "copies": copies, "out_gbps": _summary(outs), "in_gbps": _summary(ins),
                             "bitwise": True})
                print(f"  {tokens:5d} tokens {n / MB:8.1f} MB {layout:11s} ({blocks} blocks in {runs} runs, link copies "
                      f"out/in {copies['out']}/{copies['in']}): out {max(outs):5.1f} GB/s, in {max(ins):5.1f} GB/s",
                      flush=True)
                seg.close(s)
                if other is not None:
                    pool.release(other)
                del before
    finally:
        seg.drop_pool("bw")
        del pool
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# -- the first decode step after a prefetch ---------------------------------------------------------------
def build_model(cfg, device: torch.device, seed: int = 0):
    from transformers import AutoModelForCausalLM

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def bench_first_step(device: torch.device, sz: Sizes, seg: DataSegment) -> dict:
    """The decode step on KV blocks that came back from host memory vs on blocks that never left."""
    from djinn.server.execution.paged_cache import PagedCache

    cfg = sz.step_config
    model = build_model(cfg, device)
    shape = KVShape.of_module(model)
    step_tokens = sz.context + 1                      # the context and the one position the step writes
    per_session = -(-step_tokens // sz.block_tokens)
    pool = KVPool(shape, 2 * per_session + 1, sz.block_tokens, device)   # never-swapped + swapped + scratch
    seg.add_pool("step", pool)
    ids = torch.randint(3, cfg.vocab_size, (1, sz.context), generator=torch.Generator().manual_seed(1)).to(device)
    base = pool.new_table(1)
    reserve(pool, base, step_tokens)
    base_cache = PagedCache(pool, base)
    with torch.no_grad():
        logits = model(ids, past_key_values=base_cache, use_cache=True).logits
    nxt = logits[:, -1:].argmax(-1)
    del logits

    def step(cache) -> tuple[float, torch.Tensor]:
        """One decode step at position `context`; the table is rewound so every step is the same one."""
        sync(device)
        t = time.perf_counter()
        with torch.no_grad():
            out = model(nxt, past_key_values=cache, use_cache=True).logits
        sync(device)
        secs = time.perf_counter() - t
        cache.table.length = sz.context
        return secs, out

    for _ in range(3):
        step(base_cache)  # warm the kernels for this shape
    never, prefetched, miss, swap_in_s = [], [], [], []
    same_logits = {"never_vs_never": True, "prefetched_vs_never": True}
    try:
        for i in range(sz.step_reps):
            t, ref_logits = step(base_cache)
            never.append(t)
            _, again = step(base_cache)
            same_logits["never_vs_never"] &= torch.equal(again, ref_logits)
            s = session(seg, f"step{i}", pool, "step", copy_table(pool, base, step_tokens))
            table = s.kv["step"].table
            before = read_all(pool, table)
            timed_swap(seg, s, "out")
            secs, _ = timed_swap(seg, s, "in")  # the prefetch, done before the request
            swap_in_s.append(secs)
            assert same(read_all(pool, table), before), "the swap round trip changed the KV"
            del before
            t, out = step(s.kv["step"].cache)
            prefetched.append(t)
            same_logits["prefetched_vs_never"] &= torch.equal(out, ref_logits)
            # A miss: the request finds the KV in host memory and waits for the swap-in.
            timed_swap(seg, s, "out")
            seg.request_arrived(s.sid)
            sync(device)
            t0 = time.perf_counter()
            assert seg.prefetch(s), "prefetch refused"
            for _, h in seg.mem(s.sid).inflight:
                h.wait()
            assert seg.poll() == [s.sid]
            step(s.kv["step"].cache)
            miss.append(time.perf_counter() - t0)
            assert seg.mem(s.sid).counters.prefetch_misses == 1
            seg.close(s)
    finally:
        pool.release(base)
        seg.drop_pool("step")
        del model, pool, base_cache
        if device.type == "cuda":
            torch.cuda.empty_cache()
    med = {k: statistics.median(v) for k, v in (("never", never), ("prefetched", prefetched), ("miss", miss))}
    return {"model": "llama-2-7b-shape fp16" if device.type == "cuda" else "tiny llama fp32",
            "context": sz.context, "block_tokens": sz.block_tokens,
            "kv_mb": round(sz.context * shape.token_bytes / MB, 1),
            "step_ms": {k: round(v * 1e3, 3) for k, v in med.items()},
            "prefetched_vs_never": round(med["prefetched"] / med["never"], 4),
            "miss_vs_never": round(med["miss"] / med["never"], 3),
            "swap_in_ms_median": round(statistics.median(swap_in_s) * 1e3, 3),
            "cache_bitwise_after_round_trip": True,
            # The fp16 7B decode step itself is not always bitwise repeatable on these GPUs (exp2 saw
            # the same for 13B): equal logits are reported, not required; the KV's bits are checked.
            "logits_equal": same_logits, "reps": sz.step_reps}


def _summary(xs: list[float]) -> dict:
    return {"max": round(max(xs), 2), "median": round(statistics.median(xs), 2)}


def run(device: torch.device, sz: Sizes) -> dict:
    seg = DataSegment(device, sz.host_pool_bytes, swap_bw=25e9)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"swap bench on {name}; host pool pinned: {seg.pool.pinned}", flush=True)
    try:
        result = {"environment": environment(device), "host_pool_pinned": seg.pool.pinned,
                  "peak_gbps": {"h2d": peak(device, "in", sz.peak_bytes), "d2h": peak(device, "out", sz.peak_bytes)}}
        print(f"  peak {sz.peak_bytes / MB:.0f} MB copies: {result['peak_gbps']}", flush=True)
        result["bandwidth"] = bench_bandwidth(device, sz, seg)
        result["first_step"] = bench_first_step(device, sz, seg)
        assert seg.pool.used == 0, "the bench leaked host pool regions"
    finally:
        seg.close_all()

    def slowest(layout: str) -> float:
        big = [r for r in result["bandwidth"] if r["layout"] == layout and r["cache_mb"] >= sz.big_mb]
        return min(min(r["out_gbps"]["max"], r["in_gbps"]["max"]) for r in big)

    result["targets"] = {
        "swap_gbps_min_over_caches_ge_256mb": slowest("consecutive"),
        "swap_gbps_min_over_caches_ge_256mb_interleaved": slowest("interleaved"),
        "swap_target_gbps": 45,
        "prefetched_first_step_ratio": result["first_step"]["prefetched_vs_never"],
        "first_step_target_ratio": 1.05,
    }
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--out", help="JSON file to write")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    p.add_argument("--cpu-check", action="store_true", help=argparse.SUPPRESS)  # tiny sizes on the CPU; prints OK
    a = p.parse_args(argv)
    if a.cpu_check:
        for quick in (False, True):  # the real sizes: 12.5 MiB blocks of 13B KV, 8 MiB of 7B, pools of a few GiB
            real = real_sizes(quick)
            assert real.bw_shape.token_bytes * real.block_tokens == 12.5 * 2**20 and 2048 in real.bw_tokens
            bw_pool = (2 * max(real.bw_tokens) // real.block_tokens + 1) * real.bw_shape.token_bytes * real.block_tokens
            assert 3 * GIB < bw_pool < 4 * GIB and real.host_pool_bytes == 4 * GIB, bw_pool
        result = run(torch.device("cpu"), check_sizes())
        with tempfile.TemporaryDirectory() as d:
            write(result, str(Path(d) / "sub" / "swap.json"))
            assert json.loads((Path(d) / "sub" / "swap.json").read_text())["targets"] == result["targets"]
        print(json.dumps(result["first_step"]), json.dumps(result["targets"]), flush=True)
        print("OK")
        return 0
    device = torch.device(a.device)
    if device.type != "cuda":
        raise SystemExit("bench_swap measures CUDA copies; run it on a GPU (the CPU path is covered by tests)")
    torch.cuda.set_device(device)
    result = run(device, real_sizes(a.quick))
    print(json.dumps(result["first_step"]), json.dumps(result["targets"]), flush=True)
    if a.out:
        write(result, a.out)
    return 0


def write(result: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
