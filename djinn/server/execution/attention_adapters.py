"""Attention modules of older transformers releases that do not dispatch through AttentionInterface.

Note [Attention adapters]
    The paged step (Note [One step for every architecture] in paged_step.py) needs every attention
    module to call `cache.update(k, v, layer)` and then the function registered under
    `config._attn_implementation`. Falcon and GPT-J do that from transformers 5.2x on; in 5.17 (what
    the GPU machines have) `FalconAttention.forward` and `GPTJAttention._attn` attend by themselves over
    what the cache returned, so the probe left every such model eager there. An adapter is a replacement forward
    for such a module class, written from the class's own parts (its projections, its head split, its
    rotary function) exactly as the newer release's forward composes them, that routes attention to
    the registered function. It is bound to each instance and takes over only while the module's
    config names the paged attention (paged_step.IMPL, set per call): every other forward (eager
    generates, breakpoints, local reference runs) runs the release's own code unchanged, so eager
    results stay bitwise those of transformers. `paged_step.check` installs an adapter only after the
    probe failed with "not dispatched" and keeps it only if the probe then passes (the probe compares
    the paged logits with the module's plain forward), so an adapter that no longer matches a
    release's module is never used. ALiBi Falcon stays eager: its bias comes in as a mask, which the
    paged attention refuses.
"""
from __future__ import annotations

import functools
import math
import sys
import types
from typing import Callable

import torch

_ORIGINAL = "_djinn_original"  # the instance's own method, kept in its __dict__ while adapted


def _falcon_forward(self, hidden_states, alibi, attention_mask, position_ids=None, layer_past=None,
                    use_cache=False, output_attentions=False, position_embeddings=None, *, impl, attend, **kwargs):
    """transformers 5.17's FalconAttention without ALiBi, its attention through the paged step."""
    if self.config._attn_implementation_internal != impl or alibi is not None:
        return getattr(self, _ORIGINAL)(hidden_states, alibi, attention_mask, position_ids=position_ids,
                                        layer_past=layer_past, use_cache=use_cache,
                                        output_attentions=output_attentions,
                                        position_embeddings=position_embeddings, **kwargs)
    rotary = sys.modules[type(self).__module__].apply_rotary_pos_emb
    q, k, v = self._split_heads(self.query_key_value(hidden_states))  # each [B, n, heads, dim]
    batch, n = q.shape[:2]
    kv_heads = self.num_heads if self.new_decoder_architecture else self.num_kv_heads
    q = q.transpose(1, 2).reshape(batch, self.num_heads, n, self.head_dim)
    k = k.transpose(1, 2).reshape(batch, kv_heads, n, self.head_dim)
    v = v.transpose(1, 2).reshape(batch, kv_heads, n, self.head_dim)
    cos, sin = position_embeddings
    q, k = rotary(q, k, cos, sin)
    if layer_past is not None:
        k, v = layer_past.update(k, v, self.layer_idx)
    out, _ = attend(self, q, k, v, attention_mask, scaling=1 / math.sqrt(self.head_dim))
    return self.dense(out.reshape(batch, n, self.num_heads * self.head_dim)), None


def _gptj_attn(self, query, key, value, attention_mask=None, *, impl, attend):
    """transformers 5.17's GPTJAttention._attn (called after the cache update), through the paged step."""
    if self.config._attn_implementation_internal != impl:
        return getattr(self, _ORIGINAL)(query, key, value, attention_mask)
    out, _ = attend(self, query, key, value, attention_mask, scaling=self.head_dim ** -0.5)
    return out.transpose(1, 2), None  # _attn's layout, [B, heads, n, dim], which _merge_heads expects


# class name -> (the method replaced, its adapted version); a class is adapted only when its release
# does not dispatch (checked by the probe, not by version numbers).
ADAPTERS: dict[str, tuple[str, Callable]] = {
    "FalconAttention": ("forward", _falcon_forward),
    "GPTJAttention": ("_attn", _gptj_attn),
}


def install(module: torch.nn.Module, impl: str, attend: Callable) -> int:
    """Bind the adapter to every submodule of an adapted class not yet adapted, routing to `attend`
    while the config names `impl` (paged_step's, passed in: this module does not import it); how many
    were adapted."""
    n = 0
    for sub in module.modules():
        name, fn = ADAPTERS.get(type(sub).__name__, (None, None))
        if fn is not None and _ORIGINAL not in sub.__dict__:
            sub.__dict__[_ORIGINAL] = getattr(sub, name)
            setattr(sub, name, types.MethodType(functools.partial(fn, impl=impl, attend=attend), sub))
            n += 1
    return n


def uninstall(module: torch.nn.Module) -> None:
    """Give every adapted submodule its own method back (an adapter the probe did not accept)."""
    for sub in module.modules():
        if sub.__dict__.pop(_ORIGINAL, None) is not None:
            delattr(sub, ADAPTERS[type(sub).__name__][0])
