#!/usr/bin/env bash
# The GPU checks and measurements quoted in the issue notes, in one pass (about 10 minutes on an H100): kernel tests at
# real shapes (gradients included), the GPU tests of the fast paths, training throughput (ours vs the upstream release
# when UPSTREAM points at a folder holding its `x_transformers` package), decoding, the op table and the short conv.
#   OUT=out/h100 UPSTREAM=.upstream bash benchmarks/run_h100.sh
# The full kernel suites take longer: `python -m pytest -q -k gpu tests/ops/test_<family>.py`, one family per process.
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
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/all.log" | grep -E "^\||passed|failed|FAILED|Error|tokens/s|^(softmax|gdn)"
}

nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/all.log"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/all.log"
step delta_tests 90 python3 -m pytest -q -p no:cacheprovider -k "gpu and bf16 and not benchmark_shape" \
    tests/ops/test_delta_rule.py
step fast_path_tests 70 python3 -m pytest -q -p no:cacheprovider -k "cuda or gpu or sdpa" tests/ops/test_conv.py \
    tests/test_fast_paths.py tests/test_fast_decode.py
step train_default 55 python3 benchmarks/bench_train.py "${UP[@]}" --json "$OUT/train_default.json"
step train_flash 55 python3 benchmarks/bench_train.py "${UP[@]}" --config '{"attn_flash": true}' --json "$OUT/train_flash.json"
step train_gdn_1k 35 python3 benchmarks/bench_train.py --linear-attn gated_deltanet --json "$OUT/train_gdn_1k.json"
step train_gdn_8k 35 python3 benchmarks/bench_train.py --linear-attn gated_deltanet --seq-len 8192 --batch 2 \
    --json "$OUT/train_gdn_8k.json"
step decode 120 python3 benchmarks/bench_fast_decode.py --json "$OUT/decode.json"
step decode_fp32 30 python3 benchmarks/bench_fast_decode.py --precision fp32 --cases softmax --warmup 1 --repeats 1
step ops 70 python3 benchmarks/bench_ops.py --seqlens 1024,4096,16384 --no-fla --warmup 3 --reps 10 \
    --ops sdpa,chunk_simple_gla,chunk_gla,chunk_delta_rule,chunk_gated_delta_rule,hgrn_scan --out "$OUT/ops.json"
step conv 20 python3 benchmarks/bench_conv.py --out "$OUT/conv.json"
echo "=== done ($(date +%T))"
