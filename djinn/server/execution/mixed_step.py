"""The mixed step: one forward that advances every decode row by a token and feeds prompt chunks.

Note [Mixed step]
    An engine turn used to run the batched decode step, then the turn's prompt chunks as a second
    forward (Note [Batched prefill] in prefill_step.py). Each forward reads every weight once, and on a
    13B model a decode step of 48 rows is mostly that read; while agents arrive, every decode step was
    followed by a prefill of up to `prefill_step_tokens`, so each running agent's token waited for both
    (exp1 on an H100: first turns' P99 at 4 s against a 1 s turn alone). Here, when a pool has live
    decode rows and this turn has chunks for it, both go into one forward, as vLLM's and Sarathi's
    chunked prefill do: the inputs are packed into one row [1, D + sum of chunk lengths] (the D decode
    rows' tokens first, then each chunk's), with every token's own position id; the model's own
    forward runs once (Note [One step for every architecture] in paged_step.py), each token's keys and
    values go to its own table's block at its position, and `PackedAttention` splits the queries
    back: the decode rows attend as the decode step does (the pool's attention over each row's
    blocks), each chunk as the batched prefill does (its row's blocks, causal from where it starts).
    Nothing else in a transformers layer mixes positions, so each token sees only its own sequence.
    Logits come back for the D decode tokens and each chunk's last token only (`logits_to_keep` as
    indices). The rows then sample as after a decode step, the chunks' tasks as after a prefill.

    Not mixed, and run as before: a pool whose rows steer or record (their per-slot buffers belong to
    the captured graphs), a chunk that steers or records, and a forward whose gathered keys and values
    would pass the plan's `prefill_gather_tokens` (the Stack reserve's workspace; flex reads the blocks
    in place and gathers nothing for the decode rows). The mixed forward runs eagerly: its prompt
    tokens make it compute-bound, so the host's launches are hidden behind it. Its numerics are the
    fast path's (Note [Fast path numerics]): equal to eager decode to rounding.
"""
from __future__ import annotations

import time

import torch

from . import paged_step
from .paged_attention import GatherAttention
from .prefill_step import Chunk


class PackedAttention:
    """The attention of a packed forward: the queries of each part attend with that part's attention."""

    def __init__(self, parts: list[tuple[object, object, int, int, bool]]):
        self.parts = parts  # (attention, its state, first query, end, one query per row?)

    def attend(self, q: torch.Tensor, layer: int, state, scale: float, window: int | None = None,
               softcap: float | None = None) -> torch.Tensor:
        """q [1, heads, T, dim] -> [1, heads, T, dim]."""
        outs = []
        for attention, st, a, b, rows in self.parts:
            part = q[:, :, a:b]
            if rows:  # the decode rows: [1, heads, D, dim] -> [D, heads, 1, dim] and back
                o = attention.attend(part[0].transpose(0, 1).unsqueeze(2), layer, st, scale, window, softcap)
                outs.append(o.squeeze(2).transpose(0, 1).unsqueeze(0))
            else:
                outs.append(attention.attend(part, layer, st, scale, window, softcap))
        return torch.cat(outs, dim=2)


def gathered_tokens(pool, chunks: list[Chunk]) -> int:
    """Positions the mixed forward would gather per layer: each chunk's row, and the decode rows' unless
    the pool's attention reads the blocks in place."""
    bt = pool.bt
    out = sum(-(-(c.table.length + c.ids.numel()) // bt) * bt for c in chunks)
    if pool.attention.length_buckets:  # the gather: every row over the longest row's length bucket
        out += len(pool.rows) * pool.length()
    return out


def can_mix(pool, chunks: list[Chunk], max_tokens: int, gather_tokens: int) -> bool:
    """Note [Mixed step]: what may go into one forward (prompt tokens within `max_tokens`, the prefill
    the Stack reserve was measured at)."""
    return (bool(chunks) and pool.mixable() and not any(c.steer or c.record for c in chunks)
            and sum(c.ids.numel() for c in chunks) <= max_tokens and gathered_tokens(pool, chunks) <= gather_tokens)


@torch.inference_mode()
def mixed(pool, chunks: list[Chunk]) -> torch.Tensor:
    """Step every decode row of `pool` and feed every chunk in one forward; the chunks' last tokens'
    logits [len(chunks), vocab] (the rows have sampled their next tokens)."""
    t0 = time.perf_counter()
    kv, dev, bt = pool.kv, pool.device, pool.bt
    ids_d, pos_d, tables_d, state_d = pool.decode_inputs()
    D = ids_d.numel()
    blk = [tables_d[torch.arange(D, device=dev), pos_d // bt]]
    off, ids, pos = [pos_d % bt], [ids_d], [pos_d]
    parts: list = [(pool.attention, state_d, 0, D, True)]
    at = D
    for c in chunks:
        a, n = c.table.length, c.ids.numel()
        pool.kv_pool.ensure_private(c.table, a, a + n)  # a block shared with another session is copied first
        nb = -(-(a + n) // bt)
        tbl = torch.tensor([c.table.rows[0][:nb]], dtype=torch.long, device=dev)          # [1, nb]
        p = torch.arange(a, a + n, device=dev)
        att = GatherAttention(kv, 1, nb, pool.heads)
        parts.append((att, att.prepare(tbl, p[None], nb * bt), at, at + n, False))
        blk.append(tbl[0, p // bt])
        off.append(p % bt)
        ids.append(c.ids.to(dev))
        pos.append(p)
        at += n
    keep = torch.tensor([*range(D), *(e - 1 for *_, e, _ in parts[1:])], dtype=torch.long, device=dev)
    step = paged_step.Step(kv, torch.cat(blk), torch.cat(off), None, PackedAttention(parts), None)
    logits = paged_step.forward(pool.module, torch.cat(ids)[None], torch.cat(pos)[None], step, keep)
    for c in chunks:
        c.table.length += c.ids.numel()
    pool.mixed_steps += 1
    pool.advance([r for r in pool.rows if not r.done], logits[:D])
    dt = time.perf_counter() - t0
    pool.step_s += dt
    pool.mixed_s += dt
    pool.mixed_tokens += sum(int(c.ids.numel()) for c in chunks)
    return logits[D:]
