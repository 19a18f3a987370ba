"""Fuzz a real server over the wire (issue 8, part 3): whatever arrives, it answers and keeps serving.

    python OSDI_Evaluation/reliability/fuzz_server.py [--n 1000000] [--short] [--seed 0] [--sockets 8]
        [--batch 32] [--check-every 500] [--time-limit S] [--device cpu] [--out results.json]
    python OSDI_Evaluation/reliability/fuzz_server.py --replay results/fuzz_inputs/<run>/<file>.json.gz
    python OSDI_Evaluation/reliability/fuzz_server.py --replay-index 123 4567 [--seed 0]

Inputs (each a pure function of (seed, index), up to the live session/model/handle/run ids of the
socket it is sent on, which are filled in at send time):
  random_bytes      1-5 frames of random bytes
  truncated         a valid request whose msgpack header is cut short
  type_byte         wrong type frames (0, 8-255, empty, two bytes) and server-only kinds (REPLY, ERROR, STREAM)
  huge_declared     msgpack headers declaring 2**32-1 elements/bytes with a few bytes behind, tensors with
                    2**62-element shapes, upload items declaring large totals
  frame_count       one frame, thousands of frames, tensors that point at frames that are not there
  tensor_mismatch   ext 1/2 tensors whose dtype/shape disagree with the bytes (unknown dtypes, negative
                    dims, > 32 dims, non-list shapes, bool/str frame refs)
  deep_nesting      lists/maps nested 50-100000 deep (raw msgpack), structure tags ($tu/$d) nested > 64
  invalid_utf8      msgpack strings holding invalid UTF-8 (op names, keys, values)
  ext_garbage       ext types 1/2/3 with garbage payloads, other ext codes
  wrong_args        a valid REQUEST for every op in djinn.server.handlers.registry.OPS, its arguments (names read from
                    the op's source) set to random values of random types
  semi_valid        a valid request template per op with one or two fields (or nested fields) randomized
  unknown_op        random op names, dunders, module attribute names
  other_kinds       HELLO / HEARTBEAT / BYE / REPLY ... with random headers
  big_header        a 1-2 MiB header of empty maps/lists/nils (decoded-object amplification; rare: each
                    one costs the server about a second)
Sockets: --sockets DEALERs (all but one said HELLO; one never does), each sending --batch inputs back
to back and then a marker ping whose reply says the batch was read, so --sockets x --batch inputs are in
flight. Every --check-every inputs a separate health client pings (must answer within 1 s) and the
server's RSS is read (bound: baseline + --rss-slack-mb + 4 x the input bytes in flight); every few
checks it also runs a 1-token generate on a session KV (must finish within 5 s). While the loop waits on
a check, every fuzz socket heartbeats (a client silent for 10 s is reclaimed). A socket re-HELLOs and
replaces its sessions every --rotate-every batches; a rotation that fails (the server no longer knows
the client it just greeted) is a finding ("setup_failed"). The worker pid comes
from HELLO (with the supervisor, EmbeddedServer.proc is the supervisor); a crash is that pid gone, a
hang a ping unanswered for --hang-s. Inputs in flight at a crash, hang, stall, generate stall, failed
rotation or RSS excursion are saved (gzipped JSON, with the last 400 generate/start requests and 200
HELLOs, whose effects outlive their batch) under results/fuzz_inputs/<run>/: replay them with --replay
(bytes verbatim, so their session ids are stale) or regenerate them with --replay-index and live ids.
The server log is scanned for messages the server dropped ("dropped a message") and engine-loop
failures. At the end: every session reclaimed, threads and fds back to the start, the server alive, and
a tiny-model forward and session generate bitwise-equal to local.
"""
from __future__ import annotations

import argparse
import base64
import collections
import gzip
import inspect
import json
import math
import os
import random
import re
import secrets
import struct
import sys
import time
import traceback
from pathlib import Path

import msgpack
import zmq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

from load_soak import TINY_GPT2, model_spec, proc_resources  # noqa: E402

from djinn.protocol import codec  # noqa: E402
from djinn.protocol.errors import ERRORS  # noqa: E402
from djinn.protocol.messages import PROTOCOL_VERSION, MsgType  # noqa: E402

REQ = bytes([MsgType.REQUEST])
ITEMSIZE = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2, "complex32": 4, "complex64": 8,
            "complex128": 16, "uint8": 1, "int8": 1, "int16": 2, "int32": 4, "int64": 8, "uint16": 2,
            "uint32": 4, "uint64": 8, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1}
BAD_DTYPES = ["float128", "", "torch.float32", "Float32", "int4", "object", "float8", "qint8", "\x00", "x" * 300]
CATEGORIES = {
    "random_bytes": 0.07, "truncated": 0.06, "type_byte": 0.05, "huge_declared": 0.06, "frame_count": 0.04,
    "tensor_mismatch": 0.08, "deep_nesting": 0.04, "invalid_utf8": 0.05, "ext_garbage": 0.07,
    "wrong_args": 0.22, "semi_valid": 0.18, "unknown_op": 0.04, "other_kinds": 0.04, "big_header": 0.0002,
}
#: Ids for values packed inside ext payloads and truncated messages (not the socket's live ones).
FAKE_CTX = {"sid": "x" * 24, "sid2": "w" * 24, "model_id": "y" * 64, "handle": "z" * 16, "run": "r" * 12, "client_id": "c" * 32}
GEN_KWARGS = ["max_new_tokens", "min_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p",
              "min_p", "typical_p", "repetition_penalty", "no_repeat_ngram_size", "num_beams", "eos_token_id",
              "pad_token_id", "bos_token_id", "attention_mask", "length_penalty", "num_return_sequences",
              "use_cache", "streamer", "logits_processor", "assistant_model", "output_scores"]


# -- ops and their argument names, read from the server's source ---------------------------------------
def server_ops() -> dict[str, list[str]]:
    """Every op in djinn.server.handlers.registry.OPS with the argument names its function (and the helpers it hands
    `args` to) read, so new ops and arguments are fuzzed without editing this file."""
    import djinn.server.engine  # noqa: F401  (registers every op module's ops)
    from djinn.server.handlers import ops
    from djinn.server.handlers.registry import OPS

    pat = re.compile(r'\bargs\.get\(\s*"(\w+)"|\bargs\[\s*"(\w+)"\s*\]')

    def names_in(fn, depth: int = 0) -> set[str]:
        try:
            src = inspect.getsource(fn)
        except (OSError, TypeError):
            return set()
        found = {a or b for a, b in pat.findall(src)}
        if depth < 2:
            mod = inspect.getmodule(fn)
            for callee in set(re.findall(r"(\w+)\([^()]*\bargs\b", src)):
                f = getattr(mod, callee, None) or getattr(ops, callee, None)
                if inspect.isfunction(f) and f is not fn:
                    found |= names_in(f, depth + 1)
        if "engine.session(client_id, args)" in src:
            found.add("sid")
        return found

    return {name: sorted(names_in(fn)) for name, fn in sorted(OPS.items())}


# -- values ------------------------------------------------------------------------------------------
class P:
    """A placeholder for a live id of the sending socket (sid, model_id, handle, run, client_id)."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


class Raw:
    """Bytes spliced verbatim into the msgpack encoding (invalid UTF-8 strings, huge declared sizes)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data


def raw_str(b: bytes) -> Raw:
    """A msgpack str whose bytes need not be UTF-8."""
    n = len(b)
    if n < 32:
        return Raw(bytes([0xA0 | n]) + b)
    if n < 256:
        return Raw(b"\xd9" + bytes([n]) + b)
    return Raw(b"\xda" + struct.pack(">H", n) + b)


def tensor_ext(dtype: str, shape: list, data: bytes) -> msgpack.ExtType:
    return msgpack.ExtType(codec.EXT_TENSOR_INLINE, msgpack.packb([dtype, shape, data], use_bin_type=True))


def frame_ext(dtype: str, shape: list, ref) -> msgpack.ExtType:
    return msgpack.ExtType(codec.EXT_TENSOR_FRAME, msgpack.packb([dtype, shape, ref], use_bin_type=True))


def valid_tensor(rng: random.Random, dtype: str | None = None, shape: list | None = None) -> msgpack.ExtType:
    dtype = dtype or rng.choice(list(ITEMSIZE))
    shape = shape if shape is not None else [rng.randint(0, 4) for _ in range(rng.randint(0, 3))]
    n = math.prod(shape) * ITEMSIZE[dtype]
    return tensor_ext(dtype, shape, rng.randbytes(n))


