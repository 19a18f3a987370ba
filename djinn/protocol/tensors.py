"""Tensor <-> (dtype name, shape, raw bytes): the only way tensors cross the wire.

A tensor travels as its dtype's name, its shape and its bytes in C order. Strides are not kept: a
non-contiguous tensor arrives contiguous with the same values. The receiving side checks that the
byte count equals numel * itemsize before it builds anything (Note [Validate before allocate]).

Note [Any layout travels]
    What travels is the tensor's logical contents, whatever its strides, storage offset, conjugate or
    negative bit, or device: `flat_bytes` is the one place that turns a tensor into bytes (messages,
    upload chunks, weight hashes). A non-contiguous tensor is copied by `contiguous()`. That is not
    enough on its own: torch calls a tensor with at most one element contiguous whatever its strides
    (size-1 dims do not count), so a column of a batch-1 output (`out[:, 2]` of a [1, 5] tensor:
    stride 5, offset 2) comes out of contiguous() and reshape(-1) with stride 5, and viewing it as
    bytes fails. Its one element is where the offset says, so it is re-viewed there with stride 1.
"""
from __future__ import annotations

import math
import warnings

import torch

from .errors import ProtocolError

# torch.frombuffer warns on read-only buffers (zmq frames are read-only). Every tensor built over such
# a buffer is either cloned or only read (see decode_tensor), so the warning is noise here.
warnings.filterwarnings("ignore", message="The given buffer is not writable")

_CANDIDATES = [
    "float32", "float64", "float16", "bfloat16", "complex32", "complex64", "complex128",
    "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64", "bool",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
]

#: Every dtype this torch build has, by wire name. Both sides only accept names from their own table,
#: so a dtype one side lacks is a ProtocolError naming it, never a crash.
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name) for name in _CANDIDATES if isinstance(getattr(torch, name, None), torch.dtype)
}
DTYPE_NAMES: dict[torch.dtype, str] = {dt: name for name, dt in DTYPES.items()}

MAX_DIMS = 32


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ProtocolError(f"dtype {dtype} cannot be sent; supported: {sorted(DTYPES)}") from None


def dtype_from_name(name: object) -> torch.dtype:
    if not isinstance(name, str) or name not in DTYPES:
        raise ProtocolError(f"unknown dtype {name!r}; this side supports {sorted(DTYPES)}")
    return DTYPES[name]


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# Note [Remote tensors are not data]
#     The client's remote tensors (RemoteTensor, RemoteView) are torch.Tensor subclasses without storage
#     (Note [Remote tensors are Tensors] in frontend/lazy.py), so `isinstance(x, torch.Tensor)` does not
#     say that x has values here. Code that sends, hashes, groups or computes with local tensors asks
#     `is_remote` first: a remote tensor goes up as its handle (frontend/wire.py) or not at all, never
#     as bytes, which would fetch it behind the user's back. They say so by a class attribute, so this
#     module need not import the client's classes.
def is_remote(obj: object) -> bool:
    """A client's handle to a server tensor (Note [Remote tensors are not data])."""
    return isinstance(obj, torch.Tensor) and getattr(type(obj), "_djinn_remote", False) is True


def flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """Note [Any layout travels]: the tensor's values in C order as a 1-d uint8 CPU tensor. Copies only if
    not contiguous, not on the CPU, or a lazy conjugate or negative view."""
    if is_remote(t):  # Note [Remote tensors are not data]
        raise ProtocolError(f"a {type(t).__name__} has no data here to send: it goes up as its handle, or "
                            ".cpu() first")
    t = t.detach().resolve_conj().resolve_neg()  # lazy conj/neg views cannot be viewed as bytes
    if t.device.type != "cpu":
        t = t.cpu()
    flat = t.contiguous().reshape(-1)
    if flat.numel() == 0:
        return torch.empty(0, dtype=torch.uint8)
    if flat.stride(0) != 1:  # one element, any stride: contiguous() kept it (Note [Any layout travels])
        flat = flat.as_strided((flat.numel(),), (1,))
    return flat.view(torch.uint8)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's values as a flat byte view (C order), over `flat_bytes`."""
    flat = flat_bytes(t)
    return memoryview(flat.numpy()) if flat.numel() else memoryview(b"")


def check_shape(shape: object) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_DIMS:
        raise ProtocolError(f"tensor shape must be a list of at most {MAX_DIMS} ints, got {shape!r}")
    dims = []
    for d in shape:
        if not isinstance(d, int) or isinstance(d, bool) or d < 0 or d > 2**62:
            raise ProtocolError(f"tensor shape {shape!r} has an invalid dimension {d!r}")
        dims.append(d)
    return tuple(dims)


def expected_nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * itemsize(dtype)


def decode_tensor(dtype: object, shape: object, buf: memoryview | bytes, *, copy: bool = True) -> torch.Tensor:
    """Build a tensor over `buf` after checking dtype, shape and byte count agree.

    copy=False returns a tensor that aliases the (possibly read-only) buffer: the caller must only read
    it and must keep the buffer alive while it does.
    """
    dt = dtype_from_name(dtype)
    dims = check_shape(shape)
    n = expected_nbytes(dt, dims)
    buf = memoryview(buf).cast("B") if not isinstance(buf, memoryview) or buf.format != "B" else buf
    if buf.nbytes != n:
        raise ProtocolError(f"tensor {dtype}{list(dims)} needs {n} bytes, frame has {buf.nbytes}")
    if n == 0:
        return torch.empty(dims, dtype=dt)
    t = torch.frombuffer(buf, dtype=torch.uint8).view(dt).reshape(dims)
    return t.clone() if copy else t
