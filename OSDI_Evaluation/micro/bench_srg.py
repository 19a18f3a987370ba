"""SRG micro-benchmarks (issue "Interception and the SRG"): capture cost, client CPU per cached graph
call, and server-side interpretation vs eager, on a GPT-2-small forward.

    python OSDI_Evaluation/micro/bench_srg.py [--device cpu|cuda] [--out results.json] [--tokens 32]

Targets: capture <= 20 us per recorded op (with, for scale, what a dispatch mode that records nothing
costs per op on the same machine); client CPU <= 1 ms per cached call; interpretation <= 1.2x
eager on a GPU. Eager and the interpreter are timed in this process on the same device, alternating,
so the ratio is not skewed by clocks or other load; the cached-call numbers use a real server
subprocess on loopback. Writes JSON with the hardware, versions and commit.
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


def gpt2_small(seed: int, device):
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(GPT2Config()).to(device).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def names(model) -> dict[str, str]:
    return {n: n for n, _ in list(model.named_parameters(remove_duplicate=False)) +
            list(model.named_buffers(remove_duplicate=False))}


def bench_capture(model, ids, reps: int) -> dict:
    from djinn.srg.capture import capture_module

    hashes = names(model)
    capture_module(model, (ids,), {"use_cache": False}, hashes)  # warm-up (imports, kernel caches)
    per_op, total = [], []
    for _ in range(reps):
        c = capture_module(model, (ids,), {"use_cache": False}, hashes)
        per_op.append(c.seconds * 1e6 / c.ops)
        total.append(c.seconds * 1e3)
    return {"ops": c.ops, "nodes": len(c.graph.nodes), "us_per_op": statistics.median(per_op),
            "capture_ms": statistics.median(total), "target_us_per_op": 20}


def bench_interception_floor(ids, reps: int) -> dict:
    """What any __torch_dispatch__ interception costs here, per op: GPT-2-small's depth and ops at width
    64 (so compute is negligible), run eagerly, under a dispatch mode that only forwards each op, and
    captured. Alternating, same process. The no-op mode is the floor a Python-level capture pays."""
    from transformers import AutoModelForCausalLM, GPT2Config
    from torch.utils._python_dispatch import TorchDispatchMode

    from djinn.srg.capture import capture_module

    torch.manual_seed(0)
    narrow = AutoModelForCausalLM.from_config(GPT2Config(n_embd=64, n_head=2)).eval()
    hashes = names(narrow)

    class Forward(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Forward.ops += 1
            return func(*args, **(kwargs or {}))

    def eager():
        with torch.no_grad():
            narrow(ids, use_cache=False)

    def noop():
        with torch.no_grad(), Forward():
            narrow(ids, use_cache=False)

    def capture():
        return capture_module(narrow, (ids,), {"use_cache": False}, hashes)

    noop()
    cap = capture()
    Forward.ops = 0
    noop()
    dispatched = Forward.ops
    times: dict[str, list] = {"eager": [], "noop_mode": [], "capture": []}
    for _ in range(reps):
        for name, f in (("eager", eager), ("noop_mode", noop), ("capture", capture)):
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": "gpt2-small depth, width 64", "recorded_ops": cap.ops, "dispatched_ops": dispatched,
            "eager_us_per_op": med["eager"] * 1e6 / cap.ops, "noop_mode_us_per_op": med["noop_mode"] * 1e6 / cap.ops,
            "capture_us_per_op": med["capture"] * 1e6 / cap.ops,
            "capture_over_noop_mode": med["capture"] / med["noop_mode"]}


def bench_interpret(model, ids, device, reps: int) -> dict:
    """Interpreter vs eager, same process, same device, alternating."""
    from djinn.protocol import codec
    from djinn.protocol.messages import MsgType
    from djinn.server.execution.interpreter import Interpreter, compile_graph
    from djinn.srg.capture import capture_module
    from djinn.srg.graph import from_wire

    hashes = names(model)
    by_hash = dict((hashes[n], t) for n, t in list(model.named_parameters(remove_duplicate=False)) +
                   list(model.named_buffers(remove_duplicate=False)))
    cap = capture_module(model, (ids.cpu(),), {"use_cache": False}, hashes)
    wire = codec.decode(codec.encode(MsgType.REQUEST, {"rid": 0, "g": cap.wire})).header["g"]
    t = time.perf_counter()
    compiled = compile_graph(from_wire(wire), device)
    compile_ms = (time.perf_counter() - t) * 1e3
    weights = [by_hash[h] for _, h in compiled.weights]
    interp = Interpreter(compiled)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    got = interp.run([ids], weights)[0]
    bitwise = bool(torch.equal(got, ref))
    eager_s, interp_s = [], []
    for _ in range(3):
        with torch.no_grad():
            model(ids, use_cache=False)
        interp.run([ids], weights)
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        with torch.no_grad():
            model(ids, use_cache=False)
        sync(device)
        eager_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        interp.run([ids], weights)
        sync(device)
        interp_s.append(time.perf_counter() - t)
    e, i = statistics.median(eager_s), statistics.median(interp_s)
    return {"eager_ms": e * 1e3, "interpret_ms": i * 1e3, "ratio": i / e, "target_ratio": 1.2,
            "compile_ms": compile_ms, "bitwise_equal_to_eager": bitwise, "nodes": len(compiled.graph.nodes)}


def bench_cached_call(model, ids, device: str, reps: int) -> dict:
    """Client CPU per cached call (signature known on both sides), split in two: the graph path's own
    work (flatten, signature lookup, packing the inputs, rebuilding the output structure with handles)
    and the transport (encode, send, and the calling thread's polling while the server computes)."""
    import djinn
    from djinn.frontend import wire
    from djinn.frontend.connection import Connection
    from djinn.srg.capture import is_leaf_spec
    from djinn.srg.tree import unflatten

    server = start_server(device)
    try:
        conn = Connection(server.address, None)
        s = conn.default_session()
        rm = djinn.remote(model.cpu(), session=s, path="graph")
        rm(ids).logits.cpu()  # capture + first send
        own, transport, wall = [], [], []
        for _ in range(reps):
            w0, t0 = time.perf_counter(), time.thread_time()
            cap, leaves = rm._capture((ids,), {})
            inputs = wire.pack(s, leaves)
            t1 = time.thread_time()
            res = rm._run(s, cap, {"model_id": rm.model_id, "inputs": inputs, "seed": None})
            t2 = time.thread_time()
            out = unflatten(cap.out_spec, wire.unpack(s, res["outputs"]), cap.out_protos, is_leaf_spec)
            t3 = time.thread_time()
            own.append((t1 - t0) + (t3 - t2))
            transport.append(t2 - t1)
            wall.append(time.perf_counter() - w0)
            del out
        stats = conn.transport.call("graph_stats", {})
        conn.close()
    finally:
        server.stop()
    return {"graph_path_client_cpu_ms": statistics.median(own) * 1e3,
            "transport_client_cpu_ms": statistics.median(transport) * 1e3,
            "wall_ms": statistics.median(wall) * 1e3, "target_client_cpu_ms": 1.0,
            "counters": rm.counters, "server_graph_stats": stats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cuda:0" if args.device == "cuda" else args.device)
    model = gpt2_small(0, "cpu")
    ids = torch.randint(0, 50257, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    result = {"benchmark": "srg", "model": "gpt2-small (random init, seed 0)", "tokens": args.tokens,
              "env": environment(device)}
    result["capture"] = bench_capture(model, ids, max(3, args.reps // 2))
    print("capture", json.dumps(result["capture"]), flush=True)
    result["interception_floor"] = bench_interception_floor(ids, max(5, args.reps))
    print("interception_floor", json.dumps(result["interception_floor"]), flush=True)
    result["cached_call"] = bench_cached_call(model, ids, str(device), args.reps * 3)
    print("cached_call", json.dumps(result["cached_call"]), flush=True)
    result["interpret"] = bench_interpret(model.to(device), ids.to(device), device, args.reps)
    print("interpret", json.dumps(result["interpret"]), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print("wrote", args.out)


if __name__ == "__main__":
    main()
