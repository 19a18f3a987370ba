"""Tier 3 (GPU): the VMU in a real server on cuda:0, where KV memory is what limits it.

The model is a Llama built on the server from its config (README "send only the config") with KV
that matters: 8 layers x keys and values x 8 heads of 128 in fp16 is 32 KiB a token, so a 16-token
block is 512 KiB and a `--data-budget-gb 0.25` pool holds 512 blocks. A session here runs 3 turns
of a 512-token prompt + 64 new tokens: 36, 72, then 108 blocks (54 MiB), so the pool holds about
four finished sessions and 48 sessions need twelve times what it holds.

- The flood: 48 sessions on 8 client connections, each in its own worker, 3 turns with an IO_WAIT
  signal (a simulated tool call) between turns, then closed. Nothing may fail: no djinn.OutOfMemory,
  no CUDA out-of-memory, no timeout; every sequence has its length; sampled sessions (generated with
  deterministic=True, the eager path) equal a local greedy generate bit for bit; once every session
  closed, every block of the pool is free again and the host pool is empty.
  `signal` runs every session at once: it makes room by swapping idle sessions' blocks to the host.
  `resident` never moves KV, so a session it admitted can only go on while its later turns fit: when
  every resident session waits to grow and none fits, nothing can free a block (under resident no
  policy may swap or drop) and the server can only hang or fail. So under resident the client runs
  as many sessions at once as the pool holds finished ones (4 x 108 <= 512 blocks), the density
  resident offers, and the 48 sessions go through in turn.
- The VMU's own sizing, with no data budget: after one generate the model's pool plan shows a
  measured Stack reserve and a pool that takes most of what was free, and the bytes add up against
  the device's memory.
"""
from __future__ import annotations

import queue
import random
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

from djinn.config import ClientConfig
from djinn.frontend.connection import Connection
from djinn.frontend.remote import RemoteModel

pytestmark = pytest.mark.gpu
DEV = "cuda:0"
GIB = 1 << 30

SESSIONS, CONNECTIONS, TURNS, PROMPT, NEW = 48, 8, 3, 512, 64
BUDGET_GB = 0.25
#: Sessions generated with deterministic=True (eager) and compared with a local greedy generate.
REFERENCE = (0, 29)
#: Workers running sessions at once, per policy (module docstring).
WORKERS = {"signal": SESSIONS, "resident": 4}
#: No call may take longer; the flood as a whole ends by FLOOD_S or fails with the server's view.
CALL_TIMEOUT_S = 150.0
FLOOD_S = 160.0
#: No turn completed for this long: the server's view is kept for the failure message.
STALL_S = 20.0
GEN = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)


def flood_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096,
                       bos_token_id=1, eos_token_id=2)


def prompt(i: int, turn: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * i + turn)
    return torch.randint(3, 4096, (1, PROMPT), generator=g)


def think_s(i: int, turn: int) -> float:
    return random.Random(1000 * i + turn).uniform(0.05, 0.4)


def local_model(cfg) -> torch.nn.Module:
    """Bitwise the server's model: README "send only the config"."""
    torch.manual_seed(0)
    with torch.device(DEV):
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).eval()


def local_turns(model, i: int) -> list[tuple[torch.Tensor, dict[int, torch.Tensor]]]:
    """What one flood session's turns give locally: a DynamicCache kept across generate calls. Each
    turn's sequence, and the scores each generated position was chosen from (position -> [vocab])."""
    cache = DynamicCache(config=model.config)
    ids = torch.zeros(1, 0, dtype=torch.long, device=DEV)
    out = []
    for turn in range(TURNS):
        start = ids.shape[1] + PROMPT
        with torch.no_grad():
            res = model.generate(torch.cat([ids, prompt(i, turn).to(DEV)], 1), past_key_values=cache,
                                 output_scores=True, return_dict_in_generate=True, **GEN)
        ids = res.sequences
        out.append((ids.cpu(), {start + k: sc[0].float().cpu() for k, sc in enumerate(res.scores)}))
    return out


def equal_or_tied(got: torch.Tensor, want: torch.Tensor, scores: dict[int, torch.Tensor]) -> tuple[bool, bool]:
    """(agrees, tied): got equals want, or first differs at a generated position where the local run's
    best two scores were exactly equal (fp16 greedy on random weights ties now and then; on an H100,
    16f090e, session 29 tied at token 562, and another kernel order picks the other token) and got took
    one of the tied tokens. After a tie the sequences part, so nothing later can be compared."""
    if torch.equal(got, want):
        return True, False
    if got.shape != want.shape:
        return False, False
    at = int((got[0] != want[0]).nonzero()[0])
    sc = scores.get(at)
    if sc is None:
        return False, False
    best = sc.max()
    return bool(sc[want[0, at]] == best and sc[got[0, at]] == best), True


