"""Count the aten ops of one training step of a decoder LM: forward, backward and optimizer, per step and per layer.

    python benchmarks/count_ops.py                                     # small model on CPU, bf16 autocast
    python benchmarks/count_ops.py --config '{"attn_flash": true}' --json ops.json
    python benchmarks/count_ops.py --dim 512 --depth 6 --heads 8 --batch 1 --seq-len 128 --time --threads 1

Every op launched on the GPU costs host time (the issue's model is launch bound with flash attention), so the op
count of a step is a structural measure of overhead that needs no GPU. Per-layer counts are the difference between
the same model at depth + 1 and at depth. CPU autocast casts differ a little from CUDA's, and some ops are fused
only on CUDA (F.rms_norm); the structure is the same. The optimizer runs Adam's per-tensor loop on CPU (foreach on
CUDA), so compare its count only between runs on one device. `--time` also reports milliseconds per step (the
fastest of --steps, wall and process CPU time).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from x_transformers import AutoregressiveWrapper, Decoder, TransformerWrapper

# ops that only create views or query metadata: they launch nothing
FREE_OPS = set(
    """
    view _unsafe_view reshape _reshape_alias expand permute transpose t unsqueeze squeeze slice select split
    split_with_sizes unbind unfold alias as_strided detach lift_fresh view_as_real view_as_complex empty empty_like
    empty_strided new_empty new_empty_strided is_same_size _has_compatible_shallow_copy_type sym_size sym_stride
    sym_numel sym_storage_offset _local_scalar_dense
    """.split()
)


class OpCounter(TorchDispatchMode):
    """Counts aten op calls by name (overload dropped), e.g. {'mm': 42, 'copy_': 7}."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def summarize(counts: Counter) -> dict:
    launched = {name: n for name, n in counts.items() if name not in FREE_OPS}
    return dict(
        total=sum(launched.values()),
        # copies: explicit copy_, dtype / device casts (_to_copy) and clones (.contiguous() of a strided view)
        copy_=counts.get("copy_", 0) + counts.get("_to_copy", 0) + counts.get("clone", 0),
        cat=counts.get("cat", 0),
        mul=counts.get("mul", 0),
        all_ops=sum(counts.values()),
        by_op=dict(sorted(launched.items(), key=lambda kv: -kv[1])),
    )


def build(args, depth: int, device):
    torch.manual_seed(args.seed)
    decoder = Decoder(dim=args.dim, depth=depth, heads=args.heads, rotary_pos_emb=True, **json.loads(args.config))
    model = TransformerWrapper(num_tokens=256, max_seq_len=args.seq_len, attn_layers=decoder)
    wrapper = AutoregressiveWrapper(model).to(device)
    optimizer = torch.optim.Adam(wrapper.parameters(), lr=1e-4)
    return wrapper, optimizer


def count_step(args, depth: int, device, dtype) -> dict:
    """Op counts of one step (after a warm-up step, so that lazily built state is not counted)."""
    wrapper, optimizer = build(args, depth, device)
    x = torch.randint(0, 256, (args.batch, args.seq_len + 1), device=device)
    phases = dict(forward=OpCounter(), backward=OpCounter(), optimizer=OpCounter())

    def step(count: bool):
        def mode(name):
            return phases[name] if count else nullcontext()

        with mode("forward"), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = wrapper(x)
        with mode("backward"):
            loss.backward()
        with mode("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    step(count=False)
    step(count=True)
    return {name: summarize(counter.counts) for name, counter in phases.items()}


def time_step(args, device, dtype) -> tuple[float, float]:
    """Fastest wall and process CPU milliseconds of a training step: the minimum over steps is the least disturbed
    by other work on a shared box (use --threads 1)."""
    wrapper, optimizer = build(args, args.depth, device)
    x = torch.randint(0, 256, (args.batch, args.seq_len + 1), device=device)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = wrapper(x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):
        step()
    wall, cpu = [], []
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return min(wall) * 1e3, min(cpu) * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--config", default="{}", help="JSON of extra Decoder kwargs, e.g. '{\"attn_flash\": true}'")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bf16", help="bf16 (autocast) or fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time", action="store_true", help="also time ms per step (wall and process CPU time)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (with --time)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (1 for steadier CPU timings)")
    p.add_argument("--top", type=int, default=25, help="ops listed in the table")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = dict(bf16=torch.bfloat16, fp32=torch.float32)[args.dtype]

    step = count_step(args, args.depth, device, dtype)
    deeper = count_step(args, args.depth + 1, device, dtype)
    per_layer = {}
    for phase in ("forward", "backward"):
        per_layer[phase] = {k: deeper[phase][k] - step[phase][k] for k in ("total", "copy_", "cat", "mul")}
        by_op = Counter(deeper[phase]["by_op"])
        by_op.subtract(step[phase]["by_op"])
        per_layer[phase]["by_op"] = {k: v for k, v in by_op.most_common() if v}
    totals = {k: sum(step[phase][k] for phase in step) for k in ("total", "copy_", "cat", "mul")}
    result = dict(args=vars(args), per_step=totals, per_layer=per_layer, phases=step)
    if args.time:
        result["wall_ms_per_step"], result["cpu_ms_per_step"] = time_step(args, device, dtype)

    print(f"{'':10s}{'total':>8s}{'copy_':>8s}{'cat':>6s}{'mul':>6s}")
    for phase in ("forward", "backward", "optimizer"):
        s = step[phase]
        print(f"{phase:10s}{s['total']:8d}{s['copy_']:8d}{s['cat']:6d}{s['mul']:6d}")
    print(f"{'step':10s}{totals['total']:8d}{totals['copy_']:8d}{totals['cat']:6d}{totals['mul']:6d}")
    for phase, s in per_layer.items():
        label = f"layer {phase[:3]}"
        print(f"{label:10s}{s['total']:8d}{s['copy_']:8d}{s['cat']:6d}{s['mul']:6d}")
    if "cpu_ms_per_step" in result:
        print(f"ms/step: wall {result['wall_ms_per_step']:.1f}, process cpu {result['cpu_ms_per_step']:.1f}")

    for phase, s in per_layer.items():
        print(f"one layer, {phase}: " + ", ".join(f"{k} {v}" for k, v in s["by_op"].items()))
    merged = Counter()
    for phase in ("forward", "backward"):
        merged.update(step[phase]["by_op"])
    print("forward + backward ops: " + ", ".join(f"{k} {v}" for k, v in merged.most_common(args.top)))

    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
