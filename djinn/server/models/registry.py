"""Models the server builds itself (the module path, DESIGN.md section 4.1).

A model is built from its Hugging Face config on the meta device, for an architecture on the
allow-list only (never an arbitrary import), and its parameters and buffers are pointed at tensors of
the Text segment. A model handle is (architecture, config, weight hashes): the same model remoted by
ten sessions is built once and ref-counted.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ...protocol.errors import InvalidRequest, ModelNotSupported, clip, short
from ...protocol.hashing import weight_hash
from ...vmu.text import DEVICE, HOST, TextSegment
from . import streaming
from .tensors import bind_tensors, named_tensors, unique_tensors

log = logging.getLogger("djinn.models")

# Note [Attention implementations]
#     transformers resolves `attn_implementation` by name, and some names fetch code: a hub kernel
#     ("kernels-community/flash-attn", any "org/repo"), and "flash_attention_2" where the flash_attn
#     package is missing but `kernels` is installed (it falls back to the hub kernel). A client names
#     the implementation (register_model's and init_model's attn_impl) and can set one inside its config
#     (an `attn_implementation` key). The server builds models only with the implementations below,
#     which are torch code it ships with, and checks both the argument and the built config (and its
#     sub-configs) before any module is made: anything else is InvalidRequest at registration.
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


def check_attn_impl(attn_impl: object) -> None:
    """InvalidRequest unless `attn_impl` is None (transformers' default: sdpa, else eager) or allowed."""
    if attn_impl is not None and attn_impl not in ATTN_IMPLEMENTATIONS:
        raise InvalidRequest(f"attention implementation {short(attn_impl)} is not allowed on this server; "
                             f"allowed: {list(ATTN_IMPLEMENTATIONS)} (Note [Attention implementations])")


def checked_config(cls, config: dict):
    """The transformers config for `cls` built from a client's (or a model directory's) config map,
    refused unless it is `cls`'s config class and names only allowed attention implementations."""
    from transformers import AutoConfig

    cfg = dict(config)
    model_type = cfg.pop("model_type", None)
    try:
        hf_config = AutoConfig.for_model(model_type, **cfg)
    except Exception as e:
        raise InvalidRequest(f"bad config for {cls.__name__}: {clip(str(e), 300)}") from None
    if not isinstance(hf_config, cls.config_class):
        raise InvalidRequest(f"{cls.__name__} needs a {cls.config_class.__name__}, got a "
                             f"{type(hf_config).__name__} (model_type {short(model_type)})")
    for c in _configs(hf_config):
        check_attn_impl(getattr(c, "_attn_implementation", None))
    return hf_config


def _configs(hf_config) -> list:
    """A config and its sub-configs (text_config, vision_config, ...), each once."""
    out, todo = [], [hf_config]
    while todo:
        c = todo.pop()
        if any(c is o for o in out):
            continue
        out.append(c)
        for key in getattr(c, "sub_configs", None) or {}:
            sub = getattr(c, key, None)
            if sub is not None and hasattr(sub, "sub_configs"):
                todo.append(sub)
    return out


@dataclass
class ModelEntry:
    model_id: str
    arch: str
    module: nn.Module
    hashes: dict[str, str]  # tensor name -> weight hash
    config: dict
    refs: set[str] = field(default_factory=set)  # session ids using it
    streamed: streaming.StreamedModel | None = None  # set when it runs under a GPU weight budget
    fast: object = None  # its decode pool (fastpath.DecodePool), made at its first fast generate
    eager_why: str | None = None  # why its last generate that decoded eagerly did not take the fast path
    # register()'s arguments but the tensors: what another worker registers it from (cluster/migrate.py)
    recipe: dict | None = None
    tp: int | None = None  # sharded over this many workers (Note [Tensor-parallel sessions])

    @property
    def nbytes(self) -> int:
        if self.streamed is not None:  # ring views share one storage: count the weights, not the views
            return self.streamed.plan.total_bytes
        return sum(t.numel() * t.element_size() for t in unique_tensors(self.module))


class ModelRegistry:
    def __init__(self, text: TextSegment, device: torch.device, architectures: list[str]):
        self.text = text
        self.device = device
        self.architectures = set(architectures)
        self._models: dict[str, ModelEntry] = {}

    def __iter__(self):
        return iter(list(self._models.values()))

    def get(self, model_id: object) -> ModelEntry:
        entry = self._models.get(model_id) if isinstance(model_id, str) else None
        if entry is None:
            raise InvalidRequest(f"model {model_id!r} is not registered on this server")
        return entry

    def model_class(self, arch: object):
        if not isinstance(arch, str) or arch not in self.architectures:
            raise ModelNotSupported(
                f"the server cannot build {arch!r} itself: it is not among the {len(self.architectures)} "
                "architectures it allows (djinn.supported_architectures() lists them). Other modules take the "
                "graph path."
            )
        import transformers

        cls = getattr(transformers, arch, None)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ModelNotSupported(f"{arch} is allowed but this server's transformers has no such class")
        return cls

    def register(self, arch: object, config: object, attn_impl: object, tensors: object,
                 generation_config: object = None, weight_budget: int | None = None,
                 tp: int | None = None) -> tuple[ModelEntry, bool]:
        """Build (or find) the model whose weights are the Text entries named in `tensors`.

        The caller must hold a reference on every hash (a session pin); the model takes its own.
        With `weight_budget` (bytes, CUDA only) the decoder layers that do not fit stream from pinned
        host memory (djinn/server/models/streaming.py). Returns (entry, created).
        """
        streaming.check_device(self.device, weight_budget)
        cls = self.model_class(arch)
        if not isinstance(config, dict) or not isinstance(tensors, dict):
            raise InvalidRequest("register_model needs a config map and a map of tensor name -> hash")
        check_attn_impl(attn_impl)  # Note [Attention implementations]; the config's own is checked in _build
        missing = [h for h in tensors.values() if h not in self.text]
        if missing:
            raise InvalidRequest(f"{len(missing)} weights are not uploaded (first: {str(missing[0])[:12]})")
        if tp is not None and weight_budget is not None:
            raise InvalidRequest("a tensor-parallel model does not stream its weights (drop weight_budget_gb)")
        model_id = _model_id(arch, config, attn_impl, tensors, generation_config, weight_budget, tp)
        entry = self._models.get(model_id)
        if entry is not None:
            return entry, False
        module = self._build(cls, config, attn_impl, generation_config)
        streamed = None
        if tp is not None:  # Note [Tensor-parallel sessions]: from the Text entries wherever they are
            from ..cluster import tensor_parallel

            bind_tensors(module, {name: self.text.get(h) for name, h in tensors.items()})
            tensor_parallel.shard(module, tp, self.device)  # each sharded weight: its shard, on the device
            module.to(self.device)                           # the replicated rest
        elif weight_budget is None:
            bind_tensors(module, {name: self.text.to_device(h, self.device) for name, h in tensors.items()})
        else:
            streamed = streaming.stream_from_text(module, tensors, self.text, self.device, weight_budget)
        for h in tensors.values():
            self.text.acquire(h)
        entry = ModelEntry(model_id, arch, module, dict(tensors), config, streamed=streamed, tp=tp,
                           recipe={"arch": arch, "config": config, "attn_impl": attn_impl,
                                   "generation_config": generation_config, "weight_budget": weight_budget})
        self._models[model_id] = entry
        log.info("model %s built: %s, %d tensors, %.1f MB", model_id[:12], arch, len(tensors), entry.nbytes / 1e6)
        if streamed is not None:
            plan = streamed.plan
            log.info("model %s streams %d of %d layers (%.2f GB per forward) through a %.2f GB ring; budget %.2f GiB",
                     model_id[:12], len(plan.streamed), len(plan.layer_bytes), plan.streamed_bytes / 1e9,
                     plan.ring_bytes / 1e9, plan.budget / 2**30)
        return entry, True

    def load_dir(self, path: str, roots: list[str], loopback: bool,
                 weight_budget: int | None = None, tp: int | None = None) -> tuple[ModelEntry, bool]:
        """Load a Hugging Face directory (config.json + safetensors) that lives on the server."""
        from safetensors.torch import load_file
        from transformers import AutoConfig

        streaming.check_device(self.device, weight_budget)

        if not roots and not loopback:
            raise InvalidRequest("this server loads model directories only under its configured model_roots")
        within = _RootCheck(roots)
        p = Path(within(path, path))
        if not (p / "config.json").is_file():
            raise InvalidRequest(f"{short(path)} has no config.json")
        # Every file is read through its resolved path, which must stay under a root (Note [Model roots]).
        config_file = within(p / "config.json", path)
        files = [within(f, path) for f in sorted(p.glob("*.safetensors"))]
        if not files:
            raise InvalidRequest(f"{short(path)} has no .safetensors files (pickled checkpoints are never loaded)")
        hf_config = AutoConfig.from_pretrained(config_file, trust_remote_code=False)
        arch = (hf_config.architectures or [None])[0]
        self.model_class(arch)
        config = json.loads(hf_config.to_json_string(use_diff=False))
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(f, device="cpu"))
        # Build once on meta to learn the full tensor list (tied weights, non-persistent buffers).
        module = self._build(self.model_class(arch), config, None, None)
        hashes: dict[str, str] = {}
        tensors: dict[str, torch.Tensor] = {}
        rebuilt: dict[str, nn.Module] = {}
        for name, _ in named_tensors(module):
            src = state.get(name)
            if src is None:
                src = _fill_missing(module, name, state, rebuilt)
            h = weight_hash(src)
            hashes[name] = h
            if h not in tensors:
                tensors[h] = src
        pinned = [h for h in tensors]
        # With a budget, weights stay on the host until the plan says which layers are resident.
        # Sharded weights too: each worker's device gets only its shards (Note [Tensor-parallel sessions]).
        residency = HOST if weight_budget is not None or tp is not None else DEVICE
        for h, t in tensors.items():
            self.text.add(h, t if residency == HOST else t.to(self.device), residency)
        gen = None
        if (p / "generation_config.json").is_file():
            from transformers import GenerationConfig

            with open(within(p / "generation_config.json", path)) as f:
                gen = GenerationConfig.from_dict(json.load(f)).to_dict()
        try:
            return self.register(arch, config, None, hashes, gen, weight_budget, tp)
        finally:
            for h in pinned:
                self.text.release(h)

    def register_weights(self, tensors: object) -> tuple[ModelEntry, bool]:
        """A graph-path model (DESIGN.md section 4.2): only its weights, no code. The server never builds
        the module; SRGs name these weights by hash (djinn/server/handlers/graph_ops.py). Same pinning contract
        as `register`: the caller holds a reference on every hash."""
        if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tensors.items()):
            raise InvalidRequest("register_graph needs tensors: {name: hash}")
        missing = [h for h in tensors.values() if h not in self.text]
        if missing:
            raise InvalidRequest(f"{len(missing)} weights are not uploaded (first: {str(missing[0])[:12]})")
        model_id = _model_id(GRAPH_ARCH, {}, None, tensors)
        entry = self._models.get(model_id)
        if entry is not None:
            return entry, False
        table = WeightTable({name: self.text.to_device(h, self.device) for name, h in tensors.items()}, tensors)
        for h in tensors.values():
            self.text.acquire(h)
        entry = ModelEntry(model_id, GRAPH_ARCH, table, dict(tensors), {})
        self._models[model_id] = entry
        log.info("graph model %s registered: %d tensors, %.1f MB", model_id[:12], len(tensors), entry.nbytes / 1e6)
        return entry, True

    def acquire(self, entry: ModelEntry, sid: str) -> None:
        entry.refs.add(sid)

    def release(self, model_id: str, sid: str) -> None:
        entry = self._models.get(model_id)
        if entry is None:
            return
        entry.refs.discard(sid)
        if not entry.refs:
            del self._models[model_id]
            for h in entry.hashes.values():
                self.text.release(h)
            if entry.streamed is not None:  # after the releases: only entries others still use are copied out
                entry.streamed.close(self.text)
            log.info("model %s freed", model_id[:12])

    def _build(self, cls, config: dict, attn_impl: object, generation_config: object) -> nn.Module:
        from transformers import GenerationConfig

        check_attn_impl(attn_impl)
        hf_config = checked_config(cls, config)
        kwargs = {"attn_implementation": attn_impl} if attn_impl else {}
        with torch.device("meta"):
            module = cls._from_config(hf_config, **kwargs)
        if isinstance(generation_config, dict) and hasattr(module, "generation_config"):
            # Its values are checked where they take effect, merged under each generate's arguments
            # (Note [Effective generate arguments] in executor.py); here only what transformers refuses.
            try:
                module.generation_config = GenerationConfig.from_dict(generation_config)
            except (ValueError, TypeError) as e:
                raise InvalidRequest(f"bad generation_config for {cls.__name__}: {str(e)[:300]}") from None
        return module.eval()


