"""Tier 1: the per-principal ledger (Note [One ledger] in djinn/server/principals.py) and the tables that
charge it: sessions (SessionTable), live breakpoint runs (RunTable) and unfinished uploads (Uploads).
Caps are per principal, whatever client ids or sessions it uses, plus server-wide; a refusal names the
setting, charges nothing, and leaves every other principal's requests going."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from djinn.config import ServerConfig
from djinn.protocol.errors import QuotaExceeded
from djinn.server.execution.breakpoints import BreakpointSpec, Call
from djinn.server.principals import Cap, Caps, Ledger, Resource, principal_of
from djinn.server.execution.runs import RunTable
from djinn.server.sessions import SessionTable
from djinn.vmu.uploads import Uploads

S, R, U = Resource.SESSIONS, Resource.RUNS, Resource.UPLOAD_BYTES
ALICE, BOB = "curve:" + "a" * 40, "curve:" + "b" * 40


def caps(sessions=3, runs=2, upload=1000, sessions_total=5, runs_total=3) -> Caps:
    return Caps({S: Cap(sessions, "max_sessions_per_principal"), R: Cap(runs, "max_runs_per_principal"),
                 U: Cap(upload, "upload_in_flight_gb")},
                {S: Cap(sessions_total, "max_sessions_total"), R: Cap(runs_total, "max_runs_total")})


def test_the_principal_is_what_authentication_proved():
    assert principal_of("K" * 40, secret_required=True) == "curve:" + "K" * 40  # the key wins over the secret
    assert principal_of("K" * 40, secret_required=False) == "curve:" + "K" * 40
    assert principal_of(None, secret_required=True) == "secret"
    assert principal_of(None, secret_required=False) == "local"


def test_caps_come_from_the_config():
    c = Caps.from_config(ServerConfig(max_sessions_per_principal=7, max_sessions_total=9, max_runs_per_principal=2,
                                      max_runs_total=4, upload_in_flight_gb=0.5))
    assert c.per_principal == {S: Cap(7, "max_sessions_per_principal"), R: Cap(2, "max_runs_per_principal"),
                               U: Cap(1 << 29, "upload_in_flight_gb")}
    assert c.server == {S: Cap(9, "max_sessions_total"), R: Cap(4, "max_runs_total")}
    d = ServerConfig()
    assert (d.max_sessions_per_principal, d.max_sessions_total, d.max_runs_per_principal, d.max_runs_total,
            d.upload_in_flight_gb) == (1024, 2048, 64, 256, 8.0)


@pytest.mark.parametrize("name", ["max_sessions_per_principal", "max_sessions_total", "max_runs_per_principal",
                                  "max_runs_total"])
@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_cap_settings_are_validated(name, bad):
    with pytest.raises(ValueError, match=f"^{name}={bad!r} must be an int >= 1$"):
        ServerConfig(**{name: bad}).validate()


def test_per_principal_cap_names_the_setting_and_takes_nothing():
    led = Ledger(caps())
    for _ in range(3):
        led.take(S, ALICE)
    with pytest.raises(QuotaExceeded) as info:
        led.take(S, ALICE)
    assert info.value.message == ("this principal (curve) holds 3 open sessions; 1 more would pass its cap of 3 "
                                  "(max_sessions_per_principal): close sessions first")
    assert led.held(ALICE)[S] == 3 and led.total(S) == 3
    led.take(S, BOB)  # another principal goes on
    assert (led.held(BOB)[S], led.total(S)) == (1, 4)
    led.give(S, ALICE)
    led.take(S, ALICE)  # a released place is free again
    assert led.held(ALICE) == {S: 3, R: 0, U: 0}


def test_server_wide_cap_bounds_every_principal_together():
    led = Ledger(caps(sessions=3, sessions_total=5))
    for p in (ALICE, ALICE, ALICE, BOB, BOB):
        led.take(S, p)
    with pytest.raises(QuotaExceeded) as info:
        led.take(S, "local")
    assert info.value.message == ("the server holds 5 open sessions of all principals; 1 more would pass its cap "
                                  "of 5 (max_sessions_total): try again later")
    assert led.held("local")[S] == 0 and led.total(S) == 5 and led.principals() == 2


def test_bytes_are_checked_whole_and_over_release_is_a_bug():
    led = Ledger(caps(upload=1000))
    led.take(U, ALICE, 600)
    with pytest.raises(QuotaExceeded, match=r"holds 600 bytes of unfinished uploads; 401 more would pass its cap "
                                            r"of 1000 \(upload_in_flight_gb\)"):
        led.take(U, ALICE, 401)
    led.take(U, ALICE, 400)
    with pytest.raises(RuntimeError, match="release of 1001 upload_bytes by curve, which holds 1000"):
        led.give(U, ALICE, 1001)
    led.give(U, ALICE, 1000)
    assert led.held(ALICE)[U] == 0 and led.principals() == 0 and led.total(U) == 0


def test_stats_show_the_callers_own_use_and_the_server_totals():
    led = Ledger(caps())
    led.take(S, ALICE)
    led.take(S, BOB)
    led.take(U, ALICE, 10)
    assert led.stats(ALICE) == {
        "kind": "curve",
        "sessions": {"limit": 3, "used": 1}, "runs": {"limit": 2, "used": 0},
        "upload_bytes": {"limit": 1000, "used": 10},
        "server": {"sessions": {"limit": 5, "used": 2}, "runs": {"limit": 3, "used": 0}},
    }


# -- the owners charge it -------------------------------------------------------------------------------
def test_sessions_of_several_client_ids_share_their_principals_cap():
    led = Ledger(caps(sessions=3, sessions_total=5))
    table = SessionTable(ledger=led)
    mine = [table.open(cid, None, ALICE) for cid in ("id-one", "id-two", "id-three")]
    with pytest.raises(QuotaExceeded, match="max_sessions_per_principal"):
        table.open("id-four", None, ALICE)  # a fresh client id is the same tenant
    assert len(table) == 3
    theirs = table.open("bob-1", None, BOB)
    assert theirs.principal == BOB and mine[0].principal == ALICE
    table.remove(mine[0].sid)
    table.open("id-four", None, ALICE)
    led.check({ALICE: {S: 3}, BOB: {S: 1}})
    assert table.per_principal() == {ALICE: 3, BOB: 1}
    table.remove(mine[0].sid)  # removing twice gives back once
    led.check({p: {S: n} for p, n in table.per_principal().items()})


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(3, 3)

    def forward(self, x):
        return self.inner(x)


def test_live_runs_are_charged_from_start_until_they_leave():
    torch.manual_seed(0)
    m = _Twice().eval()
    led = Ledger(caps(runs=2, runs_total=3))
    table, runs = SessionTable(ledger=led), RunTable(led)
    a1, a2, b = table.open("a1", None, ALICE), table.open("a2", None, ALICE), table.open("b", None, BOB)
    x = torch.randn(2, 3)

    def start(s):
        return runs.start(s, "m", Call(m, "forward", [x], {}, None, torch.device("cpu")), [BreakpointSpec("inner")])

    p1, p2 = start(a1), start(a2)  # paused: each holds a parked thread
    assert p1.state.name == "PAUSED" and p2.state.name == "PAUSED"
    with pytest.raises(QuotaExceeded, match=r"holds 2 live breakpoint runs.*max_runs_per_principal"):
        start(a1)
    with pytest.raises(QuotaExceeded, match="max_runs_per_principal"):
        runs.fork(p1)
    q = start(b)
    with pytest.raises(QuotaExceeded, match=r"the server holds 3 live breakpoint runs.*max_runs_total"):
        start(table.open("c", None, "local"))
    led.check({ALICE: {S: 2, R: 2}, BOB: {S: 1, R: 1}, "local": {S: 1}})
    runs.resume(p1)  # it finishes: its thread and its place are free
    runs.cancel(q, "test")
    assert p1.state.name == "FINISHED" and runs.per_principal() == {ALICE: 1}
    again = start(a1)
    runs.cancel_session(a1, "closed")
    runs.cancel_session(a2, "closed")
    assert again.state.name == "CANCELLED"
    led.check({ALICE: {S: 2}, BOB: {S: 1}, "local": {S: 1}})
    # A run without breakpoints runs to its end at once and holds nothing afterwards.
    done = runs.start(b, "m", Call(m, "forward", [x], {}, None, torch.device("cpu")), [])
    assert done.state.name == "FINISHED" and led.held(BOB)[R] == 0


def _item(h: str, total: int, data: int = 16) -> dict:
    return {"hash": h, "data": torch.zeros(data, dtype=torch.uint8), "offset": 0, "total": total,
            "dtype": "uint8", "shape": [total]}


def test_unfinished_uploads_of_all_sessions_share_the_principals_bytes():
    led = Ledger(caps(upload=1000))
    up = Uploads(torch.device("cpu"), led.account(U))
    assert up.put("s1", _item("a" * 64, 600), owner=ALICE) is None
    with pytest.raises(QuotaExceeded, match=r"holds 600 bytes.*401 more.*upload_in_flight_gb"):
        up.put("s2", _item("b" * 64, 401), owner=ALICE)  # another session of the same tenant
    assert up.reserved() == {ALICE: 600} and up.nbytes == 600  # the refused one allocated nothing
    assert up.put("s3", _item("c" * 64, 1000), owner=BOB) is None  # another principal goes on
    # A chunk out of order drops its upload and gives its bytes back; so does closing a session.
    with pytest.raises(Exception, match="does not follow"):
        up.put("s1", dict(_item("a" * 64, 600), offset=100))
    assert up.reserved() == {BOB: 1000} and led.held(ALICE)[U] == 0
    up.drop_session("s3")
    assert up.reserved() == {} and led.total(U) == 0
    # A finished upload gives its reservation back too (and a bad hash still does).
    t = torch.arange(8, dtype=torch.uint8)
    from djinn.protocol.hashing import weight_hash

    item = dict(_item(weight_hash(t), 8, 8), data=t.clone())
    h, got = up.put("s1", item, owner=ALICE)
    assert h == weight_hash(t) and torch.equal(got, t) and led.held(ALICE)[U] == 0
    with pytest.raises(Exception, match="hash to"):
        up.put("s1", dict(item, hash="d" * 64), owner=ALICE)
    assert led.total(U) == 0 and up.reserved() == {}
