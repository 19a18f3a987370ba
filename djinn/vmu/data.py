"""The Data segment on the server: where each session's KV caches are, and moving them (DESIGN.md §3).

`DataSegment` owns, per session, the scheduler's view of its KV (`SessionState`), its swapped-out copy
in the pinned host pool, the swap in flight, the I/O-wait signal and the counters `djinn.stats()`
shows; and, for the whole server, the host pool, the swapper and the byte accounting. The engine
thread is its only user. It executes what the scheduler decides (swap out, drop, prefetch) and
reports what completed (`poll`); it decides nothing itself.

Note [What the scheduler moves]
    A session's KV caches (every model it generated with) move as one unit: one host region, one
    copy per cache tensor. The session's named tensors (outputs the client holds handles to) stay on
    the device: they are charged to the session's Data segment and count against the GPU budget, but
    the scheduler never moves them, so a handle is always readable without a swap-in. Bytes are
    counted rounded up to the pool's alignment (512, also the CUDA caching allocator's granule), so
    the scheduler's arithmetic matches what the pool and the allocator hand out.

Note [Host quota]
    `host_quota` (bytes, from the server's quota_host_gb; None: no limit) caps what one session may hold
    in the host pool. `swap_out` refuses (returns False, moves nothing) a session whose KV would take
    it past the quota, so that session stays on the GPU, counted against the GPU budget as before. The
    dispatcher also hides such a session from the policies' victim lists (`swappable`), so a request
    that needs room gets it from sessions that can move instead of waiting for one that never will.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

from ..scheduler.types import MemoryView, SessionState
from .accounting import DATA, HOST, Accounting
from .host_pool import HostPool
from .swap import HostCopy, KVName, SwapHandle, Swapper, cache_tensors, release_cache, restore_cache

log = logging.getLogger("djinn.vmu.data")

ALIGN = 512
GIB = 1 << 30


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass
class Counters:
    swaps_out: int = 0
    swaps_in: int = 0
    bytes_moved: int = 0
    prefetch_hits: int = 0     # a request found its KV back on the GPU after a swap-out
    prefetch_misses: int = 0   # a request found its KV still in (or on its way to) the host
    drops: int = 0
    recomputed_tokens: int = 0
    queue_s: float = 0.0

    def as_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in vars(self).items()}


@dataclass
class SessionMemory:
    """One session's KV residency. `names` lists (model id, cache tensor name) in host-region order."""

    state: SessionState = SessionState.NEW
    io_wait_since: float | None = None
    io_eta_s: float | None = None
    host: HostCopy | None = None
    names: list[tuple[str, KVName]] = field(default_factory=list)
    handle: SwapHandle | None = None
    swapped_in_wait: bool = False  # swapped out since the session's last request: the next one is a hit or miss
    returned: bool = False         # COMPUTE came while the KV was away: ACTIVE (not IO_WAIT) once back
    counters: Counters = field(default_factory=Counters)


