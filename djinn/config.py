"""Validated configuration. YAML files map 1:1 onto these dataclasses; env knobs are read only here."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .protocol.messages import Limits

DEFAULT_ARCHITECTURES = [
    "GPT2LMHeadModel", "GPT2Model",
    "LlamaForCausalLM", "LlamaModel",
    "MistralForCausalLM", "MistralModel",
    "Qwen2ForCausalLM", "Qwen2Model",
    "Qwen3ForCausalLM", "Qwen3Model",
    "GPTNeoXForCausalLM", "OPTForCausalLM", "PhiForCausalLM", "Phi3ForCausalLM",
    "GemmaForCausalLM", "Gemma2ForCausalLM", "FalconForCausalLM",
    "BloomForCausalLM", "GPTJForCausalLM", "GPTNeoForCausalLM", "StableLmForCausalLM", "CohereForCausalLM",
    "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM",
    "T5ForConditionalGeneration", "BartForConditionalGeneration", "WhisperForConditionalGeneration",
    # Decoder-only causal LMs that pass every check of OSDI_Evaluation/zoo/sweep_causal_lm.py (greedy and
    # seeded sampled generate bitwise local, a session's KV continued in the paged blocks, token ids and
    # position tables range-checked): results/causal_lm_sweep.json says why the others are not here.
    "Apertus1p5TextForCausalLM", "ApertusForCausalLM", "ArceeForCausalLM", "AriaTextForCausalLM",
    "BertGenerationDecoder", "BertLMHeadModel", "BigBirdForCausalLM", "BioGptForCausalLM",
    "BitNetForCausalLM", "CTRLLMHeadModel", "CamembertForCausalLM", "CodeGenForCausalLM",
    "Data2VecTextForCausalLM", "DiffLlamaForCausalLM", "DogeForCausalLM", "Dots1ForCausalLM",
    "ElectraForCausalLM", "Ernie4_5ForCausalLM", "Ernie4_5_MoeForCausalLM", "FlexOlmoForCausalLM",
    "GPTBigCodeForCausalLM", "GPTNeoXJapaneseForCausalLM", "Glm4ForCausalLM",
    "Glm4MoeForCausalLM", "GlmForCausalLM", "GraniteForCausalLM", "GraniteMoeForCausalLM",
    "GraniteMoeSharedForCausalLM", "HYV3ForCausalLM", "HeliumForCausalLM", "HunYuanDenseV1ForCausalLM",
    "HunYuanMoEV1ForCausalLM", "HyperCLOVAXForCausalLM", "Jais2ForCausalLM", "JetMoeForCausalLM",
    "LagunaForCausalLM", "MegatronBertForCausalLM", "MellumForCausalLM", "MiniCPM5MoeForCausalLM",
    "MiniMaxM2ForCausalLM", "MiniMaxM3VLForCausalLM", "Ministral3ForCausalLM", "NanoChatForCausalLM",
    "NemotronForCausalLM", "Olmo2ForCausalLM", "OlmoForCausalLM", "OlmoeForCausalLM",
    "PersimmonForCausalLM", "PhimoeForCausalLM", "RemBertForCausalLM", "RoFormerForCausalLM",
    "RobertaForCausalLM", "RobertaPreLayerNormForCausalLM", "SeedOssForCausalLM", "SmolLM3ForCausalLM",
    "SolarOpenForCausalLM", "Starcoder2ForCausalLM", "TrOCRForCausalLM", "XGLMForCausalLM",
    "XLMRobertaForCausalLM", "XLMRobertaXLForCausalLM",
    # Added once the sweep's tiny-config builder could make them (a name the installed transformers lacks
    # is harmless: the registry refuses it with ModelNotSupported only when a client asks for it).
    "BigBirdPegasusForCausalLM", "CohereCompassForCausalLM", "DbrxForCausalLM", "Emu3ForCausalLM",
    "MvpForCausalLM", "XLNetLMHeadModel",
    # Added once generate took forced_eos_token_id / forced_bos_token_id (range-checked), which their
    # generation configs set.
    "BartForCausalLM", "BlenderbotSmallForCausalLM", "MBartForCausalLM", "MarianForCausalLM", "PLBartForCausalLM",
]


@dataclass
class ServerConfig:
    device: str | None = None
    """Torch device the engine owns ("cuda:0", "cpu"). None: cuda:0 if a GPU is present, else cpu."""
    bind: str = "127.0.0.1"
    """Address to listen on. Anything but loopback requires `secret` or CurveZMQ keys (or both)."""
    port: int = 5556
    """TCP port; 0 picks a free one (the ready line prints the address)."""
    secret: str | None = None
    """Shared secret clients must present at HELLO. Also DJINN_SECRET."""
    heartbeat_s: float = 0.5
    """Interval at which clients are told to heartbeat."""
    client_timeout_s: float = 10.0
    """A client silent this long is dead: its sessions are reclaimed."""
    session_idle_timeout_s: float = 3600.0
    """A session with no request for this long is closed and its state freed."""
    paused_run_timeout_s: float = 600.0
    """A run parked at a breakpoint this long without a resume is cancelled and its paused state freed
    (swapping it to host memory instead belongs to the VMU)."""
    max_frame_bytes: int = 1 << 30
    """Largest tensor in one message, however many wire frames carry it (uploads are chunked below this)."""
    max_frames: int = 4096
    """Most frames in one message (a tensor or header larger than `wire_frame_bytes` takes several)."""
    max_header_bytes: int = 16 << 20
    """Largest msgpack header."""
    max_message_bytes: int = 2 << 30
    """Largest whole message, checked when it is decoded."""
    wire_frame_bytes: int = 1 << 20
    """Longest ZeroMQ frame the socket accepts from any peer (ZMQ_MAXMSGSIZE; zmq drops a connection
    that sends a longer one). libzmq applies one limit to the handshake and to every message after it,
    so this is also what a peer that has not authenticated can make the server hold (Note [Small
    frames] in djinn/protocol/codec.py). Clients split larger tensors and headers to fit; they learn
    the size at HELLO."""
    handshake_timeout_s: float = 5.0
    """A connection must finish its ZMTP handshake (Curve or secret checked) within this long, or it is
    closed (ZMQ_HANDSHAKE_IVL)."""
    max_connections: int = 256
    """Clients connected at once. A HELLO that would make one more is refused with ServerBusy; a TCP
    connection accepted beyond max_connections + 64 (handshakes in flight) is closed at once
    (djinn/server/gate.py, Note [Connection limit])."""
    send_queue_messages: int = 1000
    """Messages queued for one connection that is not reading them (ZMQ_SNDHWM); beyond it, further
    messages to it are dropped. A djinn client's library reads whatever arrives, so only a stalled or
    hostile peer reaches it."""
    architectures: list[str] = field(default_factory=lambda: list(DEFAULT_ARCHITECTURES))
    """Hugging Face model classes the server builds itself (the module path)."""
    model_roots: list[str] = field(default_factory=list)
    """Directories `djinn.remote("/path")` may load from. Empty: any path, but only on loopback."""
    weight_budget_gb: float | None = None
    """Default GPU weight budget per model, in GiB (2**30 bytes), for models whose client sends none:
    decoder layers beyond it stream from pinned host memory through a ring (CUDA only). None: no limit."""
    policy: str = "signal"
    """Scheduling policy for sessions' KV caches: signal, lru, recompute or resident (DESIGN.md section 5)."""
    swap_on_io_wait: bool = False
    """signal policy: swap out every session that signals IO_WAIT, not only while memory is wanted."""
    prefetch_margin_s: float = 0.05
    """signal policy: a prefetch is planned to finish this long before the session's announced return."""
    host_pool_gb: float = 4.0
    """Pinned host memory for swapped KV caches, in GiB, allocated once at start (0: no swapping)."""
    data_budget_gb: float | None = None
    """GiB of each model's KV pool (its Data segment: fixed-size KV blocks allocated once, at the
    model's first use of KV). None: on CUDA what the device has free after the weights and the
    measured Stack reserve (djinn/server/execution/kv_pools.py); on the CPU 2 GiB (committed only as written)."""
    kv_block_tokens: int = 16
    """Tokens per KV block (every layer's keys and values for them): the unit of allocation, swap,
    prefix sharing and copy on write."""
    prefix_caching: bool = True
    """Generates whose prompt starts with the tokens of cached KV blocks share those blocks instead of
    computing them again (a common system prompt is held once); breakpoint runs never do."""
    kv_pool_max_tokens: int = 1 << 20
    """Most tokens one model's pool holds, whatever the device has (keeps tiny models' pools small)."""
    max_prefill_tokens: int = 4096
    """Largest number of new tokens (batch x length) one forward, generate or run may feed at once.
    The Stack reserve is measured by a forward of this size, so a larger request is refused."""
    prefill_step_tokens: int = 2048
    """Prompt tokens of fast-path generates prefilled per engine turn, in chunks, before every decoding
    session takes its next step: a long prompt delays the others' next token by at most one such chunk
    (chunked prefill, Note [Chunked prefill] in djinn/server/execution/fast_task.py, which says why 2048 and not
    less: smaller chunks cost prefill throughput). At most max_prefill_tokens."""
    stack_margin_gb: float = 1.0
    """GiB left free on CUDA beyond the measured Stack (CUDA context, cuBLAS workspaces, rounding)."""
    swap_bw_gbps: float | None = None
    """Swap bandwidth the scheduler assumes until it has measured one (GB/s). None: 25 on CUDA, 4 on CPU."""
    drain_timeout_s: float = 30.0
    """On SIGTERM/SIGINT the server stops taking new work and lets running generates finish for up to
    this long, then cancels the rest and tells every client it is going away."""
    metrics_port: int | None = None
    """Serve Prometheus metrics at http://metrics_bind:PORT/metrics (0 picks a free port; None: off)."""
    metrics_bind: str = "127.0.0.1"
    """Address of the metrics endpoint (it has no authentication: keep it on loopback or a private net)."""
    log_format: str = "text"
    """"text", or "json": one JSON object per line (timestamp, level, logger, message)."""
    fault_injection: bool = False
    """Tests only: a request may carry `_fault: "oom" | "device_error"` to fail inside the engine as a
    CUDA out-of-memory or a sticky device error would (tests/integration/test_restart.py), or
    `"unencodable_reply"` to have its reply hold a value the codec refuses (tests/integration/test_replies.py)."""
    log_level: str = "INFO"
    """Python logging level name."""
    curve_secret_key: str | None = None
    """CurveZMQ: path to the server's secret certificate (NAME.key_secret from `djinn keys`). With
    `curve_allowed_dir` the socket encrypts every connection and admits only allowed client keys
    (docs/SECURITY.md). May be combined with `secret`."""
    curve_allowed_dir: str | None = None
    """CurveZMQ: directory of the allowed clients' public certificates (*.key), read at start."""
    quota_gpu_gb: float | None = None
    """Per-session quota, in GiB: the session's Data segment on the GPU (its KV caches plus the tensors
    it holds; weights are shared and never count). A generate whose KV would pass it, or a forward
    whose new outputs would, fails with QuotaExceeded and changes nothing. None: no limit."""
    quota_principal_gpu_gb: float | None = None
    """Per-principal quota, in GiB (a Curve key; everyone with the shared secret; every client of a
    loopback server without either: Note [Principals] in djinn/server/principals.py): what all of the
    principal's sessions hold on the GPU together, counted as quota_gpu_gb counts one session, plus
    the KV its admitted generates have been promised. A request that would take the principal past it
    fails with QuotaExceeded and changes nothing (Note [Principal GPU quota] in djinn/server/quotas.py).
    None: no limit (a principal then holds at most max_sessions_per_principal x quota_gpu_gb)."""
    quota_host_gb: float | None = None
    """Per-session quota, in GiB, of swapped KV in the pinned host pool. A session whose KV is larger is
    never swapped out: it stays on the GPU (the scheduler picks other victims). None: no limit."""
    fast_decode: str = "auto"
    """The decode fast path (batched across sessions, CUDA graphs; djinn/server/execution/fastpath.py): auto (on
    for CUDA devices), on, off. Results match eager decode to rounding; a generate with
    deterministic=True, or one the path does not support, runs eagerly (stats say why)."""
    fast_decode_max_batch: int | None = None
    """Rows (sessions) one batched decode step holds; more wait for a row. Its workspace is part of
    the Stack reserve. None: as many as 4 GiB of workspace allows at fast_decode_max_len, at most 64."""
    fast_decode_attention: str = "auto"
    """Attention of the batched decode step over the KV blocks (djinn/server/execution/paged_attention.py): flex
    (PyTorch FlexAttention compiled, reading the blocks in place), gather (copy each row's blocks into a
    dense tensor, then SDPA), or auto (the gather, until flex has been measured at scale on a GPU).
    Flex is checked before a pool is sized for it and falls back to the gather, saying why, when it
    does not compile or differs (Note [Flex is checked])."""
    fast_decode_max_len: int = 4096
    """Longest sequence (prompt + new tokens) the fast path takes; rounded up to a power of two."""
    fast_decode_compile: bool = False
    """Compile the decode step with torch.compile before capturing it (Note [Compiled step] in
    djinn/server/execution/fastpath.py): fewer, fused kernels; the first generate of a model waits for the compile."""
    fast_decode_overlap: bool = False
    """Launch each decode step before the previous step's tokens are read, so the host's
    work overlaps the device's (Note [Overlapped steps] in djinn/server/execution/fastpath.py); the
    same tokens. Off until measured on a GPU."""
    fast_decode_graphs: bool = True
    """Replay decode steps as CUDA graphs (CUDA only); false: run them eagerly (debugging)."""
    run_fork_from_kv: bool | None = None
    """A fork of a generate run paused in a decode step starts from the parent's KV blocks (True) or
    re-executes the call from its start (False). None: from the KV on the CPU, re-executed on CUDA,
    where the forked step, run as the first forward of a new generate call, was measured to diverge
    from the parent's tokens in fp16 (Note [Fork replays the prefix] in djinn/server/execution/breakpoints.py)."""
    fast_decode_capture: str = "all"
    """When decode step graphs are captured: all (every bucket's when the model's pool is made, at its
    first fast generate, so no later step of any session waits on a capture; stats report the seconds
    it took) or lazy (each (batch, length) bucket's at its first step, which waits for the capture:
    a stall of every decoding session, at whatever moment a new batch size or length first occurs)."""
    memory_history: bool = False
    """Record the Python frames of every device allocation, so `stats()["device_memory"]["largest_unowned"]`
    names where bytes no segment owns were allocated (Note [Device memory agrees]); debugging, costs a
    little per allocation."""
    checkpoint_dir: str | None = None
    """Where sessions that asked for it are written when the server shuts down gracefully, to be
    restored after a restart (djinn/server/handlers/checkpoint.py). None: /dev/shm/djinn-checkpoints (host memory)."""
    max_sessions_per_principal: int = 1024
    """Open sessions one principal may hold (a Curve key; everyone with the shared secret; every client
    of a loopback server without either: Note [Principals] in djinn/server/principals.py), however many
    client ids it connects with; the next open_session, fork_session or restore_session fails with
    QuotaExceeded. Every schedule looks at all sessions, so thousands would slow everyone."""
    max_sessions_total: int = 2048
    """Open sessions of all principals together; past it any principal's next session fails with
    QuotaExceeded (a server with many Curve keys is still bounded)."""
    max_runs_per_principal: int = 64
    """Live breakpoint runs (running, paused or forked) one principal may hold; each parks an OS thread."""
    max_runs_total: int = 256
    """Live breakpoint runs of all principals together: the most run threads the server parks at once."""
    upload_in_flight_gb: float = 8.0
    """GiB of unfinished uploads one principal may have reserved at once, over all its sessions: a
    tensor's whole size is reserved at its first chunk. Larger than any single weight of the models in
    BASELINES.md."""
    graph_max_flops: float | None = 1e15
    """Per-request cost budget of a graph-path request (run_graph, a graph-path start), in operations
    estimated from the SRG's shapes before it runs (Note [Graph cost] in djinn/server/execution/interpreter.py):
    2 per multiply-add of matmul, convolution and attention ops, 1 per element of every other op's
    largest tensor, views free. A graph over it fails with CostBudgetExceeded before anything runs, and
    the server serves others on. 1e15 is a second or more of a whole H100 in half precision (several in
    fp32): a 7B-parameter forward over 4096 tokens is about 1e14, so the default stops only graphs that
    would hold the engine thread, and with it every tenant, for much longer. None: no limit."""
    quota_queued_requests: int | None = None
    """Per-session quota of requests that wait behind the session's running generate (plus that
    generate itself); a request beyond it fails with QuotaExceeded at once. Frees never count. None:
    no limit."""

    def limits(self) -> Limits:
        return Limits(
            max_frames=self.max_frames, max_frame_bytes=self.max_frame_bytes,
            max_header_bytes=self.max_header_bytes, max_total_bytes=self.max_message_bytes,
            wire_frame_bytes=self.wire_frame_bytes,
        )

    def validate(self) -> "ServerConfig":
        from .protocol.auth import is_loopback

        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is not a TCP port; use 0-65535 (0 picks a free one)")
        for name in ("heartbeat_s", "client_timeout_s", "session_idle_timeout_s", "paused_run_timeout_s",
                     "drain_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0 seconds")
        if self.client_timeout_s < 2 * self.heartbeat_s:
            raise ValueError(
                f"client_timeout_s={self.client_timeout_s} must be at least twice heartbeat_s={self.heartbeat_s}"
            )
        from .protocol.auth import check_secret_length, check_server_curve

        curve = check_server_curve(self.curve_secret_key, self.curve_allowed_dir)
        if self.secret is not None and not isinstance(self.secret, str):
            raise ValueError("secret must be a string")
        if self.secret:  # "" counts as none
            check_secret_length(self.secret, "secret")
        if not is_loopback(self.bind) and not self.secret and not curve:
            raise ValueError(
                f"bind={self.bind!r} is not loopback: set a secret (--secret or DJINN_SECRET) and/or CurveZMQ keys "
                "(--curve-secret-key and --curve-allowed-dir, see docs/SECURITY.md) "
                "or bind to 127.0.0.1"
            )
        if self.weight_budget_gb is not None and (
                isinstance(self.weight_budget_gb, bool) or not isinstance(self.weight_budget_gb, (int, float))
                or not self.weight_budget_gb > 0):
            raise ValueError(f"weight_budget_gb={self.weight_budget_gb!r} must be a number of GiB > 0, or null for no limit")
        from .scheduler.policies import POLICIES

        if self.log_format not in ("text", "json"):
            raise ValueError(f"log_format={self.log_format!r} must be 'text' or 'json'")
        if self.metrics_port is not None and not (isinstance(self.metrics_port, int) and 0 <= self.metrics_port <= 65535):
            raise ValueError(f"metrics_port={self.metrics_port!r} is not a TCP port (0-65535), or null for no endpoint")

        if self.policy not in POLICIES:
            raise ValueError(f"policy={self.policy!r} is not a scheduling policy; choose one of {sorted(POLICIES)}")
        for name in ("host_pool_gb", "data_budget_gb", "swap_bw_gbps", "prefetch_margin_s"):
            v = getattr(self, name)
            if v is None and name in ("data_budget_gb", "swap_bw_gbps"):
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (v == 0 and name == "swap_bw_gbps"):
                raise ValueError(f"{name}={v!r} must be a number >= 0" + (", or null" if name != "host_pool_gb" else ""))
        if self.max_frame_bytes > self.max_message_bytes:
            raise ValueError("max_frame_bytes must not exceed max_message_bytes")
        w = self.wire_frame_bytes
        if isinstance(w, bool) or not isinstance(w, int) or w < 4096:
            raise ValueError(f"wire_frame_bytes={w!r} must be an int >= 4096 (a HELLO must fit in one frame)")
        if self.max_frames * w < self.max_message_bytes:
            raise ValueError(f"max_frames={self.max_frames} frames of wire_frame_bytes={w} cannot carry a message "
                             f"of max_message_bytes={self.max_message_bytes}: raise max_frames to at least "
                             f"{-(-self.max_message_bytes // w) + 2}")
        if self.handshake_timeout_s <= 0:
            raise ValueError(f"handshake_timeout_s={self.handshake_timeout_s} must be > 0 seconds")
        for name in ("quota_gpu_gb", "quota_principal_gpu_gb", "quota_host_gb"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0):
                raise ValueError(f"{name}={v!r} must be a number of GiB >= 0, or null for no limit")
        if self.fast_decode not in ("auto", "on", "off"):
            raise ValueError(f"fast_decode={self.fast_decode!r} must be auto, on or off")
        if self.fast_decode_attention not in ("auto", "gather", "flex"):
            raise ValueError(f"fast_decode_attention={self.fast_decode_attention!r} must be auto, gather or flex")
        if self.run_fork_from_kv not in (None, True, False):
            raise ValueError(f"run_fork_from_kv={self.run_fork_from_kv!r} must be true, false or null")
        if self.fast_decode_capture not in ("lazy", "all"):
            raise ValueError(f"fast_decode_capture={self.fast_decode_capture!r} must be lazy or all")
        if isinstance(self.stack_margin_gb, bool) or not isinstance(self.stack_margin_gb, (int, float)) \
                or self.stack_margin_gb < 0:
            raise ValueError(f"stack_margin_gb={self.stack_margin_gb!r} must be a number of GiB >= 0")
        for name in ("fast_decode_max_batch", "fast_decode_max_len", "kv_block_tokens", "kv_pool_max_tokens",
                     "max_prefill_tokens", "prefill_step_tokens"):
            v = getattr(self, name)
            if v is None and name == "fast_decode_max_batch":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or not v > 0:
                raise ValueError(f"{name}={v!r} must be an int > 0")
        if isinstance(self.prefill_step_tokens, int) and isinstance(self.max_prefill_tokens, int) \
                and self.prefill_step_tokens > self.max_prefill_tokens:
            raise ValueError(f"prefill_step_tokens={self.prefill_step_tokens} must be <= max_prefill_tokens="
                             f"{self.max_prefill_tokens} (the Stack reserve is measured at that size)")
        for name in ("max_sessions_per_principal", "max_sessions_total", "max_runs_per_principal", "max_runs_total",
                     "max_connections", "send_queue_messages"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be an int >= 1")
        v = self.upload_in_flight_gb
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"upload_in_flight_gb={v!r} must be a number of GiB > 0")
        f = self.graph_max_flops
        if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float)) or not 1 <= f < float("inf")):
            raise ValueError(f"graph_max_flops={f!r} must be a number >= 1 (operations per graph request), "
                             "or null for no limit")
        q = self.quota_queued_requests
        if q is not None and (isinstance(q, bool) or not isinstance(q, int) or q < 1):
            raise ValueError(f"quota_queued_requests={q!r} must be an int >= 1 (the running request counts), "
                             "or null for no limit")
        return self


