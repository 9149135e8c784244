#!/usr/bin/env bash
# The GPU checks and measurements quoted in the issue notes, in one pass (about 9 minutes on an H100):
# kernel tests at real shapes (gradients included), training and decoding throughput (ours vs the upstream
# release when UPSTREAM points at a folder holding its `x_transformers` package), the op benchmark, and a profile.
#   OUT=out/h100 UPSTREAM=.upstream bash benchmarks/run_h100.sh
set -uo pipefail
OUT=${OUT:-out/h100}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
UP=()
[ -n "${UPSTREAM:-}" ] && UP=(--upstream-path "$UPSTREAM")

step() {  # step NAME SECONDS CMD...: run with a time limit, keep the whole log, show the summary lines
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date +%T))"
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/all.log" | grep -E "^\||passed|failed|FAILED|Error|tokens/s|^step"
}

nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/all.log"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/all.log"
step kernels 240 python3 -m pytest -q -p no:cacheprovider -k gpu tests/ops/test_delta_rule.py \
    tests/ops/test_gla.py tests/ops/test_hgrn.py tests/ops/test_simple_gla.py
step ops 80 python3 benchmarks/bench_ops.py --seqlens 1024,4096,16384 --no-fla --warmup 3 --reps 10 \
    --ops sdpa,chunk_simple_gla,chunk_gla,chunk_gated_delta_rule,hgrn_scan --out "$OUT/ops.json"
step decode 70 python3 benchmarks/bench_fast_decode.py --json "$OUT/fast_decode.json"
step train_flash 60 python3 benchmarks/bench_train.py "${UP[@]}" --config '{"attn_flash": true}' --json "$OUT/train_flash.json"
step train_default 50 python3 benchmarks/bench_train.py "${UP[@]}" --json "$OUT/train_default.json"
step profile_gdn 30 python3 benchmarks/profile_train.py --linear-attn gated_deltanet --seq-len 8192 --batch 2 \
    --top 15 --out "$OUT/profile_gdn.json"
step enwik8 50 torchrun --nproc_per_node 1 train_enwik8.py --num-batches 120 --validate-every 60 \
    --generate-every 120 --generate-length 64 --out-dir /tmp/enwik8_gpu
cp /tmp/enwik8_gpu/metrics.csv "$OUT/enwik8_metrics.csv" 2>/dev/null
echo "=== done ($(date +%T))"
