"""The decode fast path: decode steps of any supported module-path causal LM (SUPPORTED_ARCHS) over an
engine-owned KV pool, batched across sessions and, on CUDA, replayed as CUDA graphs. The step is the
model's own forward with attention over the pool (paged_step.py, Note [One step for every architecture]).

Eager Hugging Face decode is bound by the host: one step launches hundreds of small kernels from
Python (BASELINES.md "Decode"). Here one step of every session that decodes with the same model is a
single batched call, and on CUDA that call is a captured graph per (batch bucket, length bucket).

Note [Decode pool]
    Each model that takes the fast path gets one `DecodePool`: the rows of its batched step. It owns
    no KV: every row reads and writes its session's blocks in the model's KV pool (djinn/vmu/kv_pool.py)
    through `tables[slot, j]`, the block id of the row's j-th block, so joining and leaving the batch
    copies a few block ids, never KV. Active rows are kept in slots 0..n-1 with no holes (a row that
    leaves has the last row's ids moved into its slot), and a step over n rows runs the graph of the
    buckets at or above n and the longest row (with flex attention one length bucket serves every
    row: Note [Flex over the pool] in paged_attention.py). Slots past n point at the scratch block (Note [Scratch
    block]): the step writes garbage there, never into a session's blocks. No row reads it either: a
    row's entries past its own blocks repeat its last block, so the masked positions of its length
    bucket hold only its own keys and values. (A masked position weighs 0, but 0 x NaN is NaN: a free
    slot's stale token whose forward is not finite would otherwise poison every row of the model
    through the scratch block.) CUDA graphs are captured on fixed addresses: the pool's tensor, the
    tables, ids and positions.

Note [Fast path and the session cache]
    The session's KV is its block table; the eager path (a PagedCache over the same table) prefills a
    call's new tokens, the row decodes into the blocks the dispatcher reserved for the call's new
    tokens, and leaving sets the table's length. As with HF generate, the table ends one token short of
    the sequence: the last token generated has not been fed.

Note [Length buckets]
    With the gather attention a step's work grows with its length bucket: every row's keys and values
    are gathered, padded to it, and read again by SDPA. Powers of two padded an agent's 2.1k-token
    context to 4096 positions, so at 25 rows of the 13B shape a step moved about twice the KV it needed
    (exp1 at N=48 on an H100: later turns' P99 2.45 s with the gather, 1.42 s with flex, which reads
    only a row's own pages). Past 1024 positions buckets therefore grow by LEN_STEP (512): at most
    512 positions of padding, at the price of more graphs to capture (11 length buckets instead of 7
    at max_len 4096). Flex needs no length buckets (`length_buckets = False`).

Note [Graph workspace]
    Every step graph is captured into one private memory pool. What a capture frees (the step's
    gathered keys and values, a few GiB at the largest bucket) stays in that pool and is reused by
    later captures, but only if it was there first: captured smallest first, each larger bucket adds
    new segments next to the old ones and the pool grows past the Stack reserve (an H100 ran out of
    memory that way). So the largest bucket is captured when the pool is made, and `capture_all`
    captures largest first; the Stack reserve (kv_pools.decode_rows) covers that one capture.

Note [One warm-up stream]
    cuBLAS keeps a workspace (32 MiB on an H100) for every stream it has run on, allocated through
    torch's allocator and never given back. A warm-up on a fresh side stream per captured bucket
    therefore left a workspace per bucket (torch hands out up to 32 pooled streams): about 1 GiB an
    H100 server held outside every segment (tier 3, e6e6b3a). One side stream per decode pool warms
    up every capture, and the warm-ups' cached activations go back to the device once the captures
    are done (fast_task.pool_for).

Note [Compiled step]
    With `fast_decode_compile`, the plain step (no steering or recording hooks) is the model's forward
    compiled by torch.compile (inductor), then captured as CUDA graphs like the eager one. In a graph
    no Python runs at replay, so what compiling buys is fewer, fused kernels: a 7B decode step at one
    row was about 1,300 kernels, most of them elementwise (RMSNorm's six, rotary's ten per layer), each
    a few microseconds on the device whatever its size, some 3 of its 8.4 ms on an H100. Dynamo traces
    the whole paged forward with no graph break (the thread-local step, the attention interface, the
    pool writes), batch and length symbolic, so one compile serves every bucket. Compiled numerics are
    the fast path's (Note [Overlapped steps]
    With `fast_decode_overlap` (off by default until measured on a GPU), a decode step does not wait
    for its tokens before the next step is launched (vLLM V1's async scheduling). Each row's token
    (the argmax, or a sampled row's draw from its own generator) stays on the device (`_next`, per
    slot) and feeds the next step's ids there; the host reads the tokens into pinned memory (two
    buffers, alternating) behind an event, with whether each sampled row's scores held a
    distribution (one that did not draws from a uniform one instead, never multinomial over NaN,
    and its request fails when the token is applied: Note [Scores are checked before sampling]).
    `step` launches step n, then applies step n-1's tokens (done on the device by then, or nearly),
    so the host's work for n-1 and the engine's turn around it (replies, requests, scheduling)
    overlap step n on the device. What the host must know before a launch it knows without the
    tokens: positions (`Row.ahead`: steps launched whose token is not applied yet), counts (a row
    whose in-flight step makes its last token is not launched again) and min_new_tokens (eos held
    back by count, at launch). Only eos is learned a step late: a row that sampled eos in step n-1
    has taken step n too, at the unfed position after its eos, harmless as a done row's token is. A
    row that is not launched but holds a slot feeds the last position of its reserved blocks, which
    no token of its generate reaches (its tokens end one short: Note [Fast path and the session
    cache]), so a stale step never writes a position the row's KV holds. Rows leave only after the
    step in flight was applied (`drop` drains first): the blocks it writes then belong to no one
    else yet. A step with a recording row and the mixed step (its decode rows' tokens come from the
    host) drain first and run as before. Tokens are those of plain steps (tested, greedy and seeded
    sampling, with eos, min_new_tokens, a late join, streams and cancels): the same ops over logits
    that differ at most by rounding, since an eos row stays in the batch one step longer and a
    batch's size changes its GEMMs' rounding, as any row joining or leaving does.

Note [Fast path numerics]
    The step is the model's own forward (paged_step.py), so only attention differs from HF's:
    FlexAttention's kernel over the row's blocks, or SDPA over the padded length bucket with a mask
    (djinn/server/execution/paged_attention.py; with a softcap, the eager arithmetic over the same gather).
    Results therefore match eager decode to rounding, not bitwise; `deterministic=True` asks for the
    eager path. Which architectures pass is tested, not assumed: tests/unit/test_paged_step.py compares
    logits and greedy tokens of every SUPPORTED_ARCHS model with HF's, and `paged_step.check` probes
    each model once before its first fast generate.
"""
from __future__ import annotations

