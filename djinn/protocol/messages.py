"""Message kinds, the protocol version and the limits every decoder enforces (DESIGN.md section 8)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

PROTOCOL_VERSION = 2  # 2: tensors and headers may span several frames (codec.py)

#: The line a server prints on stdout once it listens; embedded-server launchers wait for it.
READY_PREFIX = "djinn server ready at "

#: Capabilities this build offers; exchanged at HELLO so either side can refuse a feature early.
CAPABILITIES = ("module_path", "generate", "stream", "session_kv", "chunked_upload", "model_dir",
                "breakpoints")


class MsgType(enum.IntEnum):
    """First frame of every message: one byte."""

    HELLO = 1      # client -> server: version, secret, client id; server -> client: version, caps
    REQUEST = 2    # client -> server: op, request id, session id, args
    REPLY = 3      # server -> client: the result of one request
    ERROR = 4      # server -> client: typed error for one request (or for the connection, rid = 0)
    STREAM = 5     # server -> client: a partial result (e.g. a generated token); the REPLY follows
    HEARTBEAT = 6  # both ways; the server answers each client heartbeat
    BYE = 7        # client -> server: going away, reclaim my sessions; server -> client: shutting down


@dataclass(frozen=True)
class Limits:
    """Bounds checked while decoding, before anything is allocated for a message."""

    max_frames: int = 4096            # frames in one message (header + tensor buffers)
    max_frame_bytes: int = 1 << 30    # one tensor's bytes, however many wire frames carry them
    max_header_bytes: int = 16 << 20  # the msgpack header
    max_total_bytes: int = 2 << 30    # all frames together
    inline_bytes: int = 4096          # tensors up to this size travel inside the header (encode side)
    # Encode side: no frame is longer than this; a larger header or tensor is split over several frames.
    # The server's socket refuses longer frames from anyone, before authentication too (Note [Small
    # frames] in codec.py), so a client must split at the size the server announced at HELLO.
    wire_frame_bytes: int = 1 << 20
    # Maps and arrays in one header. Bytes alone do not bound the decoded size: an empty map is one
    # byte on the wire and ~64 in Python, so a header of 15 MiB of them would decode to ~1 GB.
    max_containers: int = 1 << 18


@dataclass
class Message:
    kind: MsgType
    header: dict
    #: Total bytes received, for accounting and logs.
    nbytes: int = 0
    #: Raw frames kept alive while tensors decoded with copy=False alias them.
    frames: list = field(default_factory=list, repr=False)

    @property
    def rid(self) -> int:
        return self.header.get("rid", 0)
