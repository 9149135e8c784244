"""Draw images/multi_gpu.png from the metrics of benchmarks/multi_gpu.sh (two GPUs): training loss of 1 GPU against
2 with DDP and FSDP2 at the same global batch, and their tokens/s.

    python benchmarks/plot_multi_gpu.py [--results benchmarks/results/multi_gpu] [--out images/multi_gpu.png]
"""

import csv
import statistics

import argparse
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="benchmarks/results/multi_gpu")
    p.add_argument("--out", default="images/multi_gpu.png")
    args = p.parse_args()
    plot_multi_gpu(args.results, args.out)


def plot_multi_gpu(folder, out):
    """Loss curves and tokens/s of the runs in `folder` ({name}_metrics.csv, as train_enwik8.py writes them)."""
    runs = {"one": "1 GPU", "ddp": "2 GPUs, DDP", "fsdp2": "2 GPUs, FSDP2", "fsdp2_keep": "2 GPUs, FSDP2 keep-params"}
    rows = {}
    for name in runs:
        path = os.path.join(folder, f"{name}_metrics.csv")
        if os.path.exists(path):
            with open(path, newline="") as f:
                rows[name] = list(csv.DictReader(f))
    if not rows:
        print(f"no metrics in {folder}: {out} not written")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, data in rows.items():
        steps = [int(r["step"]) for r in data]
        loss = [float(r["train_loss"]) for r in data]
        smooth = [statistics.fmean(loss[max(0, i - 9) : i + 1]) for i in range(len(loss))]  # 10-step running mean
        (line,) = left.plot(steps, smooth, label=f"{runs[name]} (train, 10-step mean)", linewidth=1)
        val = [(int(r["step"]), float(r["val_loss"])) for r in data if r["val_loss"]]
        left.plot([s for s, _ in val], [v for _, v in val], "o--", color=line.get_color(), markersize=4)
    left.set_xlabel("step (16 sequences of 1024 bytes each)")
    left.set_ylabel("loss (dots: validation)")
    left.set_title("enwik8 config, dim 512, depth 6, bf16, same seed")
    left.legend(fontsize=8)
    tps = {n: statistics.median(float(r["tokens_per_s"]) for r in d if int(r["step"]) > 20) for n, d in rows.items()}
    right.bar(range(len(tps)), [v / 1e3 for v in tps.values()], color="tab:blue")
    right.set_xticks(range(len(tps)), [runs[n].replace(", ", "\n") for n in tps], fontsize=8)
    for i, v in enumerate(tps.values()):
        right.text(i, v / 1e3, f"{v / tps.get('one', v):.2f}x", ha="center", va="bottom", fontsize=8)
    right.set_ylabel("training tokens / s (thousands, median)")
    right.set_title("two H200s, micro-batch 4 (labels: vs 1 GPU)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