class DataSegment:
    def __init__(self, device: torch.device, host_pool_bytes: int, budget_bytes: int | None,
                 swap_bw: float, reserve_bytes: int = GIB, host_quota: int | None = None):
        self.device = device
        self.pool = HostPool(host_pool_bytes)
        self.swapper = Swapper(self.pool, device)
        self.acct = Accounting()
        self.budget = budget_bytes
        self.reserve = reserve_bytes
        self.swap_bw = float(swap_bw)
        self.host_quota = host_quota  # Note [Host quota]
        self.totals = Counters()
        self._mem: dict[str, SessionMemory] = {}
        self._tensor_bytes: dict[str, int] = {}
        self._inflight: dict[str, object] = {}  # sid -> Session with a swap in flight

    # -- sessions --------------------------------------------------------------------------------
    def mem(self, sid: str) -> SessionMemory:
        m = self._mem.get(sid)
        if m is None:
            m = self._mem[sid] = SessionMemory()
        return m

    def sync(self, s) -> None:
        """Charge the session what it holds now (after a request changed its KV or tensors)."""
        m = self.mem(s.sid)
        kv = self.kv_bytes(s) if m.state.resident or m.state == SessionState.NEW else self._held_gpu(m)
        if m.state == SessionState.NEW and kv:
            m.state = SessionState.ACTIVE
        tensors = _tensor_bytes(s.tensors)
        self._tensor_bytes[s.sid] = tensors
        self._set(s.sid, DATA, kv + tensors)
        self._set(s.sid, HOST, m.host.alloc.nbytes if m.host is not None else 0)

    def close(self, s) -> dict:
        """Forget the session: wait for a swap in flight, free its host region. Returns its counters."""
        m = self._mem.pop(s.sid, None)
        self._inflight.pop(s.sid, None)
        if m is not None:
            if m.handle is not None:
                m.handle.wait()
                if m.handle.direction == "in":
                    self.swapper.release(m.host)
                m.handle = None
            if m.host is not None and m.state in (SessionState.SWAPPING_OUT, SessionState.SWAPPED):
                self.swapper.release(m.host)
            m.host = None
        self._tensor_bytes.pop(s.sid, None)
        self.acct.close_session(s.sid)
        return m.counters.as_dict() if m is not None else Counters().as_dict()

    def kv_bytes(self, s) -> int:
        return sum(self.kv_bytes_of(s, mid) for mid in s.kv)

    def kv_bytes_of(self, s, mid: str) -> int:
        """Bytes of the session's resident cache for one model (0 when it has none on the device)."""
        kv = s.kv.get(mid)
        if kv is None:
            return 0
        return sum(aligned(t.numel() * t.element_size()) for t in cache_tensors(kv.cache).values())

    def gpu_bytes(self, sid: str) -> int:
        """Bytes of KV the scheduler may move, charged on the GPU (Note [What the scheduler moves])."""
        return self.acct.session(sid)[DATA] - self._tensor_bytes.get(sid, 0)

    def tensor_bytes(self, sid: str) -> int:
        """Bytes of the tensors the session holds (handles), charged to its Data segment on the GPU."""
        return self._tensor_bytes.get(sid, 0)

    def swappable(self, sid: str, nbytes: int) -> bool:
        """Whether `nbytes` more of the session's KV may go to the host pool (Note [Host quota])."""
        return self.host_quota is None or self.host_bytes(sid) + nbytes <= self.host_quota

    def host_bytes(self, sid: str) -> int:
        m = self._mem.get(sid)
        return m.host.alloc.nbytes if m is not None and m.host is not None else 0

    # -- signals ---------------------------------------------------------------------------------
    def io_wait(self, sid: str, now: float, eta_s: float | None) -> None:
        m = self.mem(sid)
        m.io_wait_since, m.io_eta_s, m.returned = now, eta_s, False
        if m.state == SessionState.ACTIVE:
            m.state = SessionState.IO_WAIT

    def compute(self, sid: str, now: float) -> None:
        """The session is back: resident, it is ACTIVE; away, it is due now (the policy prefetches it)."""
        m = self.mem(sid)
        if m.state.in_host_tier and m.io_wait_since is not None:
            m.io_eta_s = max(0.0, now - m.io_wait_since)  # due now: the policy prefetches it
            m.returned = True
            return
        m.io_wait_since = m.io_eta_s = None
        if m.state == SessionState.IO_WAIT:
            m.state = SessionState.ACTIVE

    def request_arrived(self, sid: str) -> None:
        """A request implies COMPUTE; it tells whether the last swap-out was undone in time."""
        m = self.mem(sid)
        m.io_wait_since = m.io_eta_s = None
        m.returned = False
        if m.state == SessionState.IO_WAIT:
            m.state = SessionState.ACTIVE
        if m.swapped_in_wait:
            m.swapped_in_wait = False
            hit = m.state.resident
            for c in (m.counters, self.totals):
                if hit:
                    c.prefetch_hits += 1
                else:
                    c.prefetch_misses += 1

    # -- scheduler actions -------------------------------------------------------------------------
    def swap_out(self, s) -> bool:
        m = self.mem(s.sid)
        names, tensors = [], []
        for mid, kv in s.kv.items():
            for name, t in cache_tensors(kv.cache).items():
                names.append((mid, name))
                tensors.append(t)
        if not tensors:
            return False
        nbytes = sum(aligned(t.numel() * t.element_size()) for t in tensors)
        if not self.swappable(s.sid, nbytes):  # Note [Host quota]: it stays on the GPU
            log.info("swap-out of session %s refused: %d bytes of KV exceed its host quota of %d bytes",
                     s.sid[:8], nbytes, self.host_quota)
            return False
        handle = self.swapper.swap_out(tensors)
        if handle is None:
            log.warning("swap-out of session %s: the host pool has no block of %d bytes", s.sid[:8], nbytes)
            return False
        del tensors
        for kv in s.kv.values():
            release_cache(kv.cache)
        m.names, m.host, m.handle = names, handle.host, handle
        m.state, m.swapped_in_wait = SessionState.SWAPPING_OUT, True
        self._inflight[s.sid] = s
        self._set(s.sid, HOST, m.host.alloc.nbytes)
        return True

    def prefetch(self, s) -> bool:
        m = self.mem(s.sid)
        assert m.state == SessionState.SWAPPED and m.host is not None, m.state
        handle = self.swapper.swap_in(m.host)
        if handle is None:  # the device could not allocate it: stays swapped, the scheduler retries
            log.warning("prefetch of session %s: device out of memory", s.sid[:8])
            return False
        m.handle, m.state = handle, SessionState.PREFETCHING
        self._inflight[s.sid] = s
        self._set(s.sid, DATA, m.host.alloc.nbytes + self._tensor_bytes.get(s.sid, 0))
        return True

    def drop(self, s, fresh_cache) -> None:
        """Discard the session's KV caches, keeping the token ids: its next generate prefills them."""
        m = self.mem(s.sid)
        for mid, kv in s.kv.items():
            kv.cache = fresh_cache(mid)
        m.state = SessionState.DROPPED
        for c in (m.counters, self.totals):
            c.drops += 1
        self.sync(s)

    def recomputing(self, s, tokens: int) -> None:
        m = self.mem(s.sid)
        for c in (m.counters, self.totals):
            c.recomputed_tokens += tokens

    def forget_model(self, s, mid: str) -> None:
        """Drop the session's cache for one model, wherever it is."""
        m = self.mem(s.sid)
        if m.handle is not None:
            m.handle.wait()
            self.poll()
        s.kv.pop(mid, None)
        if m.state == SessionState.SWAPPED:
            m.names = [(i, n) for i, n in m.names if i != mid]
            if not m.names:
                self.swapper.release(m.host)
                m.host, m.state = None, SessionState.NEW
        elif not s.kv and m.state in (SessionState.ACTIVE, SessionState.IO_WAIT, SessionState.DROPPED):
            m.state = SessionState.NEW
        self.sync(s)

    # -- completions -----------------------------------------------------------------------------
    def poll(self) -> list[str]:
        """Finish the swaps whose copies are done; returns their session ids."""
        done = []
        for sid, s in list(self._inflight.items()):
            m = self._mem[sid]
            h = m.handle
            if h is None or not h.done():
                continue
            del self._inflight[sid]
            m.handle = None
            self._measured(h)
            for c in (m.counters, self.totals):
                c.bytes_moved += h.nbytes
                if h.direction == "out":
                    c.swaps_out += 1
                else:
                    c.swaps_in += 1
            if h.direction == "out":
                m.state = SessionState.SWAPPED
                self._set(sid, DATA, self._tensor_bytes.get(sid, 0))
            else:
                by_model: dict[str, dict] = {}
                for (mid, name), t in zip(m.names, h.tensors):
                    by_model.setdefault(mid, {})[name] = t
                for mid, tensors in by_model.items():
                    if mid in s.kv:
                        restore_cache(s.kv[mid].cache, tensors)
                self.swapper.release(m.host)
                m.host, m.names = None, []
                if m.returned:
                    m.io_wait_since = m.io_eta_s = None
                    m.returned = False
                m.state = SessionState.IO_WAIT if m.io_wait_since is not None else SessionState.ACTIVE
                self._set(sid, HOST, 0)
                self.sync(s)
            done.append(sid)
        return done

    def busy(self) -> bool:
        return bool(self._inflight)

    # -- views -----------------------------------------------------------------------------------
    def memory_view(self) -> MemoryView:
        used = self.acct.segment(DATA)
        return MemoryView(max(self.capacity(), used), used, self.pool.capacity, self.pool.used,
                          self.pool.largest_free)

    def capacity(self) -> int:
        """GPU bytes the Data segment may hold: the configured budget, else what it holds plus what the
        device has free (minus a reserve for activations)."""
        if self.budget is not None:
            return self.budget
        held = self.acct.segment(DATA)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            return max(0, held + free + cached - self.reserve)
        return max(0, held + _host_ram() - self.reserve)

    def stats(self, sid: str) -> dict:
        m = self._mem.get(sid) or SessionMemory()
        a = self.acct.session(sid)
        return {"state": m.state.name, "gpu_bytes": a[DATA], "host_bytes": a[HOST],
                "io_eta_s": m.io_eta_s if m.io_wait_since is not None else None, **m.counters.as_dict()}

    def summary(self) -> dict:
        return {"data_budget": self.capacity(), "data_bytes": self.acct.segment(DATA),
                "host_pool": {"capacity": self.pool.capacity, "used": self.pool.used, "pinned": self.pool.pinned},
                "swap_bw": round(self.swap_bw), **self.totals.as_dict()}

    # -- internals -------------------------------------------------------------------------------
    def _held_gpu(self, m: SessionMemory) -> int:
        if m.state == SessionState.SWAPPING_OUT or m.state == SessionState.PREFETCHING:
            return m.host.alloc.nbytes
        return 0

    def _set(self, sid: str, segment: str, n: int) -> None:
        have = self.acct.session(sid)[segment]
        if n > have:
            self.acct.add(segment, n - have, sid)
        elif n < have:
            self.acct.sub(segment, have - n, sid)

    def _measured(self, h: SwapHandle) -> None:
        secs = h.elapsed_s()
        if secs and h.nbytes >= (1 << 20):
            self.swap_bw = 0.7 * self.swap_bw + 0.3 * (h.nbytes / secs)

    def close_all(self) -> None:
        self.pool.close()


def _tensor_bytes(tensors: dict) -> int:
    unique = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors.values()}
    return sum(aligned(n) for n in unique.values())


def _host_ram() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * GIB


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """KV bytes one token adds to a decoder's cache (all layers, keys and values), from its config."""
    layers = getattr(config, "num_hidden_layers", None) or 0
    heads = getattr(config, "num_attention_heads", None) or 1
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or (getattr(config, "hidden_size", 0) // heads)
    return 2 * layers * kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()

