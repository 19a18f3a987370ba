"""Which aten ops an SRG may hold, and what the client and server know about each.

The server resolves an op name only through `ALLOWED` (Note [Op table]); nothing else named in a graph is
ever looked up. The same table lets the client fail at capture time, naming the op and the module,
instead of at the server.

Note [Op table]
    Every aten overload is classified from its schema and tags (`classify`), not listed by hand:
      kind   pure | view (returns an alias, writes nothing) | inplace (writes `self`) | mutates (writes
             another argument) | random (`nondeterministic_seeded` or a Generator argument) |
             dynamic_shape (`dynamic_output_shape`: nonzero, unique, masked_select) | data_dependent
             (returns a Python value read from a tensor: item, equal, allclose)
      nondeterministic   the `nondeterministic_bitwise` tag (runs; not bitwise between runs)
    and allowed unless a rule refuses it, each refusal with the reason the capture and the server give:
      - not a plain aten overload (an `out=` variant; another namespace is never looked up);
      - a result that is not Tensor or Tensor[] (a Python value only the server would know: the graph
        fixes every shape and value flow at capture), or no result at all (an op run for a side effect),
        except `_linalg_check_errors`, which only raises;
      - an argument type a graph cannot carry (Storage, Stream, Dict, str lists, TorchScript values);
      - an `inplace_view` op that swaps or resizes a storage (set_, resize_); t_, squeeze_ and the like
        run (they write `self`, so a weight is refused at run time like any write);
      - `dynamic_output_shape` whose output is not bounded by its inputs (Note [Data-dependent shapes]);
        the bounded ones (nonzero, unique, masked_select, a boolean-mask `index.Tensor`) run as graph
        breaks;
      - a CompositeImplicitAutograd op other than those recorded whole (Note [Composite ops]): such an
        op decomposes before `__torch_dispatch__`, so no capture ever records it, and run natively on the
        server its inner ops would bypass the per-node write and index checks;
      - an index tensor argument (`index`, `indices`, `offsets`, a class `target`) the server does not
        range-check (`INDEX_CHECKS`): on CUDA an index out of range is a device-side assert that takes
        every tenant's sessions down;
      - a layout other than strided (sparse, nested, quantized, mkldnn: by name prefix);
      - `REVIEWED`: the short list of exceptions a schema does not show (a file path, a write the schema
        does not annotate, pinned host memory, device asserts), each with its reason.
    The server still never trusts the table for weights: every node that may write is checked against
    the weights' storages at run time (Note [Weights are read-only at run time]), and
    tests/integration/test_opinfo.py audits OpInfo samples for writes no schema announces.

Note [Data-dependent shapes]
    nonzero, unique, masked_select, boolean-mask indexing: the output's shape depends on tensor values,
    and an SRG's shapes are fixed at capture. They run as graph breaks (Note [Graph breaks] in
    srg/capture.py): the capture asks the server for the shape (a probe) and records the op with it,
    and the interpreter checks at run time that the node gave that shape (GuardFailed otherwise, before
    anything that depends on it runs). Only ops whose output is bounded by their inputs are allowed
    (`BOUNDED_DYNAMIC`): the size of bincount, one_hot with num_classes=-1 and repeat_interleave by
    tensor is a value (a max or a sum) that a kernel would allocate before any check could refuse it,
    so they stay refused. `nonzero_static` and integer `index.Tensor` have static shapes.

Note [Composite ops]
    `F.scaled_dot_product_attention` and `F.batch_norm` are CompositeImplicit: by the time an op
    reaches `__torch_dispatch__` the composite has already picked a device-specific kernel (the CPU
    flash kernel, cudnn batch norm), and under a dispatch mode SDPA even falls back to the math path.
    A graph captured on the client must run the kernel eager picks on the server's device, so capture
    records these calls whole (at `__torch_function__`), as the composite's own aten overload.

Note [RNNs recorded whole]
    nn.LSTM, nn.GRU and nn.RNN call `torch._VF.lstm/gru/rnn_tanh/rnn_relu`, CompositeImplicit too: eager
    on the CPU runs mkldnn_rnn_layer for an LSTM and projects a GRU's whole input in one mm, while the
    decomposition a capture would see is a per-step cell loop (other roundings, and unsafe_split and
    transpose_ besides). They are recorded whole as their `.input` overloads (a PackedSequence's `.data`
    overload is not, and decomposes). Their weights arrive as a `Tensor[]` argument: the op writes
    nothing (its schema has no `(a!)`, and the OpInfo write audit covers it), and the server's write
    checks resolve tensors inside lists like any argument. With `dropout > 0` and `train` the op draws
    from the RNG between layers, so the graph is marked random. Cost: 2 x (tokens) x (elements of every
    weight matrix), as torch's flop counter would count the matmuls of the decomposition.
    The CPU kernels of GRU and RNN take another path (other roundings) when a weight requires grad,
    even under no_grad; a weight's stand-in keeps the flag (Note [Stand-ins]), and a "$w" node an RNN
    reads is marked `grad` when it did, so the server passes the op a detached alias that requires grad.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_COMPUTE = """
