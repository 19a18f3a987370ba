"""The Text segment: read-only weights, content-addressed and ref-counted (DESIGN.md section 3).

One owner (the engine thread). A weight uploaded by ten sessions is stored once; it is freed when the
last reference (a model, or a session's pin between upload and model registration) goes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TextEntry:
    tensor: torch.Tensor
    refs: int = 0

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()


class TextSegment:
    def __init__(self) -> None:
        self._entries: dict[str, TextEntry] = {}
        self.nbytes = 0

    def __contains__(self, h: str) -> bool:
        return h in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, h: str) -> torch.Tensor:
        return self._entries[h].tensor

    def add(self, h: str, tensor: torch.Tensor) -> torch.Tensor:
        """Store `tensor` under `h` with one reference (taken by the caller); dedups on `h`."""
        entry = self._entries.get(h)
        if entry is None:
            entry = self._entries[h] = TextEntry(tensor)
            self.nbytes += entry.nbytes
        entry.refs += 1
        return entry.tensor

    def acquire(self, h: str) -> torch.Tensor:
        entry = self._entries[h]
        entry.refs += 1
        return entry.tensor

    def release(self, h: str) -> None:
        entry = self._entries.get(h)  # a freed entry is gone: an extra release finds nothing
        if entry is None or entry.refs <= 0:
            raise RuntimeError(f"text entry {h[:12]} released more often than acquired")
        entry.refs -= 1
        if entry.refs == 0:
            del self._entries[h]
            self.nbytes -= entry.nbytes

    def refs(self, h: str) -> int:
        entry = self._entries.get(h)
        return entry.refs if entry else 0
