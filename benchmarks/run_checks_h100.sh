#!/usr/bin/env bash
# GPU checks, then kernel launch-setting A/B and the kernel table, about 9 minutes on one H100/H200:
#  1. in parallel, one process each: the gla, simple gla and delta-rule kernel test files at real shapes (fp32 and
#     bf16, gradients), and small-head bf16 shapes of each chunked op in fresh processes (check_configs.py; an
#     illegal memory access poisons a process);
#  2. chunk_gla's kernel times with the default tiles and with the dq / dk / dg tile knobs changed (bench_ops --set);
#  3. the kernel table: every chunked op against causal SDPA (and fla where named) at B*T = 16k, T = 1k ... 32k.
#   OUT=out/h100 bash benchmarks/run_checks_h100.sh
# (TESTS=... picks the test files, BENCH=0 stops after the checks, TABLE=0 before the table)
set -uo pipefail
OUT=${OUT:-out/h100}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/all.log"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/all.log"
echo "=== checks + tests ($(date +%T))" | tee -a "$OUT/all.log"
LIMIT=${TEST_LIMIT:-240}
CC=(timeout "$LIMIT" python3 benchmarks/check_configs.py --dtypes bfloat16 --jobs 2)
SHAPES=(1,200,4,16,16 2,80,2,16,32 2,80,2,64,16 2,80,2,32,32 1,200,2,16,64 1,200,3,64,32 1,300,2,128,64)
( for op in chunk_delta_rule chunk_gla chunk_simple_gla; do "${CC[@]}" --op $op --shapes "${SHAPES[@]}"; done ) \
    > "$OUT/small_heads.log" 2>&1 &
pids=($!)
for f in ${TESTS:-tests/ops/test_gla.py tests/ops/test_delta_rule.py tests/ops/test_simple_gla.py}; do
    timeout "$LIMIT" python3 -m pytest -q -p no:cacheprovider --durations=5 "$f" > "$OUT/$(basename "$f" .py).log" 2>&1 &
    pids+=($!)
done
wait "${pids[@]}"
grep -E "^ok|^FAIL|Error" "$OUT/small_heads.log" | tee -a "$OUT/all.log"
for f in "$OUT"/test_*.log; do echo "--- $f"; grep -E "^FAILED|passed|failed" "$f" | tail -8; done | tee -a "$OUT/all.log"

[ "${BENCH:-1}" = 0 ] && exit 0

step() {  # step NAME SECONDS CMD...
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date +%T))" | tee -a "$OUT/all.log"
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/all.log" | grep -E "tokens/s|^\| |Error|->|^ +[0-9.]+ us"
}
G=x_transformers.ops.gla.chunk
GLA=(python3 benchmarks/bench_ops.py --no-fla --warmup 3 --reps 10 --ops chunk_gla --seqlens 4096)
step gla_default 40 "${GLA[@]}" --profile --out "$OUT/gla_default.json"
step gla_dqkg_bk128 30 "${GLA[@]}" --set $G.DQKG_BK_CAP=128 --out "$OUT/gla_dqkg_bk128.json"
step gla_dqkg_bv128 30 "${GLA[@]}" --set $G.DQKG_BV_CAP=128 --out "$OUT/gla_dqkg_bv128.json"
step gla_unfused 30 "${GLA[@]}" --set $G.FUSED_INTRA_BWD=False --out "$OUT/gla_unfused.json"
[ "${TABLE:-1}" = 0 ] && exit 0
step table ${TABLE_LIMIT:-280} python3 benchmarks/bench_ops.py --seqlens 1024,2048,4096,8192,16384,32768 --warmup 3 \
    --reps 10 --ops sdpa,chunk_simple_gla,chunk_gla,chunk_delta_rule,chunk_gated_delta_rule,hgrn_scan \
    --fla-ops chunk_simple_gla,chunk_gated_delta_rule --out "$OUT/ops_table.json"
echo "=== done ($(date +%T))" | tee -a "$OUT/all.log"