mm addmm bmm baddbmm matmul convolution _convolution linear scaled_dot_product_attention
_scaled_dot_product_flash_attention_for_cpu _scaled_dot_product_efficient_attention
_scaled_dot_product_flash_attention _scaled_dot_product_cudnn_attention addmv addbmm mv dot vdot addr _grouped_mm
"""

#: Note [Unannotated writes]: allowed ops that write an argument their schema does not mark as written
#: (`Tensor? running_mean`, no `(a!)`): op name -> (the arguments written, the flag argument that turns
#: the write on). tests/integration/test_opinfo.py runs OpInfo samples under a mode that compares every
#: argument before and after each aten op and finds no other; tests/unit/test_weight_writes.py pins the
#: ops that may write, so a change shows in review.
UNANNOTATED_WRITES = {
    "aten.native_batch_norm.default": (("running_mean", "running_var"), "training"),
    "aten.batch_norm.default": (("running_mean", "running_var"), "training"),
}

COMPUTE_BOUND = frozenset(_COMPUTE.split())
#: Random before the tags said so (the composite dropout is recorded whole and has no tag).
_RANDOM_NAMES = frozenset("rand randn randint randperm bernoulli native_dropout dropout normal uniform multinomial "
                          "rand_like randn_like randint_like".split())

# Kinds (Note [Op table]).
PURE, VIEW, INPLACE, MUTATES, RANDOM, DYNAMIC, DATA = ("pure", "view", "inplace", "mutates", "random",
                                                       "dynamic_shape", "data_dependent")

#: Note [Op table]: exceptions the schema does not show. Base name -> why it is refused.
REVIEWED = {
    "from_file": "reads a file on the server",
    "_copy_from": "writes its `dst` argument, which its schema does not mark as written",
    "_copy_from_and_resize": "writes and resizes its `dst` argument, which its schema does not mark",
    "cudnn_batch_norm": "writes the running stats, which its schema does not mark as written",
    "miopen_batch_norm": "writes the running stats, which its schema does not mark as written",
    "_batch_norm_impl_index": "writes the running stats, which its schema does not mark as written",
    "batch_norm_update_stats": "writes the running stats, which its schema does not mark as written",
    "pin_memory": "allocates page-locked host memory outside the server's memory accounting",
    "_pin_memory": "allocates page-locked host memory outside the server's memory accounting",
    "_functional_assert_async": "a device-side assert on CUDA ends the server process for every tenant",
    "_functional_assert_scalar": "asserts on a Python value read from a tensor",
    "_functional_sym_constrain_range": "constrains symbolic shapes (compiler-only)",
    "_functional_sym_constrain_range_for_size": "constrains symbolic shapes (compiler-only)",
    "_make_dep_token": "a compiler token, not a tensor op",
    "_nested_tensor_from_mask": "makes a nested tensor",
    "_cudnn_init_dropout_state": "allocates cuDNN RNG state",
    "_fused_sdp_choice": "returns a kernel choice, not a tensor",
    "lift_fresh_copy": None,  # allowed: copies a constant (listed to say it was reviewed)
}

#: inplace_view ops that swap or resize a tensor's storage; the others (t_, squeeze_, transpose_: matmul's
#: decomposition squeezes its own result in place) only change sizes and strides within it, and write `self`
#: as far as the run-time weight check is concerned.
_STORAGE_CHANGES = frozenset({"set_", "resize_", "resize_as_", "_resize_output_", "sparse_resize_",
                              "sparse_resize_and_clear_", "resize_as_sparse_"})
#: Note [Op table]: ops that return nothing but are allowed (they only raise).
NO_RESULT_OK = frozenset({"aten._linalg_check_errors.default"})
#: Tagged dynamic_output_shape, static for the arguments a meta kernel accepts (checked at run time).
STATIC_ON_META = frozenset({"aten.index.Tensor"})
#: Note [Data-dependent shapes]: dynamic-shape ops whose output is at most a few times their inputs' size.
BOUNDED_DYNAMIC = frozenset({"nonzero", "argwhere", "masked_select", "_unique", "_unique2", "unique_consecutive",
                             "unique_dim", "unique_dim_consecutive", "linalg_lstsq"})
_NON_STRIDED = re.compile(r"^_?(sparse|to_sparse|nested|to_padded|mkldnn|to_mkldnn|quantize|dequantize|q_|"
                          r"fbgemm|_?make_per|fake_quantize|int_repr|indices|values|crow_|col_|ccol_|row_|"
                          r"coalesce|is_coalesced|_coalesced|sparse_mask|to_dense|_to_dense|_cslt|_jagged|"
                          r"_padded_dense|spdiags|_spdiags|segment_reduce)")
_WIRE_TYPES = frozenset("""Tensor Optional[Tensor] List[Tensor] List[Optional[Tensor]] Optional[List[Optional[Tensor]]]
int Optional[int] List[int] Optional[List[int]] float Optional[float] List[float] Optional[List[float]] bool
Optional[bool] List[bool] number Optional[number] List[number] str Optional[str] Device Optional[Device]
Optional[Generator]""".split())
_INDEX_ARGS = frozenset({"index", "indices", "offsets"})
_CLASS_TARGET = re.compile(r"^(nll_loss|multi_margin_loss|multilabel_margin_loss)")
#: Note [RNNs recorded whole]: the recurrent layers' composites, by torch function -> aten overload.
_RNNS = {torch.lstm: "aten.lstm.input", torch.gru: "aten.gru.input", torch.rnn_tanh: "aten.rnn_tanh.input",
         torch.rnn_relu: "aten.rnn_relu.input"}
RNN_OPS = frozenset(_RNNS.values())
_COMPOSITES_WHOLE = frozenset({"aten.scaled_dot_product_attention.default", "aten.batch_norm.default",
                               "aten.dropout.default"}) | RNN_OPS

#: Ops that read or write at positions an index tensor gives, and how the server range-checks them before
#: the kernel (server/execution/interpreter.py check_indices): base name -> (check, index argument, data argument,
#: dim argument or another argument the check needs). An index out of range is a CUDA device-side assert.
#:   dim      idx in [-n, n), n = data.shape[dim]      list   per-dim list of indices (index, index_put)
#:   rows     idx in [0, data.shape[0])                flat   idx in [-numel, numel) of data
#:   class    target in [0, C) or == ignore_index (C = data.shape[1], or [0] for 1-d data)
#:   last     target in [0, data.shape[-1])            multilabel  target in [-1, data.shape[-1])
#:   unpool   idx in [0, prod(output_size))            offsets     idx in [0, numel of the indices]
INDEX_CHECKS = {
    "index_select": ("dim", 2, 0, 1), "gather": ("dim", 2, 0, 1), "scatter": ("dim", 2, 0, 1),
    "scatter_add": ("dim", 2, 0, 1), "scatter_reduce": ("dim", 2, 0, 1), "index_add": ("dim", 2, 0, 1),
    "index_copy": ("dim", 2, 0, 1), "index_fill": ("dim", 2, 0, 1), "index_reduce": ("dim", 2, 0, 1),
    "embedding": ("rows", 1, 0, None), "embedding_bag": ("rows", 1, 0, 2), "_embedding_bag": ("rows", 1, 0, 2),
    "_embedding_bag_forward_only": ("rows", 1, 0, 2),
    "index": ("list", 1, 0, None), "_unsafe_index": ("list", 1, 0, None), "index_put": ("list", 1, 0, None),
    "_unsafe_index_put": ("list", 1, 0, None), "_index_put_impl": ("list", 1, 0, None),
    "take": ("flat", 1, 0, None), "put": ("flat", 1, 0, None),
    "nll_loss": ("class", 1, 0, 4), "nll_loss_forward": ("class", 1, 0, 4), "nll_loss2d": ("class", 1, 0, 4),
    "nll_loss2d_forward": ("class", 1, 0, 4), "nll_loss_nd": ("class", 1, 0, 4),
    "multi_margin_loss": ("last", 1, 0, None), "multilabel_margin_loss": ("multilabel", 1, 0, None),
    "multilabel_margin_loss_forward": ("multilabel", 1, 0, None),
    "max_unpool2d": ("unpool", 1, 0, 2), "max_unpool3d": ("unpool", 1, 0, 2),
}
#: Values a CUDA kernel asserts on (a device-side assert, as above): base name -> (argument, lo, hi).
VALUE_CHECKS = {"binary_cross_entropy": (0, 0.0, 1.0)}


@dataclass(frozen=True)
class OpEntry:
    """One aten overload in the op table (Note [Op table])."""
    name: str
    fn: "torch._ops.OpOverload"
    kind: str
    nondeterministic: bool
    refused: str | None      # why the graph path refuses it; None: allowed


def classify(fn: "torch._ops.OpOverload") -> OpEntry:
    """Note [Op table]: an overload's kind and whether the graph path runs it, from its schema and tags."""
    name, schema, tags = str(fn), fn._schema, set(fn.tags)
    base = base_name(name)
    args = schema.arguments
    writes = [a for a in args if a.alias_info is not None and a.alias_info.is_write]
    if torch.Tag.dynamic_output_shape in tags and name not in STATIC_ON_META:
        kind = DYNAMIC
    elif torch.Tag.data_dependent_output in tags:
        kind = DATA
    elif (torch.Tag.nondeterministic_seeded in tags or any(str(a.type) == "Optional[Generator]" for a in args)
          or base.rstrip("_") in _RANDOM_NAMES):
        kind = RANDOM
    elif any(a.name != "self" for a in writes):
        kind = MUTATES
    elif writes:
        kind = INPLACE
    elif any(r.alias_info is not None for r in schema.returns):
        kind = VIEW
    else:
        kind = PURE
    return OpEntry(name, fn, kind, torch.Tag.nondeterministic_bitwise in tags, _refusal(fn, name, base, kind, tags))