@pytest.mark.parametrize("policy", ["signal", "resident"])
def test_flood_of_sessions_over_a_small_kv_pool_has_no_failures(start_server, policy):
    srv = start_server("--policy", policy, "--data-budget-gb", str(BUDGET_GB), device=DEV)
    cfg = flood_config()
    client = ClientConfig(call_timeout_s=CALL_TIMEOUT_S)
    conns = [Connection(srv.address, None, client) for _ in range(CONNECTIONS)]
    generations = [c.transport.generation for c in conns]
    # One keeper session per client holds the model (a session may only attach a model its own client
    # holds), and keeps it, and so its KV pool, alive until the pool was checked.
    keepers = [c.session(f"keeper{n}") for n, c in enumerate(conns)]
    models = [RemoteModel.from_config(k, cfg, seed=0, dtype=torch.float16) for k in keepers]
    mid = models[0].model_id
    assert all(m.model_id == mid for m in models), "the same (config, seed, dtype) is one model"

    todo: queue.Queue[int] = queue.Queue()
    for i in range(SESSIONS):
        todo.put(i)
    lock = threading.Lock()
    failures: list[str] = []
    seqs: dict[int, list[torch.Tensor]] = {}
    decode: dict[int, dict] = {}
    progress: list[tuple[int, int]] = []   # turns done (list.append is atomic)

    def one_session(i: int) -> None:
        conn, rm = conns[i % CONNECTIONS], models[i % CONNECTIONS]
        s = conn.session(f"flood{i}")
        out = []
        try:
            for turn in range(TURNS):
                if turn:
                    eta = think_s(i, turn)
                    with s.io_wait(eta_s=eta):   # IO_WAIT now, COMPUTE on leaving
                        time.sleep(eta)
                out.append(s.generate(rm, prompt(i, turn), deterministic=i in REFERENCE, **GEN))
                progress.append((i, turn))
            decode[i] = s.stats().get("decode") or {}
        finally:
            s.close()
        with lock:
            seqs[i] = out

    def worker() -> None:
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            try:
                one_session(i)
            except Exception as e:  # noqa: BLE001 - every failure is collected and reported
                with lock:
                    failures.append(f"session {i}: {type(e).__name__}: {e}")

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, name=f"flood-{n}", daemon=True) for n in range(WORKERS[policy])]
    for t in threads:
        t.start()
    stalled = None        # the server's view when no turn had completed for STALL_S
    seen, last = 0, t0
    while any(t.is_alive() for t in threads) and time.monotonic() - t0 < FLOOD_S:
        time.sleep(0.5)
        now = time.monotonic()
        if len(progress) != seen:
            seen, last = len(progress), now
        elif stalled is None and now - last > STALL_S:
            stalled = f"no turn completed for {STALL_S:.0f} s after {seen} turns: " + server_view(conns[0])
    elapsed = time.monotonic() - t0
    try:
        stuck = [t.name for t in threads if t.is_alive()]
        assert not stuck, (f"{policy}: the flood did not end in {FLOOD_S:.0f} s ({len(stuck)} workers still waiting, "
                           f"{len(failures)} failures: {failures[:5]}); {stalled or server_view(conns[0])}")
        server_log = srv.log_text()
        assert not failures, f"{policy}: {len(failures)} of {SESSIONS} sessions failed: {failures[:10]}; {stalled}"
        for bad in ("out of memory", "OutOfMemory", "Traceback"):
            assert bad not in server_log, f"{policy}: the server log shows {bad!r}:\n{srv.log_tail(60)}"
        assert srv.alive() and [c.transport.generation for c in conns] == generations, "the server restarted"

        assert sorted(seqs) == list(range(SESSIONS))
        for i, out in seqs.items():
            assert [o.shape for o in out] == [(1, (t + 1) * (PROMPT + NEW)) for t in range(TURNS)], i
            for t in range(1, TURNS):
                assert torch.equal(out[t][:, :out[t - 1].shape[1]], out[t - 1]), (i, t)   # a turn continues the last
        for i in REFERENCE:
            assert decode[i].get("fast", 0) == 0, (i, decode[i])   # deterministic=True: the eager path

        st = conns[0].stats()
        kv = st["kv"]["models"][mid]
        sched = st["scheduler"]
        assert kv["blocks_total"] == int(BUDGET_GB * GIB) // kv["block_bytes"], kv
        assert kv["block_bytes"] == 16 * 32 * 1024
        # Every session closed: no block is held. Prompts' full blocks stay cached for later prompts to share
        # (Note [Prefix sharing]); unreferenced, they are evictable and count as free.
        assert kv["blocks_held"] == 0 and kv["blocks_cached"] + kv["blocks_free"] == kv["blocks_total"], kv
        assert kv["host_blocks_used"] == 0 and sched["host_pool"]["used"] == 0, (kv, sched)
        assert st["segments"]["data"] == 0 and st["segments"]["host"] == 0, st["segments"]
        assert sched["queued"] == 0 and sched["prefetch_failures"] == 0, sched
        if policy == "signal":
            assert sched["swaps_out"] > 0 and sched["swaps_in"] > 0, sched   # the pool was too small for all
        else:
            assert sched["swaps_out"] == 0 and sched["drops"] == 0, sched    # resident moves nothing
        print(f"\n{policy}: {SESSIONS} sessions x {TURNS} turns in {elapsed:.1f} s on {WORKERS[policy]} workers; "
              f"swaps out/in {sched['swaps_out']}/{sched['swaps_in']}, {sched['bytes_moved'] / 2**20:.0f} MiB moved, "
              f"queued {sched['queue_s']:.1f} s in all; prefetch hits/misses {sched['prefetch_hits']}/"
              f"{sched['prefetch_misses']}; decode of session 1 {decode.get(1)}")
    finally:
        for k in keepers:
            k.close()
        for c in conns:
            c.close()

    model = local_model(cfg)
    try:
        for i in REFERENCE:
            for turn, (got, (want, scores)) in enumerate(zip(seqs[i], local_turns(model, i))):
                agrees, tied = equal_or_tied(got, want, scores)
                assert agrees, f"{policy}: session {i} turn {turn} differs from a local greedy generate"
                if tied:
                    break
    finally:
        del model
        torch.cuda.empty_cache()


