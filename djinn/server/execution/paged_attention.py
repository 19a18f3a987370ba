"""Attention of the batched decode step over the KV pool's blocks: two implementations, one interface.

`GatherAttention` copies each row's blocks into a dense [rows, heads, length, dim] tensor per layer and
runs SDPA over it with a mask; `FlexAttention` reads the blocks where they lie, through PyTorch's
FlexAttention with a block mask (Note [Flex over the pool]). The step (fastpath.DecodePool, through
paged_step.py) calls `prepare` once per step and `attend` once per layer, from the attention function
it registers with transformers; both run inside the step's CUDA graph, so every tensor they touch is
allocated here once. The gather also serves the batched prefill (several queries per row) and the
module's sliding window and softcap; flex does neither (`gather_only`).

Note [Why FlexAttention]
    The gather reads the batch's KV, writes a copy and reads the copy again: three passes over the
    KV where attention needs one. On an H100 (Llama-2-7B shape, 32 rows of 256 tokens) that was 2.9 ms
    of a 13.3 ms step; at 32 rows of 2k tokens on the 13B head shape it is 1.11 ms per layer, 44 ms a
    step over 40 layers (`OSDI_Evaluation/micro/flex_probe.py`). The issue's candidates:
    transformers' continuous-batching `PagedAttentionCache` gathers too (its sdpa path indexes the
    cache into a dense copy); FlashInfer and FlashAttention's paged kernels need wheels built for the
    exact CUDA and torch of the GPU machines; FlexAttention ships with torch, compiles to one Triton
    kernel, and takes a block table as its block mask (torch's own
    `nn.attention.experimental._paged_attention` is built on it). We use FlexAttention directly: that
    experimental class converts masks per call and owns its own cache tensors. Status: flex compiled
    and matched the gather on an H100 at 1 row, and failed to compile on the block-major pool this
    module first used (past 2^31 elements, Note [Pool layout]); on the layer-major pool it has run on
    the CPU only, so `auto` still means the gather.

Note [Flex over the pool]
    The pool is layer-major, `kv[layer, k|v, block, bt, kv_head, dim]` (Note [Pool layout] in
    djinn/vmu/kv_pool.py), so layer i's keys are one contiguous run of token slots
    `kv[i, 0].view(blocks * bt, kv_head, dim)`: a valid FlexAttention key tensor of "length"
    blocks * bt, cut into pages of bt slots, page b being block b; values likewise. A row's block
    mask lists its blocks before the current one as full pages (no mask function runs on them) and
    its current block as a partial page, where `kv_idx % bt <= pos % bt` keeps the positions written
    so far; the same mask serves every layer of a step. FlexAttention's kernel reads only the pages a
    row's mask lists, so the rest of the pool (other sessions' blocks, the scratch block) is never
    touched. The kernel takes its block size as its KV tile (`BLOCK_N` = bt: the main kernel, which
    a batch of symbolic size uses, needs the tile to divide the block).

    This relies on the compiled kernel's block sparsity: the mask function alone does not say which
    pages are a row's (a prefix-shared block belongs to several rows), so FlexAttention run eagerly
    (its dense reference implementation, which applies only the mask function) would attend to the
    whole pool. `FlexAttention` therefore only ever calls the compiled function, and the compile is
    made to fail rather than fall back to eager when it cannot compile (`_compiled`).

Note [Flex is checked]
    Flex attention depends on the compiler stack of the machine (Inductor, Triton and their limits for
    a head size, dtype, tensor size or GPU). Before the VMU sizes a model's pool for flex it checks it:
    flex against the gather on a small pool of the model's shape (eagerly and, on CUDA, replayed from
    a CUDA graph), and the largest pool the device could give the model against the 32-bit offsets of
    FlexAttention's kernels (one layer's keys at most 2^31 - 1 elements). If it would not fit, fails to
    compile or differs, the pool uses the gather, sized for it (its workspace is larger), the server
    logs a warning and `stats()` shows the attention in use and the reason.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

ATTENTIONS = ("gather", "flex")


def choose(kind: str, device: torch.device) -> str:
    """The attention a decode pool on `device` uses for config value `kind` (auto, gather or flex).
    auto is the gather everywhere until flex has been measured at scale on a GPU: it was made to read
    the blocks in place, but no GPU run of it on the layer-major pool exists yet (Note [Why
    FlexAttention]); `--fast-decode-attention flex` opts in."""
    if kind == "auto":
        return "gather"
    if kind not in ATTENTIONS:
        raise ValueError(f"fast_decode_attention={kind!r} must be auto, gather or flex")
    return kind


def gather_only(config, longest: int) -> str | None:
    """Why flex cannot serve this model's attention, whose rows are at most `longest` tokens (None: it
    can): its mask is a row's blocks, nothing per position, so a sliding window that can bind and
    logit softcapping (Gemma2) are the gather's alone."""
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return "flex does not softcap attention logits (attn_logit_softcapping)"
    window = getattr(config, "sliding_window", None)
    if isinstance(window, int) and getattr(config, "use_sliding_window", True) and window < longest:
        return f"flex does not do sliding windows ({window} < {longest} tokens)"
    return None


