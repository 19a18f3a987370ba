"""What a session owes the server before its next request: handles to free and in-place edits.

Frees come from RemoteTensor's GC finalizers (frontend/tensor.py), which may run on any thread, even
one holding a lock: `free` only appends (deque append/popleft are atomic), and the session's next
request sends the batch without waiting for it. Edits come from frontend/edits.py in the order they
were written; the session ships them with its next resume, fork, fetch or run_graph (in the same request), or as
an `edit` op before any other request (frontend/session.py). This is the queue only: sending stays
with the session, which knows its id, its transport and whether it is still alive.
"""
from __future__ import annotations

from collections import deque

from ..protocol.errors import DjinnError


class Outbox:
    def __init__(self, label: str):
        self.label = label  # the session's name, for errors
        self.closed = False
        self._frees: deque[str] = deque()
        self._edits: list[dict] = []

    def free(self, hid: str) -> None:
        """Queue a handle the client no longer holds (safe from a GC finalizer)."""
        self._frees.append(hid)

    def edit(self, record: dict) -> None:
        """Queue an in-place edit record (frontend/edits.py); refused once the session is closed, where
        it would never be sent."""
        if self.closed:
            raise DjinnError(f"session {self.label} is closed")
        self._edits.append(record)

    @property
    def has_edits(self) -> bool:
        return bool(self._edits)

    def take_frees(self) -> list[str]:
        frees = []
        while self._frees:
            frees.append(self._frees.popleft())
        return frees

    def take_edits(self) -> list[dict]:
        edits, self._edits = self._edits, []
        return edits

    def close(self) -> None:
        self.closed = True
