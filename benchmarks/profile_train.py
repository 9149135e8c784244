"""Profile training steps of a decoder LM with torch.profiler and print where the GPU time goes.

    python benchmarks/profile_train.py                                   # softmax, 16 x 1024, dim 512, depth 6
    python benchmarks/profile_train.py --linear-attn gated_deltanet --seq-len 8192 --batch 2
    python benchmarks/profile_train.py --out prof.json                   # also writes the table as JSON

Prints the top kernels / ops by self device time (or CPU time without a GPU) over a few steps after warm-up.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from x_transformers import AutoregressiveWrapper, Decoder, TransformerWrapper


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--linear-attn", default=None)
    p.add_argument("--hybrid-pattern", default=None)
    p.add_argument("--config", default="{}", help="JSON of extra Decoder kwargs")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    extra = json.loads(args.config)
    if args.linear_attn:
        extra["linear_attn"] = args.linear_attn
    if args.hybrid_pattern:
        extra["hybrid_pattern"] = args.hybrid_pattern
    model = TransformerWrapper(
        num_tokens=256,
        max_seq_len=args.seq_len,
        attn_layers=Decoder(dim=args.dim, depth=args.depth, heads=args.heads, rotary_pos_emb=True, **extra),
    )
    wrapper = AutoregressiveWrapper(model).to(device)
    opt = torch.optim.Adam(wrapper.parameters(), lr=1e-4, fused=torch.cuda.is_available())
    x = torch.randint(0, 256, (args.batch, args.seq_len + 1), device=device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            loss = wrapper(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    if cuda:
        torch.cuda.synchronize()

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    step_ms = (time.perf_counter() - t0) / args.steps * 1e3

    # torch >= 2.4 names the device column self_device_time_total (self_cuda_time_total is gone from the averages)
    sort_key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(f"step {step_ms:.1f} ms (under the profiler), {args.batch * args.seq_len / step_ms * 1e3:,.0f} tokens/s")
    print(prof.key_averages().table(sort_by=sort_key, row_limit=args.top, max_name_column_width=70))

    if args.out:
        rows = []
        for e in sorted(prof.key_averages(), key=lambda e: getattr(e, attr), reverse=True)[: args.top]:
            device_us = getattr(e, attr)
            rows.append(dict(name=e.key, calls=e.count, self_us_per_step=device_us / args.steps))
        with open(args.out, "w") as f:
            json.dump(dict(args=vars(args), step_ms=step_ms, top=rows), f, indent=2)


if __name__ == "__main__":
    main()
