"""A generate on the decode fast path, as a dispatcher task (the StepTask interface).

The task first prefills the call's new tokens eagerly into the state's blocks (through its
PagedCache), a chunk per engine turn as the turn's `PrefillBudget` allows (Note [Chunked prefill]),
and samples the first token; it then waits for a row of the model's decode pool, and from then on the
pool's batched step (run once per engine turn by the dispatcher, before the tasks advance) produces its
tokens into the same blocks. When its row is done the table's length is set and the task ends (Note
[Fast path and the session cache] in fastpath.py). Everything runs on the engine thread: there is no
worker thread to hand off to.

Note [Chunked prefill]
    A 2k-token prompt is a forward of tens to hundreds of milliseconds on a 13B model; run whole, it
    stalls every session that decodes on the same GPU for that long, and several arriving together
    stall them for the sum. So each engine turn runs at most `prefill_step_tokens` tokens of pending
    prefills (the dispatcher's `PrefillBudget`, handed out to prefilling tasks in the order they
    started, so prompts finish first come first served) and then every decoding row takes its step:
    a long prompt delays the others' next token by at most one chunk, as vLLM's chunked prefill does
    with its per-step token budget. The chunk and the decode rows run as two forwards of one turn, not
    one fused forward (the decode step is a captured graph over fixed shapes). A prompt continues from
    the table's length, so a chunk is exactly a forward over a PagedCache that already holds the
    chunks before it.

    The budget trades the others' next-token delay against prefill throughput: every chunk is
    followed by a decode step, so small chunks spend the device on decode steps while prompts queue.
    Measured on an H100 (exp1, Llama-2-13B shape, 48 agents of 2k tokens arriving 4 a second,
    `results/exp1_h100_chunked512_signal.json`): with 512-token chunks each 512 tokens of prefill
    paid for a 25-row decode step at 2k context, prefill fell behind the arrivals and P99 turn
    latency rose from 5.4 s (whole prompts in one turn) to 15.1 s. The default is therefore 2048: one
    2k prompt per turn, close to the unchunked throughput, and no pile of whole prompts in one turn.
"""
from __future__ import annotations

import logging
import time
import traceback
from typing import Any, Callable

import torch

from ..sessions import KVState
from .fastpath import DecodePool, Row, Sampler
from .kv_pools import pool_for as kv_pool_for
from .mixed_step import can_mix, mixed
from .prefill_step import Chunk, groups, prefill
from .tasks import Cancelled


log = logging.getLogger("djinn.fastpath")


def pool_for(engine, entry) -> DecodePool:
    """The model's decode pool, made on first use (Note [Decode pool]).

    Note [Batched streaming]
        A model that streams its weights (djinn/server/models/streaming.py) pays one pass of its
        streamed layers through the ring per forward, at the host link's rate: 0.2-0.3 s a token for a
        13B shape at a 12 GiB budget on an H100. Decoded session by session, N sessions got 1/N of the
        link each. On the fast path every row of the pool takes its step in one forward, so one pass
        serves them all (FlexGen's batching over offloaded weights), and the mixed step (Note [Mixed
        step]) feeds prompt chunks on the same pass. The ring's hooks wait for each layer's copy on the
        host side, which a CUDA graph cannot capture: the step runs eagerly, where its launches hide
        behind the copies anyway."""
    pool = getattr(entry, "fast", None)
    if pool is None:
        cfg = engine.cfg
        kv = kv_pool_for(engine, entry)
        # Note [Batched streaming]: a streamed model's step waits on its ring's copies from the host, which
        # no CUDA graph can hold; its step runs eagerly, every row on each pass of the weights.
        # A tensor-parallel model's step holds collectives: eager too (Note [Tensor-parallel decode]).
        plain = getattr(entry, "streamed", None) is None and not getattr(entry, "tp", None)
        pool = DecodePool(entry.module, kv, kv.plan.decode_rows, cfg.fast_decode_max_len,
                          graphs=None if cfg.fast_decode_graphs and plain else False, attention=kv.plan.attention,
                          compile=cfg.fast_decode_compile and plain, overlap=cfg.fast_decode_overlap and plain)
        if cfg.fast_decode_capture == "all":
            n = pool.capture_all()
            log.info("fast path for %s: captured %d step graphs in %.1f s", type(entry.module).__name__, n,
                     pool.capture_s)
        else:
            pool.reserve_workspace()  # Note [Graph workspace]
        if pool.device.type == "cuda":
            torch.cuda.empty_cache()  # the warm-ups' cached activations (Note [One warm-up stream])
        entry.fast = pool
    return pool


