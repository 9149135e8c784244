#!/usr/bin/env bash
# Multi-GPU training checks in one pass on a 2-GPU host (about 5 minutes on two H200s): the enwik8 config (dim 512, depth 6, seq
# 1024, bf16) for 200 steps on 1 GPU, then on 2 GPUs with DDP, FSDP2 and FSDP2 keeping gathered weights
# (--fsdp-keep-params), at the same global batch of 16 sequences in micro-batches of MICRO (default 8: 8 x 2 on one
# GPU, 8 x 1 per rank on two) and the same seed; cross-resume of their checkpoints between 1 and 2 GPUs (skipped with
# RESUME=0); a gated_deltanet 'LLLN' hybrid under FSDP2 (skipped with HYBRID=0); then a summary of tokens/s,
# scaling and loss agreement.
#   OUT=out/multi_gpu bash benchmarks/multi_gpu.sh
#   OUT=out/multi_gpu MICRO=4 RESUME=0 bash benchmarks/multi_gpu.sh   # upstream's micro-batch of 4
# Copy the *_metrics.csv files and the summary to benchmarks/results/multi_gpu/ and run
# benchmarks/plot_multi_gpu.py to redraw images/multi_gpu.png.
set -uo pipefail
OUT=${OUT:-out/multi_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
# eager on every run: the 1-GPU and 2-GPU rows compare the same step (auto would compile only the single process)
COMMON=(--num-batches 200 --validate-every 50 --generate-every 1000 --seed 0 --step-mode eager)

train() {  # train NAME NPROC LIMIT ARGS...: one torchrun, its log kept, its summary lines shown
    local name=$1 nproc=$2 limit=$3
    shift 3
    echo "=== $name on $nproc GPU(s) ($(date +%T))"
    # EXTRA: more flags for every run, e.g. a tiny CPU smoke pass: EXTRA="--dim 32 --depth 1 --seq-len 32 --device cpu"
    timeout "$limit" torchrun --standalone --nproc_per_node "$nproc" train_enwik8.py "$@" ${EXTRA:-} 2>&1 \
        | tee "$OUT/$name.log" | grep -E "world|step .*val loss|average|peak memory|resumed|Error|error" | tail -8
}

nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpus.txt"
MICRO=${MICRO:-8}
ONE=(--batch-size "$MICRO" --grad-accum $((16 / MICRO)))
TWO=(--batch-size "$MICRO" --grad-accum $((8 / MICRO)))
train one 1 90 "${COMMON[@]}" "${ONE[@]}" --out-dir "$OUT/one"
train ddp 2 90 "${COMMON[@]}" "${TWO[@]}" --out-dir "$OUT/ddp"
train fsdp2 2 90 "${COMMON[@]}" "${TWO[@]}" --fsdp --out-dir "$OUT/fsdp2"
train fsdp2_keep 2 90 "${COMMON[@]}" "${TWO[@]}" --fsdp --fsdp-keep-params --out-dir "$OUT/fsdp2_keep"
if [ "${RESUME:-1}" = 1 ]; then
    # cross-resume: the 2-GPU checkpoint continues on 1 GPU, the 1-GPU checkpoint on 2 GPUs (20 more steps each)
    cp -r "$OUT/fsdp2" "$OUT/fsdp2_to_one" && cp -r "$OUT/one" "$OUT/one_to_ddp"
    train fsdp2_to_one 1 40 --num-batches 220 --validate-every 20 --generate-every 1000 "${ONE[@]}" \
        --out-dir "$OUT/fsdp2_to_one" --resume
    train one_to_ddp 2 40 --num-batches 220 --validate-every 20 --generate-every 1000 "${TWO[@]}" \
        --out-dir "$OUT/one_to_ddp" --resume
fi
[ "${HYBRID:-1}" = 1 ] && train hybrid_fsdp2 2 120 --num-batches 100 --validate-every 50 --generate-every 1000 --seed 0 "${TWO[@]}" --fsdp \
    --linear-attn gated_deltanet --hybrid-pattern LLLN --out-dir "$OUT/hybrid_fsdp2"

python3 - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import csv, statistics, sys
from pathlib import Path

out = Path(sys.argv[1])
def rows(name):
    path = out / name / "metrics.csv"
    return list(csv.DictReader(open(path))) if path.exists() else []
def tps(name):  # median tokens/s over the steps after the first 20 (compile, warm-up)
    r = [float(x["tokens_per_s"]) for x in rows(name) if int(x["step"]) > 20 and x["tokens_per_s"]]
    return statistics.median(r) if r else float("nan")
def peak(name):  # the training log's "peak memory X GB per rank" line
    log = out / f"{name}.log"
    lines = [x for x in log.read_text().splitlines() if "peak memory" in x] if log.exists() else []
    return lines[-1].split("peak memory")[1].split("GB")[0].strip() + " GB" if lines else "?"
one = tps("one")
for name in ("one", "ddp", "fsdp2", "fsdp2_keep", "hybrid_fsdp2"):
    note = "(a different model: tokens/s only)" if name.startswith("hybrid") else f"scaling vs 1 GPU {tps(name) / one:5.2f}x"
    print(f"{name:13s} {tps(name):>12,.0f} tokens/s   peak {peak(name):>8s} per GPU   {note}")
for name in ("ddp", "fsdp2", "fsdp2_keep"):
    a = {int(x["step"]): x for x in rows("one")}
    b = {int(x["step"]): x for x in rows(name)}
    vals = [(int(s), float(a[s]["val_loss"]), float(b[s]["val_loss"])) for s in a if s in b and a[s]["val_loss"]]
    print(f"val loss 1 GPU vs {name}: " + ", ".join(f"step {s}: {x:.4f} / {y:.4f}" for s, x, y in sorted(vals)))
for name in ("fsdp2_to_one", "one_to_ddp"):
    last = rows(name)[-1] if rows(name) else {}
    print(f"{name}: last step {last.get('step')}, val loss {last.get('val_loss')}")
PY
echo "=== done ($(date +%T))"
