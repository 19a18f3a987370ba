"""Principals: who a request is charged to, and what each one holds against the server's caps.

Note [Principals]
    Caps are charged to the authenticated principal, not to the client id: a client id is a random
    string any client picks at connect (docs/SECURITY.md), so caps per client id (or per session)
    multiply with every id a tenant makes up. The principal is what authentication proved:
      CurveZMQ on       "curve:<the client's public key, z85>": one principal per allowed key (with a
                        shared secret as well, the key is the finer identity and wins)
      shared secret     "secret": everyone who knows the secret is the same principal (the server
                        cannot tell them apart, so neither can its caps)
      neither           "local": every client of a loopback server is one principal (loopback mode trusts
                        every local user; per client id would hand out the caps again per connection)
    The router decides it at HELLO (`principal_of`) and keeps it with the client; a session records its
    opener's principal and everything the session later holds is charged to it.

Note [One ledger]
    `Ledger` is the one owner of what each principal holds against the caps: open sessions, live
    breakpoint runs (each parks an OS thread), and bytes reserved by unfinished uploads. The tables
    that own those things (SessionTable, RunTable, Uploads) call `take` just before they add one and
    `give` when they drop it, at their single add and remove points, so the counts follow the tables
    exactly (`check` verifies that against counts recomputed from the tables). `take` checks the
    principal's cap and the server-wide cap and raises QuotaExceeded naming the setting, having taken
    nothing: only that request fails, and every other principal goes on. Device memory is charged to
    the principal too (quota_principal_gpu_gb), but read from the Data segment's accounting rather than
    counted here: Note [Principal GPU quota] in quotas.py says why.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from ..protocol.errors import QuotaExceeded

LOCAL, SECRET, CURVE = "local", "secret", "curve"


def principal_of(curve_key: str | None, secret_required: bool) -> str:
    """The principal a HELLO authenticated (Note [Principals])."""
    if curve_key:
        return f"{CURVE}:{curve_key}"
    return SECRET if secret_required else LOCAL


def kind_of(principal: str) -> str:
    """"curve", "secret" or "local": what `stats` shows a client of its own principal."""
    return principal.split(":", 1)[0]


class Resource(enum.Enum):
    SESSIONS = "sessions"          # open sessions
    RUNS = "runs"                  # live breakpoint runs (paused or running): one OS thread each
    UPLOAD_BYTES = "upload_bytes"  # bytes reserved by unfinished uploads (a tensor whole at its first chunk)


@dataclass(frozen=True)
class Cap:
    """A limit and the setting that sets it (named in QuotaExceeded). limit None: no limit."""

    limit: int | None
    setting: str


@dataclass(frozen=True)
class Caps:
    """Per-principal and server-wide caps, by resource."""

    per_principal: dict[Resource, Cap]
    server: dict[Resource, Cap]

    @classmethod
    def from_config(cls, cfg) -> "Caps":
        return cls(
            per_principal={
                Resource.SESSIONS: Cap(cfg.max_sessions_per_principal, "max_sessions_per_principal"),
                Resource.RUNS: Cap(cfg.max_runs_per_principal, "max_runs_per_principal"),
                Resource.UPLOAD_BYTES: Cap(int(cfg.upload_in_flight_gb * 2**30), "upload_in_flight_gb"),
            },
            server={
                Resource.SESSIONS: Cap(cfg.max_sessions_total, "max_sessions_total"),
                Resource.RUNS: Cap(cfg.max_runs_total, "max_runs_total"),
            },
        )

    @classmethod
    def unlimited(cls) -> "Caps":
        return cls({}, {})


_WHAT = {Resource.SESSIONS: "open sessions", Resource.RUNS: "live breakpoint runs",
         Resource.UPLOAD_BYTES: "bytes of unfinished uploads"}
_HINT = {Resource.SESSIONS: "close sessions first", Resource.RUNS: "resume or cancel a run first",
         Resource.UPLOAD_BYTES: "finish the uploads in flight first"}


class Ledger:
    """Note [One ledger]. Engine thread only."""

    def __init__(self, caps: Caps | None = None):
        self.caps = caps if caps is not None else Caps.unlimited()
        self._held: dict[str, dict[Resource, int]] = {}
        self._total = dict.fromkeys(Resource, 0)

    def take(self, what: Resource, principal: str, n: int = 1) -> None:
        """Charge `n` of `what` to `principal`, or raise QuotaExceeded (naming the cap) and charge nothing."""
        if n < 0:
            raise ValueError(f"take of {n} {what.value}: use give to release")
        mine = self.held(principal)[what]
        cap = self.caps.per_principal.get(what)
        if cap is not None and cap.limit is not None and mine + n > cap.limit:
            raise QuotaExceeded(f"this principal ({kind_of(principal)}) holds {mine} {_WHAT[what]}; {n} more would "
                                f"pass its cap of {cap.limit} ({cap.setting}): {_HINT[what]}")
        cap = self.caps.server.get(what)
        if cap is not None and cap.limit is not None and self._total[what] + n > cap.limit:
            raise QuotaExceeded(f"the server holds {self._total[what]} {_WHAT[what]} of all principals; {n} more "
                                f"would pass its cap of {cap.limit} ({cap.setting}): try again later")
        bucket = self._held.setdefault(principal, dict.fromkeys(Resource, 0))
        bucket[what] += n
        self._total[what] += n

    def give(self, what: Resource, principal: str, n: int = 1) -> None:
        """Release `n` of `what`; releasing more than was taken is a bug and raises at once."""
        bucket = self._held.get(principal)
        if n < 0 or bucket is None or bucket[what] < n:
            have = bucket[what] if bucket is not None else 0
            raise RuntimeError(f"release of {n} {what.value} by {kind_of(principal)}, which holds {have}")
        bucket[what] -= n
        self._total[what] -= n
        if not any(bucket.values()):
            del self._held[principal]

    # -- reads -------------------------------------------------------------------------------------------
    def held(self, principal: str) -> dict[Resource, int]:
        return dict(self._held.get(principal) or dict.fromkeys(Resource, 0))

    def total(self, what: Resource) -> int:
        return self._total[what]

    def principals(self) -> int:
        return len(self._held)

    def account(self, what: Resource) -> "Account":
        """`what` of this ledger as a plain take/give pair, for owners outside the server package (Uploads)."""
        return Account(self, what)

    def stats(self, principal: str) -> dict:
        """`stats()["principal"]`: the caller's own use and caps, and the server-wide ones (no other
        principal's identity or use is shown)."""
        mine = self.held(principal)
        out: dict = {"kind": kind_of(principal)}
        for r in Resource:
            cap = self.caps.per_principal.get(r)
            out[r.value] = {"limit": cap.limit if cap else None, "used": mine[r]}
        out["server"] = {r.value: {"limit": cap.limit, "used": self._total[r]} for r, cap in self.caps.server.items()}
        return out

    def check(self, counted: dict[str, dict[Resource, int]]) -> None:
        """Verify Note [One ledger] against counts recomputed from the owning tables ({principal: {resource:
        n}}, zeros may be left out). Raises AssertionError naming the principal and resource."""
        for p in set(counted) | set(self._held):
            for r in Resource:
                want, have = counted.get(p, {}).get(r, 0), self.held(p)[r]
                assert want == have, f"{kind_of(p)} {r.value}: ledger {have} != tables {want}"
        for r in Resource:
            assert self._total[r] == sum(b[r] for b in self._held.values()), f"{r.value}: total != sum"


@dataclass(frozen=True)
class Account:
    """One resource of a Ledger: `take(principal, n)` / `give(principal, n)`."""

    ledger: Ledger
    what: Resource

    def take(self, principal: str, n: int) -> None:
        self.ledger.take(self.what, principal, n)

    def give(self, principal: str, n: int) -> None:
        self.ledger.give(self.what, principal, n)
