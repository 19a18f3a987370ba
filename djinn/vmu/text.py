"""The Text segment: read-only weights, content-addressed and ref-counted (DESIGN.md section 3).

One owner (the engine thread). A weight uploaded by ten sessions is stored once; it is freed when the
last reference (a model, or a session's pin between upload and model registration) goes.

Note [Text residency]
    Each entry records where its one copy lives (DESIGN.md section 10, "Weight streaming"):
    DEVICE  on the engine's device (every entry of a CPU server; what resident layers bind to);
    HOST    pageable host memory owned by the entry: uploads and checkpoint loads staged for a model
            with a GPU weight budget, so streamed weights never touch the GPU;
    PINNED  a view into a streaming model's pinned host buffer (that model owns the bytes; when it is
            freed, surviving entries are copied out and become HOST again).
    `to_device` promotes an entry the first time a resident binding needs it on the device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .readonly import ReadOnlyMemory

DEVICE, HOST, PINNED = "device", "host", "pinned"
RESIDENCIES = (DEVICE, HOST, PINNED)


@dataclass
class TextEntry:
    tensor: torch.Tensor
    refs: int = 0
    residency: str = DEVICE

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()


class TextSegment:
    def __init__(self) -> None:
        self._entries: dict[str, TextEntry] = {}
        self._bytes = {r: 0 for r in RESIDENCIES}
        #: where the weights' bytes are; the Text segment is its only writer (Note [Weights are read-only
        #: at run time] in readonly.py)
        self.readonly = ReadOnlyMemory()

    def __contains__(self, h: str) -> bool:
        return h in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes of every entry, wherever it lives."""
        return sum(self._bytes.values())

    @property
    def device_nbytes(self) -> int:
        return self._bytes[DEVICE]

    @property
    def host_nbytes(self) -> int:
        """Pageable host bytes owned by entries (PINNED bytes belong to the streaming model)."""
        return self._bytes[HOST]

    @property
    def pinned_nbytes(self) -> int:
        return self._bytes[PINNED]

    def device_tensors(self) -> list[torch.Tensor]:
        """The entries whose bytes are on the device (for Note [Device memory agrees])."""
        return [e.tensor for e in self._entries.values() if e.residency == DEVICE]

    def get(self, h: str) -> torch.Tensor:
        return self._entries[h].tensor

    def entry(self, h: str) -> TextEntry:
        return self._entries[h]

    def add(self, h: str, tensor: torch.Tensor, residency: str = DEVICE) -> torch.Tensor:
        """Store `tensor` under `h` with one reference (taken by the caller); dedups on `h` (an
        existing entry keeps its tensor and residency)."""
        if residency not in RESIDENCIES:
            raise ValueError(f"residency {residency!r} is not one of {RESIDENCIES}")
        entry = self._entries.get(h)
        if entry is None:
            entry = self._entries[h] = TextEntry(tensor, residency=residency)
            self._bytes[residency] += entry.nbytes
            self._track(entry.tensor, +1)
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
            self._bytes[entry.residency] -= entry.nbytes
            self._track(entry.tensor, -1)

    def holds_storage(self, t: torch.Tensor) -> bool:
        """Whether `t` shares bytes with a weight's storage (a view of it): such a tensor must never be written."""
        return self.readonly.aliases(t)

    def _track(self, t: torch.Tensor, k: int) -> None:
        self.readonly.track(t, k)

    def refs(self, h: str) -> int:
        entry = self._entries.get(h)
        return entry.refs if entry else 0

    def to_device(self, h: str, device: torch.device) -> torch.Tensor:
        """The entry's tensor on `device`, promoting a HOST or PINNED entry (Note [Text residency])."""
        entry = self._entries[h]
        if entry.residency != DEVICE:
            self.rehome(h, entry.tensor.to(device), DEVICE)
        return entry.tensor

    def rehome(self, h: str, tensor: torch.Tensor, residency: str) -> None:
        """Replace an entry's tensor with another copy of the same bytes living elsewhere."""
        if residency not in RESIDENCIES:
            raise ValueError(f"residency {residency!r} is not one of {RESIDENCIES}")
        entry = self._entries[h]
        if tensor.dtype != entry.tensor.dtype or tuple(tensor.shape) != tuple(entry.tensor.shape):
            raise ValueError(f"text entry {h[:12]}: cannot rehome {entry.tensor.dtype}{list(entry.tensor.shape)} "
                             f"as {tensor.dtype}{list(tensor.shape)}")
        self._bytes[entry.residency] -= entry.nbytes
        self._track(entry.tensor, -1)
        entry.tensor, entry.residency = tensor, residency
        self._bytes[residency] += entry.nbytes
        self._track(tensor, +1)
