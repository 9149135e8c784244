#!/usr/bin/env bash
# Delta-rule GPU checks and its kernel-table rows (about 6 minutes on one H100/H200): the delta-rule test file at
# real shapes (fp32 and bf16, gradients), bf16 shapes around the fp32 reroute (narrow_value_tiles) in fresh
# processes, then the table rows of both delta ops (fla's gated forward when importable) and hgrn_scan.
#   OUT=out/delta bash benchmarks/run_delta_h100.sh
set -uo pipefail
OUT=${OUT:-out/delta}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/all.log"
echo "=== checks + tests ($(date +%T))" | tee -a "$OUT/all.log"
timeout "${TEST_LIMIT:-240}" python3 benchmarks/check_configs.py --op chunk_delta_rule --dtypes bfloat16 --jobs 3 \
    --shapes 1,300,2,128,64 2,200,2,128,128 1,300,2,100,273 1,300,2,128,96 1,300,2,128,32 > "$OUT/shapes.log" 2>&1 &
pid=$!
timeout "${TEST_LIMIT:-240}" python3 -m pytest -q -p no:cacheprovider --durations=5 -k "gpu or half_heads" \
    tests/ops/test_delta_rule.py > "$OUT/test_delta_rule.log" 2>&1
wait $pid
grep -E "^ok|^FAIL|Error" "$OUT/shapes.log" | tee -a "$OUT/all.log"
grep -E "^FAILED|passed|failed" "$OUT/test_delta_rule.log" | tail -8 | tee -a "$OUT/all.log"
echo "=== table ($(date +%T))" | tee -a "$OUT/all.log"
timeout "${TABLE_LIMIT:-200}" python3 benchmarks/bench_ops.py --seqlens 1024,2048,4096,8192,16384,32768 --warmup 3 \
    --reps 10 --ops chunk_delta_rule,chunk_gated_delta_rule,hgrn_scan --fla-ops chunk_gated_delta_rule \
    --out "$OUT/ops_delta.json" 2>&1 | tee -a "$OUT/all.log" | grep -E "^\| |Error"
echo "=== done ($(date +%T))" | tee -a "$OUT/all.log"
