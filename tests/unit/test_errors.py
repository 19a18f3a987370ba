"""Typed errors: the wire registry maps every code back to its class, keeping message and traceback."""
from __future__ import annotations

import pytest

from djinn.protocol import errors as E
from djinn.protocol.codec import decode, encode
from djinn.protocol.errors import ERRORS, DjinnError, error_from_wire
from djinn.protocol.messages import MsgType

EXPECTED = {
    "djinn_error": E.DjinnError, "protocol": E.ProtocolError, "auth": E.AuthError,
    "session_not_found": E.SessionNotFound, "handle_not_found": E.HandleNotFound,
    "out_of_memory": E.OutOfMemory, "model_not_supported": E.ModelNotSupported,
    "invalid_request": E.InvalidRequest, "remote_execution": E.RemoteExecutionError,
    "server_unavailable": E.ServerUnavailable, "timeout": E.RequestTimeout,
    "quota_exceeded": E.QuotaExceeded, "session_lost": E.SessionLost, "shutting_down": E.ShuttingDown,
    "capture": E.CaptureError, "weight_write_refused": E.WeightWriteRefused, "server_busy": E.ServerBusy,
    "cancelled": E.GenerateCancelled, "cost_budget_exceeded": E.CostBudgetExceeded,
    "guard_failed": E.GuardFailed,
}


def test_registry_is_exactly_the_error_classes():
    assert ERRORS == EXPECTED
    defined = {v for v in vars(E).values() if isinstance(v, type) and issubclass(v, DjinnError)}
    assert set(ERRORS.values()) == defined
    assert all(cls.code == code for code, cls in ERRORS.items())


@pytest.mark.parametrize("code", sorted(EXPECTED))
def test_error_from_wire_maps_every_code(code):
    tb = 'Traceback (most recent call last):\n  File "x.py", line 1\nValueError: boom'
    e = error_from_wire(code, "it broke", tb)
    assert type(e) is EXPECTED[code]
    assert isinstance(e, DjinnError)
    assert e.code == code
    assert e.message == "it broke"
    assert e.remote_traceback == tb
    assert e.args == ("it broke",)
    assert str(e) == "it broke"  # short under a notebook cell; the traceback is an attribute
    assert e.__notes__ == ["(the server's traceback is in this error's .remote_traceback)"]


def test_remote_execution_error_str_is_the_first_line_of_its_cause():
    msg = "forward failed: RuntimeError: shapes cannot be multiplied\n\nsee the torch docs for matmul"
    e = error_from_wire("remote_execution", msg, "Traceback (most recent call last):\n  ...")
    assert str(e) == "forward failed: RuntimeError: shapes cannot be multiplied"
    assert e.message == msg
    assert error_from_wire("invalid_request", "a\nb", None).__str__() == "a\nb"  # written to be read whole


@pytest.mark.parametrize("code", sorted(EXPECTED))
def test_error_from_wire_without_traceback(code):
    e = error_from_wire(code, "msg", None)
    assert type(e) is EXPECTED[code]
    assert e.remote_traceback is None
    assert str(e) == "msg"


@pytest.mark.parametrize("code", ["nope", "", "ProtocolError", "__class__", "Exception"])
def test_unknown_code_is_a_plain_djinn_error(code):
    e = error_from_wire(code, "m", "tb")
    assert type(e) is DjinnError
    assert (e.code, e.message, e.remote_traceback) == ("djinn_error", "m", "tb")


@pytest.mark.parametrize("cls", list(EXPECTED.values()), ids=lambda c: c.__name__)
def test_error_survives_the_wire(cls):
    # The engine sends (code, message, traceback) in an ERROR message; the client rebuilds it.
    sent = cls("bad thing \u2603", remote_traceback="tb line")
    header = {"rid": 9, "code": sent.code, "message": sent.message, "traceback": sent.remote_traceback}
    got = decode(encode(MsgType.ERROR, header))
    assert got.kind is MsgType.ERROR and got.rid == 9
    e = error_from_wire(got.header["code"], got.header["message"], got.header["traceback"])
    assert type(e) is cls
    assert (e.message, e.remote_traceback) == ("bad thing \u2603", "tb line")


def test_errors_are_catchable_by_base_class():
    with pytest.raises(DjinnError):
        raise error_from_wire("out_of_memory", "oom", None)
    assert issubclass(E.ProtocolError, Exception) and not issubclass(E.ProtocolError, ValueError)


# -- Note [Errors echo little] ----------------------------------------------------------------------


def test_short_shows_a_bounded_prefix_of_any_value():
    huge = "x" * (8 << 20)
    text = E.short(huge)
    assert text.startswith("'xxxx") and f"({8 << 20} characters)" in text and len(text) < 100
    assert len(E.short(b"y" * (8 << 20))) < 100
    assert len(E.short(list(range(1 << 20)))) < 100
    assert len(E.short({"k" * 1000: ["v" * 1000] * 1000})) < 100
    assert len(E.short(10 ** 5000)) < 100
    assert E.short("ok") == "'ok'" and E.short(7) == "7" and E.short(None) == "None"


def test_wire_error_bounds_message_and_traceback():
    tb = "Traceback\n" + "y" * (1 << 20) + "\nValueError: z"
    e = E.InvalidRequest("bad value " + "x" * (8 << 20), remote_traceback=tb)
    h = E.wire_error(5, e)
    assert h["rid"] == 5 and h["code"] == "invalid_request"
    assert h["message"].startswith("bad value xxx") and len(h["message"]) <= E.MAX_MESSAGE_CHARS + 60
    assert "characters cut" in h["message"]
    # a traceback keeps its end, where the error is
    assert h["traceback"].endswith("ValueError: z") and len(h["traceback"]) <= E.MAX_TRACEBACK_CHARS + 60
    small = E.wire_error(1, E.AuthError("no"))
    assert small == {"rid": 1, "code": "auth", "message": "no", "traceback": None}
    frames = encode(MsgType.ERROR, h)
    assert sum(len(bytes(f)) for f in frames) < E.MAX_MESSAGE_CHARS + E.MAX_TRACEBACK_CHARS + 512
