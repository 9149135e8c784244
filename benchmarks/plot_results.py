"""Plot the results in benchmarks/results/: images/throughput.png (H100: training tokens/s, ours vs the
x-transformers release, and the kernels' forward+backward time against causal SDPA as the sequence grows, 16k tokens
per call) and images/multi_gpu.png (two H200s, benchmarks/run_h200x2.sh: training loss of 1 GPU against 2 with DDP
and FSDP2 at the same global batch, and their tokens/s).

    python benchmarks/plot_results.py [--results benchmarks/results] [--out images/throughput.png]
"""

import csv
import statistics

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(path):
    with open(path) as f:
        return json.load(f)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="benchmarks/results")
    p.add_argument("--out", default="images/throughput.png")
    p.add_argument("--multi-gpu-out", default="images/multi_gpu.png")
    args = p.parse_args()
    plot_multi_gpu(os.path.join(args.results, "h200x2"), args.multi_gpu_out)
    res = lambda name: os.path.join(args.results, name)  # noqa: E731

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))

    # training throughput, 16 x 1024 tokens per step
    bars = []
    for name, title in (("train_default_h100.json", "softmax"), ("train_flash_h100.json", "flash")):
        for row in load(res(name))["results"]:
            short = "upstream" if row["label"] == "upstream" else "ours"
            label = "x-transformers 2.0.1" if short == "upstream" else "ours"
            bars.append((f"{title}\n{short}", row["tokens_per_s"], label))
    for name, title in (("train_compile_h100.json", "softmax\ncompiled"), ("train_gdn_1k_h100.json", "GDN"),
                        ("train_gdn_1k_compile_h100.json", "GDN\ncompiled")):
        for row in load(res(name))["results"]:
            bars.append((title, row["tokens_per_s"], "ours"))
    colors = {"ours": "tab:blue", "x-transformers 2.0.1": "tab:gray"}
    left.bar(range(len(bars)), [b[1] / 1e3 for b in bars], color=[colors[b[2]] for b in bars])
    left.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    left.set_ylabel("training tokens / s (thousands)")
    left.set_title("training, dim 512, depth 6, 16 x 1024, bf16 (H100)")
    patches = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    left.legend(handles=patches, labels=list(colors), fontsize=8)

    # kernels: forward + backward ms against T
    rows = load(res("ops_h100.json"))["rows"]
    for op in sorted({r["op"] for r in rows}):
        pts = sorted((r["T"], r["fwd_bwd_ms"]) for r in rows if r["op"] == op and "fwd_bwd_ms" in r)
        right.plot([t for t, _ in pts], [ms for _, ms in pts], marker="o", label=op,
                   linestyle="--" if op == "sdpa" else "-", color="black" if op == "sdpa" else None)
    right.set_xscale("log", base=2)
    right.set_xlabel("sequence length T (B = 16k / T), 16 heads of dim 128, bf16")
    right.set_ylabel("forward + backward (ms)")
    right.set_title("kernels vs causal SDPA (H100)")
    right.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


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
