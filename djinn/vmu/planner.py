"""Weight-streaming planner (DESIGN.md sections 6 and 10): which decoder layers stay on the GPU, and
where every streamed layer's tensors sit in the ring.

A pure function of sizes: per decoder layer the byte sizes of its tensors (in a fixed order), the bytes
that are always resident (embeddings, final norm, lm_head, rotary buffers), a GPU weight budget and an
alignment. Nothing here touches torch or a device, so every offset is tested on the CPU.

Note [Ring layout]
    The ring is one contiguous GPU buffer of `slots` x (largest streamed layer, packed). Streamed layers
    are laid out in execution order, each tensor at the next aligned offset; a tensor that would cross
    the end of the ring starts at offset 0 instead (skip-end: a tensor never wraps, so every tensor is
    one contiguous view). Every forward pass restarts the layout at offset 0, so a layer's offsets are
    the same on every pass and the module can hold permanent views into the ring.

Note [Reuse distance]
    A streamed layer's bytes were last used by the streamed layer `reuse_distance` positions earlier in
    the cyclic execution order (equal to the number of streamed layers when it only meets itself). Its
    copy may start once that layer's compute is done, so up to reuse_distance - 1 layers compute while
    it is in flight. With equal layers and `slots` = 2 the distance is 2 everywhere, except for the
    first streamed layer when the count of streamed layers is odd: it meets the last one (distance 1),
    a bubble of one layer's compute per forward pass.

Note [Host layout]
    A streamed layer lives in pinned host memory packed the same way from offset 0 (its canonical
    layout, independent of the ring and the budget). Because ring offsets and host offsets are both
    aligned, a run of tensors with no skip between them is one contiguous copy: one copy per layer, or
    two when the layer wraps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

DEFAULT_ALIGNMENT = 512  # what the CUDA caching allocator guarantees for its own blocks
DEFAULT_SLOTS = 2


class PlanError(ValueError):
    """The budget cannot hold the always-resident weights plus a ring (or the inputs are malformed)."""


def align_up(x: int, alignment: int) -> int:
    return -(-x // alignment) * alignment


def pack(sizes: Sequence[int], alignment: int) -> tuple[tuple[int, ...], int]:
    """Offsets of tensors packed from 0, each at an aligned offset; and the footprint (aligned end)."""
    offsets, end = [], 0
    for size in sizes:
        start = align_up(end, alignment)
        offsets.append(start)
        end = start + size
    return tuple(offsets), align_up(end, alignment)


def spread(n: int, r: int) -> tuple[int, ...]:
    """`r` of `n` layer indices, evenly spread (the resident ones), so resident compute is interleaved
    with streamed layers and the copy stream never waits behind a long block of resident layers."""
    if not 0 <= r <= n:
        raise PlanError(f"cannot keep {r} of {n} layers resident")
    return tuple((2 * i + 1) * n // (2 * r) for i in range(r))


@dataclass(frozen=True)
class Placement:
    """One tensor of a streamed layer: where it sits in the ring and in the layer's host buffer."""

    ring_offset: int
    host_offset: int
    nbytes: int


@dataclass(frozen=True)
class Copy:
    """One contiguous host -> ring run (tensors and the alignment gaps between them)."""

    host_offset: int
    ring_offset: int
    nbytes: int


@dataclass(frozen=True)
class StreamedLayer:
    layer: int                      # decoder layer index
    tensors: tuple[Placement, ...]  # in the order of the layer's size list
    copies: tuple[Copy, ...]        # one, or two when the layer wraps around the end of the ring
    host_bytes: int                 # its packed footprint: the size of its pinned host buffer
    reuse_distance: int             # Note [Reuse distance]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.tensors)

    @property
    def copy_bytes(self) -> int:
        return sum(c.nbytes for c in self.copies)


@dataclass(frozen=True)
class StreamPlan:
    budget: int
    alignment: int
    slots: int
    fixed_bytes: int                     # always resident: everything outside the decoder layers
    layer_bytes: tuple[int, ...]         # per decoder layer, the sum of its tensor sizes
    resident: tuple[int, ...]            # decoder layers kept on the GPU
    streamed: tuple[StreamedLayer, ...]  # in execution order
    ring_bytes: int

    @property
    def streaming(self) -> bool:
        return bool(self.streamed)

    @property
    def total_bytes(self) -> int:
        return self.fixed_bytes + sum(self.layer_bytes)

    @property
    def resident_bytes(self) -> int:
        return self.fixed_bytes + sum(self.layer_bytes[i] for i in self.resident)

    @property
    def streamed_bytes(self) -> int:
        """Bytes a forward pass moves over the link (the tensors; copies add alignment gaps < 1 KiB)."""
        return sum(s.nbytes for s in self.streamed)

    @property
    def copy_bytes(self) -> int:
        return sum(s.copy_bytes for s in self.streamed)

    @property
    def gpu_bytes(self) -> int:
        return self.resident_bytes + self.ring_bytes

    @property
    def host_bytes(self) -> int:
        return sum(s.host_bytes for s in self.streamed)

    @property
    def resident_fraction(self) -> float:
        return self.resident_bytes / self.total_bytes if self.total_bytes else 1.0

    def summary(self) -> dict:
        return {
            "budget_bytes": self.budget, "slots": self.slots, "alignment": self.alignment,
            "layers": len(self.layer_bytes), "resident_layers": len(self.resident),
            "streamed_layers": len(self.streamed), "fixed_bytes": self.fixed_bytes,
            "resident_bytes": self.resident_bytes, "ring_bytes": self.ring_bytes, "gpu_bytes": self.gpu_bytes,
            "streamed_bytes_per_forward": self.streamed_bytes, "host_bytes": self.host_bytes,
            "resident_fraction": round(self.resident_fraction, 6),
            "min_reuse_distance": min((s.reuse_distance for s in self.streamed), default=0),
        }


