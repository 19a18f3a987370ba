"""Frames <-> Message: `[type byte][msgpack header][raw tensor buffers...]` (DESIGN.md section 8).

Tensors anywhere inside the header are replaced by msgpack ext values:
  ext 1  [dtype, shape, frame index]          bytes in their own frame (zero-copy send for large tensors)
  ext 1  [dtype, shape, frame index, count]   bytes in `count` consecutive frames, in order
  ext 2  [dtype, shape, bytes]                small tensors inline
  ext 3  dtype name                           a torch.dtype value
Nothing is unpickled or imported by name; an unknown ext code is a ProtocolError. Encoding fails only
with a ProtocolError too (a value or dtype that cannot travel, an int past 64 bits), so a sender can
answer it typed (Note [Every request is answered] in djinn/server/engine.py).

Note [Small frames]
    No frame is longer than `Limits.wire_frame_bytes` (1 MiB by default): a larger tensor is split
    over consecutive frames, and a larger header continues in the message's *last* frames, their count
    in four little-endian bytes after the type byte (so a tensor's frame numbers never depend on how
    its header was split). The server's socket refuses any longer frame from any peer (ZMQ_MAXMSGSIZE,
    server/router.py). libzmq fixes that limit per listening socket, for the ZMTP handshake and every
    message after it alike, so small frames for peers that have not authenticated mean small frames
    for everyone: what a stranger stalled inside a frame can make the server hold is one wire frame.

Note [Validate before allocate]: the decoder checks frame count and sizes, then the header's size,
then for each tensor that its dtype is known and that shape * itemsize equals the bytes it points to,
before building any tensor. A bad message costs the receiver no more memory than its own frames (and a
copy of the header or a tensor, once checked, where they span several frames).
"""
from __future__ import annotations

from typing import Any, Sequence

import msgpack
import torch

from .errors import ProtocolError, short
from .messages import Limits, Message, MsgType
from .tensors import check_shape, decode_tensor, dtype_from_name, dtype_name, expected_nbytes, tensor_bytes

EXT_TENSOR_FRAME = 1
EXT_TENSOR_INLINE = 2
EXT_DTYPE = 3

DEFAULT_LIMITS = Limits()


def encode(kind: MsgType, header: dict, limits: Limits = DEFAULT_LIMITS) -> list:
    """Message -> list of frames (bytes or memoryviews that keep their tensors alive), none longer than
    limits.wire_frame_bytes (Note [Small frames])."""
    buffers: list[memoryview] = []
    step = limits.wire_frame_bytes

    def default(obj: Any):
        if isinstance(obj, torch.Tensor):
            data = tensor_bytes(obj)
            meta = [dtype_name(obj.dtype), list(obj.shape)]
            if data.nbytes <= limits.inline_bytes:
                return msgpack.ExtType(EXT_TENSOR_INLINE, msgpack.packb(meta + [bytes(data)]))
            first = len(buffers) + 2
            buffers.extend(_pieces(data, step))
            count = len(buffers) + 2 - first
            ref = [first] if count == 1 else [first, count]
            return msgpack.ExtType(EXT_TENSOR_FRAME, msgpack.packb(meta + ref))
        if isinstance(obj, torch.dtype):
            return msgpack.ExtType(EXT_DTYPE, dtype_name(obj).encode())
        if isinstance(obj, torch.Size):
            return list(obj)
        raise ProtocolError(f"cannot send a value of type {type(obj).__name__} over the wire")

    try:
        packed = msgpack.packb(header, default=default, use_bin_type=True)
    except ProtocolError:
        raise
    except Exception as e:  # msgpack's OverflowError, ValueError, TypeError; torch refusing a tensor
        raise ProtocolError(f"cannot encode a {kind.name} message: {type(e).__name__}: {e}") from e
    body = _pieces(memoryview(packed), step)
    if len(body) == 1:
        return [bytes([int(kind)]), body[0], *buffers]
    tail = len(body) - 1  # the header's continuation frames go last (Note [Small frames])
    return [bytes([int(kind)]) + tail.to_bytes(4, "little"), body[0], *buffers, *body[1:]]


def _pieces(data: memoryview, step: int) -> list[memoryview]:
    """`data` as views of at most `step` bytes each (one view, possibly empty, if it fits)."""
    if data.nbytes <= step:
        return [data]
    return [data[i:i + step] for i in range(0, data.nbytes, step)]