def ids_tensor(rng: random.Random, batch: int | None = None, length: int | None = None, hi: int = 256):
    b, t = batch or 1, length or rng.randint(1, 12)
    vals = [rng.randrange(hi) for _ in range(b * t)]
    return tensor_ext("int64", [b, t], struct.pack(f"<{b * t}q", *vals))


def rand_int(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.5:
        return rng.randint(-2, 16)
    if r < 0.7:
        return rng.randint(0, 1000)
    if r < 0.85:
        return rng.choice([2**31 - 1, 2**31, 2**32, 2**53, 2**62, 2**63 - 1, -2**63, 2**64 - 1, -1, -2**31])
    return rng.randint(-2**63, 2**64 - 1)


def rand_str(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.3:
        return rng.choice(["", "sid", "$h", "$t", "$tu", "$d", "$mo", "forward", "..", "/", "\x00", "None",
                           "transformer.h.0", "model.layers.0", "after", "before", "IO_WAIT", "COMPUTE",
                           "float32", "int64", "GPT2LMHeadModel", "cuda:0", "cpu", "%s%n", "__class__"])
    if r < 0.8:
        return "".join(chr(rng.randint(32, 126)) for _ in range(rng.randint(0, 24)))
    if r < 0.95:
        return "".join(chr(rng.choice([rng.randint(0x80, 0xD7FF), rng.randint(0xE000, 0x10FFFF)]))
                       for _ in range(rng.randint(1, 8)))
    return "x" * rng.choice([200, 201, 1000, 70000])


def rand_value(rng: random.Random, depth: int = 0):
    """A random msgpack value of a random type (scalars, containers, tensors, tags, live ids)."""
    r = rng.random()
    if depth > 3:
        r = r * 0.55
    if r < 0.06:
        return None
    if r < 0.12:
        return rng.random() < 0.5
    if r < 0.25:
        return rand_int(rng)
    if r < 0.32:
        return rng.choice([0.0, -0.0, 1.5, -1.0, 1e308, -1e-308, float("nan"), float("inf"), float("-inf"),
                           rng.uniform(-1e6, 1e6)])
    if r < 0.45:
        return rand_str(rng)
    if r < 0.5:
        return rng.randbytes(rng.randint(0, 40))
    if r < 0.55:
        return P(rng.choice(["sid", "model_id", "handle", "run", "client_id"]))
    if r < 0.65:
        return [rand_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if r < 0.75:
        return {rand_str(rng): rand_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}
    if r < 0.82:
        return valid_tensor(rng)
    if r < 0.85:
        return msgpack.ExtType(codec.EXT_DTYPE, rng.choice(list(ITEMSIZE) + BAD_DTYPES).encode())
    if r < 0.9:
        tag = rng.choice(["$tu", "$d", "$h", "$t", "$mo"])
        if tag == "$tu":
            return {"$tu": [rand_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]}
        if tag == "$d":
            return {"$d": {rand_str(rng): rand_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}}
        if tag == "$h":
            return {"$h": rng.choice([P("handle"), rand_value(rng, depth + 1)])}
        if tag == "$t":
            return {"$t": [rand_str(rng), "float32", [1], "cpu"]}
        return {"$mo": rand_str(rng), "$d": {}}
    if r < 0.93:
        return ids_tensor(rng, hi=rng.choice([256, 2**31]))
    if r < 0.96:
        return {rand_value(rng, 9) if rng.random() < 0.5 else rng.randbytes(3): 1}  # non-str keys
    return raw_str(rng.randbytes(rng.randint(1, 12)) + b"\xff\xfe")


# -- packing with placeholders -----------------------------------------------------------------------
class Packer:
    """Packs a value after filling in placeholders; Raw pieces are spliced in through ext-type tokens."""

    def __init__(self):
        self.tok = secrets.token_bytes(16)

    def pack(self, obj, ctx: dict) -> bytes:
        raws: list[bytes] = []

        def resolve(o, depth=0):
            if depth > 200:
                return None
            if isinstance(o, P):
                return ctx.get(o.name)
            if isinstance(o, Raw):
                raws.append(o.data)
                return msgpack.ExtType(127, self.tok[:12] + struct.pack(">I", len(raws) - 1))
            if type(o) is int and not -2**63 <= o < 2**64:
                return 2**64 - 1 if o > 0 else -2**63  # msgpack's integer range
            if isinstance(o, list):
                return [resolve(v, depth + 1) for v in o]
            if isinstance(o, dict):
                return {resolve(k, depth + 1) if isinstance(k, (P, Raw)) else k: resolve(v, depth + 1)
                        for k, v in o.items()}
            return o

        body = msgpack.packb(resolve(obj), use_bin_type=True, strict_types=False)
        for i, data in enumerate(raws):
            token = b"\xd8\x7f" + self.tok[:12] + struct.pack(">I", i)
            body = body.replace(token, data, 1)
        return body


# -- the generator -----------------------------------------------------------------------------------
class Msg:
    """A generated input: either raw frames or (type byte, header value, extra frames) packed at send time."""

    __slots__ = ("index", "category", "frames", "kind", "header", "extra")

    def __init__(self, index, category, frames=None, kind=REQ, header=None, extra=()):
        self.index, self.category, self.frames = index, category, frames
        self.kind, self.header, self.extra = kind, header, list(extra)

    def build(self, packer: Packer, ctx: dict) -> list[bytes]:
        if self.frames is not None:
            return self.frames
        return [self.kind, packer.pack(self.header, ctx), *self.extra]


class Generator:
    def __init__(self, seed: int, ops: dict[str, list[str]], categories: dict[str, float]):
        self.seed, self.ops = seed, ops
        self.op_names = sorted(ops)
        self.cats = [c for c, w in categories.items() if w > 0]
        self.weights = [categories[c] for c in self.cats]
        self.packer = Packer()
        self.config = model_spec(0)["config"]
        self.templates = self._templates()

    def make(self, i: int) -> Msg:
        rng = random.Random(self.seed * 1_000_000_007 + i)
        cat = rng.choices(self.cats, self.weights)[0]
        return getattr(self, "g_" + cat)(rng, Msg(i, cat))

    # request helpers
    def _request(self, rng, op, args, rid=None):
        return {"rid": rng.randint(1, 2**31) if rid is None else rid, "op": op, "args": args}

    def _valid_request(self, rng):
        op = rng.choice(self.op_names)
        return self._request(rng, op, self._template(rng, op))

    def _template(self, rng, op):
        t = self.templates.get(op)
        return t(rng) if t is not None else {"sid": P("sid")}

    def _templates(self):
        hexh = lambda rng: rng.randbytes(32).hex()  # noqa: E731
        bp = lambda rng: [{"path": rng.choice(["transformer.h.0", "transformer.h.1", "", "lm_head"]),  # noqa: E731
                           "layer": None, "where": rng.choice(["after", "before"]), "step": None}]
        edit = lambda rng: {"h": P("handle"), "i": [], "op": rng.choice(["add", "sub", "mul", "copy"]),  # noqa: E731
                            "v": rng.choice([1.0, 0, -2.5])}
        cfg = self.config

        def upload(rng):
            n = rng.choice([4, 16, 64])
            total = n * 4
            return {"sid": P("sid"), "stage": None, "items": [{"hash": hexh(rng), "dtype": "float32", "shape": [n],
                                                               "offset": 0, "total": total,
                                                               "data": tensor_ext("uint8", [total], rng.randbytes(total))}]}

        return {
            "ping": lambda rng: {},
            "stats": lambda rng: {},
            "open_session": lambda rng: {"name": "fz"},
            "close_session": lambda rng: {"sid": P("sid2") if rng.random() < 0.5 else rand_str(rng)},
            "has_weights": lambda rng: {"sid": P("sid"), "hashes": [hexh(rng) for _ in range(rng.randint(0, 3))]},
            "upload": upload,
            "register_model": lambda rng: {"sid": P("sid"), "arch": "GPT2LMHeadModel", "config": cfg, "attn_impl": None,
                                           "tensors": {"transformer.wte.weight": hexh(rng)}, "generation_config": None},
            "load_model": lambda rng: {"sid": P("sid"), "path": rng.choice(["/", "/tmp", "/nonexistent", "..", ".",
                                                                             "/proc/self", "~", "\x00", "a" * 5000])},
            "attach_model": lambda rng: {"sid": P("sid"), "model_id": P("model_id")},
            "release_model": lambda rng: {"sid": P("sid"), "model_id": P("model_id") if rng.random() < 0.1 else hexh(rng)},
            "init_model": lambda rng: {"sid": P("sid"), "arch": "GPT2LMHeadModel", "config": cfg, "attn_impl": None,
                                       "dtype": None, "seed": rng.choice([0, 0, 0, 1])},
            "forward": lambda rng: {"sid": P("sid"), "model_id": P("model_id"), "args": [ids_tensor(rng)],
                                    "kwargs": {"$d": {}}},
            "generate": lambda rng: {"sid": P("sid"), "model_id": P("model_id"), "input_ids": ids_tensor(rng),
                                     "kwargs": {"$d": {"max_new_tokens": rng.randint(1, 3)}}, "seed": None,
                                     "use_session_kv": rng.random() < 0.5, "stream": rng.random() < 0.2},
            "signal": lambda rng: {"sid": P("sid"), "kind": rng.choice(["IO_WAIT", "COMPUTE"]), "eta_s": 0.5},
            "reset_kv": lambda rng: {"sid": P("sid"), "model_id": P("model_id")},
            "fetch": lambda rng: {"sid": P("sid"), "handles": [P("handle")], "indices": None, "edits": None},
            "free": lambda rng: {"sid": P("sid"), "handles": [rand_str(rng)]},
            "start": lambda rng: {"sid": P("sid"), "model_id": P("model_id"), "method": "forward",
                                  "args": [ids_tensor(rng)], "kwargs": {"$d": {}}, "breakpoints": bp(rng), "seed": None},
            "resume": lambda rng: {"sid": P("sid"), "run": P("run"), "edits": []},
            "fork": lambda rng: {"sid": P("sid"), "run": P("run"), "edits": []},
            "cancel_run": lambda rng: {"sid": P("sid"), "run": P("run") if rng.random() < 0.1 else rand_str(rng)},
            "edit": lambda rng: {"sid": P("sid"), "edits": [edit(rng)]},
        }

    # categories
    def g_random_bytes(self, rng, m):
        m.frames = [rng.randbytes(rng.choice([0, 1, 2, 5, 17, 64, 300, 4096])) for _ in range(rng.randint(1, 5))]
        if rng.random() < 0.5:
            m.frames[0] = bytes([rng.choice([1, 2, 6, 7])])
        return m

    def g_truncated(self, rng, m):
        body = self.packer.pack(self._valid_request(rng), FAKE_CTX)
        cut = rng.randint(0, max(0, len(body) - 1))
        m.frames = [REQ, body[:cut]] if rng.random() < 0.8 else [REQ, body[:cut] + rng.randbytes(rng.randint(1, 8))]
        return m

    def g_type_byte(self, rng, m):
        m.header = self._valid_request(rng)
        m.kind = rng.choice([b"\x00", bytes([rng.randint(8, 255)]), b"", b"\x02\x02", bytes([MsgType.REPLY]),
                             bytes([MsgType.ERROR]), bytes([MsgType.STREAM]), b"\x02" * 100])
        return m

    def g_huge_declared(self, rng, m):
        choice = rng.randrange(6)
        big = rng.choice([2**32 - 1, 2**31, 2**24, 2**20 + 1])
        if choice == 0:  # array32/map32 declaring `big` elements
            m.frames = [REQ, rng.choice([b"\xdd", b"\xdf"]) + struct.pack(">I", big) + rng.randbytes(rng.randint(0, 16))]
        elif choice == 1:  # str32/bin32/ext32 declaring `big` bytes, inside a request
            head = rng.choice([b"\xdb", b"\xc6", b"\xc9"]) + struct.pack(">I", big) + (b"\x02" if rng.random() < 0.5 else b"")
            m.header = self._request(rng, "ping", {"x": Raw(head + rng.randbytes(rng.randint(0, 16)))})
        elif choice == 2:  # tensors with enormous shapes
            shape = rng.choice([[2**62], [2**31, 2**31], [2**62, 2**62, 2], [2**20] * 6, [0, 2**62]])
            ext = frame_ext(rng.choice(list(ITEMSIZE)), shape, 2) if rng.random() < 0.5 else \
                tensor_ext(rng.choice(list(ITEMSIZE)), shape, rng.randbytes(8))
            m.header = self._request(rng, rng.choice(["ping", "forward", "generate"]),
                                     {"sid": P("sid"), "model_id": P("model_id"), "args": [ext], "input_ids": ext})
            m.extra = [rng.randbytes(8)]
        elif choice == 3:  # an upload item declaring a large total, one small chunk
            n = rng.choice([2**20, 2**26, 2**30, 2**34, 2**40, 2**62])
            dtype = rng.choice(["uint8", "float32"])
            total = n * ITEMSIZE[dtype] if rng.random() < 0.8 else rand_int(rng)
            m.header = self._request(rng, "upload", {"sid": P("sid"), "stage": rng.choice([None, "host"]), "items": [
                {"hash": rng.randbytes(32).hex(), "dtype": dtype, "shape": [n], "offset": 0, "total": total,
                 "data": tensor_ext("uint8", [4], rng.randbytes(4))}]})
        elif choice == 4:  # nested containers declaring more than they hold
            m.header = self._request(rng, "stats", {"x": Raw(b"\x91" * rng.randint(1, 50) + b"\xdd" + struct.pack(">I", big))})
        else:  # an inline ext descriptor declaring a huge bin
            payload = b"\x93" + msgpack.packb("float32") + b"\x91\x01" + b"\xc6" + struct.pack(">I", big)
            m.header = self._request(rng, "ping", {"x": msgpack.ExtType(codec.EXT_TENSOR_INLINE, payload)})
        return m

    def g_frame_count(self, rng, m):
        choice = rng.randrange(4)
        req = self._valid_request(rng)
        if choice == 0:
            m.frames = [rng.choice([REQ, b"", b"\x01", rng.randbytes(3)])]
        elif choice == 1:
            m.header = req
            m.extra = [b""] * (rng.choice([4093, 4094, 4095, 5000]) if rng.random() < 0.1 else rng.choice([1, 2, 10, 100]))
        elif choice == 2:
            m.header = self._request(rng, "forward", {"sid": P("sid"), "model_id": P("model_id"),
                                                      "args": [frame_ext("int64", [1, 2], rng.choice([2, 3, 7, 4096, -1, 0, 1]))],
                                                      "kwargs": {"$d": {}}})
            m.extra = [struct.pack("<2q", 1, 2)] * rng.randint(0, 2)
        else:
            m.header = req
            m.extra = [rng.randbytes(rng.randint(0, 64)) for _ in range(rng.randint(1, 8))]
        return m

    def g_tensor_mismatch(self, rng, m):
        dtype = rng.choice(list(ITEMSIZE) + BAD_DTYPES + [7, None, b"float32", ["float32"]])
        shape = rng.choice([[3], [2, 2], [-1], [1] * 33, [1] * 32, "3", 3, None, [True], [1.5], [2**63], [[1]], []])
        size = ITEMSIZE.get(dtype, 4) if isinstance(dtype, str) else 4
        try:
            n = math.prod(shape) * size if isinstance(shape, list) and all(type(d) is int and 0 <= d < 64 for d in shape) else 4
        except TypeError:
            n = 4
        n = max(0, n + rng.choice([-1, 1, -size, size, 0, 7]))
        op = rng.choice(self.op_names)
        if rng.random() < 0.5:
            ext = tensor_ext(dtype, shape, rng.randbytes(min(n, 512))) if rng.random() < 0.9 else \
                msgpack.ExtType(2, self.packer.pack([dtype, shape, rand_value(rng, 3)], FAKE_CTX))
            m.extra = []
        else:
            ref = rng.choice([2, 2, 2, True, "2", 2.0, None, -2])
            ext = frame_ext(dtype, shape, ref)
            m.extra = [rng.randbytes(min(n, 4096))]
        args = self._template(rng, op)
        key = rng.choice(sorted(set(args) | {"args", "input_ids", "x"}))
        args[key] = [ext] if key == "args" else ext
        m.header = self._request(rng, op, args)
        return m

    def g_deep_nesting(self, rng, m):
        depth = rng.choice([50, 65, 100, 600, 1000, 5000, 100000])
        opener = rng.choice([b"\x91", b"\x81\xa1k"])
        raw = opener * depth + b"\xc0"
        choice = rng.randrange(3)
        if choice == 0:
            m.header = self._request(rng, rng.choice(self.op_names), {"sid": P("sid"), "x": Raw(raw)})
        elif choice == 1:  # structure tags nested past MAX_DEPTH, as forward args / kwargs
            d = rng.choice([63, 64, 65, 66, 200])
            v = 1
            for _ in range(d):
                v = {"$tu": [v]} if rng.random() < 0.5 else {"$d": {"k": v}}
            args = self._template(rng, "forward")
            args[rng.choice(["args", "kwargs"])] = [v] if rng.random() < 0.5 else v
            m.header = self._request(rng, rng.choice(["forward", "generate", "start"]), args)
        else:
            m.frames = [REQ, raw]
        return m

    def g_invalid_utf8(self, rng, m):
        bad = raw_str(rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"ping\xff", b"\xf8\x88\x80\x80\x80",
                                  rng.randbytes(rng.randint(1, 40))]))
        req = self._valid_request(rng)
        where = rng.randrange(4)
        if where == 0:
            req["op"] = bad
        elif where == 1:
            req["args"]["sid" if rng.random() < 0.5 else "name"] = bad
        elif where == 2:
            req["args"][bad] = 1  # a key that is not UTF-8 (Raw keys are spliced like values)
        else:
            req["args"]["x"] = [bad, {"$d": {"k": bad}}]
        m.header = req
        return m

    def g_ext_garbage(self, rng, m):
        code = rng.choice([1, 2, 3, 1, 2, 3, 0, 4, 5, 42, 126, -1, -128])
        payload = rng.choice([
            rng.randbytes(rng.randint(0, 40)),
            self.packer.pack(rand_value(rng, 2), FAKE_CTX),
            msgpack.packb(["float32", [1], 2, 3]), msgpack.packb({"dtype": "float32"}), b"\xff\xfe\xfd",
            msgpack.packb(["float32", [1]]), b"",
        ]) if code != 3 else rng.choice([rng.randbytes(8), b"\xff\xfe", b"", b"float32\x00", b"x" * 70000,
                                        b"float32"])
        try:
            ext = msgpack.ExtType(code, payload)
        except Exception:
            ext = msgpack.ExtType(2, payload)
        op = rng.choice(self.op_names)
        args = self._template(rng, op)
        args[rng.choice(sorted(set(args) | {"x"}))] = rng.choice([ext, [ext], {"$tu": [ext]}])
        m.header = self._request(rng, op, args)
        m.extra = [rng.randbytes(rng.randint(0, 16))] if rng.random() < 0.3 else []
        return m

    def g_wrong_args(self, rng, m):
        op = rng.choice(self.op_names)
        names = list(self.ops[op]) or ["x"]
        args = {}
        for name in names:
            if name == "sid" and rng.random() < 0.7:
                args["sid"] = P("sid2") if op == "close_session" else P("sid")  # sid2: the one to lose
            elif rng.random() < 0.8:
                args[name] = rand_value(rng)
        if rng.random() < 0.2:
            args[rand_str(rng)] = rand_value(rng)
        if rng.random() < 0.05:
            args = rand_value(rng)  # args that are not a map
        m.header = self._request(rng, op, args, rid=rand_int(rng) if rng.random() < 0.1 else None)
        return m

    def g_semi_valid(self, rng, m):
        op = rng.choice(self.op_names)
        args = self._template(rng, op)
        keys = sorted(set(args) | set(self.ops[op])) or ["x"]
        for _ in range(rng.randint(1, 2)):
            key = rng.choice(keys)
            sub = args.get(key)
            r = rng.random()
            if key == "kwargs" and isinstance(sub, dict) and "$d" in sub and r < 0.7:
                kw = dict(sub["$d"])
                kw[rng.choice(GEN_KWARGS)] = rand_value(rng) if rng.random() < 0.5 else rand_int(rng)
                args[key] = {"$d": kw}
            elif isinstance(sub, list) and sub and isinstance(sub[0], dict) and r < 0.7:
                item = dict(sub[0])
                item[rng.choice(sorted(item) + ["x"])] = rand_value(rng)
                args[key] = [item] + ([rand_value(rng)] if rng.random() < 0.2 else [])
            elif r < 0.85:
                args[key] = rand_value(rng)
            else:
                args.pop(key, None)
        m.header = self._request(rng, op, args)
        return m

    def g_unknown_op(self, rng, m):
        op = rng.choice(["", "OPS", "op", "_attach", "__init__", "__class__", "log", "time", "torch", "executor",
                         "streaming", "_unpack_inputs", "__globals__", "../ping", "ping ", "PING", "Ping",
                         rand_str(rng), rand_str(rng), "ping\x00"])
        m.header = self._request(rng, op, rng.choice([{}, {"sid": P("sid")}, rand_value(rng)]))
        return m

    def g_other_kinds(self, rng, m):
        kind = rng.choice([MsgType.HELLO, MsgType.HEARTBEAT, MsgType.BYE, MsgType.REPLY, MsgType.ERROR,
                           MsgType.STREAM, MsgType.HELLO])
        if kind == MsgType.HELLO:
            h = {"rid": rng.randint(0, 100), "version": rng.choice([PROTOCOL_VERSION + 1, 0, "1", None, 1.0, [1]]),
                 "secret": rand_value(rng), "client_id": rng.choice([rand_str(rng), "short", 12345678, None, "x" * 65])}
            if rng.random() < 0.1:  # a valid HELLO that moves this socket to its own client id again
                h.update(version=PROTOCOL_VERSION, client_id=P("client_id"), secret=None)
        elif kind == MsgType.BYE:
            h = {"rid": rng.randint(0, 100), "x": rand_value(rng)}
            m.extra = [rng.randbytes(4)]  # a BYE with a stray frame: a protocol error, not a goodbye
            m.header = h
            m.header["x"] = valid_tensor(rng)
            m.header["y"] = frame_ext("uint8", [5], 2)  # 4 bytes in frame 2: mismatch, so it is refused
            m.kind = bytes([kind])
            return m
        else:
            h = rand_value(rng) if rng.random() < 0.3 else {"rid": rng.randint(0, 100), "x": rand_value(rng)}
        m.kind, m.header = bytes([kind]), h
        return m

    def g_big_header(self, rng, m):
        n = rng.choice([1, 2]) << 20
        filler = rng.choice([b"\x80", b"\x90", b"\xc0"])  # empty maps, empty lists, nils
        arrays, per = max(1, n >> 20), min(n, 1 << 20)
        x = b"\xdc" + struct.pack(">H", arrays) + (b"\xdd" + struct.pack(">I", per) + filler * per) * arrays
        m.header = self._request(rng, "ping", {"x": Raw(x)})
        return m


# -- the server side ---------------------------------------------------------------------------------
class Health:
    """A separate, well-behaved raw client: ping within 1 s, and now and then a session-KV generate."""

    def __init__(self, ctx: zmq.Context, address: str, spec: dict, packer: Packer):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.client_id = secrets.token_hex(16)
        self.rid = 1
        self.packer = packer
        self.tick = None  # called every ~0.5 s while waiting: keeps the fuzz clients' heartbeats going
        self.info = self.call(MsgType.HELLO, {"version": PROTOCOL_VERSION, "secret": None, "client_id": self.client_id}, 30)
        self.sid = self.request("open_session", {"name": "health"}, 30)["sid"]
        self.model_id = self.request("init_model", dict(spec, sid=self.sid), 60)["model_id"]

    def warm(self) -> None:
        """Start the server's lazily created, process-wide helpers before the baseline is read, so they
        are not mistaken for leaks: pyzmq's zero-copy garbage-collector thread and context (started by
        the first reply over 64 KiB; here an error message quoting a 70 KB session id) and the leaf
        hashing pool (started by the first completed upload)."""
        import torch

        from djinn.protocol.hashing import weight_hash

        try:
            self.request("reset_kv", {"sid": "x" * 70000}, 10)
        except RuntimeError:
            pass  # session_not_found, with the id in its message
        t = torch.arange(4, dtype=torch.float32) + random.random()
        h = weight_hash(t)
        data = tensor_ext("uint8", [16], t.numpy().tobytes())
        self.request("upload", {"sid": self.sid, "items": [{"hash": h, "dtype": "float32", "shape": [4], "offset": 0,
                                                             "total": 16, "data": data}]}, 10)

    def call(self, kind, header, timeout_s):
        self.rid += 1
        rid = self.rid
        self.sock.send_multipart(codec.encode(kind, dict(header, rid=rid)))
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply within {timeout_s} s")
            if not self.sock.poll(int(min(left, 0.5) * 1000) + 1):
                if self.tick is not None:
                    self.tick()
                continue
            msg = codec.decode(self.sock.recv_multipart())
            if msg.rid == rid and msg.kind != MsgType.STREAM:
                if msg.kind == MsgType.ERROR:
                    raise RuntimeError(f"{msg.header.get('code')}: {msg.header.get('message')}")
                return msg.header

    def request(self, op, args, timeout_s):
        return self.call(MsgType.REQUEST, {"op": op, "args": args}, timeout_s)["result"]

    def ping(self, timeout_s: float) -> float:
        t = time.perf_counter()
        self.request("ping", {}, timeout_s)
        return time.perf_counter() - t

    def generate(self, timeout_s: float) -> float:
        t = time.perf_counter()
        ids = msgpack.ExtType(codec.EXT_TENSOR_INLINE, msgpack.packb(["int64", [1, 4], struct.pack("<4q", 5, 6, 7, 8)]))
        self.request("reset_kv", {"sid": self.sid, "model_id": self.model_id}, timeout_s)
        self.rid += 1
        self.sock.send_multipart([REQ, self.packer.pack({"rid": self.rid, "op": "generate", "args": {
            "sid": self.sid, "model_id": self.model_id, "input_ids": ids, "kwargs": {"$d": {"max_new_tokens": 1}},
            "use_session_kv": True}}, {})])
        rid, deadline = self.rid, time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"a 1-token session generate got no reply within {timeout_s} s")
            if not self.sock.poll(int(min(left, 0.5) * 1000) + 1):
                if self.tick is not None:
                    self.tick()
                continue
            msg = codec.decode(self.sock.recv_multipart())
            if msg.rid == rid:
                if msg.kind == MsgType.ERROR:
                    raise RuntimeError(f"{msg.header.get('code')}: {msg.header.get('message')}")
                return time.perf_counter() - t

    def close(self):
        try:
            self.request("close_session", {"sid": self.sid}, 10)
        except Exception:
            pass
        self.sock.close(linger=0)