def plan_stream(layer_sizes: Sequence[Sequence[int]], fixed_bytes: int, budget: int, *,
                alignment: int = DEFAULT_ALIGNMENT, slots: int = DEFAULT_SLOTS) -> StreamPlan:
    """Keep as many whole decoder layers resident as fit next to the fixed weights and the ring.

    `layer_sizes[i]` are the byte sizes of decoder layer i's tensors, in the order the caller will bind
    them. Raises PlanError, naming the smallest budget that works, when not even the fixed weights and
    a ring fit.
    """
    if alignment < 1:
        raise PlanError(f"alignment must be >= 1 byte, got {alignment}")
    if slots < 2:
        raise PlanError(f"a ring needs at least 2 slots (one copying while one computes), got {slots}")
    if budget <= 0:
        raise PlanError(f"the GPU weight budget must be > 0 bytes, got {budget}")
    if fixed_bytes < 0 or any(s < 0 for sizes in layer_sizes for s in sizes):
        raise PlanError("tensor sizes must be >= 0 bytes")
    n = len(layer_sizes)
    layer_bytes = tuple(sum(sizes) for sizes in layer_sizes)
    footprints = [pack(sizes, alignment)[1] for sizes in layer_sizes]
    if fixed_bytes + sum(layer_bytes) <= budget:
        return StreamPlan(budget, alignment, slots, fixed_bytes, layer_bytes, tuple(range(n)), (), 0)
    if n == 0:
        raise PlanError(f"the always-resident weights ({fixed_bytes} bytes) exceed the budget ({budget} bytes) "
                        "and the model has no decoder layers to stream")
    for r in range(n - 1, -1, -1):
        resident = spread(n, r)
        keep = set(resident)
        streamed = [i for i in range(n) if i not in keep]
        ring = min(slots, len(streamed)) * max(footprints[i] for i in streamed)
        if fixed_bytes + sum(layer_bytes[i] for i in resident) + ring <= budget:
            layers = layout_ring([layer_sizes[i] for i in streamed], ring, alignment)
            layers = tuple(StreamedLayer(i, *rest) for i, rest in zip(streamed, layers))
            return StreamPlan(budget, alignment, slots, fixed_bytes, layer_bytes, resident, layers, ring)
    need = fixed_bytes + min(slots, n) * max(footprints)
    raise PlanError(
        f"a GPU weight budget of {budget} bytes ({budget / 2**30:.3f} GiB) cannot hold the always-resident "
        f"weights ({fixed_bytes} bytes: embeddings, final norm, lm_head) plus a ring of "
        f"{min(slots, n)} slots of {max(footprints)} bytes; the smallest budget that works is {need} bytes "
        f"({need / 2**30:.3f} GiB)"
    )


def layout_ring(layers: Sequence[Sequence[int]], ring_bytes: int, alignment: int
                ) -> list[tuple[tuple[Placement, ...], tuple[Copy, ...], int, int]]:
    """Lay streamed layers (in execution order) into a ring of `ring_bytes` with skip-end allocation.

    Returns per layer (placements, copies, host_bytes, reuse_distance); see the Notes at the top.
    """
    if ring_bytes % alignment:
        raise PlanError(f"ring of {ring_bytes} bytes is not a multiple of the alignment {alignment}")
    out = []
    spans: list[list[tuple[int, int]]] = []
    head = 0  # Note [Ring layout]: every pass starts at offset 0
    for sizes in layers:
        host_offsets, host_bytes = pack(sizes, alignment)
        placements: list[Placement] = []
        runs: list[list[int]] = []  # [host_offset, ring_offset, nbytes]
        for size, host_off in zip(sizes, host_offsets):
            if size > ring_bytes:
                raise PlanError(f"a {size}-byte tensor cannot fit a ring of {ring_bytes} bytes")
            if size == 0:  # nothing to copy; any offset is a valid empty view
                placements.append(Placement(0, host_off, 0))
                continue
            start = align_up(head, alignment)
            skipped = start + size > ring_bytes
            if skipped:
                start = 0  # skip-end: never wrap a tensor
            placements.append(Placement(start, host_off, size))
            if runs and not skipped and start == align_up(runs[-1][1] + runs[-1][2], alignment):
                runs[-1][2] = start + size - runs[-1][1]
            else:
                runs.append([host_off, start, size])
            head = start + size
        copies = tuple(Copy(*r) for r in runs)
        _check_no_self_overlap(copies)
        out.append((tuple(placements), copies, host_bytes))
        spans.append([(c.ring_offset, c.ring_offset + c.nbytes) for c in copies])
    m = len(layers)
    result = []
    for j, (placements, copies, host_bytes) in enumerate(out):
        distance = m
        for d in range(1, m):
            if _overlaps(spans[j], spans[(j - d) % m]):
                distance = d
                break
        result.append((placements, copies, host_bytes, distance))
    return result


def _overlaps(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> bool:
    return any(s1 < e2 and s2 < e1 for s1, e1 in a for s2, e2 in b)


def _check_no_self_overlap(copies: tuple[Copy, ...]) -> None:
    spans = [(c.ring_offset, c.ring_offset + c.nbytes) for c in copies]
    for i in range(len(spans)):
        for j in range(i + 1, len(spans)):
            if _overlaps([spans[i]], [spans[j]]):
                raise PlanError(f"a layer overlaps itself in the ring ({spans}); the ring is too small")
