"""The ring buffer: streamed decoder layers copied from pinned host memory into GPU slots while the
layers before them compute (DESIGN.md sections 6 and 10; the layout is djinn/vmu/planner.py's).

Three parts, each testable on its own:
- `RingSchedule`: pure bookkeeping. Which copies to issue, in which order, after which compute; when
  to resynchronise. Tested on the CPU against a model of the ring's bytes (tests/unit/test_ring_schedule.py).
- `PinnedLayers`: the streamed layers' pinned host buffers, allocated once per model.
- `RingStreamer`: the CUDA side. One ring buffer, one prefetch stream, events for ordering and timing,
  and forward pre/post hooks on the streamed decoder layers (as accelerate's hooks.py, with a prefetch
  stream). The layers' parameters are permanent views into the ring (Note [Ring layout] in planner.py),
  so a hook only orders streams: nothing is allocated or rebound per call.

Note [Stream ordering]
    Copies run in order on one prefetch stream. Copy of instance c (the c-th streamed-layer execution
    since the model was built) waits for the compute of instance c - reuse_distance, the last user of
    its bytes (compute runs in order on one stream, so that covers every earlier user too). It is
    issued by the host only once that compute has been enqueued (its post-hook ran): a CUDA event wait
    binds to the event's most recent record. The compute of instance u waits for copy u.
    A layer that runs out of the expected order (a forward pass that failed half-way, a breakpoint
    resumed after other passes) forces a barrier: each stream waits for everything the other has
    enqueued, the numbering restarts at that layer and its copy is issued again.

Note [Parked layers]
    Breakpoints run a forward pass on a worker thread that can park inside a decoder layer (after its
    pre-hook, before its post-hook) while other passes of the same model run on other threads and
    reuse the ring. Threads never run at the same time (djinn/server/execution/breakpoints.py), so pre/post hooks
    alternate per thread. A pre-hook on one thread while another thread has a layer open means that
    thread is parked there: its layer is evicted, i.e. rebound to a private device copy made from the
    pinned host buffer (one layer over budget while parked), and every run of that layer reads the
    private copy (same bytes) until the parked thread's post-hook, or its death, restores the ring
    views. Work the parked layer enqueued before parking is ordered before later copies by the
    compute stream's order and the barrier.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..protocol.errors import OutOfMemory
from .planner import StreamPlan, align_up

log = logging.getLogger("djinn.ring")

PINNED_CHUNK_CAP = 1 << 33  # 8 GiB: the largest single pinned allocation


# -- schedule (pure) ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    """What a hook must do, in this order: restore, evict, barrier, issue copies."""

    barrier: bool = False
    evict: tuple[int, ...] = ()    # streamed layers to rebind to private copies (Note [Parked layers])
    restore: tuple[int, ...] = ()  # streamed layers to rebind back to the ring
    issues: tuple["Issue", ...] = ()
    advanced: bool = False         # after(): the layer's run counted (record its done event)


@dataclass(frozen=True)
class Issue:
    """Copy streamed layer `layer` for execution `instance`, after the compute of execution `after`."""

    instance: int
    layer: int
    after: int | None        # None: no compute since the last barrier used these bytes
    after_layer: int | None  # the streamed layer of `after` (whose done-event the copy waits on)


class RingSchedule:
    """Note [Stream ordering], as a state machine over streamed-layer positions 0..m-1."""

    def __init__(self, reuse_distances: Sequence[int]):
        m = len(reuse_distances)
        if m == 0 or any(not 1 <= d <= m for d in reuse_distances):
            raise ValueError(f"reuse distances must be in 1..{m}, got {list(reuse_distances)}")
        self.m = m
        self.dist = list(reuse_distances)
        self.executed = 0    # executions whose compute has been enqueued (post-hook ran)
        self.next_copy = 0   # the next instance to copy
        self.base = 0        # layer_of(u) = (u - base) mod m
        self.barrier_at = 0  # computes of instances < barrier_at are behind a barrier
        self.resyncs = 0
        self.evictions = 0
        self.open: dict[object, int] = {}          # thread -> the streamed layer it is inside
        self.evicted: dict[int, set[object]] = {}  # evicted layer -> threads parked inside it

    def layer_of(self, u: int) -> int:
        return (u - self.base) % self.m

    def reap(self, alive) -> Step:
        """Restore evicted layers whose parked threads are all gone (a cancelled run never posts)."""
        restore = []
        for layer, owners in list(self.evicted.items()):
            owners.difference_update([w for w in owners if not alive(w)])
            if not owners:
                del self.evicted[layer]
                restore.append(layer)
        return Step(restore=tuple(restore))

    def before(self, layer: int, who: object = None) -> Step:
        """Thread `who` is about to run streamed layer `layer`. The caller applies the Step, then
        makes the compute stream wait for this layer's copy."""
        evict = []
        for other, j in list(self.open.items()):
            if other != who:  # Note [Parked layers]
                del self.open[other]
                owners = self.evicted.setdefault(j, set())
                if not owners:
                    evict.append(j)
                    self.evictions += 1
                owners.add(other)
        self.open[who] = layer  # replaces a layer this thread left by an exception
        barrier = layer != self.layer_of(self.executed)
        if barrier:
            self.base = self.executed - layer
            self.next_copy = self.executed
            self.barrier_at = self.executed
            self.resyncs += 1
        issues = []
        while self.next_copy <= self.executed:
            issues.append(self._issue())
        issues += self._pump()
        return Step(barrier, tuple(evict), (), tuple(issues))

    def after(self, layer: int, who: object = None) -> Step:
        """Thread `who` has enqueued streamed layer `layer`: the copies that may now be issued, or
        (for a parked layer that was evicted) the restore once its last parked thread is through."""
        if self.open.get(who) != layer:
            owners = self.evicted.get(layer)
            if owners is not None and who in owners:
                owners.discard(who)
                if not owners:
                    del self.evicted[layer]
                    return Step(restore=(layer,))
            return Step()
        del self.open[who]
        if layer != self.layer_of(self.executed):
            raise RuntimeError(f"ring schedule: layer {layer} finished but layer "
                               f"{self.layer_of(self.executed)} was expected (a bug in the ring schedule)")
        self.executed += 1
        return Step(issues=tuple(self._pump()), advanced=True)

    def _pump(self) -> list[Issue]:
        out = []
        while self.next_copy - self.dist[self.layer_of(self.next_copy)] < self.executed:
            out.append(self._issue())
        return out

    def _issue(self) -> Issue:
        c = self.next_copy
        layer = self.layer_of(c)
        dep = c - self.dist[layer]
        self.next_copy += 1
        if dep < self.barrier_at:
            return Issue(c, layer, None, None)
        return Issue(c, layer, dep, self.layer_of(dep))


