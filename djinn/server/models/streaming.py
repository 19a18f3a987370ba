"""Weight streaming on the module path (DESIGN.md sections 6 and 10): a model larger than its GPU
weight budget keeps as many whole decoder layers resident as fit and streams the rest through a ring.

`stream_module` is the mechanism on any module built on the meta device: plan, pack the streamed layers
into pinned host memory, bind resident tensors and ring views, hook the decoder layers. The registry
calls it with the Text segment as the source (`stream_from_text`); the exp2 benchmark calls it
in-process on a model object. Runs on the engine thread only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from ...protocol.errors import InvalidRequest
from ...vmu.planner import DEFAULT_ALIGNMENT, DEFAULT_SLOTS, PlanError, StreamedLayer, StreamPlan, plan_stream
from ...vmu.ring_buffer import PinnedLayers, RingStreamer
from ...vmu.text import DEVICE, HOST, PINNED, TextSegment
from .tensors import bind_tensors, named_tensors

GIB = 1 << 30  # weight_budget_gb is in GiB (2**30 bytes), like the budgets in BASELINES.md


def budget_bytes(value: object, default_gb: float | None) -> int | None:
    """A request's weight_budget_gb (or the server default when it sends none), in bytes."""
    v = default_gb if value is None else value
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise InvalidRequest(f"weight_budget_gb must be a number of GiB > 0, got {v!r}")
    return int(v * GIB)


def check_device(device: torch.device, budget: int | None) -> None:
    if budget is not None and torch.device(device).type != "cuda":
        raise InvalidRequest(
            f"weight streaming needs a CUDA device: this server runs on {device}, where weights already live "
            "in host memory. Drop weight_budget_gb, or serve on a GPU"
        )


def upload_residency(device: torch.device, stage: object, default_budget_gb: float | None = None) -> str:
    """Where an upload lands: on the device, or staged on the host for a model that will have a weight
    budget (the client's stage="host", or the server's default budget), so that streamed weights
    never occupy the GPU. A CPU server's device is the host already."""
    if stage is not None and stage != "host":
        raise InvalidRequest(f"upload stage must be 'host' or absent, got {stage!r}")
    if torch.device(device).type != "cuda" or (stage is None and default_budget_gb is None):
        return DEVICE
    return HOST


