"""Sizing a model's KV pool: Text, Stack and Data on one device (DESIGN.md section 3).

When a model first needs KV (its first generate, KV-keeping forward or run), the VMU measures the
largest step it will admit and gives what is left of the device to the model's Data segment as a pool
of fixed-size blocks, allocated once (djinn/vmu/kv_pool.py).

Note [Stack reserve]
    On CUDA the Stack reserve is measured, as vLLM's profile run does: a forward of one prefill chunk
    of `max_prefill_tokens` tokens with no cache, its peak allocation over the memory in use before
    it; plus what the paged cache adds to a prefill (each layer gathers its keys and values: two
    copies of one layer's KV for the chunk), plus the batched decode step's workspace (with the gather
    attention each layer copies the batch's keys and values; flex needs only its index tables:
    `paged_attention.workspace_bytes`), plus swap's staging buffer (Note [Staged swap] in
    djinn/vmu/kv_pool.py), plus `stack_margin_gb` for the CUDA
    context's own allocations, cuBLAS workspaces and allocator rounding. The pool gets what the device
    has free after that. A request larger than the measured chunk is refused (max_prefill_tokens), so
    a request never allocates past the reserve: running out of KV blocks is a scheduling decision,
    never a CUDA out-of-memory.
    On the CPU nothing is measured: the pool is `data_budget_gb` or 2 GiB, of which only the pages
    written are ever committed.

Note [Profile inputs]
    The profile prefill must be a request the server would admit, or it measures nothing real and, worse,
    reaches a kernel no validated request reaches: one row of 4096 tokens through a GPT-2 whose learned
    position table has 1024 (or a tiny one's 256) rows indexed past the table, a device-side assert on
    CUDA that ended the worker and every tenant's sessions (an H100 run at 06e4d93: the first generate of
    any model with a position table). So its `max_prefill_tokens` come as rows no longer than the model's
    position limit (validate.limits_of: learned tables and fixed sin/cos buffers), token ids below its
    embedding's rows, and the inputs an encoder-decoder or Whisper needs (decoder ids within the decoder's
    table; whole windows of audio features).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from ...vmu.kv_pool import STAGE_BYTES, KVPool, KVShape
from . import executor, paged_attention, validate

log = logging.getLogger("djinn.kv_pools")

GIB = 1 << 30
CPU_POOL_BYTES = 2 * GIB


def cpu_pool_bytes(cfg) -> int:
    """A model's KV pool on the CPU: the data budget, else a fixed 2 GiB (nothing is measured there)."""
    return int(cfg.data_budget_gb * GIB) if cfg.data_budget_gb is not None else CPU_POOL_BYTES


#: Rows a batched decode step holds at most, whatever its workspace allows.
MAX_DECODE_ROWS = 64
#: The batched decode step's workspace budget when fast_decode_max_batch is not set.
DECODE_WORKSPACE = 4 * GIB
#: The batched prefill's gather workspace (Note [Batched prefill] in prefill_step.py).
PREFILL_WORKSPACE = 2 * GIB


@dataclass(frozen=True)
class PoolPlan:
    """How one model's pool was sized (kept for `djinn.stats()`)."""

    blocks: int
    block_tokens: int
    pool_bytes: int
    stack_reserve: int      # bytes left free for activations (Note [Stack reserve]); 0 on the CPU
    profile_peak: int       # the measured prefill's peak, bytes
    decode_rows: int        # rows of the batched decode step
    prefill_gather_tokens: int  # padded positions one batched prefill may gather (Note [Batched prefill])
    attention: str              # the decode step's attention (djinn/server/execution/paged_attention.py)
    attention_fallback: str | None  # why auto did not get flex (Note [Flex is checked]); None: it did
    free_before: int        # device bytes free (incl. the allocator's cache) before the pool
    seconds: float

    def as_dict(self) -> dict:
        return dict(vars(self))


