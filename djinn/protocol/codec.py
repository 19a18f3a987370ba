"""Frames <-> Message: `[type byte][msgpack header][raw tensor buffers...]` (DESIGN.md section 8).

Tensors anywhere inside the header are replaced by msgpack ext values:
  ext 1  [dtype, shape, frame index]   bytes in their own frame (zero-copy send for large tensors)
  ext 2  [dtype, shape, bytes]         small tensors inline
  ext 3  dtype name                    a torch.dtype value
Nothing is unpickled or imported by name; an unknown ext code is a ProtocolError. Encoding fails only
with a ProtocolError too (a value or dtype that cannot travel, an int past 64 bits), so a sender can
answer it typed (Note [Every request is answered] in djinn/server/engine.py).

Note [Validate before allocate]: the decoder checks frame count and sizes, then the header's size,
then for each tensor that its dtype is known and that shape * itemsize equals the bytes it points to,
before building any tensor. A bad message costs the receiver no more memory than its own frames.
"""
from __future__ import annotations

from typing import Any, Sequence

import msgpack
import torch

from .errors import ProtocolError
from .messages import Limits, Message, MsgType
from .tensors import decode_tensor, dtype_from_name, dtype_name, tensor_bytes

EXT_TENSOR_FRAME = 1
EXT_TENSOR_INLINE = 2
EXT_DTYPE = 3

DEFAULT_LIMITS = Limits()


def encode(kind: MsgType, header: dict, limits: Limits = DEFAULT_LIMITS) -> list:
    """Message -> list of frames (bytes or memoryviews that keep their tensors alive)."""
    buffers: list[memoryview] = []

    def default(obj: Any):
        if isinstance(obj, torch.Tensor):
            data = tensor_bytes(obj)
            meta = [dtype_name(obj.dtype), list(obj.shape)]
            if data.nbytes <= limits.inline_bytes:
                return msgpack.ExtType(EXT_TENSOR_INLINE, msgpack.packb(meta + [bytes(data)]))
            buffers.append(data)
            return msgpack.ExtType(EXT_TENSOR_FRAME, msgpack.packb(meta + [len(buffers) + 1]))
        if isinstance(obj, torch.dtype):
            return msgpack.ExtType(EXT_DTYPE, dtype_name(obj).encode())
        if isinstance(obj, torch.Size):
            return list(obj)
        raise ProtocolError(f"cannot send a value of type {type(obj).__name__} over the wire")

    try:
        body = msgpack.packb(header, default=default, use_bin_type=True)
    except ProtocolError:
        raise
    except Exception as e:  # msgpack's OverflowError, ValueError, TypeError; torch refusing a tensor
        raise ProtocolError(f"cannot encode a {kind.name} message: {type(e).__name__}: {e}") from e
    return [bytes([int(kind)]), body, *buffers]


def _view(frame: Any) -> memoryview:
    buf = getattr(frame, "buffer", None)  # zmq.Frame
    return buf if buf is not None else memoryview(frame)


def decode(frames: Sequence[Any], limits: Limits = DEFAULT_LIMITS, *, copy: bool = True) -> Message:
    """Frames -> Message, or ProtocolError. copy=False lets large tensors alias the frames (read-only)."""
    if len(frames) < 2:
        raise ProtocolError(f"a message needs at least 2 frames (type, header), got {len(frames)}")
    if len(frames) > limits.max_frames:
        raise ProtocolError(f"message has {len(frames)} frames, limit is {limits.max_frames}")
    views = [_view(f) for f in frames]
    total = sum(v.nbytes for v in views)
    if total > limits.max_total_bytes:
        raise ProtocolError(f"message is {total} bytes, limit is {limits.max_total_bytes}")
    for i, v in enumerate(views[2:], start=2):
        if v.nbytes > limits.max_frame_bytes:
            raise ProtocolError(f"frame {i} is {v.nbytes} bytes, limit is {limits.max_frame_bytes}")
    if views[0].nbytes != 1:
        raise ProtocolError(f"first frame must be one type byte, got {views[0].nbytes} bytes")
    try:
        kind = MsgType(views[0][0])
    except ValueError:
        raise ProtocolError(f"unknown message type {views[0][0]}") from None
    if views[1].nbytes > limits.max_header_bytes:
        raise ProtocolError(f"header is {views[1].nbytes} bytes, limit is {limits.max_header_bytes}")

    def ext_hook(code: int, data: bytes):
        if code == EXT_DTYPE:
            return dtype_from_name(data.decode("utf-8", errors="replace"))
        if code not in (EXT_TENSOR_FRAME, EXT_TENSOR_INLINE):
            raise ProtocolError(f"unknown ext type {code}")
        meta = msgpack.unpackb(data, raw=False, max_bin_len=limits.inline_bytes * 2, max_array_len=64)
        if not isinstance(meta, list) or len(meta) != 3:
            raise ProtocolError("tensor descriptor must be [dtype, shape, data]")
        dt, shape, ref = meta
        if code == EXT_TENSOR_INLINE:
            if not isinstance(ref, bytes):
                raise ProtocolError("inline tensor data must be bytes")
            return decode_tensor(dt, shape, ref, copy=True)
        if not isinstance(ref, int) or isinstance(ref, bool) or not 2 <= ref < len(views):
            raise ProtocolError(f"tensor refers to frame {ref!r}, message has {len(views)} frames")
        return decode_tensor(dt, shape, views[ref], copy=copy)

    containers = [0]

    def count(obj):
        containers[0] += 1
        if containers[0] > limits.max_containers:
            raise ProtocolError(f"header has more than {limits.max_containers} maps and arrays")
        return obj

    try:
        header = msgpack.unpackb(
            views[1], raw=False, ext_hook=ext_hook, strict_map_key=True,
            max_bin_len=limits.max_header_bytes, max_str_len=limits.max_header_bytes,
            max_array_len=1 << 20, max_map_len=1 << 20, max_ext_len=1 << 16,
            object_hook=count, list_hook=count,
        )
    except ProtocolError:
        raise
    except Exception as e:  # msgpack raises many types (ExtraData, StackError, ValueError, ...)
        raise ProtocolError(f"header is not valid msgpack: {type(e).__name__}: {e}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a map, got {type(header).__name__}")
    return Message(kind, header, nbytes=total, frames=list(frames) if not copy else [])
