"""Batched prefill for the decode fast path: one forward over several sessions' prompt chunks.

Note [Batched prefill]
    Each engine turn, every fast-path generate that still has prompt tokens to feed takes a chunk of
    the turn's budget (Note [Chunked prefill] in fast_task.py). Fed one session at a time, each chunk
    is a Hugging Face forward: hundreds of kernel launches from Python, tens of milliseconds of host
    time whatever its length. 32 sessions starting together on a 7B model spent about 2 s prefilling
    128-token prompts one after another, more than their whole decode (bench_decode, H100). Here the
    turn's chunks of one model run as one forward: chunks padded to the longest one, [rows, tokens]
    through the model's own embedding, norms, projections, rotary embedding and MLP, each row's new
    keys and values written into its blocks at its positions, and attention per row over its blocks
    (gathered, as the eager PagedCache does) with a causal mask offset by where the chunk starts.
    Numerics are those of the fast path (Note [Fast path numerics]): equal to eager to rounding.

    One forward stays within the Stack reserve (Note [Stack reserve] in kv_pools.py): padded, its
    rows x longest chunk are at most `max_prefill_tokens` (the prefill the reserve was measured at)
    and its rows x longest row's blocks at most the plan's `prefill_gather_tokens` (a workspace the
    reserve includes); chunks past either run in the next forward of the same turn (`groups`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Chunk:
    """One session's prompt tokens to feed now: `ids` [n] continue `table` from its length."""

    table: object
    ids: torch.Tensor


def groups(chunks: list[Chunk], block_tokens: int, gather_tokens: int, max_tokens: int) -> list[list[Chunk]]:
    """Consecutive chunks that fit one forward (each group holds at least one): padded, the group's
    rows x its longest chunk stay within `max_tokens` (the prefill the Stack reserve was measured at)
    and rows x its longest row's blocks within `gather_tokens` (Note [Batched prefill])."""
    out: list[list[Chunk]] = []
    cur: list[Chunk] = []
    longest = widest = 0
    for c in chunks:
        n = c.ids.numel()
        end = -(-(c.table.length + n) // block_tokens) * block_tokens
        rows = len(cur) + 1
        if cur and (rows * max(widest, end) > gather_tokens or rows * max(longest, n) > max_tokens):
            out.append(cur)
            cur, longest, widest = [], 0, 0
        cur.append(c)
        longest, widest = max(longest, n), max(widest, end)
    if cur:
        out.append(cur)
    return out


@torch.inference_mode()
def prefill(pool, chunks: list[Chunk]) -> torch.Tensor:
    """Feed every chunk into its table's blocks (lengths advance); logits of each chunk's last token."""
    m, kv, dev, bt = pool.module.model, pool.kv, pool.device, pool.bt
    R = len(chunks)
    lens = [c.ids.numel() for c in chunks]
    starts = [c.table.length for c in chunks]
    n = max(lens)
    for c, a, k in zip(chunks, starts, lens):
        pool.kv_pool.ensure_private(c.table, a, a + k)  # a block shared with another session is copied first
    nb = max(-(-(a + k) // bt) for a, k in zip(starts, lens))
    tbl = torch.tensor([(r := c.table.rows[0][:nb]) + [r[-1]] * (nb - len(r)) for c in chunks],
                       dtype=torch.long, device=dev)                         # [R, nb]; tails repeat own blocks
    ids = torch.zeros(R, n, dtype=torch.long, device=dev)
    for i, c in enumerate(chunks):
        ids[i, :lens[i]] = c.ids.to(dev)
    start = torch.tensor(starts, dtype=torch.long, device=dev)
    pos = start[:, None] + torch.arange(n, device=dev)[None, :]               # [R, n]
    valid = torch.arange(n, device=dev)[None, :] < torch.tensor(lens, device=dev)[:, None]
    # Padded positions write nowhere and read their own row only: their outputs are dropped.
    wpos = pos[valid]
    wrow = torch.arange(R, device=dev)[:, None].expand(R, n)[valid]
    blk, off = tbl[wrow, wpos // bt], wpos % bt
    Lg = nb * bt
    mask = (torch.arange(Lg, device=dev)[None, None, :] <= pos[:, :, None])[:, None]  # [R, 1, n, Lg]
    h = m.embed_tokens(ids)                                                   # [R, n, hidden]
    cos, sin = m.rotary_emb(h, pos)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    H, Hkv, D = pool.heads, pool.kv_heads, pool.head_dim
    for i, layer in enumerate(pool.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        q = attn.q_proj(x).view(R, n, H, D).transpose(1, 2)
        k = attn.k_proj(x).view(R, n, Hkv, D).transpose(1, 2)
        v = attn.v_proj(x).view(R, n, Hkv, D).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        kl, vl = kv[i, 0], kv[i, 1]                                          # [blocks, bt, kv_heads, dim]
        kl[blk, off] = k.transpose(1, 2)[valid]
        vl[blk, off] = v.transpose(1, 2)[valid]
        kc = kl[tbl].view(R, Lg, Hkv, D).transpose(1, 2)
        vc = vl[tbl].view(R, Lg, Hkv, D).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, scale=attn.scaling, enable_gqa=H != Hkv)
        h = h + attn.o_proj(o.transpose(1, 2).reshape(R, n, H * D))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    last = h[torch.arange(R, device=dev), torch.tensor(lens, device=dev) - 1]  # [R, hidden]
    for c, k in zip(chunks, lens):
        c.table.length += k
    return pool.module.lm_head(m.norm(last))
