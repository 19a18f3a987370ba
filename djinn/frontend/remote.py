"""RemoteModel: a model that lives on the server; calling it runs there (module path).

`djinn.remote(model)` uploads the weights the server lacks and asks the server to build the same
Hugging Face architecture from its config. `djinn.remote("/dir/on/server")` loads a checkpoint the
server can read, and `djinn.remote(config, seed=0)` has the server build the model with seeded random
weights on its device (djinn/server/handlers/init_ops.py), so large models never cross the wire.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..protocol.errors import InvalidRequest, ModelNotSupported
from ..protocol.tensors import DTYPE_NAMES
from ..srg.layers import config_layers
from . import wire
from .generate import request as generate_request
from .run import Breakpoint, Run
from .stats_view import fmt_bytes, html_card
from .tensor import RemoteTensor
from .upload import UploadReport, named_tensors, upload_tensors

if TYPE_CHECKING:
    from .session import Session


class RemoteModel:
    path = "module"  # the server builds and runs the module itself (DESIGN.md section 4.1)

    def __init__(self, session: "Session", model_id: str, arch: str, nbytes: int, config: dict | None,
                 upload: UploadReport | None = None, source: str | None = None):
        self.session = session  # the session it was remoted in; calls without a session use it
        self.model_id = model_id
        self.arch = arch
        #: Why it is on this path (shown in the repr): a notebook user sees which path a model took.
        self.reason = f"the server builds {arch} itself"
        self.nbytes = nbytes
        self.config = config
        self.upload = upload
        self.source = source
        self._sessions = {session.sid}

    @classmethod
    def from_module(cls, session: "Session", module: nn.Module, *,
                    weight_budget_gb: float | None = None, tp: int | None = None) -> "RemoteModel":
        """Upload what the server lacks and have it build the model. `weight_budget_gb` (GiB, CUDA
        servers): the decoder layers beyond it stay in the server's pinned host memory and stream
        through a ring of GPU slots on every forward (DESIGN.md section 6). `tp`: shard it over the
        workers `session` spans (a session opened with that tp)."""
        arch = type(module).__name__
        config = getattr(module, "config", None)
        if not is_hf_model(module):
            raise ModelNotSupported(
                f"{arch} is not a Hugging Face model the server can build; arbitrary modules take the "
                "graph path (djinn.remote(module, path='graph'))"
            )
        _check_allowed(session, arch)
        conn = session.conn
        # Chunks must fit the frame limit the server announced at HELLO (--max-frame-bytes).
        chunk = conn.cfg.upload_chunk_bytes
        limit = (conn.info.get("limits") or {}).get("max_frame_bytes")
        if isinstance(limit, int) and limit > 0:
            chunk = min(chunk, limit)
        hashes, report = upload_tensors(session, named_tensors(module), conn.hashes, chunk, conn.cfg.upload_window,
                                        stage="host" if weight_budget_gb is not None or tp not in (None, 1) else None)
        gen = getattr(module, "generation_config", None)
        budget = {"weight_budget_gb": weight_budget_gb} if weight_budget_gb is not None else {}
        if tp not in (None, 1):
            budget["tp"] = tp
        info = session.call("register_model", {
            **budget,
            "arch": arch,
            "config": json.loads(config.to_json_string(use_diff=False)),
            "attn_impl": getattr(config, "_attn_implementation", None),
            "tensors": hashes,
            "generation_config": gen.to_dict() if gen is not None else None,
        })
        return cls(session, info["model_id"], arch, info["bytes"], json.loads(config.to_json_string()),
                   upload=report)

    @classmethod
    def from_config(cls, session: "Session", config, *, seed: int = 0, dtype: torch.dtype | None = None,
                    weight_budget_gb: float | None = None, tp: int | None = None) -> "RemoteModel":
        """Have the server build the model of this transformers config with random weights drawn after
        `torch.manual_seed(seed)` on its device, in `dtype` (None: `config.dtype`, else float32). Only the
        config crosses the wire. Locally the same bits come from (on the server's device and stack):

            torch.manual_seed(seed)
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)   # dtype omitted if None

        The class is `config.architectures[0]` if set, else the config type's causal-LM class; then the
        recipe's line is `getattr(transformers, arch)._from_config(config, dtype=dtype)`. The same
        (class, config, dtype, seed) asked by any session or client is built once and shared.
        """
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InvalidRequest(f"seed must be an int, got {seed!r}")
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise InvalidRequest(f"dtype must be a torch.dtype or None, got {dtype!r}")
        arch = _config_arch(config)
        _check_allowed(session, arch)
        budget = {"weight_budget_gb": weight_budget_gb} if weight_budget_gb is not None else {}
        if tp not in (None, 1):
            budget["tp"] = tp
        info = session.call("init_model", {
            **budget,
            "arch": arch,
            "config": json.loads(config.to_json_string(use_diff=False)),
            "attn_impl": getattr(config, "_attn_implementation", None),  # not in the JSON: sent apart
            "dtype": None if dtype is None else DTYPE_NAMES.get(dtype, str(dtype)),  # the server validates
            "seed": seed,
        })
        return cls(session, info["model_id"], info["arch"], info["bytes"], info.get("config"),
                   source=f"random init, seed {seed}")

    @classmethod
    def from_path(cls, session: "Session", path: str, *, weight_budget_gb: float | None = None,
                  tp: int | None = None) -> "RemoteModel":
        """Load a Hugging Face directory that lives on the server (absolute, or "./"-relative to the
        server's working directory). Hub ids are refused here: the server never downloads."""
        _check_not_hub_id(path)
        budget = {"weight_budget_gb": weight_budget_gb} if weight_budget_gb is not None else {}
        info = session.call("load_model", {"path": path, **budget, **({"tp": tp} if tp not in (None, 1) else {})})
        return cls(session, info["model_id"], info["arch"], info["bytes"], info.get("config"), source=path)

    # -- execution -------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs) -> Any:
        return self.forward(*args, **kwargs)

    def forward(self, *args, session: "Session | None" = None, **kwargs) -> Any:
        """Run forward on the server; tensors in the result are RemoteTensor handles."""
        s = session or self.session
        self.attach(s)
        result = s.call("forward", {"model_id": self.model_id, "args": wire.pack(s, list(args)),
                                    "kwargs": wire.pack(s, kwargs)})
        return wire.unpack(s, result["output"])

    def generate(self, input_ids: torch.Tensor, *, stream: bool = False, seed: int | None = None,
                 session: "Session | None" = None, **kwargs):
        """Server-side decode loop. Returns the sequences (a CPU tensor), or a TokenStream if stream=True.

        Stateless: each call starts fresh. Use `s.generate(rm, ...)` to keep the KV cache between calls.
        """
        s = session or self.session
        self.attach(s)
        return generate_request(s, self, input_ids, stream=stream, seed=seed, use_session_kv=False, **kwargs)

    def start_run(self, s: "Session", args: tuple, kwargs: dict, *, method: str = "forward",
                  breakpoints: Sequence[Breakpoint] = (), seed: int | None = None) -> Run:
        """`s.start(rm, ...)` on the module path: the server runs its own module (forward or generate)
        with hooks at the breakpoints. Each model class starts its own runs, so Session.start does not
        ask which path a model is on."""
        self.attach(s)
        kwargs = dict(kwargs)
        extra = {"deterministic": kwargs.pop("deterministic")} if method == "generate" and "deterministic" in kwargs else {}
        fut = s.submit("start", {
            "model_id": self.model_id, "method": method, "breakpoints": [b.to_wire() for b in breakpoints],
            "seed": seed, "args": wire.pack(s, list(args)), "kwargs": wire.pack(s, kwargs), **extra,
        })
        return Run(s, self, method, fut)

    def explain(self, *args, session: "Session | None" = None, **kwargs) -> str:
        """What `rm(*args, **kwargs)` runs, as text in the graph path's layout (a title line, then
        groups): the server's own module called once, the inputs that go up, where the weights live
        (resident or streamed) and what the KV cache keeps. Reads the server's stats; runs nothing."""
        s = session or self.session
        st = s.conn.stats()
        return explain_module_call(self, args, kwargs, st.get("models", {}).get(self.model_id, {}),
                                   st.get("sessions", {}).get(s.sid, {}), st.get("device", "?"))

    def attach(self, s: "Session") -> None:
        """Make the model usable in session `s` (one request, the first time): the server counts which
        sessions hold a model, and frees it after the last one closes."""
        if s.sid not in self._sessions:
            s.call("attach_model", {"model_id": self.model_id})
            self._sessions.add(s.sid)

    def _repr_html_(self) -> str:
        return html_card(f"{type(self).__name__} {self.arch}", self._card_rows())

    def _card_rows(self) -> list[tuple[str, str]]:
        return [("path", f"{self.path}: {self.reason}"),
                ("weights", f"{fmt_bytes(self.nbytes)} ({self.source or 'uploaded'})"),
                ("id", self.model_id[:12]), ("server", str(self.session.conn.address))]

    def __repr__(self) -> str:
        where = self.source or "uploaded"
        return (f"RemoteModel({self.arch}, {self.nbytes / 1e6:.1f} MB, id={self.model_id[:12]}, "
                f"{where}, {self.path} path: {self.reason}, server={self.session.conn.address})")


def _input_str(v: Any) -> str:
    from ..srg.render import meta_str

    if isinstance(v, RemoteTensor):  # already on the server: only its handle goes up
        return f"remote {meta_str(v)}"
    if isinstance(v, torch.Tensor):
        return meta_str(v)
    return repr(v)


def explain_module_call(rm: RemoteModel, args: tuple, kwargs: dict, model: dict, session: dict, device: str) -> str:
    """The module path's explain (DESIGN.md section 4.1): one call of the module the
    server built, not an SRG, so its groups are the call, the weights and the KV, not ops."""
    from ..srg.render import _size

    kwargs = dict(kwargs)
    if "use_cache" not in kwargs:  # server/execution/executor.py: a forward keeps no cache unless asked
        kwargs["use_cache"] = False
    inputs = [_input_str(a) for a in args] + [f"{k}={_input_str(v)}" for k, v in kwargs.items()]
    n_in = sum(isinstance(a, torch.Tensor) or hasattr(a, "hid") for a in (*args, *kwargs.values()))
    layers = config_layers(rm.config)
    stream = model.get("streaming")
    kv_tokens = (session.get("kv_tokens") or {}).get(rm.model_id, 0)
    kv_title = "none kept" if not kv_tokens else f"{kv_tokens} tokens kept"
    lines = [f"Module {rm.arch} {rm.model_id[:12]}: path=module, 1 call, {n_in} inputs, weights "
             f"({_size(rm.nbytes)}), KV {kv_title}",
             "call:",
             f"  {rm.arch}.forward({', '.join(inputs)})  [the module the server built: eager torch ops, "
             "not captured as an SRG]"]
    if layers:
        lines.append(f"  {layers} decoder layers: breakpoints by layer=0..{layers - 1} or module path")
    lines.append("weights:")
    where = f"text segment on {device}"
    if stream:
        lines.append(f"  {stream.get('resident_layers', '?')} of {stream.get('layers', '?')} layers resident in the "
                     f"{where}, {stream.get('streamed_layers', '?')} streamed from pinned host memory "
                     f"({_size(stream.get('streamed_bytes_per_forward', 0))} per forward)")
    else:
        lines.append(f"  {_size(rm.nbytes)} resident in the {where} ({rm.source or 'uploaded'}), shared by "
                     f"{len(model.get('sessions') or ())} session(s)")
    lines.append("kv:")
    cache = ("the cache object stays on the server and comes back as None" if kwargs["use_cache"]
             else "none kept (use_cache=False)")
    lines.append(f"  this forward: {cache}")
    lines.append(f"  this session ({session.get('name') or 'unnamed'}): {kv_tokens} tokens held for "
                 f"{rm.model_id[:12]}; s.generate(rm, ids) continues them, rm.generate starts fresh")
    pool = model.get("kv_pool")
    if pool:
        lines.append(f"  pool: {pool.get('blocks', '?'):,} blocks of {pool.get('block_tokens', '?')} tokens "
                     f"({_size(pool.get('pool_bytes', 0))}) on {device}")
    lines.append(f"outputs: {rm.arch} output (tensors as RemoteTensor handles on {device})")
    return "\n".join(lines)


def _check_allowed(session: "Session", arch: str) -> None:
    """Refuse before any upload or build what the server said at HELLO it cannot build."""
    allowed = session.conn.architectures()
    if allowed is not None and arch not in allowed:
        raise ModelNotSupported(f"the server cannot build {arch}; it builds {sorted(allowed)}")


def _check_not_hub_id(path: str) -> None:
    # "gpt2" or "meta-llama/Llama-2-7b-hf" would resolve against the server's working directory and
    # fail there as a directory without config.json, which misleads: say what the server can do instead.
    if path.startswith(("/", "./", "../", "~")):
        return
    raise InvalidRequest(
        f"{path!r} looks like a Hugging Face hub id: hub ids are not supported, the server downloads nothing "
        f"(it has no network access). Pass a config (djinn.remote(AutoConfig.from_pretrained({path!r}), seed=0): "
        f"built on the server with random weights), a module loaded here (djinn.remote("
        f"AutoModelForCausalLM.from_pretrained({path!r})): its weights go up once), or the absolute path of a "
        "model directory on the server")


def is_hf_model(module: Any) -> bool:
    """A Hugging Face model: it has a config the server can rebuild it from."""
    return hasattr(getattr(module, "config", None), "to_json_string")


def is_config(obj: Any) -> bool:
    """A transformers PretrainedConfig (imported only when transformers is already loaded)."""
    import sys

    mod = sys.modules.get("transformers")
    return mod is not None and isinstance(obj, mod.PretrainedConfig)


def _config_arch(config) -> str:
    """The class to build: the config's first `architectures` entry, else what AutoModelForCausalLM
    builds for this config type (the documented local recipe)."""
    if not is_config(config):
        raise InvalidRequest(f"from_config needs a transformers PretrainedConfig, got {type(config).__name__}")
    named = getattr(config, "architectures", None)
    if named:
        return named[0]
    from transformers import AutoModelForCausalLM

    try:
        cls = AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        raise ModelNotSupported(f"{type(config).__name__} has no causal-LM class; set config.architectures "
                                "to the class to build") from None
    if isinstance(cls, (list, tuple)):  # some config types map to several classes; the first is the default
        cls = cls[0]
    return cls.__name__