import logging
import secrets
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

from ...protocol.errors import InvalidRequest
from . import paged_attention, paged_step, steering
from .sampling import check_scores, finite_rows, refused

log = logging.getLogger("djinn.fastpath")

#: Causal LMs of the module path whose paged forward gives HF generate's greedy tokens (tests/unit/
#: test_paged_step.py); the probe (paged_step.check) must pass too. Anything else decodes eagerly.
SUPPORTED_ARCHS = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                             "GPT2LMHeadModel", "GPTNeoXForCausalLM", "OPTForCausalLM", "PhiForCausalLM",
                             "Phi3ForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "FalconForCausalLM",
                             "GPTJForCausalLM", "StableLmForCausalLM", "CohereForCausalLM"})
#: Rotary embeddings that depend on the position only: a captured step's positions are data, and
#: "dynamic" or "longrope" recompute their frequencies from the length on the host.
STATIC_ROPE = frozenset({"default", "linear", "llama3"})
#: Position tables end at max_position_embeddings (GPT-2's n_positions, OPT's, GPT-J's rotary table).
LEARNED_POSITIONS = frozenset({"GPT2LMHeadModel", "OPTForCausalLM", "GPTJForCausalLM"})
#: The one decode and prefill step (stats' "step"): the model's own HF forward over paged attention.
STEP = "hf-paged"
#: generate() arguments the fast path implements; any other one sends the call to the eager path.
FAST_KWARGS = frozenset({"max_new_tokens", "min_new_tokens", "max_length", "do_sample", "temperature", "top_k",
                         "top_p", "eos_token_id", "pad_token_id", "use_cache"})
MIN_LEN_BUCKET = 64
#: Past 2 x LEN_STEP positions, length buckets grow by LEN_STEP (Note [Length buckets]).
LEN_STEP = 512


def heads_of(config) -> int:
    return int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 0))


def unsupported(module: torch.nn.Module, batch: int, kwargs: dict, total_len: int, max_len: int) -> str | None:
    """Why this generate cannot take the fast path (None: it can)."""
    why = model_unsupported(module)
    if why:
        return why
    if type(module).__name__ in LEARNED_POSITIONS and total_len > module.config.max_position_embeddings:
        return f"{total_len} tokens > its {module.config.max_position_embeddings} learned positions"
    if batch != 1:
        return f"input batch {batch} (the fast path batches sessions, one row each)"
    extra = sorted(set(kwargs) - FAST_KWARGS)
    if extra:
        return f"generate arguments {extra}"
    if kwargs.get("use_cache") is False:
        return "use_cache=False"
    if total_len > max_len:
        return f"{total_len} tokens > fast_decode_max_len {max_len}"
    return None


#: Logits processors generate applies when the model's generation_config sets them, which the fast path's
#: sampler does not implement: such a config sends every generate of the model to the eager path.
#: (The others generate reads are refused when a generation_config sets them: Note [Effective generate
#: arguments] in executor.py.)
CONFIG_EAGER = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_p": None, "typical_p": 1.0,
                "forced_eos_token_id": None, "forced_bos_token_id": None}