# Note [Model roots]
#     `model_roots` bounds what a client can make the server read. A path is checked after every symlink
#     in it is resolved (os.path.realpath), the directory's and each file's own: a `config.json` or
#     `.safetensors` link inside a root that points outside it is refused, and the file is then read
#     through the resolved path. With no roots (loopback only) every path is taken.
class _RootCheck:
    """Resolves a path and checks it is under one of the roots (Note [Model roots])."""

    def __init__(self, roots: list[str]):
        self.roots = [os.path.realpath(os.path.expanduser(str(r))) for r in roots]

    def __call__(self, p, asked: str) -> str:
        real = os.path.realpath(p)
        if self.roots and not any(os.path.commonpath([real, r]) == r for r in self.roots):
            what = short(asked) if str(p) == asked else f"{os.path.basename(str(p))} in {short(asked)}"
            raise InvalidRequest(f"{what} is outside the server's model_roots {self.roots} (symlinks resolved)")
        return real


GRAPH_ARCH = "graph"


class WeightTable(nn.Module):
    """The weights of a graph-path model, as buffers (so accounting and stats see them), by hash."""

    def __init__(self, tensors: dict[str, torch.Tensor], hashes: dict[str, str]):
        super().__init__()
        self.by_hash: dict[str, torch.Tensor] = {}
        for i, (name, t) in enumerate(tensors.items()):
            if hashes[name] not in self.by_hash:
                self.register_buffer(f"w{i}", t, persistent=False)
                self.by_hash[hashes[name]] = t

    def forward(self, *args, **kwargs):
        raise ModelNotSupported("this model runs on the graph path only (its module code stays on the client)")