#: FlexAttention's kernels index a key tensor with 32-bit offsets: past this many elements in one
#: layer's keys they do not compile (torch 2.11, `OSDI_Evaluation/micro/flex_probe.py`).
FLEX_MAX_ELEMENTS = 2**31 - 1


def resolve(kind: str, device: torch.device, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
            heads: int, pool_bytes: int) -> tuple[str, str | None]:
    """The attention to use and, when flex was chosen and does not work here, why it fell back: flex is
    checked against the gather on a small pool of this model's shape, and the largest pool the device
    allows (`pool_bytes`) against its indexing limit (Note [Flex is checked])."""
    chosen = choose(kind, device)
    if chosen != "flex":
        return chosen, None
    per_layer = pool_bytes // (2 * layers * dtype.itemsize)
    if per_layer > FLEX_MAX_ELEMENTS:
        return "gather", (f"a pool of up to {pool_bytes / 2**30:.1f} GiB holds {per_layer} elements per layer's keys, "
                          f"past FlexAttention's 32-bit indexing ({FLEX_MAX_ELEMENTS})")
    why = flex_check(device, layers, kv_heads, head_dim, dtype, heads)
    return ("gather", why) if why else ("flex", None)


def flex_check(device: torch.device, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
               heads: int) -> str | None:
    """None when compiled flex attention gives the gather's result on a 4-block pool of this shape, at
    batch 1 and 3 (the two compiles a pool's steps need: dynamo specializes a batch of 1), eagerly
    and, on CUDA, replayed from a CUDA graph; else why not."""
    g = torch.Generator(device="cpu").manual_seed(0)
    kv = torch.randn(layers, 2, 4, 16, kv_heads, head_dim, generator=g).to(device, dtype)
    try:
        flex, gather = make("flex", kv, 3, 2, heads), make("gather", kv, 3, 2, heads)
        for B in (1, 3):
            tables = torch.tensor([[1, 2], [3, 1], [2, 2]][:B], device=device)
            pos = torch.tensor([20, 31, 5][:B], device=device)
            q = torch.randn(B, heads, 1, head_dim, generator=g).to(device, dtype)
            f = flex.attend(q, layers - 1, flex.prepare(tables, pos, 32), head_dim ** -0.5)
            want = gather.attend(q, layers - 1, gather.prepare(tables, pos, 32), head_dim ** -0.5)
            err = (f.float() - want.float()).abs().max().item()
            if not err <= 1e-2:
                return f"flex attention differs from the gather by {err:.3g} at batch {B}"
            if device.type == "cuda":  # the decode step replays it inside a CUDA graph
                err = (_replayed(flex, q, tables, pos, layers - 1, head_dim ** -0.5).float() - want.float()).abs().max()
                if not err <= 1e-2:
                    return f"flex attention replayed from a CUDA graph differs from the gather by {err:.3g}"
    except Exception as e:  # a compiler missing or failing on this machine
        return f"flex attention does not compile here: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return None


