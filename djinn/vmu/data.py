"""The Data segment on the server: the KV block pools, where each session's KV is, and moving it.

DESIGN.md section 3. `DataSegment` owns every model's KV pool (kv_pool.py: fixed-size blocks
allocated once), the pinned host pool, the swapper, the byte accounting, and per session the
scheduler's view of its KV (`SessionState`), the swaps in flight, the I/O-wait signal and the
counters `djinn.stats()` shows. The engine thread is its only user. It executes what the scheduler
decides (swap out, drop, prefetch) and reports what completed (`poll`); it decides nothing itself.

Note [What the scheduler moves]
    A session's KV (its block tables, every model it generated with) moves as one unit: per model
    one host region holding its blocks in table order, filled by one copy per run of consecutive
    block ids (blocks are large: 16 tokens of every layer). The session's named tensors (outputs the
    client holds handles to) and the constants of its compiled graphs stay on the device: they are
    charged to the session's Data segment but are not KV, so the scheduler neither counts nor moves
    them. GPU bytes of KV are whole blocks, so the scheduler's byte arithmetic is the allocator's
    block arithmetic.

Note [Blocks in flight]
    A swap-out keeps its device blocks held until its copy completes (`poll`): another session may
    not write them while the side stream still reads them. A prefetch reserves its destination blocks
    before its copy starts; when the pool has too few it starts nothing and returns False, and the
    dispatcher fails the waiting request with a typed error instead of retrying in a loop.

Note [Host quota]
    `host_quota` (bytes, from the server's quota_host_gb; None: no limit) caps what one session may hold
    in the host pool. `swap_out` refuses (returns False, moves nothing) a session whose KV would take
    it past the quota, so that session stays on the GPU. The dispatcher also hides such a session from
    the policies' victim lists (`swappable`).

Note [One KV writer]
    Which KVState a session holds per model (`Session.kv`, a read-only view) changes only here:
    `attach_kv` (a generate's first table, a fork's shared tables, a restored checkpoint's),
    `detach_kv` (reset_kv, release_model) and `close`. Each does the whole of the bookkeeping that
    goes with it (waiting for a swap in flight, freeing blocks and host regions, the residency state,
    the session's charge), so no caller can forget a step and leak blocks or misstate the session to
    the scheduler. The KVState's contents (its ids, its table's blocks and length) are the running
    request's to write. tests/unit/test_kv_writer.py holds every other module of djinn/ to this.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..scheduler.types import MemoryView, SessionState
from .accounting import DATA, HOST, Accounting
from .host_pool import HostPool
from .kv_pool import KVPool, KVTable
from .swap import HostCopy, Slot, SwapHandle, Swapper

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
    prefetch_failures: int = 0  # a prefetch found too few free blocks (Note [Blocks in flight])
    prefix_tokens_reused: int = 0  # prompt tokens whose KV came from cached blocks (Note [Prefix sharing])
    drops: int = 0
    recomputed_tokens: int = 0
    queue_s: float = 0.0

    def as_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in vars(self).items()}


@dataclass
class Away:
    """One model's KV of a session in the host pool: its blocks in table order, `per_row` per row."""

    host: HostCopy
    per_row: int
    model_id: str


@dataclass
class SessionMemory:
    """One session's KV residency."""

    state: SessionState = SessionState.NEW
    io_wait_since: float | None = None
    io_eta_s: float | None = None
    inflight: list[tuple[KVTable, SwapHandle]] = field(default_factory=list)
    swapped_in_wait: bool = False  # swapped out since the session's last request: the next one is a hit or miss
    returned: bool = False         # COMPUTE came while the KV was away: ACTIVE (not IO_WAIT) once back
    counters: Counters = field(default_factory=Counters)


