"""A model's KV pool: the Data segment's fixed-size blocks on the device, and the tables into them.

DESIGN.md section 3. One pool per model that keeps KV, allocated once (kv_pools.py sizes it) as one
tensor `kv[layer, k|v, block, block_tokens, kv_head, head_dim]` (Note [Pool layout]). Every KV path
(the eager module path through `PagedCache`, the batched decode step, breakpoints, checkpoints,
swap) reads and writes these blocks; nothing else holds KV.

Note [Pool layout]
    Layer-major: one layer's keys (or values) of every block are one contiguous tensor
    `kv[i, 0]` [blocks, bt, kv_heads, dim], so the decode step's FlexAttention reads a layer's blocks
    in place through a plain block table (djinn/server/execution/paged_attention.py). The block-major layout
    this replaced (a block's bytes of every layer in one run) made the only flat view FlexAttention
    can take span the whole pool, and past 2^31 elements (a few GB) its kernel does not compile in
    torch 2.11 (`OSDI_Evaluation/micro/flex_probe.py` on an H100). A block's bytes are now 2 x layers
    separate runs, which swap gathers first (Note [Staged swap]).

Note [Staged swap]
    Copied straight to the host, a block is 2 x layers small copies (160 KiB each on the 13B shape):
    on an H100 blocks scattered over the pool moved at 28.6 GB/s that way, half the link's 55
    (`micro/results/swap_h100_layer_major.json`). So swap goes through a staging buffer on the device
    (`stage_bytes`, 256 MiB, in the Stack reserve): a chunk of up to `stage_blocks` of the table's
    blocks is gathered into it by device-side copies (one strided copy per run of consecutive ids),
    then crosses the link as one contiguous copy; a swap-in copies each chunk in and scatters it out.
    The host copy is therefore a sequence of chunks, chunk c holding blocks c*S.. of the table laid
    out [layers, k|v, blocks, bt, kv_heads, dim] (`host_chunks`). Every copy of a swap runs in order on
    the swapper's one stream, so one staging buffer serves swap-outs and swap-ins alike: a chunk's
    gather never overwrites the buffer before the copy that reads it has run.

Note [Block tables]
    A `KVTable` is one session's KV for one model: per batch row, the block ids covering positions
    0..capacity-1 (position p lives in block rows[r][p // block_tokens] at offset p % block_tokens),
    and `length`, the positions written so far (the same for every row, as in an HF cache). Blocks
    past `length` are reserved (admission reserved them for the tokens a request may add) and not yet
    written; `trim` gives them back. The table is the only writer of its rows; the pool owns the ids'
    lifetimes through its allocator (Note [Block ref counts] in blocks.py).

Note [Scratch block]
    Block 0 is never handed out. The batched decode step runs fixed-shape CUDA graphs over bucketed
    batches: slots past the live rows point at block 0, so the step's writes for them land there.

Note [Blocks start zeroed]
    The batched decode step attends over whole length buckets and masks the positions past each row:
    a masked position weighs 0, but 0 x NaN is NaN, so a block must never hold bits that are not a
    finite number. The pool is `torch.empty` (on the CPU its pages are committed only when written),
    so the scratch block is zeroed at start and every block is zeroed when it is handed out; after
    that a block only ever holds keys and values some forward computed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .blocks import BlockAllocator, chain_key

SCRATCH = 0
#: The device buffer swap gathers blocks into before they cross the link (Note [Staged swap]).
STAGE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class KVShape:
    """What one model's KV looks like: from its config and dtype (`of_module`)."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def of_module(cls, module: torch.nn.Module) -> "KVShape":
        cfg = module.config
        cfg = getattr(cfg, "get_text_config", lambda: cfg)()
        layers = int(getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "n_layer", 0))
        heads = int(getattr(cfg, "num_attention_heads", 0) or getattr(cfg, "n_head", 0))
        if getattr(cfg, "is_encoder_decoder", False):
            # The blocks hold the decoder's self-attention KV only (Note [Encoder-decoder generate] in
            # server/execution/executor.py); an encoder-decoder's num_hidden_layers and heads are often the
            # encoder's (T5 num_layers, BART encoder_layers).
            layers = int(getattr(cfg, "num_decoder_layers", None) or getattr(cfg, "decoder_layers", None) or layers)
            heads = int(getattr(cfg, "decoder_attention_heads", None) or heads)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        if getattr(cfg, "multi_query", False) and not getattr(cfg, "new_decoder_architecture", False):
            kv_heads = 1  # Falcon-7B style multi-query attention
        hidden = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0))
        head_dim = int(getattr(cfg, "head_dim", None) or hidden // max(heads, 1))
        dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
        if not (layers and kv_heads and head_dim):
            raise ValueError(f"{type(module).__name__}: cannot read layers/heads/head_dim from its config")
        # A module sharded over tp workers holds its share of the heads (Note [Tensor-parallel sessions]).
        kv_heads //= int(getattr(module, "_djinn_tp", None) or 1)
        return cls(layers, kv_heads, head_dim, dtype)

    @property
    def token_bytes(self) -> int:
        """KV bytes of one token: every layer, keys and values."""
        return self.layers * 2 * self.kv_heads * self.head_dim * self.dtype.itemsize


@dataclass
class KVTable:
    """Note [Block tables]."""

    rows: list[list[int]]
    length: int = 0
    _dev: torch.Tensor | None = field(default=None, repr=False)  # rows as a device tensor, rebuilt on change

    @property
    def batch(self) -> int:
        return len(self.rows)

    @property
    def blocks(self) -> int:
        return sum(len(r) for r in self.rows)

    def ids(self) -> list[int]:
        return [b for r in self.rows for b in r]

    def changed(self) -> None:
        self._dev = None


class KVPool:
    def __init__(self, shape: KVShape, num_blocks: int, block_tokens: int, device: torch.device):
        if num_blocks < 2:
            raise ValueError(f"a KV pool needs at least 2 blocks (one is scratch), got {num_blocks}")
        self.shape, self.block_tokens, self.device = shape, block_tokens, torch.device(device)
        self.alloc = BlockAllocator(num_blocks, reserved=1)  # Note [Scratch block]
        # torch.empty: on the CPU untouched pages cost nothing; nothing reads a block before writing it.
        self.kv = torch.empty(shape.layers, 2, num_blocks, block_tokens, shape.kv_heads, shape.head_dim,
                              dtype=shape.dtype, device=self.device)  # [layers, k|v, blocks, bt, heads, dim]
        self.block(SCRATCH).zero_()  # Note [Blocks start zeroed]
        self.cow_copies = 0
        self.stage_blocks = max(1, min(num_blocks, STAGE_BYTES // max(1, self.block_bytes)))
        self._stage: torch.Tensor | None = None  # made at the first swap (Note [Staged swap])

    # -- the layout (Note [Pool layout]) -----------------------------------------------------------
    def block(self, b: int) -> torch.Tensor:
        """Block b of every layer: a view [layers, k|v, bt, kv_heads, head_dim]."""
        return self.kv[:, :, b]

    def layer(self, i: int, kv: int) -> torch.Tensor:
        """Layer i's keys (kv=0) or values (kv=1) of every block: a contiguous [blocks, bt, kv_heads, dim]."""
        return self.kv[i, kv]

    def copy_pairs(self, region: torch.Tensor, ids: list[int], to_host: bool) -> tuple[list, list]:
        """(dsts, srcs), in the order they must run, copying a table's blocks `ids` to (to_host) or
        from `region`, a session's flat host copy (`host_chunks`), through the staging buffer (Note
        [Staged swap])."""
        dsts, srcs = [], []
        for j, k, host in self.host_chunks(region, len(ids)):
            stage = self._staging()[:host.numel()].view(host.shape)
            runs = self.runs(ids[j:j + k])
            if to_host:
                for r, b, n in runs:
                    dsts.append(stage[:, :, r:r + n])
                    srcs.append(self.kv[:, :, b:b + n])
                dsts.append(host)
                srcs.append(stage)
            else:
                dsts.append(stage)
                srcs.append(host)
                for r, b, n in runs:
                    dsts.append(self.kv[:, :, b:b + n])
                    srcs.append(stage[:, :, r:r + n])
        return dsts, srcs

    def host_chunks(self, region: torch.Tensor, blocks: int) -> list[tuple[int, int, torch.Tensor]]:
        """(first block, blocks, view [layers, k|v, blocks, bt, kv_heads, dim]) of each chunk of a flat
        host copy of `blocks` blocks (Note [Staged swap])."""
        out, at, per = [], 0, self.block_bytes // self.kv.element_size()
        for j in range(0, blocks, self.stage_blocks):
            k = min(self.stage_blocks, blocks - j)
            out.append((j, k, region[at:at + k * per].view(self.shape.layers, 2, k, *self.kv.shape[3:])))
            at += k * per
        return out

    def host_blocks(self, region: torch.Tensor, blocks: int) -> torch.Tensor:
        """A flat host copy of `blocks` blocks as one CPU tensor [layers, k|v, blocks, bt, ...]."""
        return torch.cat([v for _, _, v in self.host_chunks(region, blocks)], dim=2)

    def _staging(self) -> torch.Tensor:
        if self._stage is None:
            self._stage = torch.empty(self.stage_blocks * self.block_bytes // self.kv.element_size(),
                                      dtype=self.kv.dtype, device=self.device)
        return self._stage

    # -- sizes -------------------------------------------------------------------------------------
    @property
    def block_bytes(self) -> int:
        return self.block_tokens * self.shape.token_bytes

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def staging(self) -> list[torch.Tensor]:
        """The swap staging buffer, once the first swap made it (Note [Staged swap]): the pool's one
        device tensor besides its blocks (Note [Device memory agrees] in device_memory.py)."""
        return [] if self._stage is None else [self._stage]

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_tokens)

    def bytes_for(self, tokens: int, batch: int = 1) -> int:
        """Device bytes a table of `batch` rows of `tokens` positions holds."""
        return batch * self.blocks_for(tokens) * self.block_bytes

    # -- tables ------------------------------------------------------------------------------------
    def new_table(self, batch: int) -> KVTable:
        return KVTable([[] for _ in range(batch)])

    def reserve(self, table: KVTable, tokens: int) -> bool:
        """Give every row blocks for `tokens` positions. False (nothing taken) when the pool has too few."""
        want = self.blocks_for(tokens)
        missing = sum(max(0, want - len(r)) for r in table.rows)
        if missing == 0:
            return True
        got = self.alloc.allocate(missing)
        if got is None:
            return False
        self.kv.index_fill_(2, torch.tensor(got, dtype=torch.long).to(self.device), 0)  # Note [Blocks start zeroed]
        got.reverse()  # ascending ids in each row: consecutive ids coalesce into one swap copy
        for r in table.rows:
            while len(r) < want:
                r.append(got.pop())
        table.changed()
        return True

    def trim(self, table: KVTable, keep_tokens: int = 0) -> int:
        """Release the blocks past `length` (reserved, never written), keeping at least `keep_tokens`
        positions' worth (a declared budget); returns how many were released."""
        keep = self.blocks_for(max(table.length, keep_tokens))
        extra = [b for r in table.rows for b in r[keep:]]
        if extra:
            for r in table.rows:
                del r[keep:]
            self.alloc.release(extra)
            table.changed()
        return len(extra)

    def release(self, table: KVTable) -> None:
        """Give every block back; the table is empty afterwards (length kept: the caller decides)."""
        ids = table.ids()
        for r in table.rows:
            r.clear()
        if ids:
            self.alloc.release(ids)
        table.changed()

    def fork(self, table: KVTable) -> KVTable:
        """A new table sharing every written block (copy on write, Note [Block ref counts])."""
        keep = self.blocks_for(table.length)
        rows = [list(r[:keep]) for r in table.rows]
        self.alloc.incref([b for r in rows for b in r])
        return KVTable(rows, table.length)

    def ensure_private(self, table: KVTable, start: int, end: int) -> None:
        """Before writing positions [start, end): copy every block there that another table shares."""
        first, last = start // self.block_tokens, self.blocks_for(end)
        for r in table.rows:
            for j in range(first, min(last, len(r))):
                b = r[j]
                if self.alloc.refcount(b) > 1 or self.alloc.key_of(b) is not None:
                    if self.alloc.refcount(b) == 1:
                        self.alloc.unpublish(b)  # only this table holds it: write in place, forget its key
                        continue
                    (nb,) = self.alloc.allocate(1) or self._no_block()  # fully overwritten: no zeroing
                    self.block(nb).copy_(self.block(b))
                    self.alloc.release([b])
                    r[j] = nb
                    self.cow_copies += 1
                    table.changed()

    def _no_block(self):
        from ..protocol.errors import OutOfMemory

        raise OutOfMemory("copy on write found no free KV block (the request reserved too few)")

    # -- prefix sharing (Note [Prefix keys] in blocks.py) ---------------------------------------------
    def share_prefix(self, table: KVTable, ids: list[int], limit: int) -> int:
        """Point an empty one-row table at the cached blocks holding the longest run of full blocks of
        `ids[:limit]`; returns the tokens it now holds (a multiple of block_tokens, maybe 0)."""
        assert table.batch == 1 and not table.rows[0] and table.length == 0, "share_prefix needs an empty table"
        key, got = None, []
        bt = self.block_tokens
        for j in range(limit // bt):
            key = chain_key(key, ids[j * bt:(j + 1) * bt])
            b = self.alloc.lookup(key)
            if b is None:
                break
            got.append(b)
        if got:
            table.rows[0].extend(got)
            table.length = len(got) * bt
            table.changed()
        return table.length

    def publish(self, table: KVTable, ids: list[int], upto: int) -> None:
        """Key the table's full blocks within ids[:upto] (their KV is final) so later tables can share them."""
        if table.batch != 1:
            return
        key, bt, row = None, self.block_tokens, table.rows[0]
        for j in range(min(upto, table.length, len(ids)) // bt):
            key = chain_key(key, ids[j * bt:(j + 1) * bt])
            if j < len(row):
                self.alloc.publish(row[j], key)

    # -- reads and writes ----------------------------------------------------------------------------
    def device_rows(self, table: KVTable) -> torch.Tensor:
        """The table's rows as a [batch, blocks] long tensor on the device (cached until it changes)."""
        if table._dev is None:
            width = max((len(r) for r in table.rows), default=0)
            rows = [r + [SCRATCH] * (width - len(r)) for r in table.rows]
            table._dev = torch.tensor(rows, dtype=torch.long).to(self.device)
        return table._dev

    def write(self, table: KVTable, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """Store k, v [batch, kv_heads, n, dim] at positions start..start+n-1 of every row."""
        n = k.shape[-2]
        if self.blocks_for(start + n) > min(len(r) for r in table.rows):
            raise RuntimeError(f"KV write of positions {start}..{start + n - 1} past the table's reserved "
                               f"{min(len(r) for r in table.rows) * self.block_tokens} (admission reserves them)")
        pos = torch.arange(start, start + n, device=self.device)                  # [n]
        blk = self.device_rows(table)[:, pos // self.block_tokens]                # [batch, n]
        off = (pos % self.block_tokens).expand_as(blk)                             # [batch, n]
        self.kv[layer, 0][blk, off] = k.transpose(1, 2).to(self.shape.dtype)      # [batch, n, heads, dim]
        self.kv[layer, 1][blk, off] = v.transpose(1, 2).to(self.shape.dtype)

    def read(self, table: KVTable, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions 0..length-1: two contiguous [batch, kv_heads, length, dim] tensors."""
        nb = self.blocks_for(length)
        idx = self.device_rows(table)[:, :nb]                                      # [batch, nb]
        out = []
        for kv in (0, 1):
            g = self.kv[layer, kv][idx]                                            # [batch, nb, bt, heads, dim]
            g = g.reshape(idx.shape[0], nb * self.block_tokens, *g.shape[-2:])[:, :length]
            out.append(g.transpose(1, 2).contiguous())                             # [batch, heads, length, dim]
        return out[0], out[1]

    def runs(self, ids: list[int]) -> list[tuple[int, int, int]]:
        """(position in `ids`, first block, count) for each run of consecutive ids: one copy each."""
        out: list[tuple[int, int, int]] = []
        for i, b in enumerate(ids):
            if out and out[-1][1] + out[-1][2] == b:
                j, first, n = out[-1]
                out[-1] = (j, first, n + 1)
            else:
                out.append((i, b, 1))
        return out

    def stats(self) -> dict:
        a = self.alloc
        return {"block_tokens": self.block_tokens, "block_bytes": self.block_bytes, "blocks_total": a.total,
                "blocks_free": a.free, "blocks_cached": a.cached, "blocks_held": a.held,
                "bytes": self.nbytes, "prefix_hits": a.hits, "evictions": a.evictions, "cow_copies": self.cow_copies}