class FuzzSocket:
    """A DEALER that sends batches of inputs followed by a marker ping, and its live ids."""

    def __init__(self, ctx: zmq.Context, address: str, hello: bool, spec: dict, fz: "Fuzzer"):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.connect(address)
        self.hello, self.spec, self.fz = hello, spec, fz
        self.client_id = secrets.token_hex(16)
        self.ctx = {"client_id": self.client_id, "sid": secrets.token_hex(12), "sid2": secrets.token_hex(12),
                    "model_id": "0" * 64,
                    "handle": secrets.token_hex(8), "run": secrets.token_hex(6)}
        self.batch: list = []
        self.prev: list = []
        self.marker = None
        self.t_sent = 0.0
        self.batches = 0
        self.sids: list[str] = []
        if hello:
            self.setup()

    def sync(self, frames: list, timeout_s: float = 30.0):
        """Send one message and wait for its reply (by rid), tallying whatever else arrives."""
        rid = self.fz.next_marker()
        self.sock.send_multipart(frames(rid))
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000) + 1):
                raise TimeoutError("no reply to a set-up request")
            msg = self.fz.take(self.sock.recv_multipart(copy=True), self)
            if msg is not None and msg.rid == rid and msg.kind != MsgType.STREAM:
                return msg

    def request(self, op: str, args: dict):
        msg = self.sync(lambda rid: [REQ, self.fz.gen.packer.pack({"rid": rid, "op": op, "args": args}, self.ctx)])
        if msg.kind != MsgType.REPLY:
            raise RuntimeError(f"set-up {op} failed: {msg.header.get('code')}: {msg.header.get('message')}")
        return msg.header["result"]

    def setup(self):
        """(Re)HELLO with its own client id, close its old sessions, open one with the model, a handle and a
        paused run: the live ids semi-valid inputs use."""
        self.sync(lambda rid: codec.encode(MsgType.HELLO, {"rid": rid, "version": PROTOCOL_VERSION, "secret": None,
                                                          "client_id": self.client_id}))
        for sid in self.sids:
            try:
                self.request("close_session", {"sid": sid})
            except RuntimeError:
                pass  # a fuzz input may have closed it already
        self.sids = []
        sid = self.request("open_session", {"name": "fuzz"})["sid"]
        sid2 = self.request("open_session", {"name": "fuzz-spare"})["sid"]  # what close_session inputs close
        self.sids = [sid, sid2]
        self.ctx["sid"], self.ctx["sid2"] = sid, sid2
        self.ctx["model_id"] = self.request("init_model", dict(self.spec, sid=P("sid")))["model_id"]
        ids = ids_tensor(random.Random(0), 1, 6)
        out = self.request("forward", {"sid": P("sid"), "model_id": P("model_id"), "args": [ids], "kwargs": {"$d": {}}})
        self.ctx["handle"] = out["output"]["$d"]["logits"]["$t"][0]
        run = self.request("start", {"sid": P("sid"), "model_id": P("model_id"), "method": "forward", "args": [ids],
                                     "kwargs": {"$d": {}}, "breakpoints": [{"path": "transformer.h.1", "layer": None,
                                                                            "where": "after", "step": None}]})
        self.ctx["run"] = run["run"]

    def send_batch(self, msgs: list):
        self.prev, self.batch = self.batch, []
        for m in msgs:
            frames = m.build(self.fz.gen.packer, self.ctx)
            self.sock.send_multipart(frames, copy=True)
            self.batch.append((m, frames))
            if isinstance(m.header, dict) and m.kind in (REQ, bytes([MsgType.HELLO])):
                if m.kind != REQ:
                    self.fz.recent["hello"].append((m, frames))
                elif m.header.get("op") in ("generate", "start"):
                    self.fz.recent["generate"].append((m, frames))
            self.fz.sent_bytes += sum(len(f) for f in frames)
        self.marker = self.fz.next_marker()
        self.sock.send_multipart([REQ, msgpack.packb({"rid": self.marker, "op": "ping", "args": {}})])
        self.t_sent = time.monotonic()
        self.batches += 1

    def in_flight_bytes(self) -> int:
        return sum(sum(len(f) for f in frames) for _, frames in self.batch) if self.marker is not None else 0

    def close(self):
        """Close its sessions and say BYE (the server reclaims whatever fuzz inputs opened for this client)."""
        if self.hello:
            try:
                self.sync(lambda rid: codec.encode(MsgType.HELLO, {"rid": rid, "version": PROTOCOL_VERSION,
                                                                  "secret": None, "client_id": self.client_id}), 10)
                for sid in self.sids:
                    try:
                        self.request("close_session", {"sid": sid})
                    except RuntimeError:
                        pass
                self.sock.send_multipart(codec.encode(MsgType.BYE, {}))
            except Exception:
                pass
        self.sock.close(linger=500)


