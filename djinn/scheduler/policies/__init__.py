"""The scheduling policies, one file each, and the registry the server config names them by."""
from __future__ import annotations

from ..interface import Policy
from .lru import LRUPolicy
from .recompute import RecomputePolicy
from .resident import ResidentPolicy
from .signal import SignalPolicy

POLICIES: dict[str, type] = {p.name: p for p in (SignalPolicy, LRUPolicy, RecomputePolicy, ResidentPolicy)}


def policy_from_config(cfg) -> Policy:
    """The policy the server config names, with the config's options for it."""
    cls = POLICIES.get(cfg.policy)
    if cls is None:
        raise ValueError(f"unknown scheduling policy {cfg.policy!r}; choose one of {sorted(POLICIES)}")
    return cls.from_config(cfg)


def get_policy(name: str, **options) -> Policy:
    """The policy called `name`, built with `options` (only `signal` takes any: margin_s, headroom, always)."""
    cls = POLICIES.get(name)
    if cls is None:
        raise ValueError(f"unknown scheduling policy {name!r}; choose one of {sorted(POLICIES)}")
    try:
        return cls(**options)
    except TypeError:
        raise ValueError(f"policy {name!r} does not take options {sorted(options)}") from None


__all__ = ["POLICIES", "get_policy", "policy_from_config", "LRUPolicy", "RecomputePolicy", "ResidentPolicy", "SignalPolicy"]
