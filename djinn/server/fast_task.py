"""A generate on the decode fast path, as a dispatcher task (the StepTask interface).

The first `advance` prefills the call's new tokens eagerly into the session's cache and samples the
first token; the task then waits for a pool slot, and from then on the pool's batched step (run once
per engine turn by the dispatcher, before the tasks advance) produces its tokens. When its row is done
the task copies the new KV back to the session cache and ends (Note [Fast path and the session cache]
in fastpath.py). Everything runs on the engine thread: there is no worker thread to hand off to.
"""
from __future__ import annotations

import logging
import traceback
from typing import Any, Callable

import torch

from .fastpath import DecodePool, Row, Sampler
from .sessions import KVState
from .tasks import Cancelled


log = logging.getLogger("djinn.fastpath")

#: Rows an automatically sized pool holds at most.
AUTO_SLOTS = 64


def pool_for(engine, entry) -> DecodePool:
    """The model's pool, made on first use (Note [Decode pool]). Raises ValueError when not even one
    row fits (the generate then runs eagerly)."""
    pool = getattr(entry, "fast", None)
    if pool is None:
        cfg = engine.cfg
        pool = DecodePool(entry.module, engine.device, pool_bytes(engine, entry.module), cfg.fast_decode_max_len,
                          graphs=None if cfg.fast_decode_graphs else False)
        if cfg.fast_decode_capture == "all":
            n = pool.capture_all()
            log.info("fast path for %s: captured %d step graphs in %.1f s", type(entry.module).__name__, n,
                     pool.capture_s)
        entry.fast = pool
    return pool


def pool_bytes(engine, module) -> int:
    """fast_decode_pool_gb, or by default a quarter of the device's free memory (1 GiB on the CPU),
    at most AUTO_SLOTS rows."""
    cfg = engine.cfg
    if cfg.fast_decode_pool_gb is not None:
        return int(cfg.fast_decode_pool_gb * 2**30)
    if engine.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(engine.device)
        budget = free // 4
    else:
        budget = 1 << 30
    return min(budget, AUTO_SLOTS * DecodePool.slot_bytes(module, cfg.fast_decode_max_len))


class FastTask:
    def __init__(self, pool: DecodePool, session, model_id: str, input_ids: torch.Tensor, kwargs: dict,
                 seed: int | None, on_tokens: Callable[[torch.Tensor], None] | None, max_new: int):
        self.pool, self.session, self.model_id = pool, session, model_id
        self.input_ids, self.kwargs, self.seed = input_ids, kwargs, seed
        self.on_tokens, self.max_new = on_tokens, max_new
        self.done = False
        self.steps = 0
        self.result: Any = None
        self.error: BaseException | None = None
        self.error_traceback: str | None = None
        self.path = "fast"
        self.row: Row | None = None
        self._state: KVState | None = None
        self._full: torch.Tensor | None = None
        self._first: int | None = None
        self._before = 0

    # -- the StepTask interface -------------------------------------------------------------------
    def advance(self) -> bool:
        if self.done:
            return True
        try:
            if self._full is None:
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
    def _prefill(self) -> None:
        from transformers import DynamicCache

        module, s = self.pool.module, self.session
        state = s.kv.get(self.model_id) if s is not None else None  # no session: a stateless generate
        if state is None:
            state = KVState(DynamicCache(config=module.config), self.input_ids[:, :0])
        full = torch.cat([state.ids, self.input_ids], dim=1)
        cached = state.cache.get_seq_length()
        self._state, self._full = state, full
        self._before = cached
        with torch.no_grad():  # not inference_mode: the cache's tensors are swapped and updated in place later
            out = module(full[:, cached:], past_key_values=state.cache, use_cache=True, logits_to_keep=1)
        if s is not None:
            s.kv[self.model_id] = state
        self.sampler = Sampler.build(module, self.kwargs, self.seed, full.device)
        gc = module.generation_config
        eos = self.kwargs.get("eos_token_id", gc.eos_token_id)
        self.eos = frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)
        self.min_new = int(self.kwargs.get("min_new_tokens") or 0)
        logits = out.logits[:, -1]
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

    def _try_join(self) -> None:
        if self.pool.free_slots() == 0:
            return  # every slot is taken: wait for a row to leave (next turn)
        n = self._full.shape[1]
        self.row = Row(self._first, n, n, self.max_new - 1, self.sampler, self.eos, on_token=self._emit,
                       ban_eos=max(0, self.min_new - 1))
        self.pool.join(self.row, self._state.cache)

    def _finish(self) -> None:
        self.pool.leave(self.row, self._state.cache)
        self._end(self.row.new)

    def _end(self, tokens: list[int]) -> None:
        new = torch.tensor([[self._first, *tokens]], dtype=torch.long, device=self._full.device)
        out = torch.cat([self._full, new], dim=1)
        self._state.ids = out
        self.result = {"sequences": out.cpu()}
        self.done = True

    def _emit(self, token: int) -> None:
        if self.on_tokens is not None:
            self.on_tokens(torch.tensor([token]))

    def fail(self, e: BaseException, tb: str | None) -> None:
        if self.row is not None:
            self.pool.drop(self.row)
        state = self._state
        if self.session is not None and state is not None and state.cache.get_seq_length() != self._before:
            self.session.kv.pop(self.model_id, None)  # the cache no longer matches its token ids
        self.error, self.error_traceback, self.done = e, tb, True
