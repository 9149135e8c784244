"""Training throughput of a decoder LM: tokens/s, step time and peak memory, as JSON and a table.

    python benchmarks/bench_train.py                                  # H100 anchor config: 16 x 1024, dim 512, depth 6
    python benchmarks/bench_train.py --compile --json out/train.json
    python benchmarks/bench_train.py --linear-attn gated_deltanet --seq-len 8192 --batch 2
    python benchmarks/bench_train.py --upstream-python /path/to/env/bin/python   # same run with x-transformers there
    python benchmarks/bench_train.py --smoke                          # tiny CPU run (checks the script works)

The x_transformers imported is whichever the running interpreter finds; with --upstream-python (an environment with
the x-transformers release installed) or --upstream-path (a folder holding its `x_transformers` package, run with
this interpreter) the same measurement is repeated in a subprocess and the table shows the ratio.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve()


def add_common_args(p: argparse.ArgumentParser):
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--linear-attn", default=None, help="linear-attention mixer name (ours only)")
    p.add_argument("--hybrid-pattern", default=None, help="e.g. LLLN (ours only, with --linear-attn)")
    p.add_argument("--config", default=None, help="JSON object of extra Decoder kwargs, e.g. '{\"attn_flash\": true}'")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, help="bf16 (default on GPU) or fp32 (default on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--label", default=None, help="name of this implementation in the table (default: from its path)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, a few iterations")
    p.add_argument("--upstream-python", default=None, help="python of an environment with x-transformers installed")
    p.add_argument("--upstream-path", default=None, help="folder holding an upstream `x_transformers` package")


def decoder_kwargs(args) -> dict:
    kwargs = dict(dim=args.dim, depth=args.depth, heads=args.heads, rotary_pos_emb=True)
    for name in ("linear_attn", "hybrid_pattern"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    if args.config:
        kwargs.update(json.loads(args.config))
    return kwargs


def setup(args):
    """Device, autocast dtype, and the x_transformers module this interpreter imports."""
    import x_transformers

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    dtype = dtypes[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device, dtype, x_transformers


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


class Timer:
    """CUDA events on GPU (no host sync inside the timed region), perf_counter on CPU; elapsed seconds."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1e3
        else:
            self.seconds = time.perf_counter() - self.t0


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def environment(device, xt) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    xt_version = None
    for dist in ("x-transformers-hybrid", "x-transformers"):
        try:
            xt_version = f"{dist} {version(dist)}"
            break
        except PackageNotFoundError:
            pass
    return dict(
        # where the measured package was imported from, relative to this repository when inside it
        x_transformers=os.path.relpath(Path(xt.__file__).parent, HERE.parent.parent),
        x_transformers_version=xt_version,
        torch=torch.__version__,
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    )


def measure(args) -> dict:
    device, dtype, xt = setup(args)
    decoder = xt.Decoder(**decoder_kwargs(args))
    model = xt.TransformerWrapper(num_tokens=256, max_seq_len=args.seq_len, attn_layers=decoder)
    model = xt.AutoregressiveWrapper(model).to(device)
    graphed = getattr(args, "cuda_graph", False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=device.type == "cuda", capturable=graphed)
    step_model = torch.compile(model) if args.compile else model
    # data made up front on the device: the benchmark times the model, not a data loader
    data = torch.randint(0, 256, (args.warmup + args.steps, args.batch, args.seq_len + 1), device=device)

    def step(x):
        with autocast(device, dtype):
            loss = step_model(x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    if graphed:
        from x_transformers.training import GraphedTrainStep

        # the graph's memory pool is allocated while capturing: count it in the peak
        reset_peak_memory(device)
        step = GraphedTrainStep(step_model, optimizer, data[0], dtype)

    for i in range(args.warmup):
        step(data[i])
    if not graphed:
        reset_peak_memory(device)
    with Timer(device) as timer:
        for i in range(args.steps):
            loss = step(data[args.warmup + i])
    tokens = args.steps * args.batch * args.seq_len
    return dict(
        benchmark="train",
        label=args.label,
        config=dict(decoder=decoder_kwargs(args), batch=args.batch, seq_len=args.seq_len, compile=args.compile,
                    cuda_graph=graphed,
                    dtype=str(dtype).removeprefix("torch."), steps=args.steps, warmup=args.warmup),
        params_m=sum(p.numel() for p in model.parameters()) / 1e6,
        tokens_per_s=tokens / timer.seconds,
        step_ms=timer.seconds / args.steps * 1e3,
        peak_memory_gb=peak_memory_gb(device),
        final_loss=loss.item(),
        **environment(device, xt),
    )


def run_upstream(args, argv, script=HERE) -> dict:
    """Re-run this script with the upstream x_transformers: another interpreter, or this one with a different path.
    The subprocess starts in an empty folder so the repository's own package is not on its path."""
    python = args.upstream_python or sys.executable
    # keep the caller's other path entries (site folders with dependencies), minus this repository
    repo = HERE.parent.parent
    kept = [e for e in os.environ.get("PYTHONPATH", "").split(os.pathsep) if e and Path(e).resolve() != repo]
    if args.upstream_path:
        kept.insert(0, str(Path(args.upstream_path).resolve()))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(kept)}
    skip = {"--upstream-python", "--upstream-path", "--json", "--label"}
    passed, it = [], iter(argv)
    for a in it:
        name = a.split("=")[0]
        if name in skip:
            if "=" not in a:
                next(it, None)
            continue
        passed.append(a)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "upstream.json"
        cmd = [python, str(script), *passed, "--json", str(out), "--label", "upstream"]
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"upstream run failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())["results"][0]


def report(results: list[dict], metric: str, columns: list[str], args):
    """Print a table (and the ratio to upstream when it ran), write JSON when asked."""
    rows = [[r["label"], *(format_cell(r.get(c)) for c in columns)] for r in results]
    header = ["impl", *columns]
    if len(results) == 2:
        ratio = results[0][metric] / results[1][metric]
        header.append(f"{metric} ratio")
        rows[0].append(f"{ratio:.2f}x")
        rows[1].append("1.00x")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header, *rows]:
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(results=results), indent=2))


def format_cell(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.0f}" if v >= 1000 else f"{v:.3g}"
    return str(v)


def finish_args(args, defaults: dict, smoke: dict):
    """Fill unset sizes from `defaults`, or from `smoke` (tiny CPU sizes) under --smoke."""
    if args.smoke:
        for k, v in smoke.items():
            setattr(args, k, v)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.label is None:
        import x_transformers

        ours = Path(x_transformers.__file__).resolve().parent.parent == HERE.parent.parent
        args.label = "ours" if ours else "upstream"
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed training steps")
    p.add_argument("--cuda-graph", action="store_true",
                   help="capture the whole eager training step as one CUDA graph (training.GraphedTrainStep; ours)")
    args = p.parse_args(argv)
    smoke = dict(dim=64, depth=2, heads=2, batch=2, seq_len=64, steps=2, warmup=1, device="cpu")
    args = finish_args(args, dict(batch=16, seq_len=1024, steps=20, warmup=5), smoke)

    results = [measure(args)]
    if args.upstream_python or args.upstream_path:
        results.append(run_upstream(args, argv))
    report(results, "tokens_per_s", ["tokens_per_s", "step_ms", "peak_memory_gb", "final_loss"], args)
    return results


if __name__ == "__main__":
    main()