class Fuzzer:
    def __init__(self, args, address: str, server, ops: dict):
        self.args, self.address, self.server = args, address, server
        self.gen = Generator(args.seed, ops, self.categories(args))
        self.spec = model_spec(0)
        self.zctx = zmq.Context()
        self.marker_seq = 2**62
        self.replies: dict[str, int] = {}
        self.codes: dict[str, int] = {}
        self.by_category: dict[str, int] = {}
        self.anomalies: list[str] = []
        self.events: list[dict] = []
        self.sent = 0
        self.sent_bytes = 0
        self.pings: list[float] = []
        self.gens: list[float] = []
        self.rss_peak = 0
        self.vm_peak = 0
        self.rss_violations = 0
        self.saved = 0
        self.stalls: list[float] = []
        self.fuzz_sessions = 0
        self.setup_failures = 0
        # Causes that act long after they were sent (a generate stuck in the scheduler, a second HELLO whose
        # stale client id is reaped 10 s later): the last few hundred of each kind go into the saved file.
        self.recent = {"generate": collections.deque(maxlen=400), "hello": collections.deque(maxlen=200)}

    @staticmethod
    def categories(args) -> dict:
        if not args.categories:
            return dict(CATEGORIES)
        chosen = set(args.categories.split(","))
        unknown = chosen - set(CATEGORIES)
        if unknown:
            raise SystemExit(f"unknown categories {sorted(unknown)}; known: {sorted(CATEGORIES)}")
        return {c: w for c, w in CATEGORIES.items() if c in chosen}

    def next_marker(self) -> int:
        self.marker_seq += 1
        return self.marker_seq

    def take(self, frames: list, fs: "FuzzSocket | None" = None):
        """Tally one reply; return it decoded (None if it did not decode: a server bug). Sessions that fuzz
        inputs opened are remembered on their socket, which closes them when it rotates: otherwise a client
        would pile up tens of thousands of sessions over a long run (see docs/RELIABILITY.md)."""
        try:
            msg = codec.decode(frames)
        except Exception as e:
            self.anomaly(f"undecodable reply from the server: {type(e).__name__}: {e}")
            return None
        kind = msg.kind.name
        self.replies[kind] = self.replies.get(kind, 0) + 1
        if msg.kind == MsgType.ERROR:
            code = msg.header.get("code")
            self.codes[str(code)] = self.codes.get(str(code), 0) + 1
            if code not in ERRORS or not isinstance(msg.header.get("message"), str) or not msg.header.get("message"):
                self.anomaly(f"error reply without a known code and a message: {str(msg.header)[:300]}")
        elif msg.kind not in (MsgType.REPLY, MsgType.STREAM, MsgType.HELLO, MsgType.HEARTBEAT, MsgType.BYE):
            self.anomaly(f"server sent a {kind}")
        if fs is not None and msg.kind == MsgType.REPLY:
            result = msg.header.get("result")
            if isinstance(result, dict) and isinstance(result.get("sid"), str) and len(result) == 1:
                fs.sids.append(result["sid"])
                self.fuzz_sessions += 1
        return msg

    def anomaly(self, what: str) -> None:
        if len(self.anomalies) < 50:
            self.anomalies.append(what)

    # -- the server's health ------------------------------------------------------------------------
    def start_server(self):
        from common import start_server

        if self.server is not None:
            self.server.stop()
        self.server = start_server(self.args.device, *self.args.server_args)
        self.address = self.server.address

    def connect(self):
        self.health = Health(self.zctx, self.address, self.spec, self.gen.packer)
        self.health.warm()
        self.health.tick = self.heartbeat_all
        self.pid = self.health.info.get("pid") or self.server.proc.pid
        self.boot = self.health.info.get("boot")
        self.base_res = proc_resources(self.pid)  # before the fuzz sockets' sessions and paused runs
        self.base_detail = proc_detail(self.pid)
        n = self.args.sockets
        self.socks = [FuzzSocket(self.zctx, self.address, i < n - 1 or n == 1, self.spec, self) for i in range(n)]

    def heartbeat_all(self) -> None:
        """While the loop waits on a health check: a HEARTBEAT from every fuzz socket, as a real client's
        keeper sends them (the server reclaims a client silent for client_timeout_s, 10 s)."""
        for s in getattr(self, "socks", []):
            try:
                s.sock.send_multipart(codec.encode(MsgType.HEARTBEAT, {}))
            except zmq.ZMQError:
                pass

    def disconnect(self):
        for s in getattr(self, "socks", []):
            try:
                s.close()
            except Exception:
                pass
        self.socks = []
        try:
            self.health.close()
        except Exception:
            pass

    def alive(self) -> bool:
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except OSError:
            return False

    def save(self, kind: str, note: str) -> str:
        """Write the inputs in flight (each socket's batch and the one before) for --replay, plus the recent
        generate/start requests and HELLOs (gzipped JSON)."""
        self.saved += 1
        d = Path(self.args.inputs_dir)
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{kind}_{self.args.seed}_{self.sent}.json.gz"

        def rows(pairs):
            return [{"index": m.index, "category": m.category,
                     "frames_b64": [base64.b64encode(bytes(f)).decode() for f in frames]} for m, frames in pairs]

        doc = {"kind": kind, "note": note, "seed": self.args.seed, "sent": self.sent,
               "inputs": rows([p for s in self.socks for p in s.prev + s.batch]),
               "recent_generate_requests": rows(self.recent["generate"]), "recent_hellos": rows(self.recent["hello"])}
        with gzip.open(path, "wt") as f:
            json.dump(doc, f)
        return str(path)

    def check(self, why: str = "periodic") -> bool:
        """Ping within 1 s, the pid alive, RSS under the bound. False if the server had to be restarted."""
        a = self.args
        if not self.alive():
            return self.crashed(f"server pid {self.pid} is gone ({why})")
        try:
            self.pings.append(self.health.ping(1.0))
        except TimeoutError:
            t0 = time.monotonic()
            try:
                self.health.ping(a.hang_s)
                stall = 1.0 + time.monotonic() - t0
                self.stalls.append(round(stall, 2))
                if len(self.stalls) <= 5:
                    path = self.save("stall", f"ping took {stall:.1f} s")
                    self.events.append({"kind": "stall", "at_input": self.sent, "seconds": round(stall, 2), "inputs": path})
                self.pings.append(stall)
            except TimeoutError:
                if not self.alive():
                    return self.crashed("server died while a ping waited")
                path = self.save("hang", f"no ping reply within {a.hang_s + 1} s")
                self.events.append({"kind": "hang", "at_input": self.sent, "inputs": path,
                                    "log_tail": self.server.log_tail(30) if self.server else ""})
                self.restart()
                return False
        try:
            r = proc_resources(self.pid)
        except OSError:
            return self.crashed("server pid vanished while reading /proc")
        self.rss_peak = max(self.rss_peak, r["VmRSS"])
        self.vm_peak = max(self.vm_peak, r["VmSize"])
        bound = int(self.rss_base + a.rss_slack_mb * 2**20 + 4 * sum(s.in_flight_bytes() for s in self.socks))
        if r["VmRSS"] > bound:
            self.rss_violations += 1
            if self.rss_violations <= 5:
                path = self.save("rss", f"RSS {r['VmRSS'] >> 20} MiB > bound {bound >> 20} MiB")
                self.events.append({"kind": "rss_over_bound", "at_input": self.sent, "rss_mb": r["VmRSS"] >> 20,
                                    "bound_mb": bound >> 20, "inputs": path})
        self.checks += 1
        if self.checks % a.generate_every == 0:
            try:
                self.gens.append(self.health.generate(5.0))
            except (TimeoutError, RuntimeError) as e:
                self.gen_failures += 1
                if self.gen_failures <= 5:
                    path = self.save("generate_stall", str(e))
                    self.events.append({"kind": "generate_stall", "at_input": self.sent, "error": str(e)[:300],
                                        "inputs": path, "scheduler": self._sched()})
                self.health.sock.close(linger=0)  # its generate may still be queued: start a fresh client
                self.health = Health(self.zctx, self.address, self.spec, self.gen.packer)
                self.health.tick = self.heartbeat_all
        return True

    def _sched(self) -> dict:
        try:
            st = self.health.request("stats", {}, 5)
            return {"scheduler": st.get("scheduler"),
                    "jobs": [v.get("job") for v in st["sessions"].values() if v.get("job")][:5]}
        except Exception as e:
            return {"error": str(e)}

    def crashed(self, why: str) -> bool:
        path = self.save("crash", why)
        self.events.append({"kind": "crash", "at_input": self.sent, "why": why, "inputs": path,
                            "log_tail": self.server.log_tail(40) if self.server else ""})
        self.restart()
        return False

    def restart(self):
        if self.args.server:
            raise SystemExit("the server under test crashed or hung; not restarting a server this script did not start")
        self.restarts += 1
        if self.restarts > self.args.max_restarts:
            raise RuntimeError(f"more than {self.args.max_restarts} crashes or hangs; stopping")
        self.disconnect()
        self.logs.append(self.server.log_text())
        self.start_server()
        self.connect()
        self.rss_base = proc_resources(self.pid)["VmRSS"]

    # -- the loop -----------------------------------------------------------------------------------
    def run(self) -> dict:
        a = self.args
        self.checks = self.gen_failures = self.restarts = 0
        self.logs: list[str] = []
        self.connect()
        start_res = self.base_res
        self.rss_base = proc_resources(self.pid)["VmRSS"]
        poller = zmq.Poller()
        t0 = time.monotonic()
        next_index, next_check = 0, a.check_every
        deadline = t0 + a.time_limit if a.time_limit else None
        progress = t0
        poller_socks = None
        while True:
            if poller_socks is not self.socks:  # (re)built after a restart
                poller = zmq.Poller()
                for s in self.socks:
                    poller.register(s.sock, zmq.POLLIN)
                poller_socks = self.socks
            out_of_time = deadline is not None and time.monotonic() > deadline
            for s in self.socks:
                if s.marker is None and next_index < a.n and not out_of_time:
                    if s.hello and s.batches and s.batches % a.rotate_every == 0:
                        try:
                            s.setup()
                        except (RuntimeError, TimeoutError) as e:
                            self.setup_failures += 1
                            if self.setup_failures <= 5:
                                path = self.save("setup_failed", str(e))
                                self.events.append({"kind": "setup_failed", "at_input": next_index,
                                                    "error": str(e)[:300], "inputs": path})
                            if not self.check("set-up failed"):
                                continue
                    k = min(a.batch, a.n - next_index)
                    msgs = [self.gen.make(i) for i in range(next_index, next_index + k)]
                    for m in msgs:
                        self.by_category[m.category] = self.by_category.get(m.category, 0) + 1
                    next_index += k
                    s.send_batch(msgs)
                    self.sent = next_index
            if all(s.marker is None for s in self.socks) and (next_index >= a.n or out_of_time):
                break
            for sock, _ in poller.poll(100):
                fs = next(s for s in self.socks if s.sock is sock)
                while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    msg = self.take(sock.recv_multipart(copy=True), fs)
                    if msg is not None and msg.rid == fs.marker and fs.marker is not None and msg.kind != MsgType.STREAM:
                        fs.marker = None
            now = time.monotonic()
            late = [s for s in self.socks if s.marker is not None and now - s.t_sent > a.marker_timeout]
            if next_index >= next_check or late:
                next_check = next_index + a.check_every
                if not self.check("marker late" if late else "periodic"):
                    continue
                for s in late:  # the server is alive and answers pings, yet this socket's marker is lost
                    if now - s.t_sent > a.hang_s:
                        path = self.save("lost_marker", f"marker ping {s.marker} unanswered for {now - s.t_sent:.0f} s")
                        self.events.append({"kind": "lost_marker", "at_input": self.sent, "inputs": path})
                        s.marker = None
            if now - progress > 30:
                progress = now
                rate = next_index / (now - t0)
                print(f"  {next_index} inputs, {rate:.0f}/s, replies {sum(self.replies.values())}, "
                      f"RSS {proc_resources(self.pid)['rss_mb'] if self.alive() else '?'} MB, events {len(self.events)}",
                      flush=True)
        elapsed = time.monotonic() - t0
        self.check("final")
        return {"inputs": next_index, "elapsed_s": round(elapsed, 1), "start_resources": start_res}

    def finish(self, run: dict) -> dict:
        """Close every fuzz session, then: threads/fds back to the start, alive, a forward bitwise-equal."""
        a = self.args
        self.disconnect()
        self.zctx.term()
        res = {}
        base = run["start_resources"]
        deadline = time.monotonic() + 15
        while True:
            end = proc_resources(self.pid) if self.alive() else None
            if (end is None or (end["threads"] <= base["threads"] + a.thread_slack and end["fds"] <= base["fds"] + a.fd_slack)
                    or time.monotonic() > deadline):
                break
            time.sleep(0.2)
        res["end_resources"] = end
        res["start_detail"] = getattr(self, "base_detail", None)
        res["end_detail"] = proc_detail(self.pid) if end is not None else None
        res["threads_back"] = end is not None and end["threads"] <= base["threads"] + a.thread_slack
        res["fds_back"] = end is not None and end["fds"] <= base["fds"] + a.fd_slack
        res.update(sessions_left(self.address, 20.0))
        res.update(final_forward(self.address, self.pid))
        res["alive"] = self.alive() and (self.server is None or self.server.alive())
        log = "".join(self.logs) + (self.server.log_text() if self.server else "")
        res["log_dropped_messages"] = log.count("dropped a message")
        res["log_engine_failures"] = log.count("engine loop step failed")
        res["log_tracebacks"] = log.count("Traceback (most recent call last)")
        res["log_excerpts"] = _excerpts(log, ["dropped a message", "engine loop step failed"], 3)
        return res


