"""Which aten ops an SRG may hold, and what the client and server know about each.

The server resolves an op name only through `ALLOWED` (Note [Op allow-list]); nothing else named in a
graph is ever looked up. The same table lets the client fail at capture time, naming the op and the
module, instead of at the server.

Note [Op allow-list]
    Names are aten overloads as `str(OpOverload)` prints them ("aten.add.Tensor"). Left out on purpose:
    ops whose output shape depends on values (nonzero, unique, masked_select: the graph's shapes are
    fixed at capture), ops that read a value back to Python (_local_scalar_dense: control flow on
    values cannot be captured), `out=` variants, ops that touch storage directly (set_, resize_),
    and anything outside the aten namespace.

Note [Composite ops]
    `F.scaled_dot_product_attention` and `F.batch_norm` are CompositeImplicit: by the time an op
    reaches `__torch_dispatch__` the composite has already picked a device-specific kernel (the CPU
    flash kernel, cudnn batch norm), and under a dispatch mode SDPA even falls back to the math path.
    A graph captured on the client must run the kernel eager picks on the server's device, so capture
    records these calls whole (at `__torch_function__`), as the composite's own aten overload.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_POINTWISE = """
abs acos acosh add addcdiv addcmul asin asinh atan atan2 atanh bitwise_and bitwise_not bitwise_or
bitwise_xor ceil clamp clamp_max clamp_min cos cosh div elu eq erf erfc erfinv exp exp2 expm1 fill
floor floor_divide fmod frac ge gelu gt hardsigmoid hardswish hardtanh isinf isnan le leaky_relu lerp
lgamma log log10 log1p log2 log_sigmoid_forward logical_and logical_not logical_or logical_xor lt
masked_fill maximum minimum mish mul nan_to_num ne neg pow reciprocal relu remainder round rsqrt rsub
sigmoid sign silu sin sinh softplus sqrt square sub tan tanh threshold trunc where xlogy
_softmax _log_softmax _safe_softmax softmax log_softmax
"""
_REDUCTIONS = """
all amax amin any argmax argmin cumprod cumsum logsumexp max mean min norm prod std sum topk
nll_loss_forward nll_loss2d_forward
sort argsort var var_mean std_mean linalg_vector_norm kthvalue median
"""
_VIEWS = """
alias as_strided detach diagonal expand permute select slice split split_with_sizes squeeze t
transpose unbind unflatten unfold unsqueeze view view_as_real view_as_complex _unsafe_view
_reshape_alias chunk narrow movedim lift_fresh
"""
_SHAPES = """
cat stack clone contiguous _to_copy to copy flip roll repeat tril triu index_select gather scatter
scatter_add index embedding pad constant_pad_nd reflection_pad2d replication_pad2d
upsample_nearest2d upsample_bilinear2d _unsafe_index new_empty new_zeros new_ones new_full
zeros_like ones_like full_like empty_like rand_like randn_like lift_fresh_copy
"""
_FACTORIES = "arange empty empty_strided full ones zeros scalar_tensor eye linspace"
_RANDOM = "rand randn randint randperm bernoulli native_dropout dropout normal uniform multinomial"
_COMPUTE = """
mm addmm bmm baddbmm matmul convolution _convolution linear scaled_dot_product_attention
_scaled_dot_product_flash_attention_for_cpu _scaled_dot_product_efficient_attention
_scaled_dot_product_flash_attention _scaled_dot_product_cudnn_attention
"""
_NORMS = """
native_layer_norm native_batch_norm _native_batch_norm_legit_no_training batch_norm native_group_norm
_weight_norm_interface max_pool2d_with_indices max_pool2d avg_pool2d adaptive_avg_pool2d
_adaptive_avg_pool2d max_pool1d_with_indices avg_pool1d adaptive_avg_pool1d
"""
#: Base names that may also appear in place (`add_`): pointwise ops and a few fills.
_INPLACE_OK = set(_POINTWISE.split()) | {"fill", "zero", "copy", "clamp", "masked_fill", "index_put",
                                          "scatter", "scatter_add", "tril", "triu", "uniform", "normal",
                                          "bernoulli", "exponential", "random"}

#: Note [Unannotated writes]: allowed ops that write an argument their schema does not mark as written
#: (`Tensor? running_mean`, no `(a!)`): op name -> (the arguments written, the flag argument that turns
#: the write on). A scan of the allow-list's overloads on sample inputs (293 of 460 ran) found no other;
#: tests/unit/test_weight_writes.py pins the full list of ops that may write, so a change shows in review.
UNANNOTATED_WRITES = {
    "aten.native_batch_norm.default": (("running_mean", "running_var"), "training"),
    "aten.batch_norm.default": (("running_mean", "running_var"), "training"),
}

COMPUTE_BOUND = frozenset(_COMPUTE.split())
RANDOM = frozenset(_RANDOM.split()) | {"uniform_", "normal_", "bernoulli_", "exponential_", "random_"}


def _build_allowed() -> dict[str, torch._ops.OpOverload]:
    """Every overload of the listed ops this torch has (the non-out ones), by name."""
    names = set()
    for block in (_POINTWISE, _REDUCTIONS, _VIEWS, _SHAPES, _FACTORIES, _RANDOM, _COMPUTE, _NORMS):
        names.update(block.split())
    names.update(f"{n}_" for n in _INPLACE_OK)
    names.add("index_put")
    table: dict[str, torch._ops.OpOverload] = {}
    for base in sorted(names):
        packet = getattr(torch.ops.aten, base, None)
        if packet is None:
            continue
        for overload in packet.overloads():
            if overload == "out" or overload.endswith("_out") or "out" in overload.split("_"):
                continue
            fn = getattr(packet, overload)
            schema = fn._schema
            if any(a.is_out for a in schema.arguments):
                continue
            # Tensor results only: the Python-scalar overloads (aten.add.int, aten.add.str) are TorchScript's.
            if not schema.returns or any(str(r.type) not in ("Tensor", "List[Tensor]") for r in schema.returns):
                continue
            table[str(fn)] = fn
    return table


#: name -> OpOverload. The only way a name in a graph becomes a callable (Note [Op allow-list]).
ALLOWED: dict[str, torch._ops.OpOverload] = _build_allowed()

#: Composite functions recorded whole (Note [Composite ops]): python function -> (aten name, arg order).
_SDPA = "aten.scaled_dot_product_attention.default"
_BN = "aten.batch_norm.default"
_DROPOUT = "aten.dropout.default"


def composite(func) -> str | None:
    if func is F.scaled_dot_product_attention:
        return _SDPA
    if func is F.batch_norm or func is torch.batch_norm:
        return _BN
    if func is F.dropout:  # whole: CUDA runs a fused kernel with its own use of the RNG, the CPU another
        return _DROPOUT
    return None


def composite_args(name: str, func, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Arguments of a composite call in its aten schema's order."""
    if name == _SDPA:
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        bound = dict(zip(names, args), **kwargs)
        pos = tuple(bound.get(n, d) for n, d in zip(names[:6], (None, None, None, None, 0.0, False)))
        kw = {k: bound[k] for k in ("scale", "enable_gqa") if bound.get(k) is not None}
        return pos, kw
    if name == _DROPOUT:  # F.dropout(input, p=0.5, training=True, inplace=False)
        b = dict(zip(("input", "p", "training", "inplace"), args), **kwargs)
        return (b["input"], float(b.get("p", 0.5)), bool(b.get("training", True))), {}
    if func is torch.batch_norm:
        return tuple(args), dict(kwargs)
    # F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    b = dict(zip(names, args), **kwargs)
    return (b["input"], b.get("weight"), b.get("bias"), b["running_mean"], b["running_var"],
            bool(b.get("training", False)), float(b.get("momentum", 0.1)), float(b.get("eps", 1e-5)),
            bool(torch.backends.cudnn.enabled)), {}