def decode_rows(cfg, shape: KVShape, heads: int, attention: str) -> int:
    """Rows of the batched decode step: as configured, else as many as its workspace allows. Flex
    attention reads the blocks in place (djinn/server/execution/paged_attention.py): its rows cost a few index
    tables, so it takes the most rows; the gather copies a row's KV per layer."""
    if cfg.fast_decode_max_batch is not None:
        return cfg.fast_decode_max_batch
    if attention == "flex":
        return MAX_DECODE_ROWS
    row = paged_attention.workspace_bytes("gather", 0, shape.layers, shape.kv_heads, shape.head_dim,
                                          shape.dtype.itemsize, heads, 1, cfg.fast_decode_max_len)
    return max(1, min(MAX_DECODE_ROWS, DECODE_WORKSPACE // row))


def _longest(max_len: int) -> int:
    """The longest row of a decode pool for fast_decode_max_len `max_len` (DecodePool rounds it up)."""
    from .fastpath import MIN_LEN_BUCKET, _bucket

    return _bucket(max_len, 1 << 30, MIN_LEN_BUCKET)


def pool_for(engine, entry) -> KVPool:
    """The model's pool, made (and the device sized) on first use."""
    pool = engine.data.pools.get(entry.model_id)
    if pool is not None:
        return pool
    t0 = time.perf_counter()
    cfg, device, module = engine.cfg, engine.device, entry.module
    shape = KVShape.of_module(module)
    heads = int(getattr(module.config, "num_attention_heads", 0) or shape.kv_heads)
    attention, fallback = (paged_attention.choose(cfg.fast_decode_attention, device), None)
    if cfg.fast_decode != "off":
        most = cfg.kv_pool_max_tokens * shape.token_bytes  # the largest pool this model could get
        if cfg.data_budget_gb is not None:
            most = min(most, int(cfg.data_budget_gb * GIB))
        if device.type == "cuda":
            most = min(most, torch.cuda.mem_get_info(device)[1])
        if attention == "flex":  # a sliding window or softcap only the gather does
            fallback = paged_attention.gather_only(module.config, _longest(cfg.fast_decode_max_len))
        attention, fallback = ("gather", fallback) if fallback else paged_attention.resolve(
            cfg.fast_decode_attention, device, shape.layers, shape.kv_heads, shape.head_dim, shape.dtype, heads, most)
        if fallback:
            log.warning("%s: decode attention falls back to the gather: %s", type(module).__name__, fallback)
    rows = decode_rows(cfg, shape, heads, attention)
    block_bytes = cfg.kv_block_tokens * shape.token_bytes
    cap = cfg.kv_pool_max_tokens * shape.token_bytes
    stack = peak = free = 0  # nothing is measured on the CPU (Note [Stack reserve])
    if device.type != "cuda":
        budget = cpu_pool_bytes(cfg)
    else:
        peak = _profile(module, device, cfg.max_prefill_tokens)
        gather = 4 * cfg.max_prefill_tokens * shape.kv_heads * shape.head_dim * shape.dtype.itemsize
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        ws = 0 if cfg.fast_decode == "off" else paged_attention.workspace_bytes(
            attention, free // block_bytes + 1, shape.layers, shape.kv_heads, shape.head_dim, shape.dtype.itemsize,
            heads, rows, cfg.fast_decode_max_len)
        stack = peak + gather + ws + STAGE_BYTES + int(cfg.stack_margin_gb * GIB)
        if cfg.fast_decode != "off":
            stack += PREFILL_WORKSPACE
        budget = free - stack
        if cfg.data_budget_gb is not None:
            budget = min(budget, int(cfg.data_budget_gb * GIB))
    blocks = max(0, min(budget, cap)) // block_bytes + 1  # + the scratch block
    if blocks < 2:
        from ...protocol.errors import OutOfMemory

        raise OutOfMemory(f"no room for a KV pool of {type(module).__name__}: {budget / GIB:.2f} GiB left after "
                          f"the weights and a Stack reserve of {stack / GIB:.2f} GiB; one block is "
                          f"{block_bytes / 2**20:.2f} MiB (lower max_prefill_tokens or fast_decode_max_batch)")
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the profile's activations go back before the pool takes its share
    pool = KVPool(shape, blocks, cfg.kv_block_tokens, device)
    per_token = paged_attention.workspace_bytes("gather", 0, shape.layers, shape.kv_heads, shape.head_dim,
                                                shape.dtype.itemsize, heads, 1, 1)
    gather_tokens = max(2 * cfg.max_prefill_tokens, PREFILL_WORKSPACE // per_token)
    plan = PoolPlan(blocks, cfg.kv_block_tokens, pool.nbytes, stack, peak, rows, gather_tokens, attention,
                    fallback, free, round(time.perf_counter() - t0, 3))
    pool.plan = plan
    engine.data.add_pool(entry.model_id, pool)
    log.info("KV pool for %s: %d blocks of %d tokens (%.2f GiB); stack reserve %.2f GiB (prefill peak %.2f GiB)",
             type(module).__name__, blocks - 1, cfg.kv_block_tokens, pool.nbytes / GIB, plan.stack_reserve / GIB,
             plan.profile_peak / GIB)
    return pool


def _profile(module: torch.nn.Module, device: torch.device, tokens: int) -> int:
    """Peak bytes a cache-less prefill of `tokens` tokens allocates (Note [Stack reserve])."""
    inputs = profile_inputs(module, tokens, device)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():  # full logits: a client's forward returns them all
        module(**inputs, use_cache=False)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del inputs
    return int(peak)


def profile_inputs(module: torch.nn.Module, tokens: int, device: torch.device | str = "cpu") -> dict:
    """The profile prefill's inputs: `tokens` tokens as the largest request the server admits would
    feed them (Note [Profile inputs])."""
    lim = validate.limits_of(module)
    vocab = lim.vocab or int(getattr(module.config, "vocab_size", 2) or 2)
    length = min(tokens, lim.positions) if lim.positions else tokens
    rows = -(-tokens // length)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, length), generator=g).to(device)
    if executor.takes_features(module):  # Whisper: whole windows of audio, decoder ids within its table
        cfg = module.config
        rows = max(1, tokens // cfg.max_source_positions)  # as check_prefill counts the encoder's positions
        feats = torch.randn(rows, cfg.num_mel_bins, 2 * cfg.max_source_positions, generator=g)
        dec = torch.randint(0, lim.decoder_vocab or vocab, (rows, min(length, cfg.max_target_positions)),
                            generator=g).to(device)
        return {"input_features": feats.to(device, next(module.parameters()).dtype), "decoder_input_ids": dec}
    if getattr(module.config, "is_encoder_decoder", False):
        return {"input_ids": ids, "decoder_input_ids": ids % (lim.decoder_vocab or vocab)}
    return {"input_ids": ids}
