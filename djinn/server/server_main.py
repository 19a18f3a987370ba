"""`python -m djinn.server.server_main --gpu 0 [--port 5556] [--bind 127.0.0.1] [--config server.yaml]`

Binds the router's socket, starts the engine thread (device and request socket), prints one ready
line with the address, and shuts down cleanly on SIGINT/SIGTERM (or when --parent-pid exits, for embedded servers).
"""
from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import sys
import threading

from ..protocol.messages import READY_PREFIX
from .supervisor import _alive


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m djinn.server.server_main", description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--gpu", type=int, help="serve on cuda:N")
    g.add_argument("--device", help="torch device to serve on (cpu, cuda:0); default: cuda:0 if present, else cpu")
    p.add_argument("--gpus", help="serve on several GPUs, one worker each: e.g. 0,1 (Note [One server, several workers])")
    p.add_argument("--workers", type=int, default=1,
                   help="with --device: that many worker processes on it (e.g. --device cpu --workers 2, for tests)")
    p.add_argument("--front", help=argparse.SUPPRESS)        # a worker of a front: its internal address
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--dist-port", type=int, dest="dist_port", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help="TCP port (default 5556; 0 picks a free one)")
    p.add_argument("--bind", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--config", help="YAML file of ServerConfig settings")
    p.add_argument("--secret", help="shared secret (default: $DJINN_SECRET)")
    p.add_argument("--curve-secret-key", dest="curve_secret_key",
                   help="CurveZMQ: the server's secret certificate (NAME.key_secret from `djinn keys`)")
    p.add_argument("--curve-allowed-dir", dest="curve_allowed_dir",
                   help="CurveZMQ: directory of allowed client public certificates (*.key)")
    p.add_argument("--client-timeout", type=float, dest="client_timeout_s", help="seconds before a silent client's sessions are reclaimed")
    p.add_argument("--paused-run-timeout", type=float, dest="paused_run_timeout_s",
                   help="seconds a run may stay paused at a breakpoint before it is cancelled (default 600)")
    p.add_argument("--max-frame-bytes", type=int, dest="max_frame_bytes", help="largest tensor accepted in one message")
    p.add_argument("--max-connections", type=int, dest="max_connections",
                   help="clients connected at once; more are refused with ServerBusy (default 256)")
    p.add_argument("--weight-budget-gb", type=float, dest="weight_budget_gb",
                   help="default GPU weight budget per model in GiB; larger models stream layers (CUDA only)")
    p.add_argument("--policy", help="KV scheduling policy: signal (default), lru, recompute, resident")
    p.add_argument("--swap-on-io-wait", action="store_const", const=True, dest="swap_on_io_wait",
                   help="signal policy: swap out every session that signals IO_WAIT")
    p.add_argument("--host-pool-gb", type=float, dest="host_pool_gb", help="pinned host pool for swapped KV (GiB)")
    p.add_argument("--data-budget-gb", type=float, dest="data_budget_gb",
                   help="GiB of each model's KV pool (default: the device after weights and the Stack reserve)")
    p.add_argument("--kv-block-tokens", type=int, dest="kv_block_tokens", help="tokens per KV block (default 16)")
    p.add_argument("--no-prefix-caching", action="store_const", const=False, dest="prefix_caching",
                   help="do not share cached KV blocks between prompts that start with the same tokens")
    p.add_argument("--max-prefill-tokens", type=int, dest="max_prefill_tokens",
                   help="largest batch x new tokens one call feeds; sizes the Stack reserve (default 4096)")
    p.add_argument("--prefill-step-tokens", type=int, dest="prefill_step_tokens",
                   help="prompt tokens prefilled per engine turn before decoding sessions step (default 2048)")
    p.add_argument("--parent-pid", type=int, help="exit when this process is gone (embedded servers)")
    p.add_argument("--no-supervise", action="store_true",
                   help="run the server in this process, with no supervisor to restart it when it dies")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # started by the supervisor
    p.add_argument("--metrics-port", type=int, dest="metrics_port",
                   help="serve Prometheus metrics at http://127.0.0.1:PORT/metrics (0: a free port)")
    p.add_argument("--drain-timeout", type=float, dest="drain_timeout_s",
                   help="seconds a stopping server lets running generates finish (default 30)")
    p.add_argument("--quota-gpu-gb", type=float, dest="quota_gpu_gb",
                   help="per-session cap on GPU GiB (KV caches and named tensors); exceeding it is QuotaExceeded")
    p.add_argument("--quota-principal-gpu-gb", type=float, dest="quota_principal_gpu_gb",
                   help="per-principal cap on GPU GiB, all its sessions together (KV caches and named tensors)")
    p.add_argument("--graph-max-flops", type=float, dest="graph_max_flops",
                   help="per-request cost budget of a graph-path request, estimated before it runs (default 1e15)")
    p.add_argument("--quota-host-gb", type=float, dest="quota_host_gb",
                   help="per-session cap on pinned host GiB held by its swapped-out state")
    p.add_argument("--quota-queued-requests", type=int, dest="quota_queued_requests",
                   help="per-session cap on requests waiting in the engine queue")
    p.add_argument("--fast-decode", dest="fast_decode", choices=["auto", "on", "off"],
                   help="batched, CUDA-graph decode for the module path's causal LMs (auto: on CUDA devices)")
    p.add_argument("--fast-decode-max-batch", type=int, dest="fast_decode_max_batch",
                   help="rows of one batched decode step (default: what 4 GiB of workspace holds, <= 64)")
    p.add_argument("--fast-decode-attention", dest="fast_decode_attention", choices=["auto", "gather", "flex"],
                   help="decode attention over the KV blocks: flex (FlexAttention, in place), gather, auto (gather)")
    p.add_argument("--fast-decode-max-len", type=int, dest="fast_decode_max_len",
                   help="longest sequence the fast path takes (default 4096)")
    p.add_argument("--fast-decode-capture", dest="fast_decode_capture", choices=["lazy", "all"],
                   help="capture every decode graph when a model's pool is made (all, default) or each at first use (lazy)")
    p.add_argument("--fast-decode-compile", dest="fast_decode_compile", action="store_const", const=True,
                   help="compile the decode step with torch.compile before capturing its graphs")
    p.add_argument("--fast-decode-overlap", dest="fast_decode_overlap", action="store_const", const=True,
                   help="launch each decode step before reading the previous step's tokens (not yet measured on a GPU)")
    p.add_argument("--memory-history", dest="memory_history", action="store_const", const=True,
                   help="record each device allocation's frames, shown for memory no segment owns (debugging)")
    p.add_argument("--checkpoint-dir", dest="checkpoint_dir",
                   help="where sessions that asked are saved at shutdown (default /dev/shm/djinn-checkpoints)")
    p.add_argument("--log-format", dest="log_format", help="text (default) or json (one object per line)")
    p.add_argument("--log-level", dest="log_level", help="DEBUG, INFO, WARNING")
    return p.parse_args(argv)


def pick_device(args, cfg):
    """The torch.device to serve on."""
    import torch

    name = cfg.device
    if args.gpu is not None:
        name = f"cuda:{args.gpu}"
    elif args.device:
        name = args.device
    if name is None:
        name = "cuda:0" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--gpu/--device asked for {name} but this machine has no CUDA GPU; use --device cpu")
        if (device.index or 0) >= torch.cuda.device_count():
            raise SystemExit(f"{name} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def main(argv=None) -> int:
    args = parse_args(argv)
    from ..config import ServerConfig, env_secret, load_yaml

    try:
        cfg = load_yaml(ServerConfig, args.config, port=args.port, bind=args.bind,
                        secret=args.secret or env_secret(), curve_secret_key=args.curve_secret_key,
                        curve_allowed_dir=args.curve_allowed_dir, client_timeout_s=args.client_timeout_s,
                        paused_run_timeout_s=args.paused_run_timeout_s,
                        max_frame_bytes=args.max_frame_bytes, max_connections=args.max_connections,
                        weight_budget_gb=args.weight_budget_gb,
                        policy=args.policy, swap_on_io_wait=args.swap_on_io_wait, host_pool_gb=args.host_pool_gb,
                        data_budget_gb=args.data_budget_gb, drain_timeout_s=args.drain_timeout_s,
                        metrics_port=args.metrics_port, quota_gpu_gb=args.quota_gpu_gb,
                        quota_principal_gpu_gb=args.quota_principal_gpu_gb, graph_max_flops=args.graph_max_flops,
                        quota_host_gb=args.quota_host_gb, quota_queued_requests=args.quota_queued_requests,
                        fast_decode=args.fast_decode, fast_decode_max_batch=args.fast_decode_max_batch,
                        kv_block_tokens=args.kv_block_tokens, max_prefill_tokens=args.max_prefill_tokens,
                        prefill_step_tokens=args.prefill_step_tokens,
                        prefix_caching=args.prefix_caching,
                        fast_decode_max_len=args.fast_decode_max_len,
                        fast_decode_capture=args.fast_decode_capture, memory_history=args.memory_history,
                        fast_decode_compile=args.fast_decode_compile, fast_decode_overlap=args.fast_decode_overlap,
                        fast_decode_attention=args.fast_decode_attention, checkpoint_dir=args.checkpoint_dir,
                        log_format=args.log_format, log_level=args.log_level).validate()
    except (ValueError, TypeError) as e:
        print(f"djinn server: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    if cfg.log_format == "json":
        from .metrics import JsonFormatter

        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())
    if not args.worker and not args.no_supervise:
        from .supervisor import Supervisor

        return Supervisor(list(sys.argv[1:] if argv is None else argv), cfg.drain_timeout_s).run()
    import torch
    import zmq

    from .. import __version__
    from .engine import Engine
    from .router import Router

    if args.front is None and (args.gpus or args.workers > 1):
        return _serve_front(args, cfg, list(sys.argv[1:] if argv is None else argv))
    device = pick_device(args, cfg)
    if cfg.weight_budget_gb is not None and device.type != "cuda":
        print(f"djinn server: weight_budget_gb={cfg.weight_budget_gb} needs a CUDA device (weight streaming keeps "
              f"layers in pinned host memory and copies them to the GPU); this server runs on {device}: "
              "drop the setting or serve on a GPU", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    info = {
        "server": f"djinn {__version__}", "torch": torch.__version__, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "pid": os.getpid(), "boot": secrets.token_hex(8),  # a new boot id: clients see a restart
    }
    ctx = zmq.Context()
    if args.front is not None:  # a worker of a front (Note [One server, several workers])
        from .cluster.link import WorkerLink

        _join_group(args, device)
        router = WorkerLink(ctx, args.front, args.rank, cfg, info)
    else:
        try:
            router = Router(ctx, cfg, info)
        except zmq.ZMQError as e:
            print(f"djinn server: cannot listen on {cfg.bind}:{cfg.port}: {e}", file=sys.stderr)
            return 1
    engine = Engine(router, cfg, device, stop)
    engine.start()
    print(f"{READY_PREFIX}{router.address} (device {device}, {info['device_name']})", flush=True)
    while not stop.is_set():
        if args.parent_pid and not _alive(args.parent_pid):
            logging.getLogger("djinn.server").info("parent %d is gone, shutting down", args.parent_pid)
            engine.drain = False  # nobody to drain for: the supervisor (or embedding process) was killed
            stop.set()
        if not engine.is_alive():
            stop.set()
        stop.wait(0.2)  # a signal's handler sets it: the stop starts at once, not at the next tick
    engine.join(timeout=cfg.drain_timeout_s + 10)
    if not engine.is_alive():
        ctx.term()
    if engine.fatal:
        logging.getLogger("djinn.server").error("stopped: the device is unusable (%s)", engine.fatal)
        return 3  # supervisor.EXIT_FATAL_DEVICE: restart in a fresh process
    logging.getLogger("djinn.server").info("stopped")
    return 0


# Flags a front passes on to its workers as they are, minus the ones that say where and how many.
_FRONT_ONLY = ("--gpus", "--workers", "--device", "--gpu", "--port", "--bind", "--parent-pid", "--metrics-port",
               "--curve-secret-key", "--curve-allowed-dir", "--secret")


def _serve_front(args, cfg, argv: list[str]) -> int:
    """A front and one worker per device (Note [One server, several workers] in cluster/front.py)."""
    import torch

    from .. import __version__
    from .cluster.front import Front
    from .supervisor import _drop_flag

    if args.gpus:
        devices = [f"cuda:{int(g)}" for g in args.gpus.split(",")]
        if not torch.cuda.is_available() or max(int(g) for g in args.gpus.split(",")) >= torch.cuda.device_count():
            print(f"djinn server: --gpus {args.gpus} but this machine has {torch.cuda.device_count()} GPU(s)",
                  file=sys.stderr)
            return 2
    else:
        devices = [str(pick_device(args, cfg))] * args.workers
    for flag in _FRONT_ONLY:
        argv = _drop_flag(argv, flag)
    argv = [a for a in argv if a not in ("--worker", "--no-supervise")]
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    info = {"server": f"djinn {__version__}", "torch": torch.__version__, "device": ", ".join(devices),
            "device_name": f"{len(devices)} workers", "pid": os.getpid(), "boot": secrets.token_hex(8)}
    front = Front(cfg, devices, argv, info)
    code = 1
    try:
        front.wait_ready()
        address = front.listen()
        print(f"{READY_PREFIX}{address} (devices {', '.join(devices)}, {len(devices)} workers)", flush=True)
        if args.parent_pid:
            threading.Thread(target=_watch_parent, args=(args.parent_pid, stop), daemon=True).start()
        code = front.serve(stop)
    finally:
        front.close(cfg.drain_timeout_s)
    return code


def _watch_parent(pid: int, stop: threading.Event) -> None:
    while not stop.is_set():
        if not _alive(pid):
            stop.set()
        stop.wait(0.2)


def _join_group(args, device) -> None:
    """The workers' torch.distributed group: tensors between workers travel over it (gloo on CPUs,
    NCCL on GPUs); the front is not in it."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # CPU workers share the machine's cores: each its share, not every core (oversubscribed
        # OpenMP threads spin against each other: a TP=2 step of two workers ran 2x slower)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.world))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{args.dist_port}", rank=args.rank,
                            world_size=args.world, timeout=timedelta(seconds=120))
    from .cluster import tensor_parallel

    tensor_parallel.make_groups(args.world, args.rank)  # Note [Tensor-parallel sessions]: blocks of workers


def exit_process(code: int) -> None:
    """End the process once main() has returned, without the interpreter's teardown.

    Note [Exit without teardown]: by then a stop has closed everything that matters explicitly
    (sessions closed and checkpoints written, clients told, sockets closed, the zmq context
    terminated). What the interpreter would still do is finalize torch, transformers and every tensor
    and module, which took 1.5-3.5 s on a loaded 2-core machine: the time a script with an embedded
    server waited for it after its last line (frontend/embedded.py stops it at exit). atexit handlers
    do not run; the logs and stdout are flushed here."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    exit_process(main())