def _refusal(fn, name: str, base: str, kind: str, tags: set) -> str | None:
    schema = fn._schema
    if any(a.is_out for a in schema.arguments) or fn._overloadname == "out" or fn._overloadname.endswith("_out"):
        return "an out= variant (a graph's results are its own tensors)"
    if not schema.returns and name not in NO_RESULT_OK:
        return "returns nothing (an op run for its side effects)"
    bad = [str(r.type) for r in schema.returns if str(r.type) not in ("Tensor", "List[Tensor]")]
    if bad:
        return (f"returns {bad[0]}, a Python value only the server would know; a graph fixes its values and "
                "shapes at capture (compare or read it on the client after the call)")
    bad = [f"{a.name}: {a.type}" for a in schema.arguments if str(a.type) not in _WIRE_TYPES]
    if bad:
        return f"takes {bad[0]}, which a graph cannot carry"
    if torch.Tag.inplace_view in tags and base in _STORAGE_CHANGES:
        return "changes a tensor's storage in place (its size or the memory it points at)"
    if kind == DYNAMIC and base not in BOUNDED_DYNAMIC:
        return ("its output's size is a value read from a tensor (a max or a sum), which the server cannot "
                "bound before the kernel allocates it (Note [Data-dependent shapes])")
    if base in REVIEWED and REVIEWED[base] is not None:
        return REVIEWED[base]
    if _NON_STRIDED.match(base):
        return "makes or reads a tensor that is not strided (sparse, nested, quantized, mkldnn)"
    if name not in _COMPOSITES_WHOLE and torch._C._dispatch_has_kernel_for_dispatch_key(
            schema.name + ("." + schema.overload_name if schema.overload_name else ""), "CompositeImplicitAutograd"):
        return "a composite that decomposes before capture sees it (a capture records its parts, never it)"
    key = base.rstrip("_") if base.rstrip("_") in INDEX_CHECKS else base
    takes_index = any(a.name in _INDEX_ARGS and "Tensor" in str(a.type) for a in schema.arguments) or (
        _CLASS_TARGET.match(base) is not None)
    if takes_index and key not in INDEX_CHECKS:
        return "reads or writes at positions an index tensor gives, which the server does not range-check for it"
    return None


