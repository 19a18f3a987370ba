"""`python -m djinn.demo`: the main job. Starts an embedded server (GPU 0 if present, else CPU) and
checks, on tiny GPT-2 and Llama models with seeded random weights, that remote execution is bitwise
equal to local execution, that two sessions share one copy of the weights, that tokens stream, and
that any nn.Module (a small CNN, on the graph path) and lazy ops on remote tensors match local torch.
Exits non-zero if any check fails.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch


def _tiny_models(device: torch.device) -> dict[str, torch.nn.Module]:
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    configs = {
        "gpt2": GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=512, n_positions=512,
                           bos_token_id=1, eos_token_id=2),
        "llama": LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             bos_token_id=1, eos_token_id=2),
    }
    models = {}
    for i, (name, cfg) in enumerate(configs.items()):
        torch.manual_seed(1000 + i)
        models[name] = AutoModelForCausalLM.from_config(cfg).to(device).eval()
    return models


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", message="`past_key_values` is deprecated", category=FutureWarning)
    p = argparse.ArgumentParser(prog="python -m djinn.demo", description=__doc__.splitlines()[0])
    p.add_argument("--server", help="address of a running server (default: $DJINN_SERVER or embedded)")
    p.add_argument("--device", help="device of the embedded server (default: cuda:0 if present, else cpu)")
    args = p.parse_args(argv)

    import djinn

    checks: list[tuple[str, bool]] = []

    def check(name: str, ok: bool) -> None:
        checks.append((name, ok))
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")

    t0 = time.perf_counter()
    conn = djinn.connect(args.server, device=args.device)
    device = torch.device(conn.device)
    print(f"connected to {conn.address} ({conn.info.get('device_name')}, device {device}) "
          f"in {time.perf_counter() - t0:.1f}s")
    models = _tiny_models(device)
    gen = torch.Generator().manual_seed(7)
    prompt = torch.randint(3, 512, (1, 16), generator=gen).to(device)

    for name, model in models.items():
        print(f"\n{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
        rm = djinn.remote(model)
        print(f"  {rm}")
        with torch.no_grad():
            ref_logits = model(prompt).logits
            ref_greedy = model.generate(prompt, max_new_tokens=16, do_sample=False)
            torch.manual_seed(123)
            ref_sampled = model.generate(prompt, max_new_tokens=16, do_sample=True, top_k=50)
        out = rm(prompt)
        check(f"{name} forward logits {list(out.logits.shape)} bitwise equal to local",
              torch.equal(out.logits.cpu(), ref_logits.cpu()))
        check(f"{name} greedy generate equal to local",
              torch.equal(rm.generate(prompt, max_new_tokens=16, do_sample=False), ref_greedy.cpu()))
        # deterministic=True: the eager path, which draws HF's random stream (on a GPU the default
        # decode fast path samples with its own seeded generator: repeatable, not HF's draws).
        check(f"{name} sampled generate (seed 123) equal to local",
              torch.equal(rm.generate(prompt, max_new_tokens=16, do_sample=True, top_k=50, seed=123,
                                      deterministic=True), ref_sampled.cpu()))

    print("\ntwo sessions sharing one copy of the llama weights")
    text_before = djinn.stats()["segments"]["text"]
    with djinn.session("agent-a") as a, djinn.session("agent-b") as b:
        ra = djinn.remote(models["llama"], session=a)
        rb = djinn.remote(models["llama"], session=b)
        st = djinn.stats()
        shared = st["models"][ra.model_id]["sessions"]
        check(f"second remote uploaded {rb.upload.bytes_uploaded} bytes, text segment unchanged "
              f"({st['segments']['text'] / 1e6:.2f} MB)",
              rb.upload.bytes_uploaded == 0 and st["segments"]["text"] == text_before)
        check(f"one model object used by {len(shared)} sessions", a.sid in shared and b.sid in shared)
        tokens = []
        stream = a.generate(ra, prompt, max_new_tokens=12, stream=True)
        for tok in stream:
            tokens.append(tok)
        print(f"  streamed tokens (session a): {tokens}")
        more = torch.tensor([[5, 6, 7]], device=device)
        cont = a.generate(ra, more, max_new_tokens=8)
        with torch.no_grad():
            from transformers import DynamicCache

            cache = DynamicCache(config=models["llama"].config)
            r1 = models["llama"].generate(prompt, max_new_tokens=12, past_key_values=cache)
            r2 = models["llama"].generate(torch.cat([r1, more], 1), max_new_tokens=8, past_key_values=cache)
        check("streamed tokens equal the local greedy continuation", tokens == r1[0, prompt.shape[1]:].tolist())
        check(f"session a continued from its KV cache ({cont.shape[1]} tokens) exactly as locally",
              torch.equal(cont, r2.cpu()))
        other = b.generate(rb, prompt, max_new_tokens=12)
        check("session b's cache is its own", torch.equal(other, r1.cpu()))
        sa = djinn.stats()["sessions"][a.sid]
        print(f"  session a holds {sa['gpu_bytes'] / 1e3:.1f} kB of KV ({sa['kv_tokens']} tokens); its generates "
              f"took the decode fast path {sa['decode']['fast']}x, eager {sa['decode']['eager']}x"
              + (f" ({sa['decode']['eager_why']})" if sa['decode']['eager_why'] else ""))

    print("\nany nn.Module: the graph path and lazy ops")
    _graph_path_checks(device, gen, check)

    st = djinn.stats()
    seg = st["segments"]
    print(f"\nserver holds: text {seg['text'] / 1e6:.2f} MB in {st['text_entries']} tensors, "
          f"data {seg['data'] / 1e3:.1f} kB, {len(st['sessions'])} sessions, {len(st['models'])} models")
    failed = [n for n, ok in checks if not ok]
    print(f"\n{len(checks) - len(failed)}/{len(checks)} checks passed in {time.perf_counter() - t0:.1f}s on {device}")
    djinn.disconnect()
    return 1 if failed else 0


def _graph_path_checks(device: torch.device, gen: torch.Generator, check) -> None:
    """A module the server cannot build runs as a captured graph; ops on its remote output are
    recorded lazily and run server-side in one round trip."""
    import djinn
    from torch import nn

    torch.manual_seed(2000)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 10)).to(device).eval()
    images = torch.randn(4, 3, 16, 16, generator=gen).to(device)
    rc = djinn.remote(cnn)
    out = rc(images)
    with torch.no_grad():
        ref = cnn(images)
    check(f"a CNN the server cannot build runs on the {rc.path} path, bitwise equal to local",
          torch.equal(out.cpu(), ref.cpu()))
    idx = torch.tensor([3, 0])
    top = (out[idx] / 0.7).softmax(-1).topk(3)        # recorded, not yet run
    got = top.indices.tolist()                          # one round trip for the whole chain
    want = (ref[idx.to(device)] / 0.7).softmax(-1).topk(3)
    check("lazy chain (index by a tensor, softmax, topk) run server-side equals local",
          got == want.indices.tolist() and torch.equal(top.values.cpu(), want.values.cpu()))


if __name__ == "__main__":
    sys.exit(main())