def config_unsupported(effective: dict, kwargs: dict) -> str | None:
    """Why the effective generate arguments (the call's over the generation_config) need the eager
    path: a processor the call did not ask for but the model's generation_config turns on."""
    for name, off in CONFIG_EAGER.items():
        v = effective.get(name, off)
        if name not in kwargs and v not in (off, None) and not (isinstance(v, (list, dict)) and not v):
            return f"the model's generation_config sets {name}={v!r}"
    return None


def why_eager(cfg, device: torch.device, module: torch.nn.Module, input_ids: torch.Tensor, kwargs: dict,
              prompt: int, deterministic: bool = False) -> str | None:
    """None if a generate of `input_ids` over a `prompt`-token context takes the fast path on this
    server, else why not: the server's fast_decode setting, deterministic=True, what the step does
    not do for this model and these arguments, or the model's generation_config."""
    from . import executor

    mode = cfg.fast_decode
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return f"fast_decode={mode} on {device.type}"
    if deterministic:
        return "deterministic=True"
    total = prompt + executor.new_tokens(module, prompt, kwargs)
    why = unsupported(module, int(input_ids.shape[0]), kwargs, total, cfg.fast_decode_max_len)
    return why or config_unsupported(executor.effective_kwargs(module, kwargs), kwargs)


_model_why: "weakref.WeakKeyDictionary[torch.nn.Module, str | None]" = weakref.WeakKeyDictionary()


def model_unsupported(module: torch.nn.Module) -> str | None:
    """Why no generate of this model can take the fast path (None: they can), decided once per model."""
    if module not in _model_why:
        _model_why[module] = _model_reason(module)
    return _model_why[module]


def _model_reason(module: torch.nn.Module) -> str | None:
    arch = type(module).__name__
    if arch not in SUPPORTED_ARCHS:
        return f"{arch} has no fast decode step"
    if getattr(module.config, "alibi", False):
        return "ALiBi position bias (Falcon alibi=True) is added through a dense mask the paged step does not build"
    ropes = {getattr(m, "rope_type", None) for m in module.modules() if hasattr(m, "rope_type")}
    if ropes - STATIC_ROPE:
        return f"rope type {sorted(ropes - STATIC_ROPE, key=str)[0]!r} changes with the length"
    why = paged_step.check(module)
    return f"{arch}: {why}" if why else None


def _bucket(n: int, cap: int, floor: int = 1) -> int:
    b = floor
    while b < n:
        b *= 2
    return min(b, cap)