class DataSegment:
    def __init__(self, device: torch.device, host_pool_bytes: int, swap_bw: float, host_quota: int | None = None):
        self.device = device
        self.pool = HostPool(host_pool_bytes)
        self.swapper = Swapper(self.pool, device)
        self.acct = Accounting()
        self.swap_bw = float(swap_bw)
        self.host_quota = host_quota  # Note [Host quota]
        self.totals = Counters()
        self.pools: dict[str, KVPool] = {}   # model id -> its KV pool
        self._mem: dict[str, SessionMemory] = {}
        self._tensor_bytes: dict[str, int] = {}
        self._away: dict[int, Away] = {}     # id(table) -> its host copy, while not on the device
        self._sessions: dict[str, object] = {}  # sid -> Session with a swap in flight

    # -- pools -----------------------------------------------------------------------------------
    def add_pool(self, mid: str, pool: KVPool) -> None:
        assert mid not in self.pools, mid
        self.pools[mid] = pool

    def drop_pool(self, mid: str) -> KVPool | None:
        """The model is gone: its pool's memory goes back (no session holds its blocks any more)."""
        pool = self.pools.pop(mid, None)
        if pool is not None and pool.alloc.held:
            log.warning("KV pool of %s dropped with %d blocks held", mid[:12], pool.alloc.held)
        return pool

    # -- sessions --------------------------------------------------------------------------------
    def mem(self, sid: str) -> SessionMemory:
        m = self._mem.get(sid)
        if m is None:
            m = self._mem[sid] = SessionMemory()
        return m

    def sync(self, s) -> None:
        """Charge the session what it holds now (after a request changed its KV, tensors or graphs)."""
        m = self.mem(s.sid)
        kv = self.kv_bytes(s)
        if m.state in (SessionState.NEW, SessionState.DROPPED) and kv and not m.inflight:
            m.state = SessionState.ACTIVE
        # Graph constants stay put like tensors: Data the scheduler neither counts as KV nor moves.
        tensors = _tensor_bytes(s.tensors) + s.graphs.nbytes
        self._tensor_bytes[s.sid] = tensors
        self._set(s.sid, DATA, kv + tensors)
        self._set(s.sid, HOST, self.host_bytes(s.sid, s))

    def close(self, s) -> dict:
        """Forget the session: wait for its swaps in flight, free its blocks and host regions."""
        m = self._mem.pop(s.sid, None)
        self._sessions.pop(s.sid, None)
        if m is not None:
            for _, h in m.inflight:
                h.wait()
            m.inflight.clear()
        for mid, kv in s.kv.items():
            self._free_table(mid, kv.table)
        s._kv.clear()  # Note [One KV writer]
        self._tensor_bytes.pop(s.sid, None)
        self.acct.close_session(s.sid)
        return m.counters.as_dict() if m is not None else Counters().as_dict()

    def _free_table(self, mid: str, table: KVTable) -> None:
        pool = self.pools.get(mid)
        if pool is not None and table.blocks:
            pool.release(table)
        away = self._away.pop(id(table), None)
        if away is not None:
            self.swapper.release(away.host)

    def kv_bytes(self, s) -> int:
        return sum(self.kv_bytes_of(s, mid) for mid in s.kv)

    def kv_bytes_of(self, s, mid: str) -> int:
        """Bytes of the session's KV blocks for one model on the device (reserved ones included)."""
        kv = s.kv.get(mid)
        pool = self.pools.get(mid)
        if kv is None or pool is None:
            return 0
        return kv.table.blocks * pool.block_bytes

    def away(self, s) -> bool:
        """Some of the session's KV is in the host tier or moving (not usable on the device now)."""
        return bool(self.mem(s.sid).inflight) or any(id(kv.table) in self._away for kv in s.kv.values())

    def kv_bytes_home(self, s) -> int:
        """Bytes of the session's KV blocks once all of it is on the device (swapped tables included)."""
        total = 0
        for mid, kv in s.kv.items():
            pool, a = self.pools.get(mid), self._away.get(id(kv.table))
            if pool is not None:
                total += (len(kv.table.rows) * a.per_row if a is not None else kv.table.blocks) * pool.block_bytes
        return total

    def gpu_bytes(self, sid: str) -> int:
        """Bytes of KV the scheduler may move, charged on the GPU (Note [What the scheduler moves])."""
        return self.acct.session(sid)[DATA] - self._tensor_bytes.get(sid, 0)

    def tensor_bytes(self, sid: str) -> int:
        return self._tensor_bytes.get(sid, 0)

    def swappable(self, sid: str, nbytes: int) -> bool:
        """Whether `nbytes` more of the session's KV may go to the host pool (Note [Host quota])."""
        return self.host_quota is None or self.acct.session(sid)[HOST] + nbytes <= self.host_quota

    def host_bytes(self, sid: str, s=None) -> int:
        if s is None:
            return self.acct.session(sid)[HOST]
        return sum(a.host.alloc.nbytes for kv in s.kv.values() if (a := self._away.get(id(kv.table))))

    def host_blocks(self, s) -> int:
        return sum(len(kv.table.rows) * a.per_row for kv in s.kv.values() if (a := self._away.get(id(kv.table))))

    def kv_layers(self, s, mid: str, host: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The session's KV for one model, per layer (keys, values) [batch, kv_heads, tokens, head_dim],
        wherever its blocks are: as CPU tensors (checkpoints), or with `host=False` left on the device
        when its blocks are there (a migration over NCCL). Waits for a swap in flight."""
        kv, pool = s.kv[mid], self.pools.get(mid)
        t = kv.table
        for x, h in self.mem(s.sid).inflight:
            if x is t:
                h.wait()
        if pool is None or t.length == 0:
            return []
        away = self._away.get(id(t))
        if away is not None and not t.blocks:  # only in the host pool
            blocks = pool.host_blocks(self._host_region(away.host), t.batch * away.per_row)  # [layers, k|v, blocks, ...]
        else:
            blocks = pool.kv[:, :, pool.device_rows(t)]             # [layers, k|v, batch, nb, bt, heads, dim]
            blocks = blocks.cpu() if host else blocks
        out = []
        for layer in range(pool.shape.layers):
            kv2 = []
            for j in (0, 1):
                x = blocks[layer, j].reshape(t.batch, -1, pool.shape.kv_heads, pool.shape.head_dim)
                x = x[:, :t.length].transpose(1, 2).contiguous()
                kv2.append(x.cpu() if host else x)
            out.append((kv2[0], kv2[1]))
        return out

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
            m.io_eta_s = max(0.0, now - m.io_wait_since)
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
    def apply(self, decision, sessions) -> list[str]:
        """Carry out a scheduler decision's moves in its order (djinn/scheduler/types.py `Decision`):
        start the swap-outs, drop, start the prefetches. `sessions`: every open session. Returns the
        sessions whose prefetch started nothing (Note [Blocks in flight]), for the dispatcher to fail."""
        by_sid = {s.sid: s for s in sessions}
        for a in decision.swap_out:
            self.swap_out(by_sid[a.sid])
        for a in decision.drop:
            self.drop(by_sid[a.sid])
        failed = []
        for a in decision.prefetch:
            if not self.prefetch(by_sid[a.sid]):
                failed.append(a.sid)
        return failed

    def swap_out(self, s) -> bool:
        """Start copying every block the session holds to the host pool (Note [Blocks in flight])."""
        m = self.mem(s.sid)
        tables = [(mid, self.pools[mid], kv.table) for mid, kv in s.kv.items()
                  if mid in self.pools and kv.table.blocks and id(kv.table) not in self._away]
        if not tables:
            return False
        nbytes = sum(aligned(t.blocks * p.block_bytes) for _, p, t in tables)
        if not self.swappable(s.sid, nbytes):  # Note [Host quota]: it stays on the GPU
            log.info("swap-out of session %s refused: %d bytes of KV exceed its host quota of %d bytes",
                     s.sid[:8], nbytes, self.host_quota)
            return False
        hosts = []
        for _, p, t in tables:
            a = self.pool.allocate(t.blocks * p.block_bytes)
            if a is None:
                for h in hosts:
                    self.pool.release(h.alloc)
                log.warning("swap-out of session %s: the host pool has no region of %d bytes", s.sid[:8], nbytes)
                return False
            n = t.blocks * p.block_bytes
            hosts.append(HostCopy(a, (Slot(0, n, (n // p.kv.element_size(),), p.kv.dtype),)))
        for (mid, p, t), host in zip(tables, hosts):
            dsts, srcs = p.copy_pairs(self._host_region(host), t.ids(), to_host=True)
            handle = self.swapper.start("out", host, dsts, srcs, keep=srcs)
            self._away[id(t)] = Away(host, len(t.rows[0]), mid)
            m.inflight.append((t, handle))
        m.state, m.swapped_in_wait = SessionState.SWAPPING_OUT, True
        self._sessions[s.sid] = s
        self._set(s.sid, HOST, self.host_bytes(s.sid, s))
        return True

    def prefetch(self, s) -> bool:
        """Reserve the blocks, then start the copies back. False (nothing started) when a pool has
        too few free blocks (Note [Blocks in flight])."""
        m = self.mem(s.sid)
        assert m.state == SessionState.SWAPPED, m.state
        todo = [(self.pools[mid], kv.table) for mid, kv in s.kv.items() if id(kv.table) in self._away]
        got = []
        for p, t in todo:
            if not p.reserve(t, self._away[id(t)].per_row * p.block_tokens):
                for q, u in got:
                    q.release(u)
                log.warning("prefetch of session %s: its KV pool has too few free blocks", s.sid[:8])
                for c in (m.counters, self.totals):
                    c.prefetch_failures += 1
                return False
            got.append((p, t))
        for p, t in todo:
            away = self._away[id(t)]
            dsts, srcs = p.copy_pairs(self._host_region(away.host), t.ids(), to_host=False)
            m.inflight.append((t, self.swapper.start("in", away.host, dsts, srcs)))
        m.state = SessionState.PREFETCHING
        self._sessions[s.sid] = s
        self.sync(s)
        return True

    def drop(self, s) -> None:
        """Discard the session's KV, keeping its token ids: its next generate prefills them again."""
        m = self.mem(s.sid)
        for mid, kv in s.kv.items():
            self._free_table(mid, kv.table)
            kv.table.length = 0
        m.state = SessionState.DROPPED
        for c in (m.counters, self.totals):
            c.drops += 1
        self.sync(s)

    def prefix_reused(self, sid: str, tokens: int) -> None:
        if tokens:
            for c in (self.mem(sid).counters, self.totals):
                c.prefix_tokens_reused += tokens

    def recomputing(self, s, tokens: int) -> None:
        m = self.mem(s.sid)
        for c in (m.counters, self.totals):
            c.recomputed_tokens += tokens

    # -- which KV a session holds (Note [One KV writer]) ------------------------------------------
    def attach_kv(self, s, mid: str, state) -> None:
        """The session's KV for model `mid` is `state` from now on, charged to it at once."""
        if mid in s.kv:  # replacing a table would leak its blocks
            raise RuntimeError(f"session {s.sid} already holds KV for model {mid[:12]}; detach it first")
        s._kv[mid] = state
        self.sync(s)

    def detach_kv(self, s, mid: str) -> None:
        """Drop the session's KV for one model, wherever it is."""
        m = self.mem(s.sid)
        kv = s.kv.get(mid)
        if kv is not None:
            for t, h in [x for x in m.inflight if x[0] is kv.table]:
                h.wait()
            self.poll()
            self._free_table(mid, kv.table)
            del s._kv[mid]
        if not any(id(k.table) in self._away for k in s.kv.values()) and m.state.in_host_tier:
            m.state = SessionState.ACTIVE if s.kv else SessionState.NEW
        elif not s.kv and m.state in (SessionState.ACTIVE, SessionState.IO_WAIT, SessionState.DROPPED):
            m.state = SessionState.NEW
        self.sync(s)

    # -- completions -----------------------------------------------------------------------------
    def poll(self) -> list[str]:
        """Finish the swaps whose copies are done; returns the sessions whose every swap completed."""
        done = []
        for sid, s in list(self._sessions.items()):
            m = self._mem.get(sid)
            if m is None:
                del self._sessions[sid]
                continue
            still = []
            for t, h in m.inflight:
                if not h.done():
                    still.append((t, h))
                    continue
                self._measured(h)
                mid = next(mid for mid, kv in s.kv.items() if kv.table is t)
                for c in (m.counters, self.totals):
                    c.bytes_moved += h.nbytes
                if h.direction == "out":
                    self.pools[mid].release(t)                # Note [Blocks in flight]: free only now
                else:
                    self.swapper.release(self._away.pop(id(t)).host)
            m.inflight = still
            if still:
                continue
            del self._sessions[sid]
            if m.state == SessionState.SWAPPING_OUT:
                m.state = SessionState.SWAPPED
                for c in (m.counters, self.totals):
                    c.swaps_out += 1
            else:
                for c in (m.counters, self.totals):
                    c.swaps_in += 1
                if m.returned:
                    m.io_wait_since = m.io_eta_s = None
                    m.returned = False
                m.state = SessionState.IO_WAIT if m.io_wait_since is not None else SessionState.ACTIVE
            self.sync(s)
            done.append(sid)
        return done

    def busy(self) -> bool:
        return bool(self._sessions)

    # -- views -----------------------------------------------------------------------------------
    def memory_view(self) -> MemoryView:
        cap = self.capacity()
        used = sum((p.alloc.held) * p.block_bytes for p in self.pools.values())
        return MemoryView(max(cap, used), used, self.pool.capacity, self.pool.used, self.pool.largest_free)

    def capacity(self) -> int:
        """GPU bytes of KV the pools hold: every block but the scratch ones."""
        return sum(p.alloc.total * p.block_bytes for p in self.pools.values())

    def stats(self, sid: str, s=None) -> dict:
        m = self._mem.get(sid) or SessionMemory()
        a = self.acct.session(sid)
        out = {"state": m.state.name, "gpu_bytes": a[DATA], "host_bytes": a[HOST],
               "io_eta_s": m.io_eta_s if m.io_wait_since is not None else None, **m.counters.as_dict()}
        if s is not None:
            shared = 0
            for mid, kv in s.kv.items():
                p = self.pools.get(mid)
                if p is not None:
                    shared += sum(1 for b in kv.table.ids() if p.alloc.refcount(b) > 1)
            out.update(kv_blocks=sum(kv.table.blocks for kv in s.kv.values()), kv_host_blocks=self.host_blocks(s),
                       kv_shared_blocks=shared)
        return out

    def outside_pools(self) -> int:
        """Data bytes not in a KV pool: sessions' tensors and graph constants (their KV is pool blocks)."""
        return sum(self._tensor_bytes.values())

    def kv_summary(self) -> dict:
        """`djinn.stats()["kv"]`: per model its pool's blocks, and the host pool in its block size."""
        models = {}
        for mid, p in self.pools.items():
            host_used = sum(a.host.alloc.nbytes for a in self._away.values() if a.model_id == mid)
            models[mid] = {**p.stats(), "host_blocks_total": self.pool.capacity // p.block_bytes,
                           "host_blocks_used": host_used // p.block_bytes}
        bts = {p.block_tokens for p in self.pools.values()}
        return {"block_tokens": bts.pop() if len(bts) == 1 else sorted(bts) or None, "models": models}

    def summary(self) -> dict:
        return {"data_budget": self.capacity(), "data_bytes": self.acct.segment(DATA),
                "kv_pool_bytes": sum(p.nbytes for p in self.pools.values()),
                "host_pool": {"capacity": self.pool.capacity, "used": self.pool.used, "pinned": self.pool.pinned},
                "swap_bw": round(self.swap_bw), **self.totals.as_dict()}

    # -- internals -------------------------------------------------------------------------------
    def _host_region(self, host: HostCopy) -> torch.Tensor:
        """A swapped table's host copy, flat (its chunks: KVPool.host_chunks)."""
        slot = host.slots[0]
        return self.pool.view(host.alloc)[:slot.nbytes].view(slot.dtype)

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
