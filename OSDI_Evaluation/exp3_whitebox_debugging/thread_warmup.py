"""Why run threads are pooled on CUDA: the same generate on the main thread, on a fresh thread each
time, with and without no-op hooks, and on one persistent thread.

    python OSDI_Evaluation/exp3_whitebox_debugging/thread_warmup.py [--model gpt2|llama7b] [--reps 3]

In-process, no server. Prints milliseconds per 16-token greedy generate of a 32-token prompt.
"""
from __future__ import annotations

import argparse
import queue
import threading
import time

import torch


def build(name: str):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(0)
    if name == "gpt2":
        cfg, dtype = GPT2Config(), torch.float32
    else:
        cfg, dtype = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=32), torch.float16
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama7b")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    model = build(args.model)
    layers = model.transformer.h if args.model == "gpt2" else model.model.layers
    ids = torch.randint(3, 30000, (1, 32), device="cuda")

    def generate():
        with torch.no_grad():
            model.generate(ids, max_new_tokens=16, do_sample=False).cpu()

    def timed(fn) -> float:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    def fresh_thread() -> float:
        box: list[float] = []
        th = threading.Thread(target=lambda: (torch.cuda.set_device(0), box.append(timed(generate))))
        th.start()
        th.join()
        return box[0]

    jobs: queue.SimpleQueue = queue.SimpleQueue()
    results: queue.SimpleQueue = queue.SimpleQueue()

    def persistent():
        torch.cuda.set_device(0)
        while True:
            results.put(timed(jobs.get()))

    threading.Thread(target=persistent, daemon=True).start()

    def hooked(fn):
        hs = [model.register_forward_pre_hook(lambda m, a, k: None, with_kwargs=True, prepend=True)]
        hs += [layers[i].register_forward_hook(lambda m, a, o: None) for i in (3, 6, 9)]
        try:
            return fn()
        finally:
            for h in hs:
                h.remove()

    for _ in range(2):
        generate()
    res: dict[str, list[int]] = {k: [] for k in ("main", "fresh_thread", "main_hooks", "fresh_thread_hooks",
                                                 "persistent_thread")}
    for _ in range(args.reps):
        res["main"].append(round(timed(generate)))
        res["fresh_thread"].append(round(fresh_thread()))
        res["main_hooks"].append(round(hooked(lambda: timed(generate))))
        res["fresh_thread_hooks"].append(round(hooked(fresh_thread)))
        jobs.put(generate)
        res["persistent_thread"].append(round(results.get()))
    print(args.model, torch.cuda.get_device_name(), res)


if __name__ == "__main__":
    main()
