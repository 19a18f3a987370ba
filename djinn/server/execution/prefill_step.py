"""Batched prefill for the decode fast path: one forward over several sessions' prompt chunks.

Note [Batched prefill]
    Each engine turn, every fast-path generate that still has prompt tokens to feed takes a chunk of
    the turn's budget (Note [Chunked prefill] in fast_task.py). Fed one session at a time, each chunk
    is a Hugging Face forward: hundreds of kernel launches from Python, tens of milliseconds of host
    time whatever its length. 32 sessions starting together on a 7B model spent about 2 s prefilling
    128-token prompts one after another, more than their whole decode (bench_decode, H100). Here the
    turn's chunks of one model run as one forward: the model's own forward (paged_step.py, Note [One
    step for every architecture]) over chunks left-padded to the longest one, [rows, tokens] with each
    row's own position ids, each row's new keys and values written into its blocks at its positions,
    and attention per row over its blocks (gathered, as the eager PagedCache does) with a causal mask
    offset by where the chunk starts (and the module's sliding window). Left-padded, every row's last
    token is the last column, the one position whose logits the forward computes (`logits_to_keep`).
    A padded input sits at its row's first position: it writes nowhere, and since attention is per row
    and nothing else mixes positions, no real input sees it. Numerics are those of the fast path (Note
    [Fast path numerics]): equal to eager to rounding.

    One forward stays within the Stack reserve (Note [Stack reserve] in kv_pools.py): padded, its
    rows x longest chunk are at most `max_prefill_tokens` (the prefill the reserve was measured at)
    and its rows x longest row's blocks at most the plan's `prefill_gather_tokens` (a workspace the
    reserve includes); chunks past either run in the next forward of the same turn (`groups`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import paged_step, steering
from .paged_attention import GatherAttention


@dataclass
class Chunk:
    """One session's prompt tokens to feed now: `ids` [n] continue `table` from its length."""

    table: object
    ids: torch.Tensor
    steer: dict | None = None  # {layer: vector [hidden]} added to that layer's output (Note [Steering])
    record: dict | None = None  # {layer: list} each fed position's output is appended to (Note [Recorded activations])


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
    kv, dev, bt = pool.kv, pool.device, pool.bt
    R = len(chunks)
    lens = [c.ids.numel() for c in chunks]
    starts = [c.table.length for c in chunks]
    n = max(lens)
    for c, a, k in zip(chunks, starts, lens):
        pool.kv_pool.ensure_private(c.table, a, a + k)  # a block shared with another session is copied first
    nb = max(-(-(a + k) // bt) for a, k in zip(starts, lens))
    tbl = torch.tensor([(r := c.table.rows[0][:nb]) + [r[-1]] * (nb - len(r)) for c in chunks],
                       dtype=torch.long, device=dev)                         # [R, nb]; tails repeat own blocks
    # Left-padded, so every row's last token is column n-1 (the forward computes that column's logits).
    pad = torch.tensor([n - k for k in lens], device=dev)[:, None]
    col = torch.arange(n, device=dev)[None, :]
    valid = col >= pad                                                        # [R, n]
    ids = torch.zeros(R, n, dtype=torch.long, device=dev)
    for i, c in enumerate(chunks):
        ids[i, n - lens[i]:] = c.ids.to(dev)
    start = torch.tensor(starts, dtype=torch.long, device=dev)[:, None]
    # A padded input sits at its row's first position: it writes nowhere, reads its own row only, and its
    # output is dropped; a real position keeps learned position tables (GPT-2, OPT) in range.
    pos = start + (col - pad).clamp(min=0)                                    # [R, n]
    wpos = pos[valid]
    wrow = torch.arange(R, device=dev)[:, None].expand(R, n)[valid]
    attention = GatherAttention(kv, R, nb, pool.heads)
    step = paged_step.Step(kv, tbl[wrow, wpos // bt], wpos % bt, valid, attention,
                           attention.prepare(tbl, pos, nb * bt))
    with steering.active(_row_vectors(chunks), _recorders(chunks, lens, n)):
        logits = paged_step.forward(pool.module, ids, pos, step)               # [R, vocab]
    for c, k in zip(chunks, lens):
        c.table.length += k
    return logits


def _row_vectors(chunks: list[Chunk]) -> dict[int, torch.Tensor] | None:
    """{layer: [R, 1, hidden]}: each chunk's vector for the layers any chunk steers, zeros for the others
    (Note [Steering] in steering.py); None when no chunk steers."""
    layers = sorted({k for c in chunks for k in (c.steer or {})})
    if not layers:
        return None
    out = {}
    for k in layers:
        ref = next(c.steer[k] for c in chunks if c.steer and k in c.steer)
        out[k] = torch.stack([c.steer[k] if c.steer and k in c.steer else torch.zeros_like(ref)
                              for c in chunks])[:, None, :]
    return out


def _recorders(chunks: list[Chunk], lens: list[int], n: int) -> dict | None:
    """{layer: recorder} appending each recording chunk's real (unpadded, so last `len`) positions of the
    layer's output [R, n, hidden] to its list (Note [Recorded activations] in steering.py)."""
    layers = {k for c in chunks if c.record for k in c.record}
    if not layers:
        return None

    def recorder(k: int):
        def rec(h: torch.Tensor) -> None:
            for i, c in enumerate(chunks):
                if c.record and k in c.record:
                    c.record[k].append(h[i, n - lens[i]:].clone())
        return rec
    return {k: recorder(k) for k in layers}