_OP_NAME = re.compile(r"^aten\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)$")
_KNOWN: frozenset[str] | None = None   # every aten overload this torch registers, by its `str` name
_TABLE: dict[str, OpEntry | None] = {}


def _known() -> frozenset[str]:
    global _KNOWN
    if _KNOWN is None:
        names = set()
        for n in torch._C._dispatch_get_all_op_names():
            if n.startswith("aten::"):
                base, _, overload = n[6:].partition(".")
                names.add(f"aten.{base}.{overload or 'default'}")
        _KNOWN = frozenset(names)
    return _KNOWN


def lookup(name: str) -> OpEntry | None:
    """The table entry of an aten overload by name (allowed or not); None if torch has no such op. A name
    is looked up only if this torch registers exactly it, so no string from a graph reaches getattr
    otherwise (Note [Op table])."""
    if name in _TABLE:
        return _TABLE[name]
    entry = None
    m = _OP_NAME.match(name) if isinstance(name, str) else None
    if m is not None and name in _known():
        packet = getattr(torch.ops.aten, m.group(1), None)
        fn = getattr(packet, m.group(2), None) if isinstance(packet, torch._ops.OpOverloadPacket) else None
        if isinstance(fn, torch._ops.OpOverload) and str(fn) == name:
            entry = classify(fn)
    if len(_TABLE) < 20_000:
        _TABLE[name] = entry
    return entry


