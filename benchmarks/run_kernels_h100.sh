#!/usr/bin/env bash
# Kernel checks and measurements on one GPU, in about 9 minutes: the op table against causal SDPA and fla (when
# importable) with each kernel's device time, a softmax training profile, then every kernel test file at real shapes
# (gradients, fp32 and bf16) in parallel processes, one log per file.
#   OUT=out/h100 bash benchmarks/run_kernels_h100.sh
set -uo pipefail
OUT=${OUT:-out/h100}
SEQLENS=${SEQLENS:-1024,4096,16384}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/all.log"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/all.log"

echo "=== ops ($(date +%T))" | tee -a "$OUT/all.log"
timeout 200 python3 benchmarks/bench_ops.py --seqlens "$SEQLENS" --warmup 3 --reps 10 --profile \
    --ops sdpa,chunk_simple_gla,chunk_gla,chunk_delta_rule,chunk_gated_delta_rule,hgrn_scan --out "$OUT/ops.json" \
    2>&1 | tee -a "$OUT/all.log" | grep -E "^\||Error"
echo "=== profile softmax training ($(date +%T))" | tee -a "$OUT/all.log"
timeout 60 python3 benchmarks/profile_train.py --top 25 --out "$OUT/profile_softmax.json" > "$OUT/profile_softmax.txt" 2>&1
tail -30 "$OUT/profile_softmax.txt"

echo "=== kernel tests ($(date +%T))" | tee -a "$OUT/all.log"
pids=()
for f in tests/ops/test_*.py tests/test_fast_paths.py tests/test_fast_decode.py; do
    name=$(basename "$f" .py)
    timeout "${TEST_LIMIT:-330}" python3 -m pytest -q -p no:cacheprovider --durations=8 "$f" > "$OUT/$name.log" 2>&1 &
    pids+=($!)
done
wait "${pids[@]}"
for f in "$OUT"/test_*.log; do echo "--- $f"; grep -E "passed|failed|FAILED|Error" "$f" | tail -12; done | tee -a "$OUT/all.log"
echo "=== done ($(date +%T))" | tee -a "$OUT/all.log"
