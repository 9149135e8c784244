#!/usr/bin/env bash
# chunk_simple_gla GPU checks and its kernel-table rows against fla (about 5 minutes on one H100/H200): the GPU tests
# of the simple gla test file (fp32 and bf16, gradients), bf16 shapes with few sequences * heads (narrowed state-pass
# tiles) in fresh processes, then the table rows.
#   OUT=out/simple_gla bash benchmarks/run_simple_gla_h100.sh
set -uo pipefail
OUT=${OUT:-out/simple_gla}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/all.log"
timeout "${TEST_LIMIT:-200}" python3 benchmarks/check_configs.py --op chunk_simple_gla --dtypes bfloat16,float32 \
    --jobs 3 --shapes 1,2000,1,128,128 1,1000,2,64,64 1,700,1,100,64 > "$OUT/shapes.log" 2>&1 &
pid=$!
timeout "${TEST_LIMIT:-200}" python3 -m pytest -q -p no:cacheprovider --durations=5 -k "gpu or state_pass" \
    tests/ops/test_simple_gla.py > "$OUT/test_simple_gla.log" 2>&1
wait $pid
grep -E "^ok|^FAIL|Error" "$OUT/shapes.log" | tee -a "$OUT/all.log"
grep -E "^FAILED|passed|failed" "$OUT/test_simple_gla.log" | tail -8 | tee -a "$OUT/all.log"
timeout "${TABLE_LIMIT:-150}" python3 benchmarks/bench_ops.py --seqlens 1024,2048,4096,8192,16384,32768 --warmup 3 \
    --reps 10 --ops chunk_simple_gla --fla-ops chunk_simple_gla --out "$OUT/ops_simple_gla.json" 2>&1 \
    | tee -a "$OUT/all.log" | grep -E "^\| |Error" | cut -c1-120
echo "=== done ($(date +%T))" | tee -a "$OUT/all.log"