def proc_detail(pid: int) -> dict:
    """Thread names and open-fd kinds of a process (what a thread or fd difference consists of)."""
    threads: dict[str, int] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        except OSError:
            continue
        threads[name] = threads.get(name, 0) + 1
    fds: dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            kind = re.sub(r"[:\[].*", "", os.readlink(f"/proc/{pid}/fd/{fd}")) or "?"
        except OSError:
            continue
        fds[kind] = fds.get(kind, 0) + 1
    return {"threads": threads, "fds": fds}


def _excerpts(log: str, needles: list[str], n: int) -> list[str]:
    out = []
    for needle in needles:
        pos = 0
        for _ in range(n):
            i = log.find(needle, pos)
            if i < 0:
                break
            out.append(log[max(0, i - 200):i + 1500])
            pos = i + 1
    return out


def sessions_left(address: str, timeout_s: float) -> dict:
    """After every fuzz socket closed (BYE), sessions must go: those of client ids a fuzz HELLO bound a
    socket to are reclaimed when that id has been silent for client_timeout_s (10 s)."""
    from djinn.frontend.connection import Connection

    t0 = time.monotonic()
    try:
        conn = Connection(address, None)
    except Exception as e:
        return {"sessions_left_error": f"{type(e).__name__}: {e}"}
    try:
        while True:
            n = sum(1 for v in conn.stats()["sessions"].values() if not v.get("mine"))
            if n == 0 or time.monotonic() - t0 > timeout_s:
                return {"sessions_left": n, "sessions_reclaimed_after_s": round(time.monotonic() - t0, 1)}
            time.sleep(0.5)
    finally:
        conn.close()


