"""Benchmark the `x_transformers.ops` kernels against causal SDPA and, when importable, fla.

Forward and forward+backward time (CUDA events, after warm-up; the median of the timed runs) and peak memory of each
public op at B*T = 16k tokens (B = max(1, 16384 // T)), H = 16, D = 128, for every T in --seqlens; the fused recurrent
ops are timed at decode shapes (one token against a cached state). Prints progress as it goes (first calls compile),
then a markdown table; --out writes the rows as JSON.

    python benchmarks/bench_ops.py --out bench_ops.json                  # GPU, the full sweep
    python benchmarks/bench_ops.py --seqlens 4096 --ops chunk_simple_gla,sdpa
    python benchmarks/bench_ops.py --smoke                               # tiny, on CPU under TRITON_INTERPRET=1
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time

import torch

OPS = (
    "sdpa",
    "flash_attention",
    "forgetting_attention",
    "chunk_simple_gla",
    "chunk_gla",
    "chunk_delta_rule",
    "chunk_gated_delta_rule",
    "chunk_kda",
    "chunk_dplr_delta_rule",
    "chunk_rwkv7",
    "chunk_gated_deltaproduct",
    "chunk_hgrn",
    "fused_recurrent_simple_gla",
    "fused_recurrent_gla",
    "fused_recurrent_delta_rule",
    "fused_recurrent_dplr_delta_rule",
    "fused_recurrent_kda",
    "fused_recurrent_hgrn",
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", default="1024,2048,4096,8192,16384,32768", help="comma-separated T values")
    p.add_argument("--tokens", type=int, default=16384, help="B * T per run (B = max(1, tokens // T))")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--decode-batches", default="1,32", help="batch sizes for the fused recurrent (decode) ops")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--no-fla", action="store_true", help="skip fla even when it is importable")
    p.add_argument("--fla-ops", default=None, help="comma-separated ops to time fla on (default: all of --ops)")
    p.add_argument("--no-backward", action="store_true", help="forward timings only")
    p.add_argument("--out", default=None, help="write the result rows as JSON here")
    p.add_argument("--set", action="append", default=[], metavar="MODULE.NAME=VALUE",
                   help="override a module-level tuning constant first, e.g. "
                        "x_transformers.ops.delta_rule.chunk.WY_SUB=16 (repeatable; for A/B runs)")
    p.add_argument("--profile", action="store_true", help="also print each kernel's device time per fwd+bwd (GPU)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one rep: checks the script runs (CPU ok)")
    args = p.parse_args(argv)
    if args.smoke:
        args.seqlens, args.tokens, args.heads, args.head_dim = "64", 128, 2, 16
        args.decode_batches, args.warmup, args.reps = "2", 0, 1
    return args


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- inputs and callables


def make_case(op, B, T, H, D, dtype, device, impl):
    """-> (fn, leaves): fn() runs the op once and returns the tensor to differentiate; leaves get gradients."""
    import torch.nn.functional as F

    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, dt=dtype, grad=True):
        return torch.randn(*shape, generator=gen, device=device, dtype=dt).requires_grad_(grad)

    def gate(*shape):
        # log decay per step in about [-4, -0.01]: logsigmoid of a normal, as data-dependent gates produce
        return F.logsigmoid(torch.randn(*shape, generator=gen, device=device) + 2.0).float().requires_grad_()

    if op == "sdpa":
        q, k, v = rand(B, H, T, D), rand(B, H, T, D), rand(B, H, T, D)
        return (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)), [q, k, v]

    if op in ("flash_attention", "forgetting_attention"):
        # causal softmax attention, plain and with the Forgetting Transformer's per-head log forget gate
        q, k, v = rand(B, T, H, D), rand(B, T, H, D), rand(B, T, H, D)
        args = (q, k, v) if op == "flash_attention" else (q, k, v, gate(B, T, H))
        if impl == "fla":
            if op == "flash_attention":
                from fla.ops.attn import parallel_attn as fn
            else:
                from fla.ops.forgetting_attn import parallel_forgetting_attn as fn
        else:
            from x_transformers.ops.attention import flash_attention as fn

        def call():
            out = fn(*args)
            return out[0] if isinstance(out, tuple) else out  # fla's parallel_attn may return (o, lse)

        return call, list(args)

    if op in ("chunk_hgrn", "fused_recurrent_hgrn"):
        # the elementwise scan over H * D channels; decoding: one token from a carried state
        decode = op == "fused_recurrent_hgrn"
        T = 1 if decode else T
        x, g = rand(B, T, H * D), gate(B, T, H * D).detach().to(dtype).requires_grad_()
        state = torch.randn(B, H * D, generator=gen, device=device) if decode else None
        fn = _resolve(impl, op)
        return (lambda: fn(x, g, initial_state=state, output_final_state=decode)[0]), [x, g]

    decode = op.startswith("fused_recurrent")
    if decode:
        T = 1
    q, k, v = rand(B, T, H, D), rand(B, T, H, D), rand(B, T, H, D)
    state = torch.randn(B, H, D, D, generator=gen, device=device) if decode else None
    kw = dict(initial_state=state, output_final_state=decode)
    family = op.replace("fused_recurrent_", "").replace("chunk_", "")

    if family in ("dplr_delta_rule", "rwkv7"):
        # RWKV-7's inputs: a = -kappa, b = kappa * lr with kappa L2-normalised, log decay in (-exp(-0.5), 0)
        kappa = F.normalize(torch.randn(B, T, H, D, generator=gen, device=device), dim=-1)
        lr = torch.rand(B, T, H, D, generator=gen, device=device)
        a, b = (-kappa).to(dtype).requires_grad_(), (kappa * lr).to(dtype).requires_grad_()
        gk = (-0.6065 * torch.rand(B, T, H, D, generator=gen, device=device)).to(dtype).requires_grad_()
        ks = (k.detach() * D**-0.5).requires_grad_()
        if impl == "fla" and family == "rwkv7":
            from fla.ops.rwkv7 import chunk_rwkv7

            return (lambda: chunk_rwkv7(q, gk, ks, v, a, b, scale=1.0, **kw)[0]), [q, ks, v, a, b, gk]
        if impl == "fla":
            import fla.ops.generalized_delta_rule as module
        else:
            import x_transformers.ops.dplr as module
        fn = getattr(module, op.replace("rwkv7", "dplr_delta_rule"))
        return (lambda: fn(q, ks, v, a, b, gk, scale=1.0, **kw)[0]), [q, ks, v, a, b, gk]
    if family == "gated_deltaproduct":
        # two Householder steps per token: keys, values and betas at 2T steps, one query and gate per token
        k2 = F.normalize(torch.randn(B, 2 * T, H, D, generator=gen, device=device), dim=-1).to(dtype)
        k2, v2 = k2.requires_grad_(), rand(B, 2 * T, H, D)
        beta2 = torch.rand(B, 2 * T, H, generator=gen, device=device).to(dtype).requires_grad_()
        g = gate(B, T, H)
        if impl == "fla":
            from fla.ops.gated_delta_product import chunk_gated_delta_product as fla_fn

            return (lambda: fla_fn(q, k2, v2, g, beta2, num_householder=2, **kw)[0]), [q, k2, v2, g, beta2]
        from x_transformers.ops import chunk_delta_rule

        def deltaproduct():
            # ours: the gated delta rule over the interleaved steps, as mixers/gated_deltaproduct.py runs it
            q2 = F.pad(q[:, :, None], (0, 0, 0, 0, 1, 0)).flatten(1, 2)
            g2 = F.pad(g[:, :, None], (0, 0, 0, 1)).flatten(1, 2)
            return chunk_delta_rule(q2, k2, v2, beta2, g2, **kw)[0][:, 1::2]

        return deltaproduct, [q, k2, v2, g, beta2]

    if family == "simple_gla":
        g = gate(B, T, H)
        fn = _resolve(impl, op)
        return (lambda: fn(q, k, v, g, **kw)[0]), [q, k, v, g]
    if family == "gla":
        g = (gate(B, T, H, D).detach() / 16).requires_grad_()
        fn = _resolve(impl, op)
        return (lambda: fn(q, k, v, g, **kw)[0]), [q, k, v, g]
    # delta rule: keys L2-normalised so the state stays bounded
    kn = F.normalize(k.detach().float(), dim=-1).to(dtype).requires_grad_()
    beta = torch.rand(B, T, H, generator=gen, device=device).to(dtype).requires_grad_()
    if family == "kda":
        # per-channel log decay of GLA's magnitude; same argument order (q, k, v, g, beta) in fla and here
        g = (gate(B, T, H, D).detach() / 16).requires_grad_()
        fn = _resolve(impl, op) if impl == "fla" else getattr(importlib.import_module("x_transformers.ops.kda"), op)
        return (lambda: fn(q, kn, v, g, beta, **kw)[0]), [q, kn, v, g, beta]
    if family == "gated_delta_rule":
        g = gate(B, T, H)
        if impl == "fla":
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fn

            return (lambda: fn(q, kn, v, g, beta, **kw)[0]), [q, kn, v, g, beta]
        from x_transformers.ops import chunk_delta_rule as fn

        return (lambda: fn(q, kn, v, beta, g, **kw)[0]), [q, kn, v, beta, g]
    fn = _resolve(impl, op)
    return (lambda: fn(q, kn, v, beta, **kw)[0]), [q, kn, v, beta]


def _resolve(impl, op):
    if impl == "fla":
        family = op.replace("fused_recurrent_", "").replace("chunk_", "")
        module = __import__(f"fla.ops.{family}", fromlist=[op])
        return getattr(module, op)
    import x_transformers.ops as ops

    return getattr(ops, op)


def fla_available():
    try:
        import fla  # noqa: F401
    except Exception:
        return False
    return True


# ---------------------------------------------------------------- timing


def timed(fn, warmup, reps, device):
    """Median milliseconds of fn() over reps runs after warmup runs. On CUDA each run sits between its own pair of
    events and the host synchronises only after the last one (as triton.testing.do_bench does), so the host queues
    ahead and the figure is device time, as in a training step, not Python launch latency (which per-run syncs would
    add to every op: ~0.1-0.3 ms at these sizes)."""
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) for start, end in events]
    else:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def kernel_times(fn, reps):
    """{kernel name: device microseconds per call of fn}, the 12 largest, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    return {e.key[:80]: round(e.self_device_time_total / reps, 1) for e in events[:12]}