class PrefillBudget:
    """Prompt tokens the current engine turn may still prefill (Note [Chunked prefill])."""

    def __init__(self, per_turn: int):
        if per_turn < 1:
            raise ValueError(f"a prefill budget needs at least one token per turn, got {per_turn}")
        self.per_turn = per_turn
        self.left = per_turn
        self.turns = 0        # turns that prefilled something
        self.chunks = 0       # forwards run under the budget
        self._used = False

    def new_turn(self) -> None:
        self.turns += self._used
        self.left, self._used = self.per_turn, False

    def take(self, want: int) -> int:
        """Up to `want` tokens of this turn's budget (0: none left, wait for the next turn)."""
        n = min(want, self.left)
        if n > 0:
            self.left -= n
            self.chunks += 1
            self._used = True
        return n


class FastTask:
    def __init__(self, pool: DecodePool, state: KVState, input_ids: torch.Tensor, kwargs: dict,
                 seed: int | None, on_tokens: Callable[[torch.Tensor], None] | None, max_new: int,
                 budget: PrefillBudget, continues: bool = True, steer: dict | None = None,
                 record: dict | None = None, finish: Callable[[torch.Tensor], dict] | None = None):
        self.pool, self.state, self.continues = pool, state, continues
        self.steer = steer or None    # Note [Steering] in steering.py
        self.record = record or None  # Note [Recorded activations] in steering.py
        self.finish = finish or (lambda out: {"sequences": out.cpu()})  # the reply, from the whole sequence
        self.input_ids, self.kwargs, self.seed = input_ids, kwargs, seed
        self.on_tokens, self.max_new, self.budget = on_tokens, max_new, budget
        self.done = False
        self.steps = 0
        self.result: Any = None
        self.error: BaseException | None = None
        self.error_traceback: str | None = None
        self.path = "fast"
        self.row: Row | None = None
        self._full: torch.Tensor | None = None
        self._first: int | None = None
        self._before = state.table.length

    # -- the StepTask interface -------------------------------------------------------------------
    def advance(self) -> bool:
        if self.done:
            return True
        try:
            if self._first is None:
                self._prefill()
            elif self.row is None:
                self._try_join()
            elif self.row.done:
                self._finish()
            self.steps = len(self.row.new) if self.row is not None else 0
        except BaseException as e:  # handed to the engine, which replies with it
            self.fail(e, traceback.format_exc())
        return self.done

    def cancel(self) -> None:
        if not self.done:
            self.fail(Cancelled(), None)

    # -- phases -------------------------------------------------------------------------------------
    def wants_prefill(self) -> bool:
        return not self.done and self._first is None

    def take_chunk(self) -> Chunk | None:
        """This turn's chunk of the prompt, as the turn's budget allows (None: it is spent)."""
        state = self.state
        if self._full is None:
            full = torch.cat([state.ids, self.input_ids], dim=1) if self.continues else self.input_ids
            if full.shape[1] <= state.table.length:
                from ...protocol.errors import InvalidRequest

                raise InvalidRequest("generate has no new token to feed: its input is empty and the cache holds them all")
            self._full = full
        a = state.table.length
        n = self.budget.take(self._full.shape[1] - a)
        if n == 0:
            return None  # this turn's prefill budget is spent: the decode rows go first (Note [Chunked prefill])
        return Chunk(state.table, self._full[0, a:a + n], self.steer, self.record)

    def prefilled(self, logits: torch.Tensor) -> None:
        """A chunk went in; `logits` [1, vocab] are its last token's. Once the whole prompt is in, the
        first token is sampled and the row joins the pool."""
        if self.state.table.length < self._full.shape[1]:
            return
        module, full = self.pool.module, self._full
        self.sampler = Sampler.build(module, self.kwargs, self.seed, full.device)
        gc = module.generation_config
        eos = self.kwargs.get("eos_token_id", gc.eos_token_id)
        self.eos = frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)
        self.min_new = int(self.kwargs.get("min_new_tokens") or 0)
        if self.min_new > 0 and self.eos:  # HF's MinNewTokensLengthLogitsProcessor
            logits = logits.clone()
            logits[:, list(self.eos)] = float("-inf")
        first = int(self.sampler(logits)[0])
        self._first = first
        self._emit(first)
        if self.max_new <= 1 or first in self.eos:
            self._end([])
            return
        self._try_join()

    def _prefill(self) -> None:
        chunk = self.take_chunk()
        if chunk is not None:
            self.prefilled(prefill(self.pool, [chunk]))

    def _try_join(self) -> None:
        if self.pool.free_slots() == 0:
            return  # every slot is taken: wait for a row to leave (next turn)
        n = self._full.shape[1]
        self.row = Row(self._first, n, n, self.max_new - 1, self.sampler, self.eos, on_token=self._emit,
                       ban_eos=max(0, self.min_new - 1), steer=self.steer, record=self.record)
        self.pool.join(self.row, self.state.table)

    def _finish(self) -> None:
        if self.row.error is not None:
            raise self.row.error  # fail() drops the row and gives back what the call wrote
        self.pool.leave(self.row, self.state.table)
        self._end(self.row.new)

    def _end(self, tokens: list[int]) -> None:
        new = torch.tensor([[self._first, *tokens]], dtype=torch.long, device=self._full.device)
        out = torch.cat([self._full, new], dim=1)
        self.state.ids = out
        self.result = self.finish(out)
        self.done = True

    def _emit(self, token: int) -> None:
        if self.on_tokens is not None:
            self.on_tokens(torch.tensor([token]))

    def fail(self, e: BaseException, tb: str | None) -> None:
        if self.row is not None:
            self.pool.drop(self.row)
        # Positions from _before on belong to a call that did not happen; the KV before them is intact.
        self.state.cache.abort_forward()
        self.state.table.length = self._before
        self.error, self.error_traceback, self.done = e, tb, True


