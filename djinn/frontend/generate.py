"""Generate requests and the TokenStream: the server's decode loop, from `s.generate(rm, ids)` (the
session's KV cache continues) and `rm.generate(ids)` (stateless: each call starts fresh).

Both build the same request here from the session's public surface, so neither reaches into the other.
"""
from __future__ import annotations

import queue
from typing import TYPE_CHECKING, Iterator

import torch

from ..protocol.errors import DjinnError, InvalidRequest, ModelNotSupported
from ..protocol.tensors import is_remote
from . import wire

if TYPE_CHECKING:
    from .remote import RemoteModel
    from .session import Session


def request(session: "Session", rm: "RemoteModel", input_ids: torch.Tensor, *, stream: bool, seed: int | None,
            use_session_kv: bool, deterministic: bool = False, steer: dict | None = None,
            record: "list[int] | None" = None, **kwargs):
    """The sequences, or a TokenStream with stream=True. The caller has attached `rm` to `session`.

    deterministic=True: the eager path, bitwise-equal to a local generate, never the batched fast path.
    steer={layer: vector}: `vector` (a tensor of the hidden size, local or remote) is added to decoder
    layer `layer`'s output at every position this call feeds, as a local forward hook returning
    `output + vector` would; steered calls stay on the batched fast path (DESIGN.md, Note [Steering]).
    record=[layer, ...]: returns `(sequences, {layer: RemoteTensor [positions, hidden]})`, each layer's
    output at every position this call fed (its new tokens and every generated token but the last),
    read inside the batched step (Note [Recorded activations]); input batch 1, stream=False.
    """
    if getattr(rm, "path", "module") != "module":
        raise ModelNotSupported(graph_path_why(rm.arch))
    if not isinstance(input_ids, torch.Tensor) or is_remote(input_ids):  # Note [Remote tensors are not data]
        raise InvalidRequest("input_ids must be a local torch.Tensor"
                             + (": .cpu() it first" if is_remote(input_ids) else ""))
    args = {"model_id": rm.model_id, "input_ids": input_ids, "kwargs": wire.pack(session, kwargs),
            "seed": seed, "use_session_kv": use_session_kv, "stream": stream}
    if deterministic:
        args["deterministic"] = True
    if steer:
        if not isinstance(steer, dict):
            raise InvalidRequest(f"steer must be a dict {{layer number: vector}}, got {type(steer).__name__}")
        args["steer"] = wire.pack(session, [[k, v] for k, v in steer.items()])
    if record is not None:
        if isinstance(record, int) or not isinstance(record, (list, tuple)) or stream:
            raise InvalidRequest("record must be a list of layer numbers, e.g. record=[1, -1], with stream=False")
        args["record"] = list(record)
    if not stream:  # interrupted (Ctrl-C), the server stops it and the session keeps none of it
        reply = session.call("generate", args, on_interrupt=lambda rid: cancel(session, rid, 0))
        if record is None:
            return reply["sequences"]
        return reply["sequences"], dict(zip(record, wire.unpack(session, reply["records"])))
    if input_ids.shape[0] != 1:
        raise InvalidRequest("stream=True supports batch size 1 (like transformers' TextStreamer)")
    q: queue.Queue = queue.Queue()
    return TokenStream(q, session.submit("generate", args, stream=q), session)


def graph_path_why(arch: str) -> str:
    """Why a graph-path model cannot generate, and what to do instead (raised before anything is sent)."""
    return (f"generate needs a model the server builds itself (the module path); this {arch} runs on the graph "
            "path, which runs forward only (its code stays on this client). A Hugging Face model whose class is in "
            "djinn.supported_architectures() generates on the server: djinn.remote(model) without path='graph'. "
            "Otherwise decode with forward calls: out = rm(ids, use_cache=True), then rm(next_ids, "
            "past_key_values=out.past_key_values, use_cache=True) keeps the cache on the server")


def cancel(session: "Session", rid: int, keep: int):
    """Stop generate `rid` on the server, the session keeping its first `keep` new tokens (those the
    caller consumed). Not waited for: the server serves it before this client's next request."""
    if session.closed or session.lost or session.conn.transport.dead is not None:
        return None
    try:
        return session.conn.transport.submit("cancel_generate", {"sid": session.sid, "rid": rid, "keep": keep})
    except DjinnError:
        return None


class TokenStream:
    """Iterator of token ids as the server produces them; `.sequences` holds the result at the end.

    Leaving the loop early (`break`, an exception, Ctrl-C) or calling `cancel()` stops the generate on
    the server; the session then holds exactly the tokens this iterator yielded (`consumed`)."""

    def __init__(self, q: queue.Queue, fut, session: "Session | None" = None):
        self._q, self._fut, self._session = q, fut, session
        self.sequences: torch.Tensor | None = None
        self.consumed = 0
        self._ended = False
        self._cancel_reply = None

    def __iter__(self) -> Iterator[int]:
        try:
            while True:
                item = self._fut.transport.next_stream_item(self._q)
                if item is None:
                    self._ended = True
                    self.sequences = self._fut.result()["sequences"]  # raises the typed error, if any
                    return
                for tok in item["tokens"]:
                    self.consumed += 1
                    yield tok
        finally:
            if not self._ended:
                self.cancel()

    def cancel(self) -> None:
        """Stop the generate now, keeping the tokens consumed so far in the session."""
        if self._ended:
            return
        self._ended = True
        if self._session is not None:
            self._cancel_reply = cancel(self._session, self._fut.rid, self.consumed)

    close = cancel

    def __repr__(self) -> str:
        done = "done" if self.sequences is not None else "cancelled" if self._ended else "streaming"
        return f"TokenStream({done})"
