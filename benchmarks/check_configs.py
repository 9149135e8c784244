"""Run a chunked kernel's forward + backward at several shapes and launch settings, each in a fresh process, and
compare it with the fp32 token-by-token reference: finds shapes or settings a GPU compiler gets wrong (an illegal
memory access poisons the whole process, hence one process per case; CUDA_LAUNCH_BLOCKING=1 names the failing kernel).

    python benchmarks/check_configs.py --op chunk_delta_rule --shapes 2,80,2,16,32 2,80,2,64,64 \
        --set "" "x_transformers.ops.delta_rule.chunk.WY_STAGES=2" --json out.json

Each --set entry is one setting: comma-separated MODULE.NAME=VALUE overrides ("" = the defaults).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

OPS = {
    "chunk_delta_rule": ("x_transformers.ops.delta_rule", "chunk_delta_rule", "naive_delta_rule"),
    "chunk_gla": ("x_transformers.ops.gla", "chunk_gla", "naive_recurrent_gla"),
    "chunk_simple_gla": ("x_transformers.ops.simple_gla", "chunk_simple_gla", "naive_simple_gla"),
}


def run_case(op, shape, settings, dtype, gated):
    """One case in this process: {'ok', 'max_rel_rms', 'worst'} (raises on a kernel error)."""
    import torch
    import torch.nn.functional as F

    for item in filter(None, settings.split(",")):
        target, _, value = item.partition("=")
        module_name, _, name = target.rpartition(".")
        module = importlib.import_module(module_name)
        setattr(module, name, type(getattr(module, name))(value))
    package, fn_name, ref_name = OPS[op]
    module = importlib.import_module(package)
    fn, ref = getattr(module, fn_name), getattr(module, ref_name)
    B, T, H, K, V = shape
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, d, generator=gen) for d in (K, K, V))
    h0 = torch.randn(B, H, K, V, generator=gen)
    extra = []
    if op == "chunk_delta_rule":
        k = F.normalize(k, dim=-1)
        extra = [torch.rand(B, T, H, generator=gen), -torch.rand(B, T, H, generator=gen) if gated else None]
    elif op == "chunk_gla":
        extra = [-torch.rand(B, T, H, K, generator=gen)]
    else:
        extra = [-torch.rand(B, T, H, generator=gen) if gated else None]
    inputs = [q, k, v, *extra]

    def go(f, dt):
        leaves = [None if x is None else (x.to(dt) if i < 3 else x).to(dev).requires_grad_() for i, x in
                  enumerate(inputs)]
        state = h0.to(dev).requires_grad_()
        o, ht = f(*leaves, initial_state=state, output_final_state=True)
        g2 = torch.Generator().manual_seed(1)
        loss = (o.float() * torch.randn(o.shape, generator=g2).to(dev)).sum()
        loss = loss + (ht * torch.randn(ht.shape, generator=g2).to(dev)).sum()
        loss.backward()
        return [o, ht] + [x.grad for x in leaves if x is not None] + [state.grad]

    out = go(fn, getattr(torch, dtype))
    if dev == "cuda":
        torch.cuda.synchronize()
    want = go(ref, torch.float32)
    errs = []
    for a, b in zip(out, want):
        a, b = a.double(), b.double()
        errs.append(((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp(min=1e-12)).item())
    tol = 5e-3 if dtype == "float32" else 2e-2
    return dict(ok=max(errs) < tol, max_rel_rms=max(errs), worst=errs.index(max(errs)))


def has_cuda():
    import torch

    return torch.cuda.is_available()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", default="chunk_delta_rule", choices=sorted(OPS))
    p.add_argument("--shapes", nargs="+", default=["2,80,2,16,32"], help="B,T,H,K,V")
    p.add_argument("--set", nargs="+", default=[""], help="settings, each comma-separated MODULE.NAME=VALUE")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--plain", action="store_true", help="no gate (delta rule / simple gla)")
    p.add_argument("--jobs", type=int, default=8)
    p.add_argument("--json", default=None)
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case, print its JSON
    args = p.parse_args(argv)
    if args.case:
        case = json.loads(args.case)
        print("RESULT " + json.dumps(run_case(**case)))
        return
    cases = [dict(op=args.op, shape=[int(x) for x in s.split(",")], settings=st, dtype=dt, gated=not args.plain)
             for s in args.shapes for st in args.set for dt in args.dtypes.split(",")]

    def launch(case):
        res = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], env=env, capture_output=True,
                             text=True, timeout=600)
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
        if lines:
            return {**case, **json.loads(lines[-1][7:])}
        tail = (res.stdout + res.stderr).strip().splitlines()
        kernel = next((ln.strip() for ln in reversed(tail) if "_kernel[" in ln or "kernel" in ln and ".py" in ln), "")
        return {**case, "ok": False, "error": (tail[-1] if tail else "")[:200], "where": kernel[:200]}

    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    if not has_cuda():  # off a GPU the kernels run under the Triton interpreter (tiny shapes only)
        env.setdefault("TRITON_INTERPRET", "1")

    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(launch, cases))
    for r in rows:
        status = "ok" if r["ok"] else "FAIL"
        detail = f"rel rms {r['max_rel_rms']:.1e}" if "max_rel_rms" in r else f"{r['error']} @ {r['where']}"
        print(f"{status:4} {r['op']} {r['shape']} {r['dtype']:8} [{r['settings'] or 'defaults'}] {detail}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