def written_args(fn: torch._ops.OpOverload, args: tuple, kwargs: dict) -> tuple[tuple[int, str], ...]:
    """(position, name) of every argument this call of `fn` may write: those its schema marks as written
    (`Tensor(a!)`) and Note [Unannotated writes]. The value is args[position] if given positionally,
    else kwargs[name]. An unannotated write counts unless its flag is literally False."""
    name = str(fn)
    extra, flag = UNANNOTATED_WRITES.get(name, ((), None))
    out = []
    for pos, a in enumerate(fn._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            out.append((pos, a.name))
        elif a.name in extra:
            flag_pos = next(i for i, b in enumerate(fn._schema.arguments) if b.name == flag)
            on = args[flag_pos] if flag_pos < len(args) else kwargs.get(flag, True)
            if on is not False:
                out.append((pos, a.name))
    return tuple(out)


def base_name(name: str) -> str:
    """'aten.add_.Tensor' -> 'add_'."""
    return name.split(".")[1] if name.count(".") >= 2 else name


def cost_class(name: str) -> str:
    return "compute" if base_name(name) in COMPUTE_BOUND else "memory"


def is_random(name: str) -> bool:
    b = base_name(name)
    return b in RANDOM or b.rstrip("_") in RANDOM or b in ("rand_like", "randn_like")
