"""The fast path's one forward: a model's own Hugging Face forward over the KV pool's blocks.

The batched decode step (fastpath.DecodePool) and the batched prefill (prefill_step.py) both run
`forward`: the ForCausalLM module's forward, fed a `StepCache` and position ids per row, with attention
routed to the pool (Note [One step for every architecture]).

Note [One step for every architecture]
    Architectures differ in everything around attention: learned absolute positions (GPT-2, OPT and
    its offset of 2), rotary embeddings full or partial (Phi), embedding scaling (Gemma), parallel
    residuals (GPT-NeoX, Phi, Falcon), qk-norms (Qwen3), logit softcapping (Gemma2). What the fast path
    changes is only where keys and values live and how attention reads them, and transformers exposes
    both: every attention module of the supported architectures calls `cache.update(k, v, layer_idx)`
    and then the function registered in `AttentionInterface` under `config._attn_implementation`,
    passing its scaling, sliding window and softcap. So the step runs the model's own forward with
      - `StepCache.update` writing each row's new keys and values into that row's blocks at its
        positions (the `Step`'s precomputed block and offset of every written position), and
        returning them unchanged: nothing reads them but the attention below;
      - `attend` (registered as IMPL) attending each row over its own blocks through
        paged_attention.py's gather or flex, honouring the module's scaling, sliding window and
        softcap, with GQA/MQA taken from the query's head count;
      - position ids per row, so rows of different lengths share one forward.
    IMPL is not in transformers' `AttentionMaskInterface`, so `create_causal_mask` returns None
    without building anything: the masks are the paged attention's own (a row's length, its window).
    Every layer must call update then attend exactly once, in that order (the attend reads the layer
    the update named); `check` runs a 3-token probe forward per model and refuses one that does not,
    or whose logits differ from its plain forward. A module class whose release does not dispatch
    (Falcon before transformers 5.2x) gets an adapter if one exists (Note [Attention adapters]).
    The kernels are the ones the Llama-only step this replaced issued by hand (the same projections,
    rotary, norms and MLP modules, the same writes and attention): the Python around them differs,
    and on CUDA the step is a captured graph, so that Python runs only at capture.

Note [Paged attention is set per call]
    `AttentionInterface.register` adds IMPL to transformers' global table; nothing else uses that key,
    so no other model's attention changes. A model uses it only while `forward` runs: the model's
    config says IMPL for the duration of the call (restored in `finally`) and the `Step` the attention
    reads is thread-local. Everything that runs a model's forward on the server is serialized on the
    engine's baton (Note [Run hand-off] in breakpoints.py: a breakpoint run's thread runs only while
    the engine thread waits), so no eager forward of the same module runs while its config says IMPL;
    and were one to, on another thread, `attend` finds no step there and raises instead of attending
    over a pool it knows nothing of. Only `_attn_implementation_internal` is set, not the property:
    its setter would also rewrite sub-configs, which restoring could not undo exactly.
"""
from __future__ import annotations

import inspect
import threading
import weakref
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer

from . import attention_adapters

IMPL = "djinn_paged"

_local = threading.local()  # .step: the Step whose forward runs on this thread (Note [Paged attention is set per call])


@dataclass
class Step:
    """One forward's inputs to the cache and the attention: where each written position goes, and the
    attention's per-step state (from `attention.prepare`)."""

    kv: torch.Tensor             # the pool [layers, k|v, blocks, bt, kv_heads, dim]
    blk: torch.Tensor            # [N] the block of each written position
    off: torch.Tensor            # [N] its offset in that block
    valid: torch.Tensor | None   # [B, n] bool: which inputs are written (None: all, in row-major order)
    attention: object            # paged_attention.GatherAttention or FlexAttention
    state: object                # attention.prepare(...) for this step
    layer: int = -1              # the layer whose update ran last: its attention comes next
    trace: list | None = field(default=None, repr=False)  # ("update" | "attend", layer), when probing

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [B, kv_heads, n, dim] of layer `layer` into their blocks."""
        _, _, _, _, kvh, dim = self.kv.shape
        if k.shape[1] != kvh or k.shape[-1] != dim:
            raise ValueError(f"layer {layer} wrote keys of {tuple(k.shape)}; the pool holds {kvh} heads of {dim}")
        k, v = k.transpose(1, 2), v.transpose(1, 2)                           # [B, n, kv_heads, dim]
        if self.valid is None:
            k, v = k.reshape(-1, kvh, dim), v.reshape(-1, kvh, dim)
        else:
            k, v = k[self.valid], v[self.valid]                               # [N, kv_heads, dim]
        self.kv[layer, 0][self.blk, self.off] = k
        self.kv[layer, 1][self.blk, self.off] = v
        self.layer = layer
        if self.trace is not None:
            self.trace.append(("update", layer))


class StepCache(Cache):
    """The transformers Cache of one paged forward: `update` writes into the step's blocks (Note [One
    step for every architecture]); it reports no length, positions come from the position ids."""

    def __init__(self, layers: int):
        super().__init__(layers=[DynamicLayer() for _ in range(layers)])  # for is_sliding and friends

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        _current().write(layer_idx, key_states, value_states)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0, *args) -> int:
        return 0


def _current() -> Step:
    step = getattr(_local, "step", None)
    if step is None:
        raise RuntimeError(f"attention {IMPL!r} ran outside a paged step (Note [Paged attention is set per call])")
    return step


def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, softcap=None,
           **kwargs):
    """The attention function registered as IMPL: query [B, heads, n, dim] over each row's blocks.
    `key` and `value` are this forward's own (already in the blocks): unused."""
    step = _current()
    if step.trace is not None:
        step.trace.append(("attend", step.layer))
    if attention_mask is not None:  # IMPL has no mask function, so only a model adding its own bias gets here
        raise ValueError(f"{type(module).__name__} passed an attention mask to the paged step (e.g. ALiBi)")
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = step.attention.attend(query, step.layer, step.state, scale, window=sliding_window, softcap=softcap)
    return out.transpose(1, 2), None                                           # [B, n, heads, dim]