@dataclass
class ClientConfig:
    call_timeout_s: float = 300.0
    """Default timeout of one call; a dead server is detected sooner by heartbeats."""
    connect_timeout_s: float = 10.0
    """Time allowed for the HELLO exchange."""
    connect_probe_s: float = 1.0
    """Time allowed to resolve the server's host name and open a TCP connection to it before the HELLO:
    an unresolvable, dead or unreachable address fails after at most this long (frontend/address.py)."""
    heartbeat_s: float = 0.5
    """Heartbeat interval (the server's HELLO reply may lower it)."""
    liveness_s: float = 3.0
    """No message from the server for this long: it is dead, pending calls fail."""
    retries: int = 2
    """Extra attempts for idempotent calls that time out while the server is alive."""
    upload_chunk_bytes: int = 32 << 20
    """Weight uploads are split into messages of about this size."""
    upload_window: int = 4
    """Upload messages in flight at once."""
    embedded_start_timeout_s: float = 120.0
    """Time allowed for an embedded local server to print its ready line."""
    server_public_key: str | None = None
    """CurveZMQ: the server's public key, as its certificate file (NAME.key) or the 40-character z85
    key. With `client_secret_key` the connection is encrypted and authenticated (docs/SECURITY.md)."""
    client_secret_key: str | None = None
    """CurveZMQ: path to this client's secret certificate (NAME.key_secret from `djinn keys`); its
    public .key file must be in the server's curve_allowed_dir."""

    def validate(self) -> "ClientConfig":
        from .protocol.auth import check_client_curve

        check_client_curve(self.server_public_key, self.client_secret_key)
        return self


def load_yaml(cls, path: str | os.PathLike | None, **overrides):
    """Build `cls` from a YAML map (unknown keys are errors naming the key), then apply overrides."""
    data = {}
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a map of settings, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known, key=str)  # YAML keys need not be strings
    if unknown:
        raise ValueError(f"{path}: unknown settings {unknown}; known: {sorted(known)}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**data)


def env_server_address() -> str | None:
    return os.environ.get("DJINN_SERVER") or None


def env_secret() -> str | None:
    return os.environ.get("DJINN_SECRET") or None