# -- layout ------------------------------------------------------------------------------------------
def find_decoder_layers(module: nn.Module) -> tuple[str, nn.ModuleList]:
    """The streaming unit: the ModuleList of identical blocks holding the most parameters."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in module.named_modules():
        if name and isinstance(mod, nn.ModuleList) and len(mod) and len({type(c) for c in mod}) == 1:
            size = sum(p.numel() for p in mod.parameters())
            if size and (best is None or size > best[0]):
                best = (size, name, mod)
    if best is None:
        raise InvalidRequest(f"{type(module).__name__} has no decoder layers (a ModuleList of identical blocks) "
                             "to stream; it cannot run with a weight budget")
    return best[1], best[2]


@dataclass(frozen=True)
class ModelLayout:
    """Every tensor name of a module with its key (a weight hash on the server), split into the
    decoder layers (the streaming unit) and the fixed rest (embeddings, final norm, lm_head, rotary)."""

    layers_path: str
    fixed: tuple[tuple[str, str], ...]
    layers: tuple[tuple[tuple[str, str], ...], ...]

    def keys(self, i: int) -> tuple[str, ...]:
        """Layer i's distinct keys, in first-appearance order: the planner's size list for that layer."""
        return tuple(dict.fromkeys(k for _, k in self.layers[i]))

    def fixed_keys(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(k for _, k in self.fixed))


def layout_of(module: nn.Module, key_of: Callable[[str], str]) -> ModelLayout:
    path, layers = find_decoder_layers(module)
    prefix = path + "."
    per_layer: list[list[tuple[str, str]]] = [[] for _ in layers]
    fixed: list[tuple[str, str]] = []
    for name, _ in named_tensors(module):
        if name.startswith(prefix):
            index = int(name[len(prefix):].split(".", 1)[0])
            per_layer[index].append((name, key_of(name)))
        else:
            fixed.append((name, key_of(name)))
    return ModelLayout(path, tuple(fixed), tuple(tuple(x) for x in per_layer))


def plan_for(layout: ModelLayout, size_of: Callable[[str], int], budget: int, *,
             alignment: int = DEFAULT_ALIGNMENT, slots: int = DEFAULT_SLOTS) -> StreamPlan:
    fixed = sum(size_of(k) for k in layout.fixed_keys())
    sizes = [[size_of(k) for k in layout.keys(i)] for i in range(len(layout.layers))]
    try:
        return plan_stream(sizes, fixed, budget, alignment=alignment, slots=slots)
    except PlanError as e:
        raise InvalidRequest(str(e)) from None


# -- the streamed model ------------------------------------------------------------------------------
@dataclass
class StreamedModel:
    """A module bound to a plan: resident tensors on the device, streamed layers as ring views."""

    module: nn.Module
    layout: ModelLayout
    plan: StreamPlan
    streamer: RingStreamer | None              # None when everything fits the budget
    pinned: PinnedLayers | None                # the host buffers this model allocated (owns)
    host: dict[int, torch.Tensor]              # decoder layer -> its packed host buffer
    adopted: set[str] = field(default_factory=set)  # Text entries that became views into `pinned`

    @property
    def ring_bytes(self) -> int:
        return self.plan.ring_bytes if self.streamer is not None else 0

    @property
    def pinned_bytes(self) -> int:
        return self.pinned.nbytes if self.pinned is not None else 0

    def stats(self) -> dict:
        out = self.streamer.stats() if self.streamer is not None else self.plan.summary()
        out["pinned_host_bytes"] = self.pinned_bytes
        return out

    def adopt_text(self, text: TextSegment) -> None:
        """Point HOST Text entries of streamed tensors at their copy in the pinned buffers, so the
        staged pageable copy is freed (Note [Text residency] in djinn/vmu/text.py)."""
        if self.pinned is None:
            return
        for sl in self.plan.streamed:
            buf = self.host[sl.layer]
            for key, p in zip(self.layout.keys(sl.layer), sl.tensors):
                entry = text.entry(key)
                if entry.residency != HOST or p.nbytes == 0:
                    continue
                view = buf[p.host_offset:p.host_offset + p.nbytes].view(entry.tensor.dtype).view(entry.tensor.shape)
                text.rehome(key, view, PINNED)
                self.adopted.add(key)

    def close(self, text: TextSegment | None = None) -> None:
        """Unhook, drop the ring, copy surviving adopted Text entries out, free the pinned buffers."""
        if self.streamer is not None:
            self.streamer.close()
            self.streamer = None
        if self.pinned is not None:
            if text is not None:
                owned = {c.untyped_storage().data_ptr() for c in self.pinned.chunks}
                for key in self.adopted:
                    if key in text:
                        entry = text.entry(key)
                        if entry.residency == PINNED and entry.tensor.untyped_storage().data_ptr() in owned:
                            text.rehome(key, entry.tensor.clone(), HOST)
            self.host = {}
            self.pinned.close()
            self.pinned = None
        self.adopted = set()


def stream_module(module: nn.Module, layout: ModelLayout, plan: StreamPlan, device: torch.device, *,
                  resident: Callable[[str], torch.Tensor], source: Callable[[str], torch.Tensor],
                  host_layers: Mapping[int, torch.Tensor] | None = None) -> StreamedModel:
    """Bind a meta-built `module` to `plan` on `device`.

    resident(key): the device tensor for a resident key. source(key): any tensor with a streamed key's
    dtype, shape and bytes (host or device). host_layers: already-packed pinned buffers per decoder
    layer (Note [Host layout] in planner.py); streamed layers without one are packed from `source`
    into pinned memory allocated here, once.
    """
    device = torch.device(device)
    tensors: dict[str, torch.Tensor] = {}
    for name, key in layout.fixed:
        tensors[name] = resident(key)
    for i in plan.resident:
        for name, key in layout.layers[i]:
            tensors[name] = resident(key)
    if not plan.streamed:
        bind_tensors(module, tensors)
        return StreamedModel(module, layout, plan, None, None, {})
    check_device(device, plan.budget)
    host = dict(host_layers or {})
    need = [sl for sl in plan.streamed if sl.layer not in host]
    pinned = PinnedLayers([sl.host_bytes for sl in need], plan.alignment) if need else None
    streamer = None
    try:
        for sl, buf in zip(need, pinned.buffers if pinned is not None else []):
            pack_layer(buf, sl, [source(k) for k in layout.keys(sl.layer)])
            host[sl.layer] = buf
        streamer = RingStreamer(plan, [host[sl.layer] for sl in plan.streamed], device)
        for k, sl in enumerate(plan.streamed):
            index = {key: j for j, key in enumerate(layout.keys(sl.layer))}
            for name, key in layout.layers[sl.layer]:
                src = source(key)
                tensors[name] = streamer.view(k, index[key], src.dtype, src.shape)
        bind_tensors(module, tensors)
        layers = module.get_submodule(layout.layers_path)
        streamer.attach([layers[sl.layer] for sl in plan.streamed])
    except BaseException:
        if streamer is not None:
            streamer.close()
        if pinned is not None:
            pinned.close()
        raise
    return StreamedModel(module, layout, plan, streamer, pinned, host)


def pack_layer(buf: torch.Tensor, layer: StreamedLayer, tensors: Sequence[torch.Tensor]) -> None:
    """Copy a layer's tensors into its host buffer at their planned host offsets."""
    if len(tensors) != len(layer.tensors):
        raise ValueError(f"layer {layer.layer}: {len(tensors)} tensors for {len(layer.tensors)} placements")
    for p, t in zip(layer.tensors, tensors):
        if p.nbytes == 0:
            continue
        flat = t.detach().reshape(-1).view(torch.uint8)
        if flat.numel() != p.nbytes:
            raise ValueError(f"layer {layer.layer}: a {flat.numel()}-byte tensor where the plan has {p.nbytes}")
        buf[p.host_offset:p.host_offset + p.nbytes].copy_(flat)


# -- server glue -------------------------------------------------------------------------------------
def stream_from_text(module: nn.Module, tensors: dict[str, str], text: TextSegment, device: torch.device,
                     budget: int, *, alignment: int = DEFAULT_ALIGNMENT, slots: int = DEFAULT_SLOTS) -> StreamedModel:
    """The registry's entry point: `tensors` maps every tensor name of `module` to its Text hash."""
    check_device(device, budget)
    layout = layout_of(module, tensors.__getitem__)
    plan = plan_for(layout, lambda h: text.entry(h).nbytes, budget, alignment=alignment, slots=slots)
    sm = stream_module(module, layout, plan, device, resident=lambda h: text.to_device(h, device), source=text.get)
    sm.adopt_text(text)
    return sm


def segment_bytes(text: TextSegment, models) -> tuple[int, int]:
    """(weight bytes on the device, weight bytes in host memory), rings and pinned buffers included."""
    streamed = [m.streamed for m in models if getattr(m, "streamed", None) is not None]
    return (text.device_nbytes + sum(s.ring_bytes for s in streamed),
            text.host_nbytes + sum(s.pinned_bytes for s in streamed))