def _replayed(flex, q, tables, pos, layer: int, scale: float) -> torch.Tensor:
    """flex's prepare and attend captured as a CUDA graph (after a warm-up on a side stream, as the
    decode step captures its graphs), replayed once."""
    side = torch.cuda.Stream(q.device)
    side.wait_stream(torch.cuda.current_stream(q.device))
    with torch.cuda.stream(side):
        flex.attend(q, layer, flex.prepare(tables, pos, 32), scale)
    torch.cuda.current_stream(q.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = flex.attend(q, layer, flex.prepare(tables, pos, 32), scale)
    graph.replay()
    torch.cuda.synchronize(q.device)
    return out


def make(kind: str, kv: torch.Tensor, slots: int, width: int, heads: int):
    """The decode attention `kind` over pool tensor `kv` for `slots` rows of `width` blocks each."""
    cls = {"gather": GatherAttention, "flex": FlexAttention}[kind]
    return cls(kv, slots, width, heads)


def workspace_bytes(kind: str, blocks: int, layers: int, kv_heads: int, head_dim: int, itemsize: int,
                    heads: int, rows: int, max_len: int) -> int:
    """Device bytes the step's attention needs beyond the pool, at `rows` rows of `max_len` tokens."""
    if kind == "flex":
        return 2 * rows * blocks * 4 + rows * 16   # two int32 index tables of a page per block, per row
    per_pos = kv_heads * head_dim * itemsize  # one layer's gathered keys and values, plus GQA's copies
    return rows * max_len * per_pos * (2 + 2 * max(1, heads // max(1, kv_heads)))


class GatherAttention:
    """Each layer copies the rows' blocks into a dense tensor and runs SDPA with a length mask (and
    the module's sliding window; with a softcap, the same arithmetic as transformers' eager attention)."""

    length_buckets = True  # the work grows with the padded length bucket

    def __init__(self, kv: torch.Tensor, slots: int, width: int, heads: int):
        self.kv = kv
        self.bt, self.kv_heads, self.head_dim = kv.shape[3], kv.shape[4], kv.shape[5]  # [layers, k|v, blocks, ...]

    def prepare(self, tables: torch.Tensor, pos: torch.Tensor, length: int):
        """Per step: tables [B, nb] covering `length` positions; pos [B] (decode) or [B, n] (prefill):
        the position of each query."""
        B, nb = tables.shape
        Lg = nb * self.bt
        qpos = (pos if pos.dim() == 2 else pos[:, None])[:, None, :, None]    # [B, 1, n, 1]
        kpos = torch.arange(Lg, device=pos.device)
        return {"tables": tables, "qpos": qpos, "kpos": kpos, ("mask", None): kpos <= qpos}  # [B, 1, n, Lg]

    def _mask(self, state, window: int | None) -> torch.Tensor:
        """The causal mask, with the sliding window if any (transformers': kv > q - window); made once
        per step and window, at the first layer that asks."""
        key = ("mask", window)
        if key not in state:
            state[key] = state[("mask", None)] & (state["kpos"] > state["qpos"] - window)
        return state[key]

    def attend(self, q: torch.Tensor, layer: int, state, scale: float, window: int | None = None,
               softcap: float | None = None) -> torch.Tensor:
        """q [B, heads, n, dim] -> [B, heads, n, dim] over layer `layer`'s KV of every row."""
        tables = state["tables"]
        B, nb = tables.shape
        Lg = nb * self.bt
        mask = self._mask(state, window)
        kl, vl = self.kv[layer, 0], self.kv[layer, 1]                         # [blocks, bt, kv_heads, dim]
        kc = kl[tables].view(B, Lg, self.kv_heads, self.head_dim).transpose(1, 2)
        vc = vl[tables].view(B, Lg, self.kv_heads, self.head_dim).transpose(1, 2)
        if softcap is None:
            return F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, scale=scale,
                                                  enable_gqa=q.shape[1] != self.kv_heads)
        groups = q.shape[1] // self.kv_heads                                  # SDPA has no softcap (Gemma2)
        kc, vc = kc.repeat_interleave(groups, 1), vc.repeat_interleave(groups, 1)
        w = torch.matmul(q, kc.transpose(2, 3)) * scale
        w = torch.tanh(w / softcap) * softcap
        w = w.masked_fill(~mask, torch.finfo(w.dtype).min)
        return torch.matmul(w.softmax(-1, dtype=torch.float32).to(q.dtype), vc)


class FlexAttention:
    """Note [Flex over the pool]."""

    length_buckets = False  # the kernel reads each row's own pages: padding the length costs nothing

    def __init__(self, kv: torch.Tensor, slots: int, width: int, heads: int):
        from torch.nn.attention.flex_attention import BlockMask

        layers, _, blocks, bt, kv_heads, dim = kv.shape
        self.heads, self.kv_heads, self.bt = heads, kv_heads, bt
        self.longest = width * bt  # a window at least this long never masks anything
        n = blocks * bt
        self.keys = [kv[i, 0].view(n, kv_heads, dim).permute(1, 0, 2).unsqueeze(0) for i in range(layers)]
        self.values = [kv[i, 1].view(n, kv_heads, dim).permute(1, 0, 2).unsqueeze(0) for i in range(layers)]
        dev = kv.device
        self.full = torch.zeros(slots, 1, 1, blocks, dtype=torch.int32, device=dev)  # the full pages
        self.full_n = torch.zeros(slots, 1, 1, dtype=torch.int32, device=dev)
        self.part = torch.zeros(slots, 1, 1, blocks, dtype=torch.int32, device=dev)  # the current page
        self.part_n = torch.ones(slots, 1, 1, dtype=torch.int32, device=dev)
        self.off = torch.zeros(slots, dtype=torch.long, device=dev)  # the current page's last offset
        self.options = {"BLOCK_N": bt}
        off = self.off

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx % bt) <= off[b]

        # One block mask per batch size, over views of the buffers above, made once: its construction
        # validates on the host, which a captured step must not do.
        self._masks = {}
        self._make_mask = lambda B: BlockMask.from_kv_blocks(
            self.part_n[:B], self.part[:B], self.full_n[:B], self.full[:B], BLOCK_SIZE=(128, bt),
            mask_mod=mask_mod, seq_lengths=(1, n), compute_q_blocks=False)
        self._flex = _compiled()

    def prepare(self, tables: torch.Tensor, pos: torch.Tensor, length: int):
        B, nb = tables.shape
        blk = pos // self.bt
        self.full[:B, 0, 0, :nb] = tables.to(torch.int32)
        self.full_n[:B, 0, 0] = blk.to(torch.int32)
        self.part[:B, 0, 0, 0] = tables.gather(1, blk[:, None])[:, 0].to(torch.int32)
        self.off[:B] = pos % self.bt
        mask = self._masks.get(B)
        if mask is None:
            mask = self._masks[B] = self._make_mask(B)
        return mask

    def attend(self, q: torch.Tensor, layer: int, mask, scale: float, window: int | None = None,
               softcap: float | None = None) -> torch.Tensor:
        if softcap is not None or (window is not None and window < self.longest):
            raise ValueError("flex attention over the pool does not do sliding windows or softcapping "
                             "(the pool should have taken the gather: `gather_only`)")
        return self._flex(q, self.keys[layer], self.values[layer], block_mask=mask, scale=scale,
                          enable_gqa=q.shape[1] != self.kv_heads, kernel_options=self.options)


FLEX_COMPILE_ENTRIES = 256  # compiled graphs of flex_attention a process may hold (`_compiled`)


@functools.cache
def _compiled():
    """flex_attention compiled, shared by every pool of the process; never run eagerly (Note [Flex over
    the pool]): a compile that cannot happen, or a recompile past dynamo's limit, raises instead of
    falling back to the eager reference."""
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    # Batch sizes and pool sizes vary between steps and models: one graph with symbolic sizes. Still,
    # each model shape (heads, KV heads, head size, scale) gets entries of its own, batch 1 and query
    # length 1 specialize too: about three per model, so dynamo's default limit of 8 (per function, and
    # this one function serves every pool) failed the third model a server loaded (H100, 16f090e). Every
    # entry is a real graph, compiled once; the limit only has to outlast the models of a server's life.
    cfg = torch._dynamo.config
    if hasattr(cfg, "fail_on_recompile_limit_hit"):
        cfg.fail_on_recompile_limit_hit = True
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), FLEX_COMPILE_ENTRIES))
    if hasattr(cfg, "accumulated_recompile_limit"):
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4 * FLEX_COMPILE_ENTRIES)
    return torch.compile(flex_attention, dynamic=True, fullgraph=True)