def final_forward(address: str, pid: int) -> dict:
    """A normal client: forward and a session generate on the tiny model, bitwise-equal to local."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    from djinn.config import ClientConfig
    from djinn.frontend.connection import Connection
    from djinn.frontend.remote import RemoteModel

    out = {}
    try:
        conn = Connection(address, None, ClientConfig(call_timeout_s=60, retries=0))
        try:
            s = conn.session("final")
            cfg = GPT2Config(**TINY_GPT2)
            rm = RemoteModel.from_config(s, cfg, seed=0)
            torch.manual_seed(0)
            local = AutoModelForCausalLM.from_config(cfg).eval()
            ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                ref = local(ids).logits
                ref_gen = local.generate(ids[:1], max_new_tokens=4, do_sample=False)
            out["final_forward_bitwise_equal"] = bool(torch.equal(rm(ids).logits.cpu(), ref))
            out["final_generate_equal"] = bool(torch.equal(s.generate(rm, ids[:1], max_new_tokens=4), ref_gen))
            st = conn.stats()
            out["final_stats"] = {"segments": st["segments"], "sessions": len(st["sessions"]),
                                  "models": len(st["models"]), "scheduler_queued": st["scheduler"].get("queued")}
            s.close()
        finally:
            conn.close()
    except Exception as e:
        out["final_error"] = f"{type(e).__name__}: {e}"
        out.setdefault("final_forward_bitwise_equal", False)
    return out


# -- replay ------------------------------------------------------------------------------------------
def replay(args, ops) -> int:
    """Send saved (or regenerated) inputs one at a time to a fresh server, each followed by a ping."""
    from common import start_server

    server = None if args.server else start_server(args.device, *args.server_args)
    address = args.server or server.address
    fz = Fuzzer(args, address, server, ops)
    fz.connect()
    sock = fz.socks[0]
    if args.replay:
        opener = gzip.open if args.replay.endswith(".gz") else open
        with opener(args.replay, "rt") as f:
            data = json.load(f)
        if args.replay_section != "inputs":
            data["inputs"] = data[args.replay_section]
        items = [(it["index"], it["category"], [base64.b64decode(f) for f in it["frames_b64"]]) for it in data["inputs"]]
    else:
        items = []
        for i in args.replay_index:
            m = fz.gen.make(i)
            items.append((i, m.category, m.build(fz.gen.packer, sock.ctx)))
    rows = []
    for index, cat, frames in items:
        t = time.perf_counter()
        sock.sock.send_multipart(frames)
        try:  # the marker ping on the same socket is read after the input, so it times the input itself
            sock.sync(lambda rid: [REQ, msgpack.packb({"rid": rid, "op": "ping", "args": {}})], args.hang_s)
            fz.health.ping(args.hang_s)
            ok = True
        except TimeoutError:
            ok = False
        rows.append({"index": index, "category": cat, "ping_after_s": round(time.perf_counter() - t, 3),
                     "alive": fz.alive(), "answered": ok, "rss_mb": proc_resources(fz.pid)["rss_mb"] if fz.alive() else None})
        print(rows[-1], flush=True)
        if not rows[-1]["alive"] or not ok:
            break
    fz.disconnect()
    if server:
        server.stop()
    print(json.dumps({"replies": fz.replies, "codes": fz.codes, "anomalies": fz.anomalies}, indent=1))
    return 0 if all(r["alive"] and r["answered"] for r in rows) else 1


# -- main --------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, help="inputs to send (default 1,000,000; short 2,000)")
    p.add_argument("--short", action="store_true", help="CI: 2,000 inputs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--sockets", type=int, default=8, help="fuzzing DEALER sockets (the last one never says HELLO)")
    p.add_argument("--batch", type=int, default=32, help="inputs sent back to back per socket before its marker ping")
    p.add_argument("--check-every", type=int, default=500, dest="check_every",
                   help="inputs between health checks (ping within 1 s, RSS bound)")
    p.add_argument("--generate-every", type=int, default=4, dest="generate_every",
                   help="health checks between 1-token session generates (must answer within 5 s)")
    p.add_argument("--rotate-every", type=int, default=25, dest="rotate_every",
                   help="batches after which a socket re-HELLOs and replaces its session, model, handle and run")
    p.add_argument("--marker-timeout", type=float, default=5.0, dest="marker_timeout")
    p.add_argument("--hang-s", type=float, default=30.0, dest="hang_s", help="a ping unanswered this long is a hang")
    p.add_argument("--rss-slack-mb", type=float, default=256.0, dest="rss_slack_mb",
                   help="RSS bound: start + this + 4 x the input bytes in flight")
    p.add_argument("--thread-slack", type=int, default=max(2, min(8, os.cpu_count() or 2)), dest="thread_slack",
                   help="threads the server may end with beyond its start: its leaf-hashing pool grows on demand "
                        "to max(2, min(8, cores)) workers (a bounded, process-wide pool, not per request)")
    p.add_argument("--fd-slack", type=int, default=0, dest="fd_slack")
    p.add_argument("--time-limit", type=float, dest="time_limit", help="stop sending after this many seconds")
    p.add_argument("--max-restarts", type=int, default=5, dest="max_restarts")
    p.add_argument("--categories", help="comma list of categories to fuzz (default all)")
    p.add_argument("--server", help="address of a running server (default: start one)")
    p.add_argument("--server-arg", action="append", default=[], dest="server_args")
    p.add_argument("--inputs-dir", dest="inputs_dir",
                   help="where inputs in flight at a crash, hang, stall or RSS excursion are saved (default "
                        "results/fuzz_inputs/<name of the JSON>/, emptied at the start)")
    p.add_argument("--replay", help="a saved inputs file: send each input alone, then a ping (its time is the input's)")
    p.add_argument("--replay-section", default="inputs", dest="replay_section",
                   choices=["inputs", "recent_generate_requests", "recent_hellos"],
                   help="which list of a saved file to replay")
    p.add_argument("--replay-index", type=int, nargs="+", dest="replay_index", help="regenerate these inputs and replay them")
    p.add_argument("--out", help="JSON path (default results/fuzz_<device>[_short].json)")
    args = p.parse_args(argv)
    args.n = args.n if args.n is not None else (2000 if args.short else 1_000_000)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from common import environment

    ops = server_ops()
    if args.replay or args.replay_index:
        return replay(args, ops)
    device = torch.device(args.device)
    name = f"fuzz_{device.type}{'_short' if args.short else ''}.json"
    out = Path(args.out) if args.out else HERE / "results" / name
    if not args.inputs_dir:
        args.inputs_dir = str(HERE / "results" / "fuzz_inputs" / out.stem)
        for old in Path(args.inputs_dir).glob("*.json"):
            old.unlink()
    results: dict = {"environment": environment(device), "args": vars(args),
                     "ops": ops, "category_weights": Fuzzer.categories(args)}
    fz = Fuzzer(args, None, None, ops)
    ok = False
    try:
        if args.server:
            fz.address = args.server
        else:
            fz.start_server()
        run = fz.run()
        fin = fz.finish(run)
        crashes = [e for e in fz.events if e["kind"] in ("crash", "hang")]
        results.update({
            "inputs": run["inputs"], "elapsed_s": run["elapsed_s"],
            "inputs_per_s": round(run["inputs"] / max(run["elapsed_s"], 1e-9), 1),
            "bytes_sent": fz.sent_bytes, "by_category": fz.by_category,
            "sessions_opened_by_fuzz_inputs": fz.fuzz_sessions,
            "replies": fz.replies, "error_codes": dict(sorted(fz.codes.items(), key=lambda kv: -kv[1])),
            "health_checks": fz.checks, "ping_ms_p50": _ms(_pct(fz.pings, 50)), "ping_ms_p99": _ms(_pct(fz.pings, 99)),
            "ping_ms_max": _ms(max(fz.pings) if fz.pings else None),
            "generate_checks": len(fz.gens) + fz.gen_failures, "generate_failures": fz.gen_failures,
            "generate_ms_max": _ms(max(fz.gens) if fz.gens else None),
            "rss_start_mb": run["start_resources"]["rss_mb"], "rss_peak_mb": round(fz.rss_peak / 2**20, 1),
            "vmsize_peak_gb": round(fz.vm_peak / 2**30, 2), "rss_over_bound_checks": fz.rss_violations,
            "events": fz.events, "crashes_or_hangs": len(crashes), "restarts": fz.restarts,
            "anomalies": fz.anomalies, "start_resources": run["start_resources"], **fin,
        })
        ok = (not crashes and fin.get("alive") and fin.get("final_forward_bitwise_equal")
              and fin.get("final_generate_equal") and not fz.anomalies and fin["log_dropped_messages"] == 0
              and fin["log_engine_failures"] == 0 and fin["threads_back"] and fin["fds_back"]
              and fin.get("sessions_left") == 0)
        results["no_crash_or_hang"] = not crashes and bool(fin.get("alive"))
        results["findings"] = {
            "generate_stalls": fz.gen_failures, "stalls": len(fz.stalls), "stall_seconds": fz.stalls[:50],
            "socket_setup_failures": fz.setup_failures, "engine_loop_failures_in_log": fin["log_engine_failures"],
            "rss_over_bound_checks": fz.rss_violations, "lost_markers": sum(e["kind"] == "lost_marker" for e in fz.events),
            "threads_back": fin["threads_back"], "fds_back": fin["fds_back"],
            "sessions_left": fin.get("sessions_left"),
        }
        print(f"fuzz: {results['inputs']} inputs in {results['elapsed_s']} s ({results['inputs_per_s']}/s); replies "
              f"{fz.replies}; errors by code {results['error_codes']}")
        print(f"  ping p50 {results['ping_ms_p50']} ms p99 {results['ping_ms_p99']} ms max {results['ping_ms_max']} ms; "
              f"RSS {results['rss_start_mb']} -> peak {results['rss_peak_mb']} MB; VmSize peak {results['vmsize_peak_gb']} GB")
        print(f"  crashes/hangs {len(crashes)}, events {[(e['kind'], e['at_input']) for e in fz.events][:10]}, "
              f"anomalies {len(fz.anomalies)}, dropped messages in log {fin['log_dropped_messages']}, "
              f"engine failures {fin['log_engine_failures']}; alive {fin['alive']}, final forward equal "
              f"{fin.get('final_forward_bitwise_equal')}, generate equal {fin.get('final_generate_equal')}, "
              f"threads {run['start_resources']['threads']} -> {fin['end_resources'] and fin['end_resources']['threads']}, "
              f"fds {run['start_resources']['fds']} -> {fin['end_resources'] and fin['end_resources']['fds']}")
        if fin.get("final_error"):
            print("  final:", fin["final_error"])
    except BaseException:
        results["exception"] = traceback.format_exc()
        print(results["exception"], file=sys.stderr)
    finally:
        if fz.server is not None:
            results["server_log_tail"] = fz.server.log_tail(15)
            fz.server.stop()
    results["passed"] = bool(ok)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"{'PASSED' if ok else 'FAILED'}; wrote {out}")
    return 0 if ok else 1


def _pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


def _ms(x):
    return None if x is None else round(x * 1e3, 2)


if __name__ == "__main__":
    sys.exit(main())
