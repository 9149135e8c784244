#!/usr/bin/env bash
# One kernel family's GPU checks and kernel-table rows (5 - 6 minutes on one H100/H200): its test file's GPU tests
# (fp32 and bf16, gradients), shapes near its launch-setting edges in fresh processes (check_configs.py), then its
# table rows (fla's forward when importable).
#   delta:      bf16 heads around the fp32 reroute (narrow_value_tiles); rows of both delta ops and hgrn_scan
#   simple_gla: few sequences * heads (narrowed state-pass tiles), bf16 and fp32; rows of chunk_simple_gla
#   OUT=out/delta bash benchmarks/run_family_h100.sh delta
set -uo pipefail
FAMILY=${1:-}
case $FAMILY in
    delta)
        OP=chunk_delta_rule DTYPES=bfloat16 TEST_FILE=tests/ops/test_delta_rule.py SELECT="gpu or half_heads"
        SHAPES=(1,300,2,128,64 2,200,2,128,128 1,300,2,100,273 1,300,2,128,96 1,300,2,128,32)
        OPS=chunk_delta_rule,chunk_gated_delta_rule,hgrn_scan FLA_OPS=chunk_gated_delta_rule ;;
    simple_gla)
        OP=chunk_simple_gla DTYPES=bfloat16,float32 TEST_FILE=tests/ops/test_simple_gla.py SELECT="gpu or state_pass"
        SHAPES=(1,2000,1,128,128 1,1000,2,64,64 1,700,1,100,64)
        OPS=chunk_simple_gla FLA_OPS=chunk_simple_gla ;;
    *)
        echo "usage: run_family_h100.sh delta|simple_gla (got '$FAMILY')" >&2
        exit 2 ;;
esac
OUT=${OUT:-out/$FAMILY}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/all.log"
echo "=== checks + tests ($(date +%T))" | tee -a "$OUT/all.log"
timeout "${TEST_LIMIT:-240}" python3 benchmarks/check_configs.py --op $OP --dtypes $DTYPES --jobs 3 \
    --shapes "${SHAPES[@]}" > "$OUT/shapes.log" 2>&1 &
pid=$!
TEST_LOG="$OUT/$(basename "$TEST_FILE" .py).log"
timeout "${TEST_LIMIT:-240}" python3 -m pytest -q -p no:cacheprovider --durations=5 -k "$SELECT" "$TEST_FILE" \
    > "$TEST_LOG" 2>&1
wait $pid
grep -E "^ok|^FAIL|Error" "$OUT/shapes.log" | tee -a "$OUT/all.log"
grep -E "^FAILED|passed|failed" "$TEST_LOG" | tail -8 | tee -a "$OUT/all.log"
echo "=== table ($(date +%T))" | tee -a "$OUT/all.log"
timeout "${TABLE_LIMIT:-200}" python3 benchmarks/bench_ops.py --seqlens 1024,2048,4096,8192,16384,32768 --warmup 3 \
    --reps 10 --ops $OPS --fla-ops $FLA_OPS --out "$OUT/ops_$FAMILY.json" 2>&1 \
    | tee -a "$OUT/all.log" | grep -E "^\| |Error" | cut -c1-120
echo "=== done ($(date +%T))" | tee -a "$OUT/all.log"
