"""Sessions: the server-side state one client keeps between calls (DESIGN.md sections 1, 3).

The SessionTable is owned by the engine thread. A session belongs to the client that opened it; any
other client asking for it gets SessionNotFound, as if it did not exist. It is charged to the principal
that client authenticated as (Note [Principals] in djinn/server/principals.py): the table takes a
session from the Ledger when it opens one and gives it back when it removes it.
"""
from __future__ import annotations

import enum
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

from ..protocol.errors import HandleNotFound, InvalidRequest, OutOfMemory, SessionNotFound
from ..vmu.readonly import ReadOnlyMemory
from .principals import LOCAL, Ledger, Resource

log = logging.getLogger("djinn.sessions")


class SessionState(enum.IntEnum):
    ACTIVE = 1
    PAUSED = 2  # one of its runs is parked at a breakpoint (djinn/server/execution/runs.py)
    CLOSED = 9


@dataclass
class KVState:
    """A session's KV for one model: the tokens it covers and the cache over its blocks.

    `cache` is a PagedCache (djinn/server/execution/paged_cache.py) over `table`, the session's block table in
    the model's pool (djinn/vmu/kv_pool.py). `ids` are every token seen so far; the table holds the KV
    of the first `table.length` of them (fewer after the scheduler dropped it: the next generate
    prefills the rest, Note [Paged layers and the write position])."""

    cache: object
    ids: torch.Tensor  # [batch, tokens seen so far], on the device

    @property
    def table(self):
        return self.cache.table

    @property
    def nbytes(self) -> int:
        return self.cache.table.blocks * self.cache.pool.block_bytes

    def keep(self, inputs: torch.Tensor, tokens: list[int]) -> None:
        """After a call was rolled back to before it: its inputs and the first `tokens` it made, as if it
        had made only those (Note [Cancel] in dispatch.py); the table holds all but the last token, which
        the next call feeds, as after any generate."""
        tail = torch.tensor([tokens], dtype=torch.long, device=self.ids.device)
        self.ids = torch.cat([self.ids, inputs.to(self.ids.device), tail], dim=1)
        self.table.length = int(self.ids.shape[1]) - 1

    @classmethod
    def empty(cls, pool, ids: torch.Tensor) -> "KVState":
        """No KV yet: a table of `ids`' batch rows and no blocks; `ids` [batch, 0] on the device."""
        from .execution.paged_cache import PagedCache

        return cls(PagedCache(pool, pool.new_table(int(ids.shape[0]))), ids)


MAX_GRAPHS_PER_SESSION = 256


class GraphCache:
    """A session's compiled graphs by signature, least recently used first out (Note [Graph cache] in
    graph_ops.py). Their constants live on the device: `nbytes` is charged to the session's Data."""

    def __init__(self, limit: int = MAX_GRAPHS_PER_SESSION) -> None:
        self.limit = limit
        self._graphs: OrderedDict[str, object] = OrderedDict()  # signature -> interpreter.Compiled

    def __len__(self) -> int:
        return len(self._graphs)

    def get(self, sig: str):
        c = self._graphs.get(sig)
        if c is not None:
            self._graphs.move_to_end(sig)
        return c

    def put(self, sig: str, compiled) -> None:
        self._graphs[sig] = compiled
        while len(self._graphs) > self.limit:
            self._graphs.popitem(last=False)

    def clear(self) -> None:
        self._graphs.clear()

    @property
    def nbytes(self) -> int:
        return sum(c.const_bytes for c in self._graphs.values())

    def device_tensors(self) -> list:
        return [t for c in self._graphs.values() for t in c.consts.values()]


@dataclass
class Session:
    sid: str
    client_id: str
    name: str | None
    principal: str = LOCAL  # who its holdings are charged to (Note [Principals] in principals.py)
    created: float = field(default_factory=time.monotonic)
    last_active: float = field(default_factory=time.monotonic)
    state: SessionState = SessionState.ACTIVE
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # handle id -> tensor (Data segment)
    _kv: dict[str, KVState] = field(default_factory=dict, init=False, repr=False)  # model id -> cache (`kv`)
    models: set[str] = field(default_factory=set)                   # model ids this session holds
    text_pins: set[str] = field(default_factory=set)                # weight hashes held until registration
    stack: dict[str, torch.Tensor] = field(default_factory=dict)    # handle -> stop tensor of a parked run (RunTable's)
    decode: dict[str, int] = field(default_factory=lambda: {"fast": 0, "eager": 0})  # generates per path
    eager_why: str | None = None  # why the last eager generate was not fast
    max_kv_tokens: int | None = None  # declared KV budget per model (Note [Declared KV budgets] in handlers/ops.py)
    restored_kv: dict = field(default_factory=dict)  # model id -> (ids, layers) from a checkpoint, until first use
    checkpoint_token: str | None = None  # written to host memory at shutdown (djinn/server/handlers/checkpoint.py)
    readonly: ReadOnlyMemory = field(default_factory=ReadOnlyMemory)  # the weights' memory (the Text segment's)
    graphs: GraphCache = field(default_factory=GraphCache)  # compiled graphs it sent (Note [Graph cache])
    tp: int | None = None    # spans this many workers (Note [Tensor-parallel sessions] in cluster/tensor_parallel.py)
    tp_streamed: object = None  # its last TP generate of its KV, until a cancel or another call (tensor_parallel.Streamed)
    _handles: int = 0        # handle ids of a spanning session come from this counter, alike on every worker

    @property
    def kv(self) -> Mapping[str, KVState]:
        """Model id -> its cache, read-only: only the Data segment changes which KV a session holds
        (Note [One KV writer] in djinn/vmu/data.py); an assignment here raises TypeError."""
        return MappingProxyType(self._kv)

    def new_id(self, nbytes: int = 8) -> str:
        """A new id for something of this session (a tensor handle, a run, a stop's tensor): random,
        but from a counter in a spanning session, whose every worker must name it alike (Note
        [Tensor-parallel sessions] in djinn/server/cluster/tensor_parallel.py)."""
        if self.tp:
            self._handles += 1
            return f"{self._handles:0{2 * nbytes}x}"
        return secrets.token_hex(nbytes)

    def add_tensor(self, t: torch.Tensor) -> str:
        hid = self.new_id()
        self.tensors[hid] = self.private(t)
        return hid

    def private(self, t: torch.Tensor) -> torch.Tensor:
        """t, or a copy of it if it lives in a weight's storage: no handle a tenant holds aliases a weight
        (Note [Weights are read-only at run time] in djinn/vmu/readonly.py)."""
        return self.readonly.private(t)

    def tensor(self, hid: object) -> torch.Tensor:
        t = self.tensors.get(hid) if isinstance(hid, str) else None
        if t is None and isinstance(hid, str):
            t = self.stack.get(hid)
        if t is None:
            raise HandleNotFound(f"tensor handle {hid!r} is not held by session {self.sid}")
        return t

    @property
    def data_bytes(self) -> int:
        unique = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self.tensors.values()}
        return sum(unique.values()) + sum(kv.nbytes for kv in self.kv.values()) + self.graphs.nbytes


