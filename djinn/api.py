"""The public client API (re-exported by `djinn`, which imports this module on first use; see
djinn/__init__.py)."""
from __future__ import annotations

import atexit
import threading

from .config import ClientConfig, env_secret, env_server_address
from .frontend.connection import Connection
from .frontend.edits import RemoteView
from .frontend.graph_model import GraphModel
from .frontend.remote import RemoteModel, is_config
from .frontend.run import Breakpoint, Run, Stop
from .frontend.session import Session, TokenStream
from .frontend.tensor import RemoteTensor
from .protocol.errors import (
    AuthError, CaptureError, DjinnError, HandleNotFound, InvalidRequest, ModelNotSupported, OutOfMemory, ProtocolError,
    QuotaExceeded, RemoteExecutionError, RequestTimeout, ServerBusy, ServerUnavailable, SessionLost, SessionNotFound,
    ShuttingDown, WeightWriteRefused,
)


# The public names are listed once, in djinn/__init__.py (__all__).

_conn: Connection | None = None
_lock = threading.Lock()


def connect(address: str | None = None, *, secret: str | None = None, device: str | None = None,
            config: ClientConfig | None = None, server_public_key: str | None = None,
            client_secret_key: str | None = None) -> Connection:
    """Connect to a server (address, else $DJINN_SERVER, else an embedded local server).

    `device` only applies to an embedded server ("cpu", "cuda:0"; default GPU 0 if present).
    `server_public_key` (the server's .key file or z85 key) and `client_secret_key` (this client's
    .key_secret file) make the connection CurveZMQ-encrypted and authenticated (docs/SECURITY.md).
    Replaces any previous connection of this process.
    """
    global _conn
    with _lock:
        if _conn is not None:
            _conn.close()
            _conn = None
        _conn = Connection(address or env_server_address(), secret or env_secret(), config, device,
                           server_public_key=server_public_key, client_secret_key=client_secret_key)
        return _conn


def disconnect() -> None:
    global _conn
    with _lock:
        if _conn is not None:
            _conn.close()
            _conn = None


def connection() -> Connection:
    """The current connection, connecting with defaults on first use."""
    if _conn is None or _conn.transport.dead is not None:
        connect()
    return _conn


def remote(model, *, session: Session | None = None, weight_budget_gb: float | None = None,
           seed: int | None = None, dtype=None, path: str | None = None) -> RemoteModel:
    """Make `model` run remotely: an nn.Module (its weights go up), a path to a Hugging Face directory
    on the server, or a transformers config, which the server builds with random weights drawn after
    `torch.manual_seed(seed)` (default 0) on its device, in `dtype` (RemoteModel.from_config).

    `weight_budget_gb`: the GPU memory (GiB) the model's weights may use on a CUDA server; decoder
    layers beyond it stream from pinned host memory on every forward. None: the server's default.

    `path`: "module" (the server builds the architecture itself), "graph" (any nn.Module: its forward is
    captured as an SRG per input signature and interpreted on the server), or None: the module path when
    the server can build the module, else the graph path (DESIGN.md section 4).
    """
    if path not in (None, "module", "graph"):
        raise InvalidRequest(f"path must be 'module', 'graph' or None, got {path!r}")
    s = session or connection().default_session()
    if is_config(model):
        return RemoteModel.from_config(s, model, seed=0 if seed is None else seed, dtype=dtype,
                                       weight_budget_gb=weight_budget_gb)
    if seed is not None or dtype is not None:  # a module's or checkpoint's weights are what they are
        raise InvalidRequest("seed and dtype apply only when remoting a config (random weights)")
    if isinstance(model, str):
        return RemoteModel.from_path(s, model, weight_budget_gb=weight_budget_gb)
    if path == "graph":
        if weight_budget_gb is not None:
            raise InvalidRequest("weight streaming (weight_budget_gb) is for the module path only")
        return GraphModel.from_module(s, model)
    try:
        return RemoteModel.from_module(s, model, weight_budget_gb=weight_budget_gb)
    except ModelNotSupported:
        if path == "module" or weight_budget_gb is not None:
            raise
        return GraphModel.from_module(s, model)  # any other nn.Module: the graph path


def explain(model, *args, **kwargs) -> str:
    """The SRG of `model(*args, **kwargs)` as text: ops grouped by module, with phase, lifecycle, cost
    class and sizes. `model` is a graph-path RemoteModel or a local nn.Module (captured locally, no server)."""
    if isinstance(model, GraphModel):
        return model.explain(*args, **kwargs)
    from .srg.capture import capture_module
    from .srg.render import render

    names = [n for n, _ in list(model.named_parameters()) + list(model.named_buffers())]
    cap = capture_module(model, args, kwargs, {n: n for n in names})
    return render(cap.graph, f"SRG {type(model).__name__}")


def session(name: str | None = None, *, checkpoint: bool = False, max_kv_tokens: int | None = None) -> Session:
    """A new server-side session (use as a context manager to close it). checkpoint=True: the server
    saves it to host memory if it shuts down; `djinn.restore_session(s.checkpoint_token)` brings it back.
    max_kv_tokens: the most tokens its KV will hold; reserved at its first generate, so later turns
    never wait for memory (an agent that knows its context budget should say it)."""
    return connection().session(name, checkpoint=checkpoint, max_kv_tokens=max_kv_tokens)


def restore_session(token: str, name: str | None = None) -> Session:
    """A new session holding a checkpointed session's state (after the server restarted)."""
    return connection().restore_session(token, name)


def stats() -> dict:
    """What the server holds: segments (text/data/stack/host bytes), sessions and models."""
    return connection().stats()


atexit.register(disconnect)