def bench_case(op, impl, B, T, args, dtype, device):
    row = dict(op=op, impl=impl, B=B, T=1 if op.startswith("fused_recurrent") else T, H=args.heads, D=args.head_dim,
               dtype=args.dtype, device=torch.cuda.get_device_name() if device == "cuda" else "cpu")
    t0 = time.perf_counter()
    try:
        fn, leaves = make_case(op, B, T, args.heads, args.head_dim, dtype, device, impl)
        out = fn()  # the first call compiles
        do = torch.randn_like(out)

        def fwd():
            with torch.no_grad():
                fn()

        def fwd_bwd():
            for t in leaves:
                t.grad = None
            fn().backward(do)

        row["compile_s"] = round(time.perf_counter() - t0, 2)
        row["fwd_ms"] = timed(fwd, args.warmup, args.reps, device)
        decode = op.startswith("fused_recurrent")
        if not args.no_backward and not decode:
            fwd_bwd()
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                fwd_bwd()
                torch.cuda.synchronize()
                row["peak_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
            row["fwd_bwd_ms"] = timed(fwd_bwd, args.warmup, args.reps, device)
            if args.profile and device == "cuda":
                row["kernels_us"] = kernel_times(fwd_bwd, args.reps)
                log("\n".join(f"    {us:9.1f} us  {name}" for name, us in row["kernels_us"].items()))
    except Exception as e:  # one failing op (OOM, missing fla kernel) must not stop the sweep
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


def markdown(rows):
    lines = ["| op | impl | B | T | fwd ms | fwd+bwd ms | peak MiB | note |", "|---|---|---|---|---|---|---|---|"]
    fmt = lambda x: f"{x:.3f}" if isinstance(x, float) else ("" if x is None else str(x))  # noqa: E731
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['impl']} | {r['B']} | {r['T']} | {fmt(r.get('fwd_ms'))} | {fmt(r.get('fwd_bwd_ms'))} "
            f"| {fmt(r.get('peak_mib'))} | {r.get('error', '')} |"
        )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        if not args.smoke:
            log("no GPU: running anyway on CPU under the Triton interpreter (use --smoke for a quick check)")
        # the Triton kernels can only run on CPU through the interpreter, which must be on before triton is imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    dtype = getattr(torch, args.dtype)
    for item in args.set:
        target, _, value = item.partition("=")
        module_name, _, name = target.rpartition(".")
        module = importlib.import_module(module_name) if module_name and value else None
        if module is None or not hasattr(module, name):
            raise SystemExit(f"--set wants MODULE.NAME=VALUE naming an existing constant, got {item!r}")
        setattr(module, name, type(getattr(module, name))(value))
        log(f"set {target} = {value}")
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        raise SystemExit(f"unknown --ops {unknown}; choose from {','.join(OPS)}")
    impls = ["ours"] + (["fla"] if not args.no_fla and fla_available() else [])
    log(f"device {device}, dtype {args.dtype}, impls {impls}")

    rows = []
    for op in ops:
        if op.startswith("fused_recurrent"):
            shapes = [(int(b), 1) for b in args.decode_batches.split(",")]
        else:
            shapes = [(max(1, args.tokens // int(t)), int(t)) for t in args.seqlens.split(",")]
        fla_ops = None if args.fla_ops is None else set(args.fla_ops.split(","))
        op_impls = [i for i in impls if i != "fla" or fla_ops is None or op in fla_ops]
        for impl in op_impls if op != "sdpa" else ["torch"]:
            for B, T in shapes:
                log(f"{op:28s} {impl:5s} B={B:<3d} T={T:<6d} ...")
                row = bench_case(op, impl, B, T, args, dtype, device)
                rows.append(row)
                if args.out:  # after every row, so that a run cut short keeps what it measured
                    with open(args.out, "w") as f:
                        json.dump(dict(command=" ".join(sys.argv), rows=rows), f, indent=1)
                log(f"{'':28s} -> fwd {row.get('fwd_ms', float('nan')):.3f} ms, "
                    f"fwd+bwd {row.get('fwd_bwd_ms', float('nan')):.3f} ms {row.get('error', '')}")
    table = markdown(rows)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(command=" ".join(sys.argv), rows=rows), f, indent=1)
        log(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