class SessionTable:
    def __init__(self, readonly: ReadOnlyMemory | None = None, ledger: Ledger | None = None) -> None:
        self._sessions: dict[str, Session] = {}
        self._readonly = readonly if readonly is not None else ReadOnlyMemory()
        self._ledger = ledger if ledger is not None else Ledger()

    def __iter__(self):
        return iter(list(self._sessions.values()))

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, sid: object) -> bool:
        return sid in self._sessions

    def open(self, client_id: str, name: str | None, principal: str = LOCAL, sid: str | None = None) -> Session:
        """A new session of `client_id`, charged to `principal`; QuotaExceeded past its session caps.
        `sid`: the id a front chose (Note [One server, several workers]); else a new random one."""
        if sid is not None and sid in self._sessions:
            raise ValueError(f"session id {sid[:12]} is taken")
        self._ledger.take(Resource.SESSIONS, principal)
        s = Session(sid or secrets.token_hex(12), client_id, name, principal, readonly=self._readonly)
        self._sessions[s.sid] = s
        return s

    def find(self, sid: str) -> Session | None:
        """The session, whoever's it is: for the server's own bookkeeping, never for a client's request."""
        return self._sessions.get(sid)

    def get(self, sid: object, client_id: str) -> Session:
        s = self._sessions.get(sid) if isinstance(sid, str) else None
        if s is None or s.client_id != client_id:
            raise SessionNotFound(f"session {sid!r} does not exist (closed, reclaimed, or never opened)")
        s.last_active = time.monotonic()
        return s

    def remove(self, sid: str) -> Session | None:
        s = self._sessions.pop(sid, None)
        if s is not None:
            s.state = SessionState.CLOSED
            self._ledger.give(Resource.SESSIONS, s.principal)
        return s

    def of_client(self, client_id: str) -> list[Session]:
        return [s for s in self._sessions.values() if s.client_id == client_id]

    def of_principal(self, principal: str) -> list[Session]:
        return [s for s in self._sessions.values() if s.principal == principal]

    def per_principal(self) -> dict[str, int]:
        """Open sessions per principal, counted from the table (Ledger.check)."""
        out: dict[str, int] = {}
        for s in self._sessions.values():
            out[s.principal] = out.get(s.principal, 0) + 1
        return out

    def idle(self, timeout_s: float, now: float) -> list[Session]:
        return [s for s in self._sessions.values() if now - s.last_active > timeout_s]


def install_restored(engine, s, entry, pool) -> None:
    """A restored session's first call with this model: its KV goes into blocks of the model's pool."""
    held = s.restored_kv.get(entry.model_id)
    if held is None:
        return
    ids, layers = held
    shape = pool.shape
    if len(layers) != shape.layers or any(kv["keys"].shape[1] != shape.kv_heads or kv["keys"].shape[3] != shape.head_dim
                                          for kv in layers.values()):
        raise InvalidRequest(f"the restored KV of model {entry.model_id[:12]} does not fit the model's shape")
    tokens = next(iter(layers.values()))["keys"].shape[2] if layers else 0
    state = KVState.empty(pool, ids[:, :0].to(engine.device))
    if not pool.reserve(state.table, tokens):
        raise OutOfMemory(f"the restored session's {tokens} tokens of KV do not fit the model's free KV blocks now")
    for i, kv in layers.items():
        pool.write(state.table, i, kv["keys"].to(engine.device), kv["values"].to(engine.device), 0)
    state.table.length = tokens
    state.ids = ids.to(engine.device)
    del s.restored_kv[entry.model_id]
    engine.data.attach_kv(s, entry.model_id, state)
