"""The public client API (re-exported by `djinn`, which imports this module on first use; see
djinn/__init__.py)."""
from __future__ import annotations

import atexit
import threading
import warnings

from torch import nn

from .config import ClientConfig, env_secret, env_server_address
from .frontend.connection import Connection
from .frontend.edits import RemoteView
from .frontend.graph_model import GraphModel
from .frontend.remote import RemoteModel, is_config, is_hf_model
from .frontend.run import Breakpoint, Run, Stop
from .frontend.generate import TokenStream
from .frontend.session import Session
from .frontend.tensor import RemoteTensor
from .protocol.errors import (
    AuthError, CaptureError, CostBudgetExceeded, DjinnError, HandleNotFound, InvalidRequest, ModelNotSupported,
    OutOfMemory, ProtocolError, QuotaExceeded, RemoteExecutionError, RequestTimeout, ServerBusy, ServerUnavailable,
    SessionLost, SessionNotFound, ShuttingDown, WeightWriteRefused, GenerateCancelled, GuardFailed,
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
    """The current connection, connecting with defaults on first use.

    Note [No silent fallback]: a connection to an address (given to connect() or in $DJINN_SERVER)
    stays on that address. When its server is gone, calls raise ServerUnavailable; the transport
    reconnects by itself if the server comes back there. Only a process that asked for nothing (or
    whose embedded server died) gets a new embedded server: starting a local CPU server in place of a
    remote GPU one would carry on with other hardware, other memory and none of the remote state.
    """
    conn = _conn
    if conn is None:
        return connect()
    dead = conn.transport.dead
    if dead is None:
        return conn
    if conn.embedded is None:
        raise ServerUnavailable(
            f"the djinn server at {conn.address} is gone ({dead.message}); no other server was started in its "
            "place. Calls work again once it is back at that address; djinn.connect(ADDRESS) picks another "
            "server, djinn.connect() with no address and no DJINN_SERVER starts a local one") from None
    return connect(device=conn.embedded_device)


def remote(model, *, session: Session | None = None, weight_budget_gb: float | None = None,
           seed: int | None = None, dtype=None, path: str | None = None, tp: int | None = None) -> RemoteModel:
    """Make `model` run remotely: an nn.Module (its weights go up), a path to a Hugging Face directory
    on the server, or a transformers config, which the server builds with random weights drawn after
    `torch.manual_seed(seed)` (default 0) on its device, in `dtype` (RemoteModel.from_config).

    `weight_budget_gb`: the GPU memory (GiB) the model's weights may use on a CUDA server; decoder
    layers beyond it stream from pinned host memory on every forward. None: the server's default.

    `path`: "module" (the server builds the architecture itself), "graph" (any nn.Module: its forward is
    captured as an SRG per input signature and interpreted on the server), or None: the module path when
    the server can build the module, else the graph path (DESIGN.md section 4).

    `tp`: shard the model over that many workers of a server with several (tensor parallelism); it
    lives in a session spanning them (`session`, opened with the same tp, or a new one).
    """
    if path not in (None, "module", "graph"):
        raise InvalidRequest(f"path must be 'module', 'graph' or None, got {path!r}")
    _check_model_arg(model)  # before connecting: a wrong argument must not start a server first
    tp = None if tp in (None, 1) else tp
    if tp is not None and path == "graph":
        raise InvalidRequest("tp applies to the module path")
    s = session or (connection().session(f"tp{tp}", tp=tp) if tp else connection().default_session())
    if is_config(model):
        return RemoteModel.from_config(s, model, seed=0 if seed is None else seed, dtype=dtype,
                                       weight_budget_gb=weight_budget_gb, tp=tp)
    if seed is not None or dtype is not None:  # a module's or checkpoint's weights are what they are
        raise InvalidRequest("seed and dtype apply only when remoting a config (random weights)")
    if isinstance(model, str):
        return RemoteModel.from_path(s, model, weight_budget_gb=weight_budget_gb, tp=tp)
    if path == "graph":
        if weight_budget_gb is not None:
            raise InvalidRequest("weight streaming (weight_budget_gb) is for the module path only")
        return GraphModel.from_module(s, model)
    try:
        return RemoteModel.from_module(s, model, weight_budget_gb=weight_budget_gb, tp=tp)
    except ModelNotSupported:
        if path == "module" or weight_budget_gb is not None or tp:
            raise
    hf, arch = is_hf_model(model), type(model).__name__
    why = f"the server does not build {arch}" if hf else f"{arch} is not a Hugging Face model"
    gm = GraphModel.from_module(s, model, reason=why)  # any other nn.Module: the graph path
    if hf:  # a user of an HF model expects generate and a KV cache: say they are not here
        warnings.warn(f"djinn: {arch} is not an architecture this server builds, so it runs on the graph "
                      "path: forward only, no generate and no session KV cache (s.generate), each new input "
                      "shape captured again; djinn.supported_architectures() lists the module path's",
                      stacklevel=2)
    return gm


def supported_architectures() -> list[str]:
    """The Hugging Face classes the server builds itself (the module path: generate, session KV
    caches, breakpoints by layer, weight streaming), as it announced them when this client connected.
    Any other nn.Module runs on the graph path (forward only)."""
    archs = connection().architectures()
    if archs is None:  # a server that did not say: the list this client version's servers default to
        from .config import DEFAULT_ARCHITECTURES

        return sorted(DEFAULT_ARCHITECTURES)
    return sorted(archs)


def _check_model_arg(model) -> None:
    if isinstance(model, (str, nn.Module)) or is_config(model):
        return
    got = "None" if model is None else f"a {type(model).__name__}"
    raise InvalidRequest(f"djinn.remote takes the model to run remotely: an nn.Module (its weights go up once), "
                         f"a transformers config (built on the server with seeded random weights), or the path "
                         f"of a model directory on the server; got {got}")


def explain(model, *args, **kwargs) -> str:
    """What `model(*args, **kwargs)` runs, as text. A local nn.Module or a graph-path model: its SRG, ops
    grouped by module with phase, lifecycle, cost class and sizes (a local module is captured here, no
    server). A module-path model: the server's module call, where its weights live and its KV."""
    if isinstance(model, RemoteModel):
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
    """What the server holds: segments (text/data/stack/host bytes), sessions and models. A dict with
    every number (keys as the server sends them); printed, or shown in a notebook, a short table."""
    return connection().stats()


atexit.register(disconnect)
