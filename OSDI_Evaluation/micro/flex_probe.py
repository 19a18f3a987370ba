"""Decode attention over KV blocks at agent scale: gather+SDPA against FlexAttention compiled two ways
(dynamic batch with the main kernel at BLOCK_N = block size; static batch with the decode kernel)."""
import json, sys, time
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention, BlockMask

dev = "cuda"
layers, H, D, bt = 4, 32, 128, 16
rows, ctx = int(sys.argv[1]) if len(sys.argv) > 1 else 32, int(sys.argv[2]) if len(sys.argv) > 2 else 2048
per = -(-(ctx + 1) // bt)
blocks = rows * per + 1
kv = torch.randn(blocks, layers, 2, bt, H, D, device=dev, dtype=torch.float16)
perm = torch.randperm(blocks - 1, device=dev) + 1
tables = perm[:rows * per].view(rows, per)
pos = torch.full((rows,), ctx, device=dev)
q = torch.randn(rows, H, 1, D, device=dev, dtype=torch.float16)
L = layers - 1
# gather reference
Lg = per * bt
kc = kv[:, L, 0][tables].view(rows, Lg, H, D).transpose(1, 2)
vc = kv[:, L, 1][tables].view(rows, Lg, H, D).transpose(1, 2)
mask = (torch.arange(Lg, device=dev)[None] <= pos[:, None])[:, None, None]
def gather():
    kc = kv[:, L, 0][tables].view(rows, Lg, H, D).transpose(1, 2)
    vc = kv[:, L, 1][tables].view(rows, Lg, H, D).transpose(1, 2)
    return F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask)
ref = gather()
flat = kv.view(-1, H, D)
P = 2 * layers * (blocks - 1) + 1
n = P * bt
K = flat[2 * L * bt:2 * L * bt + n].permute(1, 0, 2).unsqueeze(0)
V = flat[(2 * L + 1) * bt:(2 * L + 1) * bt + n].permute(1, 0, 2).unsqueeze(0)
full = torch.zeros(rows, 1, 1, P, dtype=torch.int32, device=dev)
full[:, 0, 0, :per] = (tables * 2 * layers).int()
blk = pos // bt
full_n = blk.int()[:, None, None]
part = torch.zeros(rows, 1, 1, P, dtype=torch.int32, device=dev)
part[:, 0, 0, 0] = (tables.gather(1, blk[:, None])[:, 0] * 2 * layers).int()
off = pos % bt
def mm(b, h, qi, ki):
    return (ki % bt) <= off[b]
bm = BlockMask.from_kv_blocks(torch.ones(rows, 1, 1, dtype=torch.int32, device=dev), part, full_n, full,
                              BLOCK_SIZE=(128, bt), mask_mod=mm, seq_lengths=(1, n), compute_q_blocks=False)
def timeit(f, reps=20):
    for _ in range(3): f()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(reps): f()
    torch.cuda.synchronize(); return (time.perf_counter() - t) / reps * 1e3
res = {"rows": rows, "ctx": ctx, "kv_gb_read": rows * ctx * H * D * 2 * 2 / 1e9}
res["gather_ms"] = timeit(gather)
for name, kw in (("main_bn16", dict(dynamic=True)), ("decode_static", dict(dynamic=False))):
    torch._dynamo.reset()
    c = torch.compile(flex_attention, fullgraph=True, **kw)
    opts = {"BLOCK_N": bt} if name == "main_bn16" else None
    try:
        t0 = time.perf_counter()
        out = c(q, K, V, block_mask=bm, kernel_options=opts)
        torch.cuda.synchronize()
        res[name + "_compile_s"] = time.perf_counter() - t0
        res[name + "_maxdiff"] = (out.float() - ref.float()).abs().max().item()
        res[name + "_ms"] = timeit(lambda: c(q, K, V, block_mask=bm, kernel_options=opts))
    except Exception as e:
        res[name + "_error"] = str(e).splitlines()[0][:300]
res["gather_gbps"] = res["kv_gb_read"] / res["gather_ms"] * 1e3
print(json.dumps(res, indent=1))
