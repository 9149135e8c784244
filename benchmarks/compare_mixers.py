"""Train one small byte-level LM per token mixer on the bundled corpus and compare validation losses.

    python benchmarks/compare_mixers.py --steps 300 --out runs/mixers.json --plot images/mixers.png

Every model has the same width, depth and feedforward; only the token mixer changes: all-softmax, each linear
mixer alone, and gated-DeltaNet/softmax hybrids ('LLLN' = 3:1, 'LLN' = 2:1). Writes a JSON of the curves and final
validation losses, prints a table, and plots all validation curves in one figure.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from loguru import logger

from x_transformers import AutoregressiveWrapper, Decoder, TransformerWrapper
from x_transformers import training
from x_transformers.mixers import MIXERS

ROOT = Path(__file__).resolve().parent.parent


def configs(names):
    out = {"softmax": {}}
    for name in names:
        out[name] = dict(linear_attn=name)
    out["gated_deltanet LLLN (3:1)"] = dict(linear_attn="gated_deltanet", hybrid_pattern="LLLN")
    out["gated_deltanet LLN (2:1)"] = dict(linear_attn="gated_deltanet", hybrid_pattern="LLN")
    return out


def load_bytes(path: Path):
    """Plain text or .gz / .bz2 / .xz / .zst, through the training scripts' reader: 90% train, 10% validation."""
    data = training.load_bytes(path).long()
    split = int(len(data) * 0.9)
    return data[:split], data[split:]


def batches(data, batch_size, seq_len, generator):
    while True:
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)
        yield torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()])


def device_name(device):
    return torch.cuda.get_device_name() if str(device).startswith("cuda") else "cpu"


def train_one(name, kwargs, args, train, val, device):
    torch.manual_seed(args.seed)
    model = TransformerWrapper(
        num_tokens=256,
        max_seq_len=args.seq_len,
        attn_layers=Decoder(
            dim=args.dim, depth=args.depth, heads=args.heads, attn_dim_head=args.dim // args.heads,  # same width as the mixers
            # rotary for the softmax layers; a stack of mixers alone has none to rotate (and refuses the flag)
            rotary_pos_emb="linear_attn" not in kwargs or "hybrid_pattern" in kwargs, **kwargs,
        ),
    )
    wrapper = AutoregressiveWrapper(model).to(device)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(wrapper.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    gen = torch.Generator().manual_seed(args.seed)
    val_batches = [b.to(device) for b, _ in zip(batches(val, args.batch_size, args.seq_len, torch.Generator().manual_seed(1)), range(args.val_batches))]

    def evaluate():
        wrapper.eval()
        with torch.no_grad():
            loss = sum(wrapper(b).item() for b in val_batches) / len(val_batches)
        wrapper.train()
        return loss

    curve, t0 = [], time.time()
    for step, batch in zip(range(args.steps), batches(train, args.batch_size, args.seq_len, gen)):
        loss = wrapper(batch.to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(wrapper.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
        sched.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            curve.append((step + 1, evaluate()))
            logger.info(f"{name:28s} step {step + 1:4d} train {loss.item():.3f} val {curve[-1][1]:.3f}")
    return dict(params=params, curve=curve, val_loss=curve[-1][1], seconds=time.time() - t0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--val-batches", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mixers", default=",".join(sorted(MIXERS)), help="comma-separated mixer names")
    parser.add_argument("--data", default=str(ROOT / "data" / "shakespeare.txt.gz"),
                        help="text file, plain or .gz / .bz2 / .xz / .zst")
    parser.add_argument("--out", default="runs/mixers.json")
    parser.add_argument("--plot", default=None, help="PNG path for the validation curves")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--from-json", default=None, help="skip training: table and plot from an earlier --out")
    args = parser.parse_args()

    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        results = saved["results"]
        for key in ("dim", "depth", "seq_len"):
            setattr(args, key, saved["args"][key])
    else:
        try:
            train, val = load_bytes(Path(args.data))
        except training.DataError as error:
            parser.error(str(error))
        results = {}
        for name, kwargs in configs([m for m in args.mixers.split(",") if m]).items():
            results[name] = train_one(name, kwargs, args, train, val, args.device)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(dict(args=vars(args), device=device_name(args.device), results=results), indent=2))

    print("\n| mixer | params | val loss | bpc | seconds |\n|---|---|---|---|---|")
    for name, r in sorted(results.items(), key=lambda kv: kv[1]["val_loss"]):
        print(f"| {name} | {r['params'] / 1e6:.2f}M | {r['val_loss']:.3f} | {r['val_loss'] / math.log(2):.3f} | {r['seconds']:.0f} |")

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(9, 5.5))
        for name, r in sorted(results.items(), key=lambda kv: kv[1]["val_loss"]):
            steps, losses = zip(*r["curve"])
            style = "-" if name == "softmax" or "LLN" in name else "--"
            ax.plot(steps, losses, style, label=f"{name} ({r['val_loss']:.3f})", linewidth=2 if name == "softmax" else 1.2)
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (nats / byte)")
        ax.set_title(f"Token mixers, dim {args.dim}, depth {args.depth}, seq {args.seq_len} (bundled Shakespeare)")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120, bbox_inches="tight")
        logger.info(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