def _join(views: Sequence[memoryview]) -> memoryview:
    """One writable buffer holding `views` back to back (torch.empty: no zero-fill)."""
    out = memoryview(torch.empty(sum(v.nbytes for v in views), dtype=torch.uint8).numpy())
    at = 0
    for v in views:
        out[at:at + v.nbytes] = v.cast("B") if v.format != "B" or v.ndim != 1 else v
        at += v.nbytes
    return out


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
    if views[0].nbytes not in (1, 5):
        raise ProtocolError(f"first frame must be one type byte (and a header frame count), "
                            f"got {views[0].nbytes} bytes")
    tail = int.from_bytes(views[0][1:5], "little") if views[0].nbytes == 5 else 0
    if not 0 <= tail <= len(views) - 2:
        raise ProtocolError(f"header continues in {tail} frames, message has {len(views)}")
    end = len(views) - tail  # frames[2:end] carry tensors; frames[end:] continue the header
    for i, v in enumerate(views[2:end], start=2):
        if v.nbytes > limits.max_frame_bytes:
            raise ProtocolError(f"frame {i} is {v.nbytes} bytes, limit is {limits.max_frame_bytes}")
    try:
        kind = MsgType(views[0][0])
    except ValueError:
        raise ProtocolError(f"unknown message type {views[0][0]}") from None
    head = [views[1], *views[end:]]
    head_bytes = sum(v.nbytes for v in head)
    if head_bytes > limits.max_header_bytes:
        raise ProtocolError(f"header is {head_bytes} bytes, limit is {limits.max_header_bytes}")
    body = head[0] if len(head) == 1 else _join(head)

    def ext_hook(code: int, data: bytes):
        if code == EXT_DTYPE:
            return dtype_from_name(data.decode("utf-8", errors="replace"))
        if code not in (EXT_TENSOR_FRAME, EXT_TENSOR_INLINE):
            raise ProtocolError(f"unknown ext type {code}")
        meta = msgpack.unpackb(data, raw=False, max_bin_len=limits.inline_bytes * 2, max_array_len=64)
        if code == EXT_TENSOR_INLINE:
            if not isinstance(meta, list) or len(meta) != 3:
                raise ProtocolError("tensor descriptor must be [dtype, shape, data]")
            dt, shape, ref = meta
            if not isinstance(ref, bytes):
                raise ProtocolError("inline tensor data must be bytes")
            return decode_tensor(dt, shape, ref, copy=True)
        if not isinstance(meta, list) or len(meta) not in (3, 4):
            raise ProtocolError("tensor descriptor must be [dtype, shape, frame] or [dtype, shape, frame, count]")
        dt, shape, ref, count = meta if len(meta) == 4 else (*meta, 1)
        if not (_is_int(ref) and _is_int(count) and count >= 1 and 2 <= ref and ref + count <= end):
            span = f" (and {short(count)} in all)" if len(meta) == 4 else ""
            raise ProtocolError(f"tensor refers to frame {short(ref)}{span}, message has {end} frames")
        if count == 1:
            return decode_tensor(dt, shape, views[ref], copy=copy)
        parts = views[ref:ref + count]
        nbytes = sum(v.nbytes for v in parts)
        if nbytes > limits.max_frame_bytes:
            raise ProtocolError(f"tensor in frames {ref}..{ref + count - 1} is {nbytes} bytes, "
                                f"limit is {limits.max_frame_bytes}")
        want = expected_nbytes(dtype_from_name(dt), check_shape(shape))
        if want != nbytes:  # before the join allocates anything (Note [Validate before allocate])
            raise ProtocolError(f"tensor {short(dt)}{list(check_shape(shape))} needs {want} bytes, "
                                f"frames have {nbytes}")
        return decode_tensor(dt, shape, _join(parts), copy=False)  # the join is this tensor's own copy

    containers = [0]

    def count(obj):
        containers[0] += 1
        if containers[0] > limits.max_containers:
            raise ProtocolError(f"header has more than {limits.max_containers} maps and arrays")
        return obj

    try:
        header = msgpack.unpackb(
            body, raw=False, ext_hook=ext_hook, strict_map_key=True,
            max_bin_len=limits.max_header_bytes, max_str_len=limits.max_header_bytes,
            max_array_len=1 << 20, max_map_len=1 << 20, max_ext_len=1 << 16,
            object_hook=count, list_hook=count,
        )
    except ProtocolError:
        raise
    except Exception as e:  # msgpack raises many types (ExtraData, StackError, ValueError, ...)
        raise ProtocolError(f"header is not valid msgpack: {type(e).__name__}: {short(str(e), 200)}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a map, got {type(header).__name__}")
    return Message(kind, header, nbytes=total, frames=list(frames) if not copy else [])


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
