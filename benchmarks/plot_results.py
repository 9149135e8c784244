"""Plot the H100 results in benchmarks/results/ into images/throughput.png: training tokens/s (ours vs the
x-transformers release) and the kernels' forward+backward time against causal SDPA as the sequence grows
(16k tokens per call).

    python benchmarks/plot_results.py [--results benchmarks/results] [--out images/throughput.png]
"""

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
    args = p.parse_args()
    res = lambda name: os.path.join(args.results, name)  # noqa: E731

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))

    # training throughput, 16 x 1024 tokens per step
    bars = []
    for name, title in (("train_default_h100.json", "softmax"), ("train_flash_h100.json", "flash")):
        for row in load(res(name))["results"]:
            short = "upstream" if row["label"] == "upstream" else "ours"
            label = "x-transformers 2.0.1" if short == "upstream" else "ours"
            bars.append((f"{title}\n{short}", row["tokens_per_s"], label))
    for row in load(res("train_gdn_1k_h100.json"))["results"]:
        bars.append(("GDN\nours", row["tokens_per_s"], "ours"))
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


if __name__ == "__main__":
    main()
