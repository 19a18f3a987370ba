"""A request's arguments, checked and resolved through the calling client's session: ids, seeds,
lists, the model a session holds, and how many tokens a call may feed. Shared by every op module.

Note [Isolation]
    Every handle an op takes is resolved through the calling client's own session: the session id
    through `engine.session` (another client's session does not exist for it), tensor handles through
    `Session.tensor` (that session's tensors and paused-stop tensors only), run ids through
    `RunTable.get` (that session's runs only), and model ids through `model_of` (attached to that
    session) or, for attach_model, the models this client holds in one of its sessions. A foreign id is
    answered exactly like one that never existed. Session, tensor, stop and run ids come from the
    secrets module (96, 64, 64 and 96 bits). Model ids are content addresses, not secrets: knowing one
    gives nothing, since every use checks that the session holds the model.
"""
from __future__ import annotations

from typing import Any

from ...protocol.errors import InvalidRequest, ModelNotSupported
from ..execution import executor
from ..models.registry import GRAPH_ARCH


def model_id_of(args) -> str:
    mid = args.get("model_id")
    if not isinstance(mid, str):
        raise InvalidRequest(f"model_id must be a string, got {type(mid).__name__}")
    return mid


def model_of(engine, s, args):
    mid = model_id_of(args)
    if mid not in s.models:
        raise InvalidRequest(f"model {mid!r} is not attached to session {s.sid[:8]}; remote it in this session")
    return engine.models.get(mid)


def require_module(entry, what: str) -> None:
    """A graph-path model (weights only, no code on the server) cannot run `what`: a typed error naming
    what works instead, not an AttributeError on its weight table."""
    if entry.arch == GRAPH_ARCH:
        raise ModelNotSupported(f"{what} needs a model the server builds itself (the module path); this one runs on "
                                "the graph path (forward only: its code stays on the client). Remote a Hugging Face "
                                "model whose architecture is in djinn.supported_architectures(), or decode with "
                                "forward calls: rm(ids, past_key_values=cache, use_cache=True) keeps the cache on "
                                "the server")


def seed_of(args: dict, meta: dict | None = None) -> int | None:
    """A request's optional `seed`: None or an int (not a bool). Where it names none, the seed a front
    gave every worker of a spanning session in `meta` (Note [Tensor-parallel sessions]), if any."""
    seed = args.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise InvalidRequest(f"seed must be an int, got {seed!r}")
    return seed if seed is not None or meta is None else meta.get("seed")


def str_list(v: Any, what: str) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise InvalidRequest(f"{what} must be a list of strings")
    return v


def check_prefill(engine, input_ids: Any, what: str, module=None) -> None:
    """Note [Stack reserve] in kv_pools.py: no call feeds more new tokens at once than were measured
    (Whisper's input_features: batch x its encoder's positions, `executor.fed_tokens`)."""
    n = executor.fed_tokens(module, input_ids)
    if n is not None:
        limit = engine.cfg.max_prefill_tokens
        if n > limit:
            raise InvalidRequest(f"{what} feeds {n} tokens at once (batch x length), over max_prefill_tokens="
                                 f"{limit}; split the input or start the server with a larger --max-prefill-tokens")
