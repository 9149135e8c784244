"""Benchmark the causal depthwise short convolution: our Triton op vs `F.conv1d(groups=d)` on the channels-first view
vs the depthwise `F.conv2d` on the channels-last view (what `ShortConvolution` in mixers/base.py did before).

Forward and forward+backward milliseconds (CUDA events, median of the timed runs after warm-up; the backward computes
the gradients of x and weight) and the effective bandwidth of ours (one read and one write of x forward; x, dy read
and dx written backward) at each --shapes entry. --sweep also times our op under each (rows, channels, warps) block
config of the kernels, to pick the defaults in x_transformers/ops/conv/causal_conv.py. Prints a markdown table; --out
writes the rows as JSON.

    python benchmarks/bench_conv.py --out bench_conv.json                 # GPU: b=2 n=8192 and b=16 n=1024, d=1536
    python benchmarks/bench_conv.py --sweep --out bench_conv_sweep.json   # GPU: also every block config of ours
    python benchmarks/bench_conv.py --smoke                               # tiny, on CPU under TRITON_INTERPRET=1
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

# the same CUDA-event timing as the op benchmark (this folder is on sys.path when a script in it runs)
from bench_ops import log, timed

IMPLS = ("ours", "conv1d", "conv2d_channels_last")
# (rows, channels, warps): forward, backward and the backward with the fused activation use the same candidates
SWEEP = ((32, 128, 4), (32, 128, 8), (64, 128, 4), (64, 128, 8), (128, 128, 8), (64, 64, 4), (128, 64, 8), (16, 128, 4))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="2x8192x1536,16x1024x1536", help="comma-separated BxNxD")
    p.add_argument("--width", type=int, default=4, help="kernel width w")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--activation", default=None, choices=[None, "silu"], help="fused activation (ours only)")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--sweep", action="store_true", help="also time our op under every block config in SWEEP")
    p.add_argument("--out", default=None, help="write the result rows as JSON here")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one rep: checks the script runs (CPU ok)")
    args = p.parse_args(argv)
    if args.smoke:
        args.shapes, args.warmup, args.reps = "2x40x48", 0, 1
    return args


def make_fn(impl, x, weight, activation):
    """-> fn() returning (b, n, d) outputs of one implementation. cuDNN wants the weight in x's dtype (autocast casts
    it in a model); the others apply the activation unfused."""
    from x_transformers.ops import causal_conv1d

    W = weight.shape[1]
    act = F.silu if activation == "silu" else (lambda t: t)
    if impl == "ours":
        return lambda: causal_conv1d(x, weight, activation=activation)[0]
    if impl == "conv1d":
        # channels-first view: conv1d copies it to (b, d, n) and the output back
        return lambda: act(F.conv1d(x.transpose(1, 2), weight.to(x.dtype)[:, None], padding=W - 1, groups=x.shape[-1])
                           [..., : x.shape[1]].transpose(1, 2))
    if impl == "conv2d_channels_last":
        # (b, n, d) is the channels-last layout of a (b, d, 1, n) image (ShortConvolution before this op)
        def fn():
            image = x.transpose(1, 2).unsqueeze(2)
            out = F.conv2d(image, weight.to(x.dtype)[:, None, None], padding=(0, W - 1), groups=x.shape[-1])
            return act(out.squeeze(2)[..., : x.shape[1]].transpose(1, 2))

        return fn
    raise ValueError(f"unknown impl {impl!r}, expected one of {IMPLS}")


def bench_one(impl, B, N, D, args, device, dtype, label=None):
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(B, N, D, generator=gen, device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(D, args.width, generator=gen, device=device) / args.width**0.5).requires_grad_()
    fn = make_fn(impl, x, weight, args.activation)
    dy = torch.randn(B, N, D, generator=gen, device=device, dtype=dtype)

    def fwd():
        with torch.no_grad():
            fn()

    def fwd_bwd():
        torch.autograd.grad(fn(), (x, weight), dy)

    row = dict(impl=label or impl, B=B, N=N, D=D, width=args.width, dtype=args.dtype, activation=args.activation)
    row["fwd_ms"] = timed(fwd, args.warmup, args.reps, device)
    row["fwd_bwd_ms"] = timed(fwd_bwd, args.warmup, args.reps, device)
    nbytes = x.numel() * x.element_size()
    # forward reads x, writes out; backward reads x and dy, writes dx (weight traffic is negligible)
    row["fwd_GBps"] = 2 * nbytes / row["fwd_ms"] / 1e6
    row["fwd_bwd_GBps"] = 5 * nbytes / row["fwd_bwd_ms"] / 1e6
    if impl != "ours":
        ours = make_fn("ours", x, weight, args.activation)
        with torch.no_grad():
            row["max_abs_diff_vs_ours"] = (ours().float() - fn().float()).abs().max().item()
    log(f"{row['impl']:>28} {B}x{N}x{D}: fwd {row['fwd_ms']:.4f} ms, fwd+bwd {row['fwd_bwd_ms']:.4f} ms")
    return row


def main(argv=None):
    args = parse_args(argv)
    if args.smoke and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from x_transformers.ops.conv import causal_conv as conv_module

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    rows = []
    for shape in args.shapes.split(","):
        B, N, D = (int(s) for s in shape.lower().split("x"))
        for impl in args.impls.split(","):
            rows.append(bench_one(impl, B, N, D, args, device, dtype))
        if args.sweep:
            names = ("FWD_BLOCKS", "BWD_WEIGHT_BLOCKS", "BWD_INPUT_BLOCKS")
            defaults = [getattr(conv_module, name) for name in names]
            for blocks in SWEEP[: 2 if args.smoke else None]:
                for name in names:
                    setattr(conv_module, name, blocks)
                label = "ours BT={} BD={} warps={}".format(*blocks)
                rows.append(bench_one("ours", B, N, D, args, device, dtype, label) | dict(blocks=blocks))
            for name, value in zip(names, defaults):
                setattr(conv_module, name, value)

    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"\n{device_name}, width {args.width}, {args.dtype}, activation {args.activation}\n")
    print("| impl | B x N x D | fwd ms | fwd+bwd ms | fwd GB/s | fwd+bwd GB/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['impl']} | {r['B']}x{r['N']}x{r['D']} | {r['fwd_ms']:.4f} | {r['fwd_bwd_ms']:.4f} | "
              f"{r['fwd_GBps']:.0f} | {r['fwd_bwd_GBps']:.0f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=device_name, torch=torch.__version__, rows=rows), f, indent=1)
        log(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
