"""The fused fast paths of nn.MultiheadAttention and nn.TransformerEncoderLayer, as a capture records them.

Note [Fast paths]
    In eval mode (and without grad), nn.MultiheadAttention and nn.TransformerEncoderLayer run one fused
    aten op, `_native_multi_head_attention` / `_transformer_encoder_layer_fwd`, instead of the Python
    slow path (projections, SDPA, out projection; layer norms and the feed-forward). The two give
    different roundings. Their forwards choose by conditions on the module and the arguments, and
    two of them always fail in a capture: `has_torch_function` (the capture's TorchFunctionMode) and
    the device check (stand-ins are meta tensors). So a capture would record the slow path, and the
    slow path's SDPA decomposed besides (inside F.multi_head_attention_forward the function mode is
    off for nested calls, and a Python function's body cannot run with it on: it would call the mode
    again). `capture_module` therefore gives each such submodule, for the capture only, a forward
    (`install`) that checks torch's conditions less those two, in torch's order, and on the fast path
    records the masks' canonical forms, `merge_masks` and the fused op as eager runs them; otherwise it
    calls the module's own forward. The server runs the fused op, so outputs are bitwise-equal.
    nn.TransformerEncoder with a `src_key_padding_mask` runs its layers over nested tensors in eager,
    which no graph carries: that capture is a CaptureError that says to pass
    `enable_nested_tensor=False` (then each layer's fast path takes the mask, and is recorded).
    The conditions follow torch 2.11-2.13 (torch/nn/modules/activation.py and transformer.py);
    tests/unit/test_recorded_whole.py compares captures with eager for each path.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..protocol.errors import CaptureError


def _requires_grad(ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def mha_fast(m: nn.MultiheadAttention, query, key, value, key_padding_mask, attn_mask) -> bool:
    """Would eager `m(query, key, value, ...)` take `_native_multi_head_attention`?"""
    if ((attn_mask is not None and torch.is_floating_point(attn_mask))
            or (key_padding_mask is not None and torch.is_floating_point(key_padding_mask))):
        return False
    if not torch.backends.mha.get_fastpath_enabled() or query.dim() != 3 or query is not key or key is not value:
        return False
    if m.in_proj_weight is None or m.in_proj_bias is None or query.dtype != m.in_proj_bias.dtype:
        return False
    if (query.dtype != m.in_proj_weight.dtype or m.training or m.num_heads % 2 or not m.batch_first
            or m.bias_k is not None or m.bias_v is not None or m.add_zero_attn or not m._qkv_same_embed_dim
            or query.is_nested or torch.is_autocast_enabled()):
        return False
    return not _requires_grad((query, m.in_proj_weight, m.in_proj_bias, m.out_proj.weight, m.out_proj.bias))


def _mha_forward(m: nn.MultiheadAttention, query, key, value, key_padding_mask=None, need_weights=True,
                 attn_mask=None, average_attn_weights=True, is_causal=False):
    if not mha_fast(m, query, key, value, key_padding_mask, attn_mask):
        return type(m).forward(m, query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                               attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
    key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                         other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                         target_type=query.dtype)
    attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                  target_type=query.dtype, check_other=False)
    merged, mask_type = m.merge_masks(attn_mask, key_padding_mask, query)
    out, weights = torch._native_multi_head_attention(query, key, value, m.embed_dim, m.num_heads,
                                                      m.in_proj_weight, m.in_proj_bias, m.out_proj.weight,
                                                      m.out_proj.bias, merged, need_weights, average_attn_weights,
                                                      mask_type)
    return out, (weights if need_weights else None)  # eager's kernel gives no weights then (an undefined tensor)


def layer_fast(m: nn.TransformerEncoderLayer, src, src_mask, src_key_padding_mask) -> bool:
    """Would eager `m(src, ...)` take `_transformer_encoder_layer_fwd`?"""
    sa = m.self_attn
    if (not torch.backends.mha.get_fastpath_enabled() or src.dim() != 3 or m.training or not sa.batch_first
            or sa.in_proj_bias is None or not sa._qkv_same_embed_dim or not m.activation_relu_or_gelu
            or m.norm1.eps != m.norm2.eps or src.is_nested or sa.num_heads % 2 == 1 or torch.is_autocast_enabled()):
        return False
    if any(len(getattr(x, "_forward_hooks", {})) + len(getattr(x, "_forward_pre_hooks", {})) for x in m.modules()):
        return False
    return not _requires_grad((src, sa.in_proj_weight, sa.in_proj_bias, sa.out_proj.weight, sa.out_proj.bias,
                               m.norm1.weight, m.norm1.bias, m.norm2.weight, m.norm2.bias, m.linear1.weight,
                               m.linear1.bias, m.linear2.weight, m.linear2.bias))


def _layer_forward(m: nn.TransformerEncoderLayer, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
    if not layer_fast(m, src, src_mask, src_key_padding_mask):
        return type(m).forward(m, src, src_mask=src_mask, src_key_padding_mask=src_key_padding_mask,
                               is_causal=is_causal)
    src_key_padding_mask = F._canonical_mask(mask=src_key_padding_mask, mask_name="src_key_padding_mask",
                                             other_type=F._none_or_dtype(src_mask), other_name="src_mask",
                                             target_type=src.dtype)
    src_mask = F._canonical_mask(mask=src_mask, mask_name="src_mask", other_type=None, other_name="",
                                 target_type=src.dtype, check_other=False)
    sa = m.self_attn
    merged, mask_type = sa.merge_masks(src_mask, src_key_padding_mask, src)
    return torch._transformer_encoder_layer_fwd(
        src, sa.embed_dim, sa.num_heads, sa.in_proj_weight, sa.in_proj_bias, sa.out_proj.weight, sa.out_proj.bias,
        m.activation_relu_or_gelu == 2, m.norm_first, m.norm1.eps, m.norm1.weight, m.norm1.bias, m.norm2.weight,
        m.norm2.bias, m.linear1.weight, m.linear1.bias, m.linear2.weight, m.linear2.bias, merged, mask_type)


def _encoder_forward(m: nn.TransformerEncoder, src, mask=None, src_key_padding_mask=None, is_causal=None):
    first = m.layers[0] if len(m.layers) else None
    if (src_key_padding_mask is not None and getattr(m, "use_nested_tensor", False) and first is not None
            and not first.training and src.dim() == 3 and mask is None and torch.backends.mha.get_fastpath_enabled()
            and not torch.is_autocast_enabled()):
        raise CaptureError(
            "nn.TransformerEncoder with a src_key_padding_mask runs its layers over nested tensors in eager (its "
            "fast path), which a graph cannot carry; build it with enable_nested_tensor=False, and each layer's "
            "fast path takes the mask and is recorded (Note [Fast paths])")
    return type(m).forward(m, src, mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=is_causal)


_FORWARDS = ((nn.TransformerEncoder, _encoder_forward), (nn.TransformerEncoderLayer, _layer_forward),
             (nn.MultiheadAttention, _mha_forward))


def _bound(fn, m):
    sig = inspect.signature(fn)

    def forward(*args, **kwargs):
        b = sig.bind(m, *args, **kwargs)
        return fn(*b.args, **b.kwargs)
    return forward


@contextmanager
def install(module: nn.Module):
    """Note [Fast paths]: for the capture, each submodule whose class forward is torch's own gets a
    forward that records its fast path; removed on exit (also on an error)."""
    done = []
    try:
        for m in module.modules():
            for cls, fn in _FORWARDS:
                if type(m).forward is cls.forward and isinstance(m, cls) and "forward" not in vars(m):
                    object.__setattr__(m, "forward", _bound(fn, m))
                    done.append(m)
                    break
        yield
    finally:
        for m in done:
            vars(m).pop("forward", None)