# -- pinned host memory ------------------------------------------------------------------------------
def chunk_layout(sizes: Sequence[int], alignment: int, cap: int = PINNED_CHUNK_CAP
                 ) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]]:
    """Group buffers into pinned chunks: returns (chunk sizes, (chunk, offset) per buffer).

    torch's pinned allocator rounds each allocation up to a power of two, so one buffer per layer
    wastes up to half, and so does one buffer per model. Chunks of power-of-two capacity (largest
    that the remaining bytes fill, at most `cap`), each holding whole buffers, keep the waste small.
    """
    aligned = [align_up(s, alignment) for s in sizes]
    chunks: list[int] = []
    where: list[tuple[int, int]] = []
    i = 0
    while i < len(aligned):
        rest = sum(aligned[i:])
        target = min(cap, _pow2_floor(rest))
        if target < aligned[i]:
            target = aligned[i]
        used = 0
        while i < len(aligned) and (used == 0 or used + aligned[i] <= target):
            where.append((len(chunks), used))
            used += aligned[i]
            i += 1
        chunks.append(used)
    return tuple(chunks), tuple(where)


def _pow2_floor(x: int) -> int:
    return 1 << (x.bit_length() - 1) if x > 0 else 0


class PinnedLayers:
    """Pinned host buffers for streamed layers, allocated once per model at registration (never per forward)."""

    def __init__(self, sizes: Sequence[int], alignment: int):
        if not torch.cuda.is_available():
            raise ValueError("pinned host memory needs CUDA; weight streaming needs a CUDA device")
        chunk_sizes, where = chunk_layout(sizes, alignment)
        self.nbytes = sum(chunk_sizes)
        self.chunks: list[torch.Tensor] = []
        try:
            for n in chunk_sizes:
                self.chunks.append(torch.empty(max(n, 1), dtype=torch.uint8, pin_memory=True))
        except RuntimeError as e:
            self.close()
            raise OutOfMemory(
                f"weight streaming needs {self.nbytes / 1e9:.2f} GB of pinned host memory for the streamed "
                f"layers and the host could not pin it ({str(e).splitlines()[0]}); host RAM is short: raise "
                "the GPU weight budget (fewer streamed layers) or free host memory"
            ) from None
        self.buffers = [self.chunks[c][off:off + n] for (c, off), n in zip(where, sizes)]

    def close(self) -> None:
        self.buffers = []
        self.chunks = []
        # Hand the cached pinned blocks back to the OS: a freed model's tens of GB must not stay pinned.
        empty = getattr(torch._C, "_host_emptyCache", None)
        if empty is not None and torch.cuda.is_available():
            empty()


