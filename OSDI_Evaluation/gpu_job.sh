#!/usr/bin/env bash
# One GPU job, as run on the device machines: `OSDI_Evaluation/gpu_job.sh OUTDIR PART...`.
# Parts: exp1 ($EXP1_POLICIES, default signal,resident, at N=$EXP1_AGENTS, default 16,48,96), fork (forks at a 2k prefix on
# 13B), exp1s (signal alone at N=$EXP1_AGENTS, default 48), exp1b (lru and recompute at N=48, the shared-prefix
# variant at N=48), micro (session and run forks at a 2k prefix on 13B, 7B decode speed against HF
# eager, swap by blocks), decode (7B decode with gather and flex attention,
# 32 rows at 128 and 2k tokens, 32 remote sessions, steered and recorded generates, swap by blocks),
# exp3 (white-box debugging on the 7B shape: breakpoints, steering, hooks that never fire), exp1m (the mixed
# step: $EXP1_POLICIES, default signal, at $EXP1_AGENTS, default 48,80, flex and 512-token chunks), streamed
# (16 sessions on a streamed 13B shape vs one), check (what was built without a GPU: tier-3 tests, decode
# with flex and the compiled step, the flood reference), remote (7B decode at 1/32/64 rows, in process
# and remote, flex), overlap (the same with overlapped steps), cluster (two GPUs: migration, tensor parallelism),
# gpu-tests (tier 3 alone), next (the open measurements in the order they matter, one call). Each writes its
# JSON and log under OUTDIR.
set -u
out=${1:?usage: gpu_job.sh OUTDIR PART...}; shift
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt"
here=$(cd "$(dirname "$0")" && pwd)
for part in "$@"; do
  case $part in
    exp1)
      budget=${EXP1_BUDGET_S:-560}
      pol=${EXP1_POLICIES:-signal,resident}
      timeout $((budget + 25)) python "$here/exp1_semantic_scheduler/run_exp1.py" --policies "$pol" \
        --agents "${EXP1_AGENTS:-16,48,96}" --shared-base --time-budget-s "$budget" --out "$out" --name "exp1_${pol//,/_}" 2>&1 \
        | tee "$out/exp1_${pol//,/_}.log" | tail -25 ;;
    fork)
      timeout 150 python "$here/micro/bench_fork.py" --shape 13b --prefix 2048 --out "$out/fork.json" 2>&1 | tail -5 ;;
    exp1b)
      timeout 400 python "$here/exp1_semantic_scheduler/run_exp1.py" --policies lru,recompute --agents 48 \
        --time-budget-s 380 --out "$out" --name exp1_lru_recompute 2>&1 | tee "$out/exp1_lru_recompute.log" | tail -12
      timeout 200 python "$here/exp1_semantic_scheduler/run_exp1.py" --policies signal --agents 48 \
        --shared-prefix-tokens 1024 --time-budget-s 190 --out "$out" --name exp1_shared_prefix 2>&1 \
        | tee "$out/exp1_shared_prefix.log" | tail -8 ;;
    micro)
      timeout 120 python "$here/micro/bench_fork.py" --shape 13b --prefix 2048 --out "$out/fork.json" 2>&1 | tail -5
      timeout 200 python "$here/exp_decode/bench_decode.py" --shapes 7b --concurrency 1,32 --max-sessions 32 \
        --out "$out/decode_7b.json" 2>&1 | tail -12
      timeout 60 python "$here/micro/bench_swap.py" --quick --out "$out/swap.json" 2>&1 | tail -8 ;;
    exp1m)  # the mixed step (decode rows and $EXP1_CHUNK-token prompt chunks, default 512, in one forward), flex
      budget=${EXP1_BUDGET_S:-320}
      pol=${EXP1_POLICIES:-signal}
      chunk=${EXP1_CHUNK:-512}
      timeout $((budget + 25)) python "$here/exp1_semantic_scheduler/run_exp1.py" --policies "$pol" \
        --agents "${EXP1_AGENTS:-48,80}" --time-budget-s "$budget" --server-arg=--fast-decode-attention \
        --server-arg=flex --server-arg=--prefill-step-tokens --server-arg="$chunk" --out "$out" \
        --name "exp1_mixed${chunk}_${pol//,/_}" 2>&1 | tee "$out/exp1_mixed${chunk}_${pol//,/_}.log" | tail -30 ;;
    streamed)  # N sessions decoding a 13B shape streamed at a 12 GiB budget, against one session
      timeout 300 python "$here/exp2_virtual_memory/bench_streamed_batch.py" --out "$out" 2>&1 | tail -8 ;;
    exp1s)
      budget=${EXP1_BUDGET_S:-170}
      timeout $((budget + 25)) python "$here/exp1_semantic_scheduler/run_exp1.py" --policies signal \
        --agents "${EXP1_AGENTS:-48}" --time-budget-s "$budget" --out "$out" --name exp1_signal 2>&1 \
        | tee "$out/exp1_signal.log" | tail -12 ;;
    decode)
      timeout 240 python "$here/exp_decode/bench_decode.py" --shapes 7b --concurrency 1,32 --max-sessions 32 \
        --long-prompt 2048 --server-attention flex --out "$out/decode_7b.json" > "$out/decode_7b.log" 2>&1
      grep -v -i warn "$out/decode_7b.log" | grep -E "^\[|Error|error" | tail -20
      timeout 40 python "$here/micro/bench_swap.py" --quick --out "$out/swap.json" 2>&1 | tail -6 ;;
    exp3)
      timeout 300 python "$here/exp3_whitebox_debugging/run_exp3.py" --models llama7b --out "$out" > "$out/exp3.log" 2>&1
      tail -15 "$out/exp3.log" ;;
    check)  # what was built without a GPU: its tier-3 tests, 7B decode at 1/32/64 with flex and the compiled
      # step, the flood reference in process (about 560 s: a call of its own)
      timeout 150 python -m pytest -v -rfE -p no:cacheprovider tests/gpu/test_mixed_step_gpu.py \
        tests/gpu/test_compiled_step_gpu.py tests/gpu/test_streaming.py tests/unit/test_paged_step.py \
        > "$out/check_tests.log" 2>&1
      grep -E "FAILED|ERROR|passed|failed" "$out/check_tests.log" | tail -12
      timeout 300 python "$here/exp_decode/bench_decode.py" --shapes 7b --concurrency 1,32,64 --max-sessions 64 \
        --server-attention flex --compile-rows 1 --out "$out/decode_7b_flex_compile.json" > "$out/decode.log" 2>&1
      grep -v -i warn "$out/decode.log" | grep -E "^\[|Error|error" | tail -20
      timeout 100 python "$here/micro/flood_reference_check.py" > "$out/flood.log" 2>&1
      tail -3 "$out/flood.log" ;;
    remote)  # 7B decode at 1/32/64 rows with flex, in process and from as many remote sessions (about 300 s)
      timeout 330 python "$here/exp_decode/bench_decode.py" --shapes 7b --concurrency 1,32,64 --max-sessions 64 \
        --attentions flex --server-attention flex --out "$out/decode_7b_remote.json" > "$out/decode_remote.log" 2>&1
      grep -v -i warn "$out/decode_remote.log" | grep -E "^\[|Error|error" | tail -20 ;;
    overlap)  # as remote, with overlapped steps (Note [Overlapped steps]): in process both ways, the server overlapped
      timeout 330 python "$here/exp_decode/bench_decode.py" --shapes 7b --concurrency 1,32,64 --max-sessions 64 \
        --attentions flex --server-attention flex --overlap --out "$out/decode_7b_overlap.json" > "$out/decode_overlap.log" 2>&1
      grep -v -i warn "$out/decode_overlap.log" | grep -E "^\[|Error|error" | tail -20 ;;
    cluster)  # two GPUs (nvidia-h100-x2): migration GPU to GPU, 13B TP=2 vs one GPU, a 34B shape at TP=2
      timeout 560 python "$here/exp_cluster/bench_cluster.py" --gpus 0,1 --out "$out/cluster.json" > "$out/cluster.log" 2>&1
      grep -E "^\[|wrote" "$out/cluster.log" | tail -8 ;;
    gpu-tests)  # about 280 s on an H100 (e6e6b3a): a call of its own
      timeout 420 python -m pytest -v -rfE --durations=12 tests/gpu -p no:cacheprovider > "$out/gpu_tests.log" 2>&1
      grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed" "$out/gpu_tests.log" | tail -70 ;;
    next)  # the open measurements in the order they matter, in one call of about 590 s: the tier-3 tests of
      # what has not run on a GPU (mixed and compiled step, batched streaming, overlapped steps, a run's
      # batched steps), then exp1 at real scale (signal at N=1/16/48/80, flex, 2048-token chunks; about 310 s
      # by the script's estimate) with where the fast path's time went; resident in a call of its own
      timeout 150 python -m pytest -q -rfE -p no:cacheprovider tests/gpu/test_mixed_step_gpu.py \
        tests/gpu/test_compiled_step_gpu.py "tests/gpu/test_streaming.py::test_sessions_of_a_streamed_model_decode_in_one_batch_per_pass" \
        tests/gpu/test_overlap_gpu.py tests/gpu/test_runs_gpu.py > "$out/retest.log" 2>&1
      grep -E "FAILED|ERROR|passed|failed" "$out/retest.log" | tail -8
      EXP1_CHUNK=${EXP1_CHUNK:-2048} EXP1_POLICIES=${EXP1_POLICIES:-signal} EXP1_AGENTS=${EXP1_AGENTS:-16,48,80} \
        EXP1_BUDGET_S=${EXP1_BUDGET_S:-400} "$0" "$out" exp1m ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
  esac
done
