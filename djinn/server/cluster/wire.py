"""The frames between the front and its workers (Note [One server, several workers] in front.py).

Front -> worker:
  [REQUEST, client id, meta (msgpack), *the client's message frames]   meta: {"principal", "new_sid"?}
  [GONE, client id, reason]                                          the client's sessions close
  [CONTROL, msgpack {"op", ...}]                                     stats, and what later ops add
Worker -> front:
  [REPLY, client id, rid (msgpack), final (b"1"/b"0"), *message frames]  relayed to the client as is
  [CONTROL, msgpack {"op", ...}]                                     ready, load, closed, stats

Both ends are processes of one server on one host, over an ipc socket in a directory only the
server's user can open, so nothing here is authenticated again: the front authenticated the client.
"""
from __future__ import annotations

import msgpack

REQUEST, GONE, CONTROL, REPLY = b"Q", b"G", b"C", b"R"


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data) -> object:
    return msgpack.unpackb(bytes(data), raw=False, strict_map_key=False)


def reply_rid(frames: list) -> tuple[int, bool]:
    """(rid, final) of an outgoing message's frames: REPLY and ERROR end a request, STREAM does not.
    Only the header is parsed (tensors in it are skipped), so the front knows which requests a worker
    has answered and can answer the rest itself if the worker dies. A header longer than one wire
    frame continues in the message's last frames (Note [Small frames] in protocol/codec.py)."""
    first = memoryview(frames[0])
    final = first[0] in (3, 4)  # MsgType.REPLY, MsgType.ERROR
    tail = int.from_bytes(first[1:5], "little") if first.nbytes == 5 else 0
    head = b"".join(bytes(f) for f in [frames[1], *(frames[len(frames) - tail:] if tail else [])])
    try:
        parsed = msgpack.unpackb(head, raw=False, strict_map_key=False, ext_hook=lambda c, d: None)
    except Exception:
        return 0, final
    rid = parsed.get("rid", 0) if isinstance(parsed, dict) else 0
    return (rid if isinstance(rid, int) else 0), final
