#!/usr/bin/env bash
# GPU checks, then kernel launch-setting A/B and training throughput, about 8 minutes on one H100/H200:
#  1. in parallel, one process each: the gla and delta-rule kernel test files at real shapes (fp32 and bf16,
#     gradients), the CUDA-graph training-step test, and the delta rule's small-key bf16 shapes in fresh processes
#     (check_configs.py; an illegal memory access poisons a process);
#  2. chunk_gla's kernel times with the default tiles and with each tile knob changed (bench_ops.py --set);
#  3. training tokens/s of the softmax model: eager, and the step captured as a CUDA graph at 16 x 1024 and 2 x 8192.
#   OUT=out/h100 bash benchmarks/run_checks_h100.sh
set -uo pipefail
OUT=${OUT:-out/h100}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/all.log"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/all.log"
echo "=== checks + tests ($(date +%T))" | tee -a "$OUT/all.log"
LIMIT=${TEST_LIMIT:-240}
timeout "$LIMIT" python3 benchmarks/check_configs.py --dtypes bfloat16 --jobs 4 --json "$OUT/delta_configs.json" \
    --shapes 2,80,2,16,32 2,80,2,16,64 1,200,4,16,16 2,80,2,32,32 --set "" > "$OUT/delta_configs.log" 2>&1 &
pids=($!)
for f in ${TESTS:-tests/ops/test_gla.py tests/ops/test_delta_rule.py}; do
    timeout "$LIMIT" python3 -m pytest -q -p no:cacheprovider --durations=5 "$f" > "$OUT/$(basename "$f" .py).log" 2>&1 &
    pids+=($!)
done
timeout "$LIMIT" python3 -m pytest -q -p no:cacheprovider -k graphed tests/test_train.py > "$OUT/test_train.log" 2>&1 &
pids+=($!)
wait "${pids[@]}"
tail -12 "$OUT/delta_configs.log" | tee -a "$OUT/all.log"
for f in "$OUT"/test_*.log; do echo "--- $f"; grep -E "^FAILED|^E  |passed|failed" "$f" | tail -12; done | tee -a "$OUT/all.log"

step() {  # step NAME SECONDS CMD...
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date +%T))" | tee -a "$OUT/all.log"
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/all.log" | grep -E "tokens/s|^\| chunk|Error|->|^ +[0-9.]+ us"
}
G=x_transformers.ops.gla.chunk
OPS=(python3 benchmarks/bench_ops.py --no-fla --warmup 3 --reps 10 --ops chunk_gla)
step gla_default 60 "${OPS[@]}" --seqlens 1024,4096,16384 --profile --out "$OUT/gla_default.json"
step gla_out128 45 "${OPS[@]}" --seqlens 4096,16384 --set $G.OUT_BV_CAP=128 --out "$OUT/gla_out128.json"
step gla_state32 45 "${OPS[@]}" --seqlens 4096,16384 --set $G.STATE_CAP=32 --out "$OUT/gla_state32.json"
step train_eager 45 python3 benchmarks/bench_train.py --json "$OUT/train_eager.json"
step train_graph 45 python3 benchmarks/bench_train.py --cuda-graph --json "$OUT/train_graph.json"
step train_sm_8k_graph 45 python3 benchmarks/bench_train.py --seq-len 8192 --batch 2 --cuda-graph \
    --json "$OUT/train_sm_8k_graph.json"
echo "=== done ($(date +%T))" | tee -a "$OUT/all.log"