def fast_turn(tasks: list, max_tokens: int) -> None:
    """One engine turn of the fast path: per model pool, its decode rows take a step and this turn's
    prompt chunks go in (Note [Chunked prefill]), in one forward where they can (Note [Mixed step] in
    mixed_step.py), else the decode step and then the chunks as batched prefills (Note [Batched
    prefill] in prefill_step.py), first started first. A failure fails the tasks of its forward only."""
    fast = [t for t in tasks if isinstance(t, FastTask)]
    stepping = {id(t.pool): t.pool for t in fast if t.row is not None}
    chunks = _take_chunks(fast)
    for key, pool in stepping.items():
        items = chunks.get(key, (pool, []))[1]
        if items:
            pool.drain()  # a mixed step feeds its decode rows' tokens from the host (Note [Overlapped steps])
        mine = [t for t in fast if t.pool is pool and t.row is not None]
        group = [c for _, c in items]
        if can_mix(pool, group, max_tokens, _gather(pool, max_tokens)):
            del chunks[key]
            try:
                logits = mixed(pool, group)
            except BaseException as e:  # every row and chunk of this forward
                tb = traceback.format_exc()
                for t in (*mine, *(t for t, _ in items)):
                    t.fail(e, tb)
                continue
            _prefilled([t for t, _ in items], logits)
            continue
        try:
            pool.step()
        except Exception as e:  # fails the rows of this pool only (e.g. out of memory capturing a graph)
            tb = traceback.format_exc()
            for t in mine:
                t.fail(e, tb)
    for pool, items in chunks.values():
        owner = {id(c): t for t, c in items}
        for group in groups([c for _, c in items], pool.bt, _gather(pool, max_tokens), max_tokens):
            ts = [owner[id(c)] for c in group]
            t0 = time.perf_counter()
            try:
                logits = prefill(pool, group)
            except BaseException as e:  # e.g. a NaN-free check or a device error: every row of this forward
                tb = traceback.format_exc()
                for t in ts:
                    t.fail(e, tb)
                continue
            _prefilled(ts, logits)
            pool.prefill_s += time.perf_counter() - t0
            pool.prefill_tokens += sum(int(c.ids.shape[0]) for c in group)


def _take_chunks(tasks: list) -> dict[int, tuple[DecodePool, list]]:
    """This turn's chunk of every prefilling task, by pool, first started first."""
    by_pool: dict[int, tuple[DecodePool, list]] = {}
    for t in tasks:
        if not t.wants_prefill():
            continue
        try:
            chunk = t.take_chunk()
        except BaseException as e:
            t.fail(e, traceback.format_exc())
            continue
        if chunk is not None:
            by_pool.setdefault(id(t.pool), (t.pool, []))[1].append((t, chunk))
    return by_pool


def _gather(pool: DecodePool, max_tokens: int) -> int:
    plan = getattr(pool.kv_pool, "plan", None)
    return plan.prefill_gather_tokens if plan is not None else 2 * max_tokens


def _prefilled(tasks: list, logits: torch.Tensor) -> None:
    for i, t in enumerate(tasks):
        try:
            t.prefilled(logits[i:i + 1])
        except BaseException as e:  # its own sampling (Note [Scores are checked before sampling])
            t.fail(e, traceback.format_exc())