def refusal(name: str) -> str:
    """Why the graph path does not run `name` (for errors)."""
    e = lookup(name)
    if e is None:
        return "not an aten op this server knows"
    return e.refused or "allowed"


class _Allowed(Mapping):
    """name -> OpOverload of every allowed op: the only way a name in a graph becomes a callable."""

    def __getitem__(self, name: str) -> "torch._ops.OpOverload":
        e = lookup(name)
        if e is None or e.refused is not None:
            raise KeyError(name)
        return e.fn

    def __contains__(self, name: object) -> bool:
        e = lookup(name) if isinstance(name, str) else None
        return e is not None and e.refused is None

    def __iter__(self):
        return (n for n in sorted(_known()) if n in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)


#: name -> OpOverload. The only way a name in a graph becomes a callable (Note [Op table]).
ALLOWED: Mapping[str, "torch._ops.OpOverload"] = _Allowed()

# Note [Meta kernels narrower than the device's]
#     Captures and the server's dry run run every op on meta tensors. `_grouped_mm`'s meta kernel
#     checks what its CUDA kernel needs (bfloat16 inputs), while the CPU kernel, which a local run of
#     a float32 MoE model uses (transformers' grouped_mm experts), takes float32. Its output's shape and
#     strides do not depend on the dtype, so on meta it runs in bfloat16 and its output is given the
#     dtype the real op returns (`out_dtype`, else the input's). The op itself still runs as captured.
def meta_call(func, args, kwargs):
    """`func(*args, **kwargs)` on meta tensors (Note [Meta kernels narrower than the device's])."""
    if func is _GROUPED_MM and isinstance(args[0], torch.Tensor) and args[0].dtype != torch.bfloat16:
        b = dict(zip(("self", "mat2", "offs", "bias", "out_dtype"), args), **kwargs)
        bf = torch.bfloat16
        out = func(b["self"].to(bf), b["mat2"].to(bf), b.get("offs"),
                   None if b.get("bias") is None else b["bias"].to(bf))
        return torch.empty_strided(out.shape, out.stride(), dtype=b.get("out_dtype") or b["self"].dtype,
                                   device=out.device)
    return func(*args, **kwargs)


_GROUPED_MM = getattr(getattr(torch.ops.aten, "_grouped_mm", None), "default", None)

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
    return _RNNS.get(func)


_RNN_ARGS = ("input", "hx", "params", "has_biases", "num_layers", "dropout", "train", "bidirectional", "batch_first")


def rnn_input_overload(args: tuple, kwargs: dict) -> bool:
    """Note [RNNs recorded whole]: a `torch._VF.lstm/gru/...` call of the `.input` overload (hx is a
    list for lstm, a tensor for the others; the `.data` overload puts `batch_sizes` second)."""
    b = dict(zip(_RNN_ARGS, args), **kwargs)
    return "params" in b and isinstance(b["params"], (list, tuple)) and len(args) + len(kwargs) == len(_RNN_ARGS)


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
    if name in RNN_OPS:
        b = dict(zip(_RNN_ARGS, args), **kwargs)
        return tuple(b[n] for n in _RNN_ARGS), {}
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
    e = lookup(name)
    return e.kind == RANDOM if e is not None else base_name(name).rstrip("_") in _RANDOM_NAMES
