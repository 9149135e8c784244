"""Count the PyTorch glue ops of one linear-attention mixer block: one forward + backward under bf16 autocast.

    python benchmarks/count_mixer_ops.py                                  # the six main mixers, 2 x 256, dim 512
    python benchmarks/count_mixer_ops.py --mixers gated_deltanet --ops    # per-op table
    python benchmarks/count_mixer_ops.py --time --json counts.json        # also fwd+bwd ms, JSON out
    python benchmarks/count_mixer_ops.py --device cuda --time --seq-len 8192 --conv-check   # on a GPU

Every aten op below autograd is seen by a TorchDispatchMode. The recurrence itself (the `x_transformers.ops`
call: Triton on a GPU, a chunked PyTorch path on CPU) runs in a region of its own, forward and backward, so its
ops are counted apart from the mixer's glue: projections, norms, gates, casts, layout copies. The glue counts are
what a GPU launches around the kernels; the `.contiguous()` the Triton launchers apply to their inputs is counted
as glue too. "bytes" is the size of every op's outputs, a rough estimate of memory traffic; view ops launch no
kernel and are left out of both columns (they are listed with --ops).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections import Counter, defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import x_transformers.mixers as mixers_pkg
from x_transformers.mixers import MIXERS, ShortConvolution, make_mixer

KERNELS = ("chunk_delta_rule", "fused_recurrent_delta_rule", "chunk_simple_gla", "fused_recurrent_simple_gla",
           "chunk_gla", "fused_recurrent_gla", "chunk_hgrn", "fused_recurrent_hgrn", "causal_conv1d")
# kernels whose output has the dtype of their first input (the others: of the values, their third)
INPUT_FIRST = ("chunk_hgrn", "fused_recurrent_hgrn", "causal_conv1d")
MATMULS = {"mm", "addmm", "bmm", "matmul", "linear", "_efficient_attention_forward"}


class OpCounter(TorchDispatchMode):
    """Counts calls and output bytes per aten op, in the region ('glue' or 'kernel') that is current."""

    def __init__(self):
        super().__init__()
        self.region = "glue"
        self.calls = defaultdict(Counter)
        self.bytes = defaultdict(Counter)
        self.views = Counter()

    @contextlib.contextmanager
    def within(self, region):
        prev, self.region = self.region, region
        try:
            yield
        finally:
            self.region = prev

    def record(self, name, tensors):
        self.calls[self.region][name] += 1
        self.bytes[self.region][name] += sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        tensors = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not tensors:
            return out  # metadata only (dtypes, sizes): no kernel
        if func.is_view or name in ("detach", "alias", "lift_fresh", "_unsafe_view"):
            self.views[name] += 1
            return out
        self.calls[self.region][name] += 1
        self.bytes[self.region][name] += sum(t.numel() * t.element_size() for t in tensors)
        return out


COUNTER: OpCounter | None = None


def region(name):
    return COUNTER.within(name) if COUNTER is not None else contextlib.nullcontext()


class KernelRegion(torch.autograd.Function):
    """Runs a kernel call with its forward and backward ops counted in the 'kernel' region."""

    @staticmethod
    def forward(ctx, fn, kwargs, tensor_kwargs, *args):
        with region("kernel"), torch.enable_grad():
            leaves = [a.detach().requires_grad_(a.requires_grad) if torch.is_tensor(a) else a for a in args]
            n = len(leaves) - len(tensor_kwargs)
            o, state = fn(*leaves[:n], **kwargs, **dict(zip(tensor_kwargs, leaves[n:])))
            # the Triton launchers return a contiguous output in the value's dtype
            value = leaves[0] if fn.__name__ in INPUT_FIRST else leaves[2]
            o = o.to(value.dtype).contiguous()
        ctx.leaves, ctx.outputs = leaves, (o,)
        return o.detach(), state.detach() if state is not None else None

    @staticmethod
    def backward(ctx, do, dstate):
        # the Triton backward makes the incoming gradient contiguous, outside any kernel
        do = do.contiguous()
        with region("kernel"):
            inputs = [a for a in ctx.leaves if torch.is_tensor(a) and a.requires_grad]
            grads = iter(torch.autograd.grad(ctx.outputs, inputs, (do,), allow_unused=True))
            # and contiguous gradients in the inputs' dtypes
            out = [next(grads) if torch.is_tensor(a) and a.requires_grad else None for a in ctx.leaves]
            out = [d.to(a.dtype).contiguous() if d is not None else None for a, d in zip(ctx.leaves, out)]
        return (None, None, None, *out)


def counted_kernel(fn):
    def call(*args, **kwargs):
        # what the Triton launchers do with their inputs before the kernels see them
        args = [a.contiguous() if torch.is_tensor(a) else a for a in args]
        tensor_kwargs = {k: v.contiguous() for k, v in kwargs.items() if torch.is_tensor(v)}
        kwargs = {k: v for k, v in kwargs.items() if k not in tensor_kwargs}
        return KernelRegion.apply(fn, kwargs, tuple(tensor_kwargs), *args, *tensor_kwargs.values())

    call.__name__ = fn.__name__
    return call


class KernelStub(torch.autograd.Function):
    """Stands in for a kernel when timing the glue alone: outputs and gradients are allocated, nothing computed."""

    @staticmethod
    def forward(ctx, value, state_shape, *inputs):
        ctx.inputs = inputs
        state = value.new_zeros(state_shape, dtype=torch.float32) if state_shape is not None else None
        return torch.zeros_like(value), state

    @staticmethod
    def backward(ctx, do, dstate):
        return (None, None, *(torch.zeros_like(t) if torch.is_tensor(t) else None for t in ctx.inputs))


def stub_kernel(fn):
    def call(*args, initial_state=None, output_final_state=False, **kwargs):
        args = [a.contiguous() if torch.is_tensor(a) else a for a in args]
        tensors = [*args, *(v.contiguous() for v in kwargs.values() if torch.is_tensor(v))]
        value = args[0] if fn.__name__ in INPUT_FIRST else args[2]
        if fn.__name__ == "causal_conv1d":
            # the new decode cache: the last w - 1 inputs
            state_shape = (value.shape[0], args[1].shape[-1] - 1, value.shape[-1])
        elif not output_final_state:
            state_shape = None
        elif fn.__name__ in ("chunk_hgrn", "fused_recurrent_hgrn"):
            state_shape = value[:, 0].shape
        else:
            state_shape = (value.shape[0], value.shape[2], args[1].shape[-1], value.shape[-1])
        return KernelStub.apply(value, state_shape, *tensors)

    call.__name__ = fn.__name__
    return call


class FusedRMSNorm(torch.autograd.Function):
    """F.rms_norm counted as the one fused kernel each way that CUDA runs when input and weight share a dtype (the
    CPU build decomposes it into a dozen ops, which a GPU does not launch)."""

    @staticmethod
    def forward(ctx, x, shape, weight, eps):
        with region("fused"), torch.enable_grad():
            leaves = [t.detach().requires_grad_(t.requires_grad) if torch.is_tensor(t) else t for t in (x, weight)]
            out = RMS_NORM(leaves[0], shape, leaves[1], eps)
        ctx.leaves, ctx.out = leaves, out
        if COUNTER is not None:
            COUNTER.record("rms_norm (fused)", [out])
        return out.detach()

    @staticmethod
    def backward(ctx, dout):
        with region("fused"):
            inputs = [t for t in ctx.leaves if torch.is_tensor(t) and t.requires_grad]
            grads = iter(torch.autograd.grad(ctx.out, inputs, dout, allow_unused=True))
            dx, dw = (next(grads) if torch.is_tensor(t) and t.requires_grad else None for t in ctx.leaves)
        if COUNTER is not None:
            COUNTER.record("rms_norm_backward (fused)", [dx, dw])
        return dx, None, dw, None


RMS_NORM = torch.nn.functional.rms_norm


def rms_norm(x, normalized_shape, weight=None, eps=None):
    if weight is not None and weight.dtype == x.dtype:
        return FusedRMSNorm.apply(x, normalized_shape, weight, eps)
    return RMS_NORM(x, normalized_shape, weight, eps)


@contextlib.contextmanager
def patched(wrap=counted_kernel, fuse_rms_norm=True):
    """Route every kernel the mixer modules imported through `wrap` (KernelRegion by default), and rms_norm through
    FusedRMSNorm."""
    undo = [(torch.nn.functional, "rms_norm", RMS_NORM)]
    if fuse_rms_norm:
        torch.nn.functional.rms_norm = rms_norm
    for module_path in ("x_transformers.mixers.base", *(path for path, _ in MIXERS.values())):
        module = __import__(module_path, fromlist=["_"])
        for name in KERNELS:
            fn = getattr(module, name, None)
            if fn is not None:
                undo.append((module, name, fn))
                setattr(module, name, wrap(fn))
    try:
        yield
    finally:
        for module, name, fn in undo:
            setattr(module, name, fn)


def fwd_bwd(mixer, x, grad):
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        # a view, as inside a model the input is no leaf: autocast caches the casts of leaves only
        out = mixer(x.view_as(x))
    out.backward(grad)


def count(name, args):
    global COUNTER
    torch.manual_seed(0)
    mixer = make_mixer(name, dim=args.dim, heads=args.heads).to(args.device)
    x = torch.randn(args.batch, args.seq_len, args.dim, device=args.device, requires_grad=True)
    with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16), torch.no_grad():
        dtype = mixer(x[:, :2]).dtype
    grad = torch.randn(args.batch, args.seq_len, args.dim, device=args.device, dtype=dtype)
    # count the CUDA path of the short convolution (its kernel), wherever this runs
    ShortConvolution.use_kernel = True
    with patched():
        fwd_bwd(mixer, x, grad)  # warm-up: lazily built buffers are not part of a step
        mixer.zero_grad(set_to_none=True)
        x.grad = None
        COUNTER = OpCounter()
        with COUNTER:
            fwd_bwd(mixer, x, grad)
        counter, COUNTER = COUNTER, None
    ShortConvolution.use_kernel = None
    glue, kernel = counter.calls["glue"], counter.calls["kernel"]
    glue_bytes = counter.bytes["glue"]
    result = dict(
        mixer=name,
        glue_ops=sum(glue.values()),
        glue_elementwise_ops=sum(v for k, v in glue.items() if k not in MATMULS),
        glue_matmuls=sum(v for k, v in glue.items() if k in MATMULS),
        glue_mb=sum(glue_bytes.values()) / 2**20,
        glue_elementwise_mb=sum(v for k, v in glue_bytes.items() if k not in MATMULS) / 2**20,
        kernel_ops_cpu_path=sum(kernel.values()),
        views=sum(counter.views.values()),
        ops={k: dict(calls=v, mb=round(glue_bytes[k] / 2**20, 3)) for k, v in glue.most_common()},
    )
    if args.time:
        result["fwd_bwd_ms"] = time_fwd_bwd(lambda: fwd_bwd(mixer, x, grad), args.repeats, x.device)
        with patched(stub_kernel, fuse_rms_norm=False):
            result["glue_fwd_bwd_ms"] = time_fwd_bwd(lambda: fwd_bwd(mixer, x, grad), args.repeats, x.device)
    return result


def time_fwd_bwd(fn, repeats, device):
    """Fastest of `repeats` calls (after one warm-up), in ms: the run least disturbed by other work."""
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return round(min(times[1:]), 3)


def conv_check(args):
    """The short convolution's two paths, fwd+bwd under bf16 autocast on --device at the gated_deltanet q/k/v width:
    the kernel (ops.causal_conv1d, SiLU fused) and the shifted products (then SiLU)."""
    width = 3 * args.dim
    conv = ShortConvolution(width).to(args.device)
    x = torch.randn(args.batch, args.seq_len, width, device=args.device, requires_grad=True)
    grad = torch.randn_like(x, dtype=torch.bfloat16)

    def run(use_kernel):
        conv.use_kernel = use_kernel
        with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16):
            conv(x.to(torch.bfloat16))[0].backward(grad)
        conv.use_kernel = None

    device = torch.device(args.device)
    result = {name: time_fwd_bwd(lambda k=k: run(k), args.repeats, device) for name, k in (("kernel", True),
                                                                                           ("shifted", False))}
    print(f"short conv fwd+bwd, (B={args.batch}, T={args.seq_len}, C={width}) on {args.device}: "
          f"kernel {result['kernel']:.3f} ms, shifted products {result['shifted']:.3f} ms")
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mixers", nargs="+", default=["gated_deltanet", "deltanet", "gla", "retnet", "mamba2", "hgrn2"])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--ops", action="store_true", help="print the per-op table of every mixer")
    p.add_argument("--device", default="cpu")
    p.add_argument("--time", action="store_true", help="also time one fwd+bwd on --device (fastest of --repeats, "
                   "bf16 autocast, not counted): the whole block, and the glue alone with the kernels stubbed out")
    p.add_argument("--conv-check", action="store_true", help="also time the short convolution against shifted products")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--json", default=None, help="write the results here as JSON")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    results = [count(name, args) for name in args.mixers]

    for r in results:
        if args.ops:
            print(f"\n{r['mixer']}: glue ops of one fwd+bwd (B={args.batch}, T={args.seq_len}, dim={args.dim})")
            print(f"  {'op':<34}{'calls':>7}{'MB out':>10}")
            for op, v in r["ops"].items():
                print(f"  {op:<34}{v['calls']:>7}{v['mb']:>10.2f}")
    print(f"\nB={args.batch} T={args.seq_len} dim={args.dim} heads={args.heads}, bf16 autocast, one fwd+bwd, "
          f"{args.device}, glue = every op outside the recurrence kernel (x_transformers from {mixers_pkg.__file__})")
    header = f"{'mixer':<16}{'glue ops':>9}{'elementwise':>12}{'matmuls':>8}{'glue MB':>9}{'elemwise MB':>12}"
    header += f"{'ms':>9}{'glue ms':>9}" if args.time else ""
    print(header)
    for r in results:
        line = f"{r['mixer']:<16}{r['glue_ops']:>9}{r['glue_elementwise_ops']:>12}{r['glue_matmuls']:>8}"
        line += f"{r['glue_mb']:>9.1f}{r['glue_elementwise_mb']:>12.1f}"
        line += f"{r['fwd_bwd_ms']:>9.2f}{r['glue_fwd_bwd_ms']:>9.2f}" if args.time else ""
        print(line)
    payload = dict(
        benchmark="count_mixer_ops", torch=torch.__version__, device=args.device, dim=args.dim, heads=args.heads,
        batch=args.batch, seq_len=args.seq_len, results=results,
    )
    if args.conv_check:
        payload["conv_check_ms"] = conv_check(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
    print(json.dumps([{k: v for k, v in r.items() if k != "ops"} for r in results]))


if __name__ == "__main__":
    main()