def server_view(conn: Connection) -> str:
    """What the scheduler holds and why sessions wait: for a failure message."""
    st = conn.stats()
    waiting = {sid[:8]: (v["state"], v["gpu_bytes"], v["host_bytes"], v["job"])
               for sid, v in st["sessions"].items() if v["job"] or v["state"] not in ("ACTIVE", "NEW")}
    return f"scheduler {st['scheduler']}; kv {st['kv']}; sessions waiting or away {waiting}"


def sizing_config() -> LlamaConfig:
    # 16 layers x k,v x 16 heads of 128 in fp16: 128 KiB a token, so kv_pool_max_tokens (1 Mi tokens:
    # 128 GiB) does not cap the pool below half of an H100's or H200's free memory.
    return LlamaConfig(vocab_size=4096, hidden_size=2048, intermediate_size=4096, num_hidden_layers=16,
                       num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096,
                       bos_token_id=1, eos_token_id=2)


def test_without_a_data_budget_the_vmu_sizes_the_pool_from_the_device(start_server):
    srv = start_server("--memory-history", device=DEV)  # a failure names where unowned bytes came from
    conn = Connection(srv.address, None)
    try:
        s = conn.session()
        rm = RemoteModel.from_config(s, sizing_config(), seed=0, dtype=torch.float16)
        out = s.generate(rm, torch.randint(3, 4096, (1, 16), generator=torch.Generator().manual_seed(0)),
                         max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        assert out.shape == (1, 20)
        st = conn.stats()
        plan = st["models"][rm.model_id]["kv_pool"]
        kv = st["kv"]["models"][rm.model_id]
        text, pools = st["segments"]["text"], st["segments"]["kv_pools"]
        total = torch.cuda.get_device_properties(DEV).total_memory
        free_now, _ = torch.cuda.mem_get_info(DEV)
        used = total - free_now                       # every process's, this one's CUDA context included
        view = f"plan {plan}, text {text}, kv_pools {pools}, device total {total}, used {used}"
        assert plan["stack_reserve"] > 0 and plan["profile_peak"] > 0 and plan["pool_bytes"] > 0, view
        assert pools == plan["pool_bytes"] == kv["bytes"] and kv["blocks_total"] == plan["blocks"] - 1, view
        assert text > 0 and text + pools <= used, view             # the server holds what it says it holds
        assert text + pools + plan["stack_reserve"] <= total, view  # and left its Stack reserve free
        # The pool is what was free after the Stack reserve (plus the scratch block), most of the device.
        assert plan["pool_bytes"] <= plan["free_before"] - plan["stack_reserve"] + kv["block_bytes"], view
        assert plan["pool_bytes"] > 0.5 * plan["free_before"], view
        # What the segments account for and what torch's allocator holds agree within 2 % (issue: the VMU
        # owns device memory; Note [Device memory agrees]): weights, the KV pool, Data outside it, paused
        # runs, and the steps' workspaces (their buffers, the graphs' pool, the allocator's cache).
        mem, seg = st["device_memory"], st["segments"]
        accounted = text + pools + seg["data_outside_pools"] + seg["stack"] + seg["workspace"]
        assert abs(mem["reserved"] - accounted) <= 0.02 * mem["reserved"], (mem, seg, view)
        assert mem["owned"]["kv_pools"] >= pools and abs(mem["owned"]["text"] - text) <= 0.01 * text, (mem, seg)
        assert seg["workspace"] <= plan["stack_reserve"], (mem, seg, view)  # the steps fit the reserve made for them
        print(f"\nKV pool {plan['pool_bytes'] / GIB:.1f} GiB of {plan['free_before'] / GIB:.1f} GiB free "
              f"(Stack reserve {plan['stack_reserve'] / GIB:.2f} GiB, prefill peak {plan['profile_peak'] / GIB:.2f} "
              f"GiB, {plan['decode_rows']} decode rows) on {torch.cuda.get_device_name(DEV)}, {plan['seconds']} s")
    finally:
        conn.close()