# -- CUDA side ---------------------------------------------------------------------------------------
class _Timer:
    """A fixed pool of (start, end) timing-event pairs used round-robin. An entry is read back (its
    elapsed time added to the totals) before reuse, so timing allocates nothing per call."""

    def __init__(self, size: int):
        self.pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(size)]
        self.pending: list[int | None] = [None] * size  # bytes of an unread entry, None when read
        self.i = 0
        self.seconds = 0.0
        self.count = 0
        self.nbytes = 0

    def take(self, nbytes: int = 0) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        i = self.i
        self.i = (i + 1) % len(self.pairs)
        self._read(i)
        self.pending[i] = nbytes
        return self.pairs[i]

    def read_all(self) -> None:
        for i in range(len(self.pairs)):
            self._read(i)

    def reset(self) -> None:
        self.read_all()
        self.seconds, self.count, self.nbytes = 0.0, 0, 0

    def _read(self, i: int) -> None:
        nbytes = self.pending[i]
        if nbytes is None:
            return
        self.pending[i] = None
        start, end = self.pairs[i]
        try:
            end.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        except RuntimeError:  # taken but never recorded (the call failed in between): nothing to count
            return
        self.seconds += elapsed
        self.count += 1
        self.nbytes += nbytes


class RingStreamer:
    """Streams the plan's layers through one GPU ring; attach() hooks them onto the decoder layers."""

    def __init__(self, plan: StreamPlan, host: Sequence[torch.Tensor], device: torch.device):
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"weight streaming needs a CUDA device, got {device}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if not plan.streamed:
            raise ValueError("the plan streams no layers; nothing to build a ring for")
        if len(host) != len(plan.streamed):
            raise ValueError(f"{len(host)} host buffers for {len(plan.streamed)} streamed layers")
        for sl, buf in zip(plan.streamed, host):
            if buf.device.type != "cpu" or buf.dtype != torch.uint8 or buf.dim() != 1 or not buf.is_contiguous():
                raise ValueError(f"layer {sl.layer}: host buffer must be a contiguous 1-d uint8 CPU tensor")
            if buf.numel() < sl.host_bytes:
                raise ValueError(f"layer {sl.layer}: host buffer has {buf.numel()} bytes, plan needs {sl.host_bytes}")
            if sl.copy_bytes and not buf.is_pinned():
                raise ValueError(f"layer {sl.layer}: host buffer is not pinned; copies from pageable memory "
                                 "are synchronous and 5-10x slower")
        self.plan = plan
        self.device = device
        self.schedule = RingSchedule([sl.reuse_distance for sl in plan.streamed])
        self.ring = torch.empty(plan.ring_bytes, dtype=torch.uint8, device=device)
        self.copy_stream = torch.cuda.Stream(device)
        m = len(plan.streamed)
        self.done = [torch.cuda.Event() for _ in range(m)]       # compute of the layer's latest run
        self.copied: list[torch.cuda.Event | None] = [None] * m  # its latest copy (a _link end event)
        self.runs = [[(buf[c.host_offset:c.host_offset + c.nbytes], self.ring[c.ring_offset:c.ring_offset + c.nbytes])
                      for c in sl.copies] for sl, buf in zip(plan.streamed, host)]
        self.nbytes = [sl.copy_bytes for sl in plan.streamed]
        self._host = list(host)
        self._link = _Timer(2 * m + 8)   # copy start/end on the prefetch stream: link time
        self._stall = _Timer(2 * m + 8)  # around the compute stream's wait: stall time
        self._handles: list = []
        self._bindings: list[list[tuple]] = []         # per streamed layer: where its tensors are bound
        self._private: dict[int, torch.Tensor] = {}    # evicted layer -> its private device copy
        self.forwards = 0
        self.layers_run = 0

    # -- binding -----------------------------------------------------------------------------------
    def view(self, layer: int, index: int, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
        """The ring view for tensor `index` of streamed layer `layer` (positions in the plan)."""
        p = self.plan.streamed[layer].tensors[index]
        numel = 1
        for s in shape:
            numel *= int(s)
        if numel * dtype.itemsize != p.nbytes:
            raise ValueError(f"tensor {index} of streamed layer {layer}: {dtype}{list(shape)} is "
                             f"{numel * dtype.itemsize} bytes, the plan placed {p.nbytes}")
        return self.ring[p.ring_offset:p.ring_offset + p.nbytes].view(dtype).view(tuple(shape))

    def attach(self, modules: Sequence[nn.Module]) -> None:
        """Hook modules[k], the decoder layer of the plan's k-th streamed layer, whose parameters and
        buffers must already be views into the ring (see view())."""
        if self._handles:
            raise RuntimeError("ring streamer is already attached")
        if len(modules) != len(self.plan.streamed):
            raise ValueError(f"{len(modules)} modules for {len(self.plan.streamed)} streamed layers")
        self._bindings = [self._collect(k, mod) for k, mod in enumerate(modules)]
        for k, mod in enumerate(modules):
            self._handles.append(mod.register_forward_pre_hook(lambda _m, _a, k=k: self._before(k)))
            self._handles.append(mod.register_forward_hook(lambda _m, _a, _o, k=k: self._after(k)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for k in list(self._private):
            self._restore(k)

    def _collect(self, k: int, mod: nn.Module) -> list[tuple]:
        """(owner, attr, is_param, ring offset, host offset, dtype, shape) of every non-empty tensor."""
        ring = self.ring.untyped_storage().data_ptr()
        host_of = {p.ring_offset: p.host_offset for p in self.plan.streamed[k].tensors if p.nbytes}
        out = []
        for _, sub in mod.named_modules():
            for table, is_param in ((sub._parameters, True), (sub._buffers, False)):
                for attr, t in table.items():
                    if t is None or t.numel() == 0:
                        continue
                    off = t.storage_offset() * t.element_size()
                    if t.untyped_storage().data_ptr() != ring or off not in host_of:
                        raise ValueError(f"streamed layer {self.plan.streamed[k].layer}: {attr} is not bound "
                                         "to its place in the ring")
                    out.append((sub, attr, is_param, off, host_of[off], t.dtype, tuple(t.shape)))
        return out

    def _point(self, k: int, base: torch.Tensor, host_layout: bool) -> None:
        for sub, attr, is_param, ring_off, host_off, dtype, shape in self._bindings[k]:
            off = host_off if host_layout else ring_off
            n = dtype.itemsize
            for d in shape:
                n *= d
            t = base[off:off + n].view(dtype).view(shape)
            if is_param:
                sub._parameters[attr] = nn.Parameter(t, requires_grad=False)
            else:
                sub._buffers[attr] = t

    def _evict(self, k: int, stream: torch.cuda.Stream) -> None:
        """Note [Parked layers]: rebind layer k to a private copy of its weights."""
        host = self._host[k]
        private = torch.empty(self.plan.streamed[k].host_bytes, dtype=torch.uint8, device=self.device)
        with torch.cuda.stream(stream):
            private.copy_(host[:private.numel()], non_blocking=True)
        self._private[k] = private
        self._point(k, private, host_layout=True)
        log.info("streamed layer %d evicted to a private copy (a run is parked inside it)",
                 self.plan.streamed[k].layer)

    def _restore(self, k: int) -> None:
        if self._private.pop(k, None) is not None:  # freed in stream order by the caching allocator
            self._point(k, self.ring, host_layout=False)

    def close(self) -> None:
        """Detach, wait for in-flight copies, and drop the ring (the caller drops the host buffers)."""
        self.detach()
        if self.ring is not None:
            torch.cuda.synchronize(self.device)
        self.ring = None
        self.runs = []
        self._host = []

    # -- hooks -------------------------------------------------------------------------------------
    def _before(self, k: int) -> None:
        compute = torch.cuda.current_stream(self.device)
        start, end = self._stall.take()
        start.record(compute)
        if self.schedule.evicted:
            for j in self.schedule.reap(lambda t: t.is_alive()).restore:
                self._restore(j)
        step = self.schedule.before(k, threading.current_thread())
        for j in step.evict:
            self._evict(j, compute)
        if step.barrier:  # Note [Stream ordering]
            compute.wait_stream(self.copy_stream)
            self.copy_stream.wait_stream(compute)
            log.debug("ring resync at streamed layer %d", k)
        for it in step.issues:
            self._copy(it)
        compute.wait_event(self.copied[k])
        end.record(compute)
        if k == 0:
            self.forwards += 1

    def _after(self, k: int) -> None:
        step = self.schedule.after(k, threading.current_thread())
        for j in step.restore:
            self._restore(j)
        if not step.advanced:  # the tail of a parked run of an evicted layer: not part of the schedule
            return
        self.done[k].record(torch.cuda.current_stream(self.device))
        self.layers_run += 1
        for it in step.issues:
            self._copy(it)

    def _copy(self, it: Issue) -> None:
        stream = self.copy_stream
        if it.after_layer is not None:
            stream.wait_event(self.done[it.after_layer])
        start, end = self._link.take(self.nbytes[it.layer])
        with torch.cuda.stream(stream):
            start.record(stream)
            for src, dst in self.runs[it.layer]:
                dst.copy_(src, non_blocking=True)
            end.record(stream)
        self.copied[it.layer] = end

    # -- stats -------------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Counters since construction (or reset_stats); reads back pending timing events (a sync)."""
        self._link.read_all()
        self._stall.read_all()
        link = self._link
        return {
            **self.plan.summary(),
            "ring_device": str(self.device),
            "forwards": self.forwards,
            "layers_run": self.layers_run,
            "copies": link.count,
            "bytes_copied": link.nbytes,
            "copy_s": link.seconds,
            "link_GBps": link.nbytes / link.seconds / 1e9 if link.seconds > 0 else 0.0,
            "stall_s": self._stall.seconds,
            "resyncs": self.schedule.resyncs,
            "evictions": self.schedule.evictions,
        }

    def reset_stats(self) -> None:
        self._link.reset()
        self._stall.reset()
        self.forwards = 0
        self.layers_run = 0