AttentionInterface.register(IMPL, attend)


def forward(module: torch.nn.Module, ids: torch.Tensor, pos: torch.Tensor, step: Step,
            keep: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [B, vocab] of each row's last input: ids and pos [B, n] through the module's own forward
    with its attention over the pool (Notes [One step for every architecture], [Paged attention is set
    per call]). Rows are left-padded: their last input is column n-1. `keep` (one row only): the
    columns whose logits come back instead, [len(keep), vocab] (the mixed step's, Note [Mixed step])."""
    cfg = module.config
    before = cfg._attn_implementation_internal
    outer = getattr(_local, "step", None)
    cfg._attn_implementation_internal = IMPL
    _local.step = step
    try:
        # Embedded here rather than passing input_ids: some forwards inspect input_ids on the host (GPT-2's
        # padding warning), which a captured step must not; the embedding module is the one HF calls.
        embeds = module.get_input_embeddings()(ids)
        kw = _kwargs(type(module))
        some = kw["keep"] if keep is None else {"logits_to_keep": keep} if kw["keep"] else {}
        out = module(inputs_embeds=embeds, position_ids=pos, use_cache=True,
                     **{kw["cache"]: StepCache(step.kv.shape[0])}, **some)
        if keep is None:
            return out.logits[:, -1]
        return out.logits[0] if kw["keep"] else out.logits[0, keep]
    finally:
        cfg._attn_implementation_internal = before
        _local.step = outer


_KWARGS: dict[type, dict] = {}


def _kwargs(cls: type) -> dict:
    """The forward's name for the cache (transformers 5.2x renamed past_key_values to cache) and
    logits_to_keep when it takes it (only the last position's logits are computed)."""
    kw = _KWARGS.get(cls)
    if kw is None:
        params = inspect.signature(cls.forward).parameters
        kw = _KWARGS[cls] = {"cache": "cache" if "cache" in params else "past_key_values",
                             "keep": {"logits_to_keep": 1} if "logits_to_keep" in params else {}}
    return kw


_NOT_DISPATCHED = "its attention does not go through transformers' AttentionInterface after its cache update, once per layer"
_checked: "weakref.WeakKeyDictionary[torch.nn.Module, str | None]" = weakref.WeakKeyDictionary()


def check(module: torch.nn.Module) -> str | None:
    """None when the paged forward works for this module, else why not (Note [One step for every
    architecture]); probed once per module."""
    if module not in _checked:
        why = _probe(module)
        if why == _NOT_DISPATCHED and attention_adapters.install(module, IMPL, attend):  # Note [Attention adapters]
            why = _probe(module)
            if why is not None:
                attention_adapters.uninstall(module)
        _checked[module] = why
    return _checked[module]


@torch.inference_mode()
def _probe(module: torch.nn.Module) -> str | None:
    """A 3-token prompt through the paged forward on a scratch pool of 2 blocks: every layer must update
    then attend once, and the last logits must equal the module's plain forward's to rounding."""
    from ...vmu.kv_pool import KVShape
    from .paged_attention import GatherAttention

    trace: list = []
    try:
        shape = KVShape.of_module(module)
        dev = next(module.parameters()).device
        kv = torch.zeros(shape.layers, 2, 2, 4, shape.kv_heads, shape.head_dim, dtype=shape.dtype, device=dev)
        ids = (torch.arange(3, device=dev)[None] * 7 + 3) % module.get_input_embeddings().num_embeddings
        pos = torch.arange(3, device=dev)[None]
        attention = GatherAttention(kv, 1, 1, 0)
        step = Step(kv, torch.ones(3, dtype=torch.long, device=dev), pos[0], None, attention,
                    attention.prepare(torch.ones(1, 1, dtype=torch.long, device=dev), pos, 4), trace=trace)
        got = forward(module, ids, pos, step).float()
        want = module(ids, use_cache=False).logits[:, -1].float()
    except Exception as e:  # the module's forward does not fit the paged step's contract
        if trace and trace[-1][0] == "update":  # it attended by itself over what the cache returned
            return _NOT_DISPATCHED
        return f"its forward does not run paged: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
    if trace != [(what, i) for i in range(shape.layers) for what in ("update", "attend")]:
        return _NOT_DISPATCHED
    tol = 1e-4 if shape.dtype == torch.float32 else 3e-2
    err = (got - want).abs().max().item() / (want.abs().max().item() + 1)
    if not err <= tol:
        return f"its paged forward differs from its own forward by {err:.3g} (relative)"
    return None
