#!/usr/bin/env bash
# The kernel table and the training-throughput / profile numbers of the Performance section, in one pass (about
# 9 minutes on one H100/H200; fla 0.6.0 joins the table when importable):
#   OUT=out/perf bash benchmarks/run_perf.sh
set -uo pipefail
OUT=${OUT:-out/perf}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS CMD...: run with a time limit, keep the whole log, show the summary lines
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date +%T))" | tee -a "$OUT/all.log"
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/all.log" | grep -E "^\| |Error|tokens/s|^step"
}

nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/all.log"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/all.log"
step table ${TABLE_LIMIT:-270} python3 benchmarks/bench_ops.py --seqlens 1024,2048,4096,8192,16384,32768 --warmup 3 \
    --reps 10 --ops sdpa,chunk_simple_gla,chunk_gla,chunk_delta_rule,chunk_gated_delta_rule,hgrn_scan \
    --fla-ops chunk_simple_gla,chunk_gated_delta_rule --out "$OUT/ops_table.json"
step profile_gdn 45 python3 benchmarks/profile_train.py --linear-attn gated_deltanet --out "$OUT/profile_gdn.txt"
step train_softmax_graph 45 python3 benchmarks/bench_train.py --cuda-graph --json "$OUT/train_softmax_graph.json"
step train_gdn_graph 45 python3 benchmarks/bench_train.py --linear-attn gated_deltanet --cuda-graph \
    --json "$OUT/train_gdn_graph.json"
step train_gdn_8k_graph 45 python3 benchmarks/bench_train.py --linear-attn gated_deltanet --cuda-graph --seq-len 8192 \
    --batch 2 --json "$OUT/train_gdn_8k_graph.json"
step train_softmax_8k_graph 45 python3 benchmarks/bench_train.py --cuda-graph --seq-len 8192 --batch 2 \
    --json "$OUT/train_softmax_8k_graph.json"
echo "=== done ($(date +%T))" | tee -a "$OUT/all.log"