def length_bucket(n: int, cap: int) -> int:
    """The padded length a step over rows whose longest has `n` positions runs at (Note [Length
    buckets]): powers of two up to 2 x LEN_STEP, then multiples of LEN_STEP, at most `cap`."""
    if n <= 2 * LEN_STEP:
        return _bucket(n, cap, MIN_LEN_BUCKET)
    return min(cap, -(-n // LEN_STEP) * LEN_STEP)


def length_buckets(cap: int) -> list[int]:
    """Every value `length_bucket` takes below `cap` (a power of two), ascending."""
    out, n = [], MIN_LEN_BUCKET
    while n < min(cap, 2 * LEN_STEP):
        out.append(n)
        n *= 2
    while n < cap:
        out.append(n)
        n += LEN_STEP
    return out + [cap]


@dataclass
class Sampler:
    """One session's sampling settings (HF defaults from the model's generation config)."""

    do_sample: bool
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    @classmethod
    def build(cls, module: torch.nn.Module, kwargs: dict, seed: int | None, device: torch.device) -> "Sampler":
        gc = module.generation_config

        def pick(name, default):
            v = kwargs.get(name)
            if v is None:
                v = getattr(gc, name, None)
            return default if v is None else v

        s = cls(bool(pick("do_sample", False)), float(pick("temperature", 1.0)), int(pick("top_k", 0)),
                float(pick("top_p", 1.0)))
        if s.do_sample:
            # Note [Random streams] in rng.py: unseeded, from the OS, so no one else's seed decides it.
            s.generator = torch.Generator(device)
            s.generator.manual_seed(seed if seed is not None else secrets.randbits(64))
        return s

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Next token ids [rows] from logits [rows, vocab]."""
        if not self.do_sample:
            return logits.argmax(-1)
        scores = self.scores(logits)
        check_scores(scores)  # Note [Scores are checked before sampling]
        return self.draw(scores)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """The sampling scores [rows, vocab]: temperature, top-k and top-p applied (nothing is read back)."""
        scores = logits.float() / max(self.temperature, 1e-5)
        if self.top_k and self.top_k < scores.shape[-1]:
            kth = torch.topk(scores, self.top_k, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
            cum = sorted_scores.softmax(-1).cumsum(-1)
            drop = cum <= (1 - self.top_p)
            drop[..., -1:] = False
            scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        return scores

    def draw(self, scores: torch.Tensor) -> torch.Tensor:
        """Token ids [rows] drawn from checked scores, from this session's own generator (on the device)."""
        return torch.multinomial(scores.softmax(-1), 1, generator=self.generator).squeeze(-1)


@dataclass
class Row:
    """One session's generate while it holds a pool slot."""

    token: int                   # the next token to feed
    pos: int                     # its position (= tokens already in the slot's KV)
    start: int                   # the slot's KV length when it joined (copied from the session cache)
    remaining: int               # tokens still to generate
    sampler: Sampler
    eos: frozenset
    on_token: Callable[[int], None] | None = None
    ban_eos: int = 0             # steps in which eos may not be sampled yet (min_new_tokens, as HF does)
    new: list = field(default_factory=list)  # tokens generated in the pool (the prefill's first excluded)
    slot: int = -1
    done: bool = False
    error: InvalidRequest | None = None  # its scores could not be sampled: it ends, the other rows go on
    steer: dict | None = None    # {layer: vector [hidden]} added to that layer's output (Note [Steering])
    record: dict | None = None   # {layer: list}: each fed position's output appended (Note [Recorded activations])
    ahead: int = 0               # steps launched whose token is not applied yet (Note [Overlapped steps])
    eos_index: torch.Tensor | None = None  # its eos ids on the device, for min_new_tokens (made when it joins)
    cap: int = 0                 # positions its blocks hold (set when it joins)


@dataclass
class _Flight:
    """A launched step whose tokens the host has not applied (Note [Overlapped steps])."""

    rows: list                   # (row, its slot at launch)
    host: torch.Tensor           # the step's tokens, landing in pinned memory
    event: object                # recorded after the copy (None on the CPU: the copy is done)


class DecodePool:
    """The batched decode step of one model (Note [Decode pool]): its rows and captured step graphs."""

    def __init__(self, module: torch.nn.Module, kv_pool, rows: int, max_len: int, graphs: bool | None = None,
                 attention: str = "auto", compile: bool = False, overlap: bool = False):
        self.module, self.kv_pool = module, kv_pool
        self.device = kv_pool.device
        self.head_dim, self.kv_heads = kv_pool.shape.head_dim, kv_pool.shape.kv_heads
        self.heads = heads_of(module.config) or self.kv_heads
        self.dtype = next(module.parameters()).dtype
        self.bt = kv_pool.block_tokens
        self.max_len = _bucket(max_len, 1 << 30, MIN_LEN_BUCKET)  # a power of two: buckets tile it
        self.slots = int(rows)
        if self.slots < 1:
            raise ValueError(f"a decode pool needs at least one row, got {rows}")
        self.kv = kv_pool.kv                                        # [layers, k|v, blocks, bt, heads, dim]
        width = -(-self.max_len // self.bt)
        self.tables = torch.zeros(self.slots, width, dtype=torch.long, device=self.device)  # 0: scratch
        self.ids = torch.zeros(self.slots, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(self.slots, dtype=torch.long, device=self.device)
        self.rows: list[Row] = []
        self.attention_kind = paged_attention.choose(attention, self.device)
        self.attention = paged_attention.make(self.attention_kind, self.kv, self.slots, width, self.heads)
        self.use_graphs = self.device.type == "cuda" if graphs is None else graphs
        # (batch, length, steered layers, recorded layers) -> graph and its logits (Notes [Steering],
        # [Recorded activations] in steering.py)
        self._graphs: dict[tuple[int, int, frozenset, frozenset], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.steer: dict[int, torch.Tensor] = {}  # layer -> [slots, 1, hidden]: each slot's vector or zeros
        self.rec: dict[int, torch.Tensor] = {}    # layer -> [slots, hidden]: each slot's last output there
        self._mempool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._side = torch.cuda.Stream(self.device) if self.use_graphs else None  # Note [One warm-up stream]
        # Note [Compiled step]: batch and length symbolic, so one compile serves every bucket
        self._compiled = torch.compile(self._step_body, dynamic=True) if compile else None
        self.compile_error: str | None = None  # why a compiled step fell back (it then stays uncompiled)
        self._compile_checked: set[tuple[int, int]] = set()  # buckets whose compiled step matched eager
        self.steps = 0
        self.rows_stepped = 0
        self.capture_s = 0.0   # seconds spent capturing step graphs, all buckets together
        self.step_s = 0.0      # host seconds inside step(), its reads of the tokens included
        self.mixed_steps = 0   # steps taken in a forward with prompt chunks (Note [Mixed step])
        # Where a turn's time goes: host seconds of the mixed forwards (part of step_s) and of the batched
        # prefills (fast_task.fast_turn, up to their first tokens' read), and the prompt tokens each fed.
        self.mixed_s, self.mixed_tokens = 0.0, 0
        self.prefill_s, self.prefill_tokens = 0.0, 0
        # Note [Overlapped steps]
        self.overlap = overlap
        self.overlapped = 0    # steps launched before the previous step's tokens were read
        self._next = torch.zeros(self.slots, dtype=torch.long, device=self.device)
        pin = self.device.type == "cuda"
        # each step's tokens and whether each row's scores could be sampled (Note [Scores are checked before sampling])
        self._landing = [torch.zeros(2, self.slots, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        # A copy from pageable memory waits for the stream, the step in flight included: each launch's
        # ids, positions and ahead flags go through pinned memory, one of two by the step's parity (the
        # one a launch writes was last read two steps ago, before the event the host then waited on).
        self._staging = [torch.zeros(3, self.slots, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self._ahead = torch.zeros(self.slots, dtype=torch.bool, device=self.device)
        self._tables_host = torch.zeros(self.slots, width, dtype=torch.long, pin_memory=pin)
        self._flight: _Flight | None = None

    def buffers(self) -> list[torch.Tensor]:
        """The step's own device tensors: row tables, ids, positions, steering and recording rows, the
        attention's index tables. The pool's KV and the graphs' private pool are counted on their own
        (Note [Device memory agrees] in djinn/vmu/device_memory.py)."""
        out = [self.tables, self.ids, self.pos, *self.steer.values(), *self.rec.values()]
        return out + [v for v in vars(self.attention).values() if isinstance(v, torch.Tensor) and v is not self.kv]

    def free_slots(self) -> int:
        return self.slots - len(self.rows)

    # -- rows join and leave ------------------------------------------------------------------------
    def join(self, row: Row, table) -> None:
        """Point the next slot at the table's blocks (reserved up to the row's last position)."""
        assert len(self.rows) < self.slots and table.batch == 1
        if self.kv_pool.blocks_for(row.start + row.remaining) > len(table.rows[0]):
            raise RuntimeError("a fast-path row joined with fewer blocks than its tokens need")
        row.slot = len(self.rows)
        ids = table.rows[0]
        row.cap = len(ids) * self.bt
        if row.ban_eos and row.eos:
            self._eos_index(row)  # now, with the join's own copies, not inside a step
        # never the scratch block (Note [Decode pool]); through the slot's pinned row, so a join while a
        # step is in flight does not wait for it (Note [Overlapped steps]): the slot's last copy from
        # there preceded the step its last row was applied in
        staged = self._tables_host[row.slot]
        staged.fill_(ids[-1])
        staged[:len(ids)] = torch.tensor(ids, dtype=torch.long)
        self.tables[row.slot].copy_(staged, non_blocking=True)
        if row.steer:
            for k, v in row.steer.items():
                if k not in self.steer:
                    self.steer[k] = torch.zeros(self.slots, 1, v.numel(), dtype=self.dtype, device=self.device)
        for k in row.record or ():
            if k not in self.rec:
                self.rec[k] = torch.zeros(self.slots, steering.hidden_size(self.module), dtype=self.dtype, device=self.device)
        for k, buf in self.steer.items():
            if row.steer and k in row.steer:
                buf[row.slot, 0].copy_(row.steer[k])
            else:
                buf[row.slot].zero_()
        self.rows.append(row)

    def leave(self, row: Row, table) -> None:
        """The row's KV is in its blocks up to its position: the table says so; its slot is given up."""
        table.length = row.pos
        self.drop(row)

    def drop(self, row: Row) -> None:
        """Give the slot up; the last row moves into it, and the freed slot points at scratch again."""
        if row not in self.rows:
            return
        self.drain()  # Note [Overlapped steps]: the step in flight may still write into its blocks
        last = self.rows[-1]
        if last is not row:
            self.tables[row.slot].copy_(self.tables[last.slot])
            for buf in self.steer.values():
                buf[row.slot].copy_(buf[last.slot])
            self._next[row.slot].copy_(self._next[last.slot])
            last.slot, self.rows[row.slot] = row.slot, last
        self.rows.pop()
        self.tables[len(self.rows)].zero_()
        for buf in self.steer.values():
            buf[len(self.rows)].zero_()
        self.pos[len(self.rows)] = 0
        row.slot = -1

    # -- one step for every row ----------------------------------------------------------------------
    def step(self) -> None:
        """Feed every row its token, sample its next one; rows that are finished are marked done. With
        overlap, a greedy batch's tokens are applied a step later (Note [Overlapped steps])."""
        rows = [r for r in self.rows if not r.done]
        if not rows and self._flight is None:
            return
        t0 = time.perf_counter()
        try:
            if self.overlap and rows and all(self._overlappable(r) for r in rows):
                self._step_ahead(rows)
            else:
                self.drain()
                rows = [r for r in self.rows if not r.done]
                if rows:
                    self._step(rows)
        finally:
            self.step_s += time.perf_counter() - t0

    def _hold_eos(self, logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
        """The logits with eos out of reach of the rows still under min_new_tokens (HF's
        MinNewTokensLengthLogitsProcessor), each of which spends one step of its count."""
        banned = [r for r in rows if r.ban_eos > 0 and r.eos]
        if banned:
            logits = logits.clone()
            for r in banned:
                logits[r.slot, self._eos_index(r)] = float("-inf")
                r.ban_eos -= 1
        return logits

    def _eos_index(self, r: Row) -> torch.Tensor:
        """The row's eos ids on the device, made once: an index built from a list each step is a copy
        from pageable memory, which waits for the step in flight (Note [Overlapped steps])."""
        if r.eos_index is None:
            r.eos_index = torch.tensor(sorted(r.eos), dtype=torch.long, device=self.device)
        return r.eos_index

    @staticmethod
    def _overlappable(r: Row) -> bool:
        return not r.record  # a recording row appends its activations as its tokens are applied

    def _step_ahead(self, rows: list[Row]) -> None:
        """Note [Overlapped steps]: launch the next step from the device's tokens, then apply the last."""
        go = [r for r in rows if r.remaining - r.ahead > 0]
        if not go:
            self.drain()
            return
        going = {id(r) for r in go}
        n = len(self.rows)
        pos = [r.pos + r.ahead if id(r) in going else r.cap - 1 for r in self.rows]
        B = _bucket(n, self.slots)
        L = self.length(pos)
        stage = self._staging[self.steps % 2]
        stage[:, :n] = torch.tensor([[r.token for r in self.rows], pos, [int(r.ahead > 0) for r in self.rows]],
                                    dtype=torch.long)
        self.ids[:n].copy_(stage[0, :n], non_blocking=True)
        self.pos[:n].copy_(stage[1, :n], non_blocking=True)
        if self._flight is not None:
            self._ahead[:n].copy_(stage[2, :n], non_blocking=True)
            self.ids[:n] = torch.where(self._ahead[:n], self._next[:n], self.ids[:n])
        layers = frozenset(k for r in self.rows if r.steer for k in r.steer)
        logits = self._run(B, L, layers, frozenset())[:n]
        toks, ok = self._draw(logits, go)
        self._next[:n].copy_(toks)
        host = self._landing[self.steps % 2]
        host[0, :n].copy_(toks, non_blocking=True)
        host[1, :n].copy_(ok, non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        if self._flight is not None:
            self.overlapped += 1
        self.drain()  # the previous step's tokens: done on the device by now, or nearly
        for r in go:
            r.ahead += 1
        self.steps += 1
        self.rows_stepped += len(go)
        self._flight = _Flight([(r, r.slot) for r in go], host, event)

    def _draw(self, logits: torch.Tensor, go: list[Row]) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [n], sampleable [n]) of a launched step, on the device, nothing read back: the ops of
        `advance` and `_next_tokens`, with eos held back by count (min_new_tokens) at launch, and a
        sampled row whose scores hold no distribution drawing from a uniform one instead (its row fails
        when its token is applied: Note [Scores are checked before sampling])."""
        logits = self._hold_eos(logits, go)
        toks = logits.argmax(-1)
        ok = torch.ones(logits.shape[0], dtype=torch.long, device=logits.device)
        sampled = [r for r in go if r.sampler.do_sample]
        if sampled:
            scores = torch.cat([r.sampler.scores(logits[r.slot:r.slot + 1]) for r in sampled])
            good = finite_rows(scores)
            scores = torch.where(good[:, None], scores, torch.zeros_like(scores))
            for i, r in enumerate(sampled):
                toks[r.slot] = r.sampler.draw(scores[i:i + 1])[0]
                ok[r.slot] = good[i]
        return toks, ok

    def drain(self) -> None:
        """Apply the step in flight's tokens (Note [Overlapped steps]); nothing when none is."""
        f, self._flight = self._flight, None
        if f is None:
            return
        if f.event is not None:
            f.event.synchronize()
        toks, oks = f.host.tolist()
        for r, slot in f.rows:
            r.ahead -= 1
            if r.done:
                continue
            if not oks[slot]:  # its scores could not be sampled: its request only
                r.error, r.done = refused([0]), True
                continue
            self._apply(r, toks[slot])

    def _apply(self, r: Row, tok: int) -> None:
        r.pos += 1
        r.token = tok
        r.new.append(tok)
        r.remaining -= 1
        if r.on_token is not None:
            r.on_token(tok)
        if r.remaining <= 0 or tok in r.eos:
            r.done = True

    def length(self, pos: list[int] | None = None) -> int:
        """The positions this step's attention spans: the longest row's length bucket with the gather,
        the pool's max_len with flex (Note [Length buckets]). `pos`: the rows' fed positions, where they
        are not their own (Note [Overlapped steps])."""
        longest = max(pos if pos is not None else [r.pos for r in self.rows]) + 1
        return length_bucket(longest, self.max_len) if self.attention.length_buckets else self.max_len

    def _step(self, rows: list[Row]) -> None:
        n = len(self.rows)
        B = _bucket(n, self.slots)
        L = self.length()
        # One host-to-device copy each for tokens and positions (done rows still in a slot feed a
        # harmless token at their position), one device-to-host copy for every greedy row's token.
        self.ids[:n].copy_(torch.tensor([r.token for r in self.rows], dtype=torch.long))
        self.pos[:n].copy_(torch.tensor([r.pos for r in self.rows], dtype=torch.long))
        layers = frozenset(k for r in self.rows if r.steer for k in r.steer)
        recorded = frozenset(k for r in rows if r.record for k in r.record)
        logits = self._run(B, L, layers, recorded)[:n]
        for r in rows:  # Note [Recorded activations]: the step wrote every slot's output; keep this row's
            for k, got in (r.record or {}).items():
                got.append(self.rec[k][r.slot:r.slot + 1].clone())
        self.advance(rows, logits)

    def mixable(self) -> bool:
        """Whether this step's rows can go into a mixed forward with prompt chunks (Note [Mixed step] in
        mixed_step.py): none steers or records (their per-slot buffers live in the graphs)."""
        return any(not r.done for r in self.rows) and not any(r.steer or r.record for r in self.rows)

    def decode_inputs(self):
        """(ids [n], pos [n], tables [n, nb], attention state) of every slot's row for a forward outside
        the captured graphs: the mixed step's decode part (Note [Mixed step])."""
        n, L = len(self.rows), self.length()
        ids = torch.tensor([r.token for r in self.rows], dtype=torch.long).to(self.device)
        pos = torch.tensor([r.pos for r in self.rows], dtype=torch.long).to(self.device)
        nb = -(-L // self.bt)
        tables = self.tables[:n, :nb]
        return ids, pos, tables, self.attention.prepare(tables, pos, L)

    def advance(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Each live row samples its next token from its slot's logits [slots in use, vocab]."""
        toks = self._next_tokens(self._hold_eos(logits, rows), rows)
        self.steps += 1
        self.rows_stepped += len(rows)
        for r in rows:
            tok = toks.get(r.slot)
            if tok is None:  # its scores could not be sampled: its request only (Note [Scores are checked
                r.error, r.done = refused([0]), True            # before sampling]): its one row
                continue
            self._apply(r, tok)

    def _next_tokens(self, logits: torch.Tensor, rows: list[Row]) -> dict[int, int]:
        """slot -> next token of every row; a sampled row whose scores are not finite is left out. Two
        reads from the device whatever the number of rows (Note [One read per step]): each sampled row's
        scores and draw stay on the device (its own generator), their finiteness comes back in one read,
        and every row's token in another."""
        sampled = [r for r in rows if r.sampler.do_sample]
        if not sampled:
            return dict(enumerate(logits.argmax(-1).tolist()))
        scores = [r.sampler.scores(logits[r.slot:r.slot + 1]) for r in sampled]
        ok = finite_rows(torch.cat(scores)).tolist()
        out = logits.argmax(-1)
        for r, s, good in zip(sampled, scores, ok):
            if good:
                out[r.slot] = r.sampler.draw(s)[0]
        toks = out.tolist()
        bad = {r.slot for r, good in zip(sampled, ok) if not good}
        return {r.slot: toks[r.slot] for r in rows if r.slot not in bad}

    def _run(self, B: int, L: int, layers: frozenset = frozenset(), recorded: frozenset = frozenset()) -> torch.Tensor:
        if not self.use_graphs:
            return self._forward(B, L, layers, recorded)
        key = (B, L, layers, recorded)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(*key)
        graph, out = entry
        graph.replay()
        return out

    def buckets(self) -> list[tuple[int, int]]:
        """Every (batch, length) bucket a step can use: batches in powers of two up to the slots, lengths
        as `length_bucket` rounds them (Note [Length buckets])."""
        bs, b = [], 1
        while b < self.slots:
            bs.append(b)
            b *= 2
        bs.append(self.slots)
        ls = length_buckets(self.max_len) if self.attention.length_buckets else [self.max_len]
        return [(B, L) for B in bs for L in ls]

    def capture_all(self) -> int:
        """Capture every bucket's step graph now (fast_decode_capture=all), so no step waits on a capture.
        Only on an empty pool: the warm-up steps write KV (into the scratch block, where every free slot
        points). Largest first (Note [Graph workspace])."""
        if not self.use_graphs:
            return 0
        if self.rows:
            raise RuntimeError("capture_all needs an empty pool (its warm-up steps write into every slot)")
        todo = sorted((k for k in ((B, L, frozenset(), frozenset()) for B, L in self.buckets()) if k not in self._graphs),
                      key=lambda k: -k[0] * k[1])
        self.ids.zero_()
        self.pos.zero_()
        for key in todo:
            self._graphs[key] = self._capture(*key)
        return len(todo)

    def reserve_workspace(self) -> None:
        """Capture the largest bucket's graph now, on the empty pool (Note [Graph workspace])."""
        key = (self.slots, self.max_len, frozenset(), frozenset())
        if self.use_graphs and not self.rows and key not in self._graphs:
            self.ids.zero_()
            self.pos.zero_()
            self._graphs[key] = self._capture(*key)

    def _capture(self, B: int, L: int, layers: frozenset = frozenset(), recorded: frozenset = frozenset()):
        t0 = time.perf_counter()
        # Warm-up steps write the same KV the real step writes (same ids and positions): harmless.
        side = self._side
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(B, L, layers, recorded)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._mempool, capture_error_mode="thread_local"):
            out = self._forward(B, L, layers, recorded)
        torch.cuda.synchronize(self.device)
        self.capture_s += time.perf_counter() - t0
        log.info("captured a decode step graph: batch %d, length %d%s%s", B, L,
                 f", steering layers {sorted(layers)}" if layers else "",
                 f", recording layers {sorted(recorded)}" if recorded else "")
        return graph, out

    def _forward(self, B: int, L: int, layers: frozenset = frozenset(), recorded: frozenset = frozenset()) -> torch.Tensor:
        """One decode step for slots 0..B-1 over positions 0..L-1; logits [B, vocab] (Note [Compiled
        step]: compiled where asked, for the plain step)."""
        if self._compiled is not None and not layers and not recorded:
            capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
            try:
                with torch.no_grad():  # inference mode and a compiled in-place write of the pool do not mix
                    out = self._compiled(B, L)
            except Exception as e:  # a compiler failing on this machine: step uncompiled from now on
                if capturing:
                    raise  # not a compile (that happens in the warm-ups before a capture)
                self._uncompile(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}")
                return self._eager(B, L, layers, recorded)
            if capturing or (B, L) in self._compile_checked:
                return out
            # Note [Compiled step is checked]: the eager step of the same inputs (it writes the same KV)
            want = self._eager(B, L, layers, recorded)
            err = (out.float() - want.float()).abs().max().item() / (want.float().abs().max().item() + 1)
            if err <= (1e-4 if self.dtype == torch.float32 else 3e-2):
                self._compile_checked.add((B, L))
                return out
            self._uncompile(f"the compiled step differs from the eager step by {err:.3g} (relative) "
                            f"at batch {B}, length {L}")
            return want
        return self._eager(B, L, layers, recorded)

    def _uncompile(self, why: str) -> None:
        """Step uncompiled from now on; `stats()` says why. Graphs captured from the compiled step go too."""
        self._compiled, self.compile_error = None, why
        for key in [k for k in self._graphs if not k[2] and not k[3]]:
            del self._graphs[key]
        log.warning("the compiled decode step is off, stepping uncompiled: %s", why)

    @torch.inference_mode()
    def _eager(self, B: int, L: int, layers: frozenset = frozenset(), recorded: frozenset = frozenset()) -> torch.Tensor:
        return self._step_body(B, L, layers, recorded)

    def _step_body(self, B: int, L: int, layers: frozenset = frozenset(), recorded: frozenset = frozenset()) -> torch.Tensor:
        """The model's own forward (Note [One step for every architecture] in paged_step.py)."""
        ids, pos = self.ids[:B], self.pos[:B]
        nb = -(-L // self.bt)
        rows = torch.arange(B, device=self.device)
        blk = self.tables[rows, pos // self.bt]                                # [B] block of each row's token
        step = paged_step.Step(self.kv, blk, pos % self.bt, None, self.attention,
                               self.attention.prepare(self.tables[:B, :nb], pos, L))
        recorders = {k: (lambda h, buf=self.rec[k]: buf[:h.shape[0]].copy_(h[:, -1])) for k in recorded}
        with steering.active({k: self.steer[k][:B] for k in layers}, recorders):
            return paged_step.forward(self.module, ids[:, None], pos[:, None], step)

    def stats(self) -> dict:
        return {"path": "fast", "step": STEP, "slots": self.slots, "rows": len(self.rows), "max_len": self.max_len,
                "attention": self.attention_kind, "compiled": self._compiled is not None,
                "compile_error": self.compile_error,
                "graphs": sorted((B, L) for B, L, ls, rs in self._graphs if not ls and not rs),
                # graphs with steering or recording hooks: (batch, length, steered layers, recorded layers)
                "hooked_graphs": sorted((B, L, sorted(ls), sorted(rs)) for B, L, ls, rs in self._graphs if ls or rs),
                "capture_s": round(self.capture_s, 3), "step_s": round(self.step_s, 6), "steps": self.steps, "mixed_steps": self.mixed_steps, "rows_stepped": self.rows_stepped,
                "mixed_s": round(self.mixed_s, 6), "mixed_tokens": self.mixed_tokens,
                "prefill_s": round(self.prefill_s, 6), "prefill_tokens": self.prefill_tokens,
                "overlap": self.overlap, "overlapped_steps": self.overlapped}
