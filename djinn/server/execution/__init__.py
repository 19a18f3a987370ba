"""Execution: how a tenant's call runs on the device once a handler has checked it. The module path
(executor, validate, sampling), the graph path (interpreter, graph_runs), a generate stepped among
others (tasks), the decode fast path over KV blocks (fastpath, fast_task, paged_step, prefill_step,
paged_attention, paged_cache, kv_pools), breakpoint runs (breakpoints, runs, edits) and the random
stream of each call (rng)."""