def _model_id(arch, config, attn_impl, tensors, generation_config=None, weight_budget=None, tp=None) -> str:
    # generation_config is part of the identity: it sets generate()'s defaults, so two clients whose
    # models differ only there must not share one module (the first one's defaults would win).
    # So is a weight budget: a streamed module and a resident one are different modules.
    parts = [arch, config, attn_impl, sorted(tensors.items()), generation_config]
    if weight_budget is not None:
        parts.append({"weight_budget": weight_budget})
    if tp is not None:  # a sharded module is another module
        parts.append({"tp": tp})
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _fill_missing(module: nn.Module, name: str, state: dict, rebuilt: dict) -> torch.Tensor:
    """A tensor a checkpoint does not store: a tied weight, or a buffer computed at init (rotary)."""
    tied = getattr(module, "_tied_weights_keys", None) or {}
    if isinstance(tied, dict) and name in tied and tied[name] in state:
        return state[tied[name]]
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if attr in owner._buffers:
        # Recompute init-time buffers by rebuilding this submodule on the CPU.
        if owner_name not in rebuilt:
            cfg = getattr(owner, "config", None) or module.config
            with torch.device("cpu"):
                rebuilt[owner_name] = type(owner)(config=cfg)
        return getattr(rebuilt[owner_name], attr)
    raise InvalidRequest(f"checkpoint has no tensor {name}")

