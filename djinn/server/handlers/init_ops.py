"""init_model: the server builds a Hugging Face model from its config with seeded random weights.

For benchmarks and tests that need a model's shape, not its trained weights (a 26 GB Llama-2-13B in
fp16, say): nothing but the config crosses the wire, and the weights are initialized on the engine's
device, never on the client or the host.

The server does exactly what this local recipe does, so a client can rebuild the same bits:

    torch.manual_seed(seed)
    with torch.device(device):                                  # the server's device
        model = getattr(transformers, arch)._from_config(config, **({"dtype": dtype} if dtype else {}))
    model.eval()

which is `AutoModelForCausalLM.from_config(config, dtype=dtype)` when `arch` is the config's causal-LM
class (what the client picks when the config names no architecture). With dtype None, transformers
uses `config.dtype` if the config sets one, else torch's default (float32). The weights are
initialized in that dtype; initializing in float32 and casting is another recipe (not always the same bits).

Note [Seeded weights are named, not hashed]
    The weights enter the Text segment like any others, so the model is built, shared and ref-counted
    through ModelRegistry.register exactly as an uploaded or loaded one. Their Text keys are not
    content hashes: hashing 26 GB would cost more than building it. They are named by an identity key,
    sha256 over a canonical JSON of (arch, config, dtype, seed), which determines the bits on a given
    device and software stack: `init:{key}:{tensor name}`. Upload hashes are 64 hex digits and are
    verified against the bytes, so no upload can plant bytes under such a name. A second request with
    the same identity finds the keys held by a model and builds nothing; one that differs only in the
    attention implementation or weight budget gets its own module over the same Text entries.
"""
from __future__ import annotations

import hashlib
import json
import logging

import torch
from torch import nn

from ...protocol.errors import InvalidRequest
from ...protocol.tensors import DTYPES
from ...vmu.text import DEVICE, HOST, TextSegment
from ..models import streaming
from ..models.registry import check_attn_impl, checked_config
from ..models.tensors import named_tensors
from .model_ops import attach, model_info, tp_of
from .registry import op

log = logging.getLogger("djinn.init_ops")

#: Dtypes weights can be initialized in: normal_/uniform_ have no integer, bool or fp8 kernels.
INIT_DTYPES = ("float16", "bfloat16", "float32", "float64")


@op
def init_model(engine, client_id, rid, args):
    """Build (or find) `arch` from `config` with weights drawn after torch.manual_seed(seed) on the
    server's device (module docstring). Replies like load_model: model_id, arch, bytes, created, config."""
    s = engine.session(client_id, args)
    arch, config, attn_impl = args.get("arch"), args.get("config"), args.get("attn_impl")
    cls = engine.models.model_class(arch)  # ModelNotSupported before anything is built
    if not isinstance(config, dict):
        raise InvalidRequest("init_model needs the config as a map")
    check_attn_impl(attn_impl)  # checked by register too, but only after the build
    dtype = _dtype(args.get("dtype"))
    seed = _seed(args.get("seed", 0))
    budget = streaming.budget_bytes(args.get("weight_budget_gb"), engine.cfg.weight_budget_gb)
    streaming.check_device(engine.device, budget)  # a CPU server refuses a budget before it builds
    tp = tp_of(s, args)
    # A sharded model is drawn on the host, so no device ever holds it whole (Note [Tensor-parallel
    # sessions]); its weights are then another recipe's than the same config drawn on a GPU.
    draw_on = torch.device("cpu") if tp is not None else engine.device
    key = identity_key(arch, config, args.get("dtype"), seed) + ("" if draw_on == engine.device else "/host")
    held = _held_by(engine.models, arch, key)
    pins: list[str] = []
    try:
        if held is not None:  # the weights exist: register finds the module, or binds a new one to them
            config, tensors = held.config, dict(held.hashes)
        else:
            module = _init_module(cls, checked_config(cls, config), dtype, attn_impl, seed, draw_on)
            config = json.loads(module.config.to_json_string(use_diff=False))
            # With a budget the weights wait on the host until the plan says which layers stay (like
            # load_dir); sharded ones stay there whole, each worker's device holding its shards.
            tensors = _store(engine.text, module, key, HOST if budget is not None or tp else DEVICE, pins)
            del module
        entry, created = engine.models.register(arch, config, attn_impl, tensors, None, budget, tp)
    finally:
        for h in pins:  # the model holds its own references now (or failed and holds none)
            engine.text.release(h)
    attach(engine, s, entry)
    if created:
        log.info("model %s from config: %s seed=%d dtype=%s%s", entry.model_id[:12], arch, seed, args.get("dtype"),
                 " (weights shared with another model)" if held is not None else "")
    return dict(model_info(entry, created), config=entry.config)


def identity_key(arch: str, config: dict, dtype: str | None, seed: int) -> str:
    """sha256 of a canonical JSON of what determines seeded random weights. An identity, not a content
    hash (Note [Seeded weights are named, not hashed]): equal keys mean equal requests, and equal bits
    only on the same device, torch and transformers (the config carries transformers_version)."""
    try:
        blob = json.dumps([arch, config, dtype, seed], sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidRequest(f"init_model config must be plain JSON: {e}") from None
    return hashlib.sha256(blob.encode()).hexdigest()


def _dtype(name: object) -> torch.dtype | None:
    if name is None:
        return None
    if not isinstance(name, str) or name not in DTYPES:
        raise InvalidRequest(f"unknown dtype {name!r}; dtypes: {sorted(DTYPES)}")
    if name not in INIT_DTYPES:
        raise InvalidRequest(f"weights cannot be initialized in {name}; use one of {list(INIT_DTYPES)}")
    return DTYPES[name]


def _seed(seed: object) -> int:
    # torch.manual_seed takes any int in [-2**63, 2**64); negatives alias large ones, so keep one spelling.
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise InvalidRequest(f"seed must be an int in [0, 2**64), got {seed!r}")
    return seed


def _init_module(cls, hf_config, dtype, attn_impl, seed: int, device: torch.device) -> nn.Module:
    """The documented recipe, on the engine's device. fork_rng puts the server's RNG state back, so
    seeding here does not change what other sessions' unseeded sampling draws next."""
    kwargs = {"dtype": dtype} if dtype is not None else {}  # dtype=None would override config.dtype
    if attn_impl is not None:
        kwargs["attn_implementation"] = attn_impl
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        with torch.device(device):
            module = cls._from_config(hf_config, **kwargs)
    return module.eval()


def _store(text: TextSegment, module: nn.Module, key: str, residency: str, pins: list[str]) -> dict[str, str]:
    """Put each distinct tensor of `module` into Text under its name (tied names share the first one's
    entry); every new entry's one reference is appended to `pins` as soon as it is taken."""
    names: dict[int, str] = {}
    tensors: dict[str, str] = {}
    for name, t in named_tensors(module):
        h = names.get(id(t))
        if h is None:
            h = names[id(t)] = f"init:{key}:{name}"
            data = t.detach()
            text.add(h, data.cpu() if residency == HOST else data, residency)
            pins.append(h)
        tensors[name] = h
    return tensors


def _held_by(models, arch: str, key: str):
    """A model whose weights are this identity's Text entries, or None."""
    prefix = f"init:{key}:"
    for entry in models:
        if entry.arch == arch and entry.hashes and all(h.startswith(prefix) for h in entry.hashes.values()):
            return entry
    return None
