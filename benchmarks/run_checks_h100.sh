#!/usr/bin/env bash
# GPU checks then training throughput, about 9 minutes on one H100/H200:
#  1. the delta rule's launch settings at small head dims in fresh processes (check_configs.py), in parallel with
#     the kernel / fast-path test files (one process each);
#  2. the kernel table of chunk_gla and the delta rule; training tokens/s with the fused rotary + LayerNorm kernels
#     and without (X_TRANSFORMERS_FUSED=0), with the step captured as a CUDA graph, gated DeltaNet at 1k and 8k.
#   OUT=out/h100 bash benchmarks/run_checks_h100.sh
set -uo pipefail
OUT=${OUT:-out/h100}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/all.log"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/all.log"
D=x_transformers.ops.delta_rule.chunk
echo "=== checks + tests ($(date +%T))" | tee -a "$OUT/all.log"
timeout ${TEST_LIMIT:-180} python3 benchmarks/check_configs.py --dtypes bfloat16 --jobs 6 --json "$OUT/delta_configs.json" \
    --shapes 2,80,2,16,32 2,80,2,32,32 2,80,2,16,64 2,80,2,64,64 1,200,4,16,16 \
    --set "" "$D.WY_STAGES=2" "$D.STATE_WARPS=4" "$D.STATE_STAGES=3" "$D.BWD_STAGES=2" > "$OUT/delta_configs.log" 2>&1 &
pids=($!)
for f in ${TESTS:-tests/ops/test_delta_rule.py tests/ops/test_rotary.py tests/ops/test_layer_norm.py \
        tests/ops/test_gla.py tests/test_fast_paths.py}; do
    timeout ${TEST_LIMIT:-180} python3 -m pytest -q -p no:cacheprovider --durations=5 "$f" > "$OUT/$(basename "$f" .py).log" 2>&1 &
    pids+=($!)
done
timeout ${TEST_LIMIT:-180} python3 -m pytest -q -p no:cacheprovider -k "cuda or gpu or sdpa or graph or fsdp" \
    tests/test_fast_decode.py > "$OUT/test_fast_decode.log" 2>&1 &
pids+=($!)
timeout ${TEST_LIMIT:-180} python3 -m pytest -q -p no:cacheprovider -k graphed tests/test_train.py > "$OUT/test_train.log" 2>&1 &
pids+=($!)
# the small-head bf16 case apart, so that an illegal memory access there cannot fail the rest of the file
timeout ${TEST_LIMIT:-180} python3 -m pytest -q -p no:cacheprovider -k "not test_bf16" tests/ops/test_delta_rule.py \
    > "$OUT/test_delta_rule_rest.log" 2>&1 &
pids+=($!)
wait "${pids[@]}"
cat "$OUT/delta_configs.log" | tee -a "$OUT/all.log"
for f in "$OUT"/test_*.log; do echo "--- $f"; grep -E "^FAILED|passed|failed" "$f" | tail -8; done | tee -a "$OUT/all.log"

step() {  # step NAME SECONDS CMD...
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date +%T))" | tee -a "$OUT/all.log"
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/all.log" | grep -E "tokens/s|^ *ours|^step|Error|->|^ +[0-9.]+ us"
}
step ops_gla 80 python3 benchmarks/bench_ops.py --seqlens 1024,4096,16384 --no-fla --warmup 3 --reps 10 --profile \
    --ops sdpa,chunk_gla,chunk_delta_rule,chunk_gated_delta_rule --out "$OUT/ops.json"
step train_fused 50 python3 benchmarks/bench_train.py --json "$OUT/train_fused.json"
[ -n "${AB:-}" ] && step train_unfused 50 env X_TRANSFORMERS_FUSED=0 python3 benchmarks/bench_train.py \
    --json "$OUT/train_unfused.json"
step train_graph 50 python3 benchmarks/bench_train.py --cuda-graph --json "$OUT/train_graph.json"
step train_gdn_1k_graph 45 python3 benchmarks/bench_train.py --linear-attn gated_deltanet --cuda-graph \
    --json "$OUT/train_gdn_1k_graph.json"
step train_gdn_8k_graph 45 python3 benchmarks/bench_train.py --linear-attn gated_deltanet --seq-len 8192 --batch 2 \
    --cuda-graph --json "$OUT/train_gdn_8k_graph.json"
step train_sm_8k_graph 45 python3 benchmarks/bench_train.py --seq-len 8192 --batch 2 --cuda-graph \
    --json "$OUT/train_sm_8k_graph.json"
echo "=== done ($(date +%T))" | tee -a "$OUT/all.log"
