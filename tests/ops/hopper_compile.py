"""Compile this repo's Triton kernels for Hopper (sm_90) on a machine without a GPU, to catch errors that the
interpreter cannot see (dot shapes, dtypes, layouts). Launches are intercepted: each kernel is compiled to a cubin with
the argument types of the call instead of being run. Run as `python tests/ops/hopper_compile.py <family> ...` with
TRITON_INTERPRET unset; prints one line per compiled kernel (shared memory in bytes, registers per thread and stack
bytes, i.e. register spills, from cuobjdump) and exits non-zero on the first failure."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import torch

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "unset TRITON_INTERPRET: the interpreter compiles nothing"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32", torch.int64: "i64"}
seen = set()


def register_stats(kernel):
    """Registers and spill bytes of the compiled cubin (the runtime reports them only on a GPU)."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        log = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True).stdout
    regs, stack = re.search(r"REG:(\d+)", log), re.search(r"STACK:(\d+)", log)
    return f"regs={regs[1] if regs else '?'} stack={stack[1] if stack else '?'}"


def compile_instead_of_launch(self, *args, grid, warmup, **kwargs):
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    bound = dict(zip(self.arg_names, args)) | kwargs
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(self.arg_names):
        value = bound[name]
        # like the runtime, which specialises integer arguments equal to 1 into constants
        if i in self.constexprs or value is None or isinstance(value, (bool, str)) or (type(value) is int and value == 1):
            signature[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + DTYPES[value.dtype]
            # like the runtime: 16-byte aligned pointers (every fresh allocation) allow vectorised loads
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{self.__name__}: cannot type argument {name}={value!r}")
    key = (self.__name__, tuple(sorted(signature.items())), tuple(sorted((k, str(v)) for k, v in constexprs.items())))
    if key in seen:
        return None
    seen.add(key)
    kernel = triton.compile(ASTSource(self, signature, constexprs, attrs), target=TARGET, options=options)
    flags = {k: v for k, v in constexprs.items() if v is not None}
    print(f"ok {self.__name__} shared={kernel.metadata.shared} {register_stats(kernel)} {flags}", flush=True)
    return None


def attention_inputs(K, V, H, varlen, dtype, T=300):
    """(cu_seqlens, q, k, v, initial state) of one linear-attention call: a batch of one sequence, or three packed
    ones (an empty one among them)."""
    cu = torch.tensor([0, 100, 100, T]) if varlen else None
    N = 3 if varlen else 1
    q, k = (torch.randn(1, T, H, K, dtype=dtype, requires_grad=True) for _ in range(2))
    v = torch.randn(1, T, H, V, dtype=dtype, requires_grad=True)
    return cu, q, k, v, torch.randn(N, H, K, V, requires_grad=True)


def simple_gla(dtype):
    from x_transformers.ops.simple_gla.chunk import ChunkSimpleGLAFunction
    from x_transformers.ops.simple_gla.fused_recurrent import FusedRecurrentSimpleGLAFunction

    for K, V, varlen in ((128, 128, False), (100, 64, True)):
        cu, q, k, v, h0 = attention_inputs(K, V, 2, varlen, dtype)
        g = torch.randn(1, q.shape[1], 2, requires_grad=True)
        for fn in (ChunkSimpleGLAFunction, FusedRecurrentSimpleGLAFunction):
            for gate in (g, None):
                o, ht = fn.apply(q, k, v, gate, 0.1, h0, True, cu)
                # the intercepted launches leave garbage in the outputs; only the backward launches matter here
                torch.autograd.grad((o.float().sum() + ht.sum()), [q, k, v, h0])


def hgrn(dtype):
    from x_transformers.ops.hgrn import scan
    from x_transformers.ops.hgrn.scan import HGRNScanFunction

    for varlen, scan.CHUNKED in ((False, False), (True, False), (False, True), (True, True)):
        T, D = 300, 96
        cu = torch.tensor([0, 100, 100, T]) if varlen else None
        N = 3 if varlen else 1
        x = torch.randn(1, T, D, dtype=dtype, requires_grad=True)
        g = torch.randn(1, T, D, dtype=dtype, requires_grad=True)
        h0 = torch.randn(N, D, requires_grad=True)
        h, ht = HGRNScanFunction.apply(x, g, h0, True, cu)
        torch.autograd.grad(h.float().sum() + ht.sum(), [x, g, h0])


def single_token(dtype):
    """T = 1 turns the length argument into a compile-time constant."""
    from x_transformers.ops.hgrn.scan import HGRNScanFunction
    from x_transformers.ops.simple_gla.chunk import ChunkSimpleGLAFunction
    from x_transformers.ops.simple_gla.fused_recurrent import FusedRecurrentSimpleGLAFunction

    q, k, v = (torch.randn(2, 1, 2, 64, dtype=dtype, requires_grad=True) for _ in range(3))
    g = torch.randn(2, 1, 2, requires_grad=True)
    h0 = torch.randn(2, 2, 64, 64, requires_grad=True)
    for fn in (ChunkSimpleGLAFunction, FusedRecurrentSimpleGLAFunction):
        o, ht = fn.apply(q, k, v, g, 0.1, h0, True, None)
        torch.autograd.grad((o.float().sum() + ht.sum()), [q, k, v, g, h0])
    x = torch.randn(2, 1, 64, dtype=dtype, requires_grad=True)
    h, ht = HGRNScanFunction.apply(x, x.detach().clone().requires_grad_(), h0[:, 0, 0], True, None)
    torch.autograd.grad(h.float().sum() + ht.sum(), [x])


def delta_rule(dtype):
    from x_transformers.ops.delta_rule.chunk import ChunkDeltaRuleFunction
    from x_transformers.ops.delta_rule.fused_recurrent import FusedRecurrentDeltaRuleFunction

    cases = ((64, 64, 2, False), (128, 128, 2, False), (64, 64, 16, True), (100, 64, 2, True), (128, 128, 16, False))
    for K, V, H, varlen in cases:
        cu, q, k, v, h0 = attention_inputs(K, V, H, varlen, dtype)
        beta = torch.rand(1, q.shape[1], H, dtype=dtype, requires_grad=True)
        g = torch.randn(1, q.shape[1], H, requires_grad=True)
        for fn in (ChunkDeltaRuleFunction, FusedRecurrentDeltaRuleFunction):
            for gate in (g, None):
                # with and without initial / final state: each flag combination is its own compiled kernel
                for state in (h0, None):
                    o, ht = fn.apply(q, k, v, beta, gate, K**-0.5, state, state is not None, cu)
                    # the intercepted launches leave garbage in the outputs; only the backward launches matter here
                    loss = o.float().sum() + (ht.sum() if ht is not None else 0)
                    torch.autograd.grad(loss, [q, k, v, beta])


def conv(dtype):
    from x_transformers.ops.conv.causal_conv import CausalConv1dFunction

    # each flag at the benchmark's width (1536 channels), with the fused SiLU where it changes the backward the most,
    # and widths 2 and 8
    T, D = 300, 1536
    for W, bias, act, cached, varlen in [
        (4, False, False, False, False), (4, True, True, False, False), (4, False, False, True, False),
        (4, False, True, True, False), (4, False, True, False, True), (2, False, False, False, False),
        (8, True, False, True, False),
    ]:
        x = torch.randn(1, T, D, dtype=dtype, requires_grad=True)
        w = torch.randn(D, W, requires_grad=True)
        b = torch.randn(D, requires_grad=True) if bias else None
        cache = torch.randn(1, W - 1, D, dtype=dtype, requires_grad=True) if cached else None
        seq_start = torch.zeros(T, dtype=torch.int32) if varlen else None
        y = CausalConv1dFunction.apply(x, w, b, cache, seq_start, act)
        torch.autograd.grad(y.float().sum(), [x, w])


def gla(dtype):
    from x_transformers.ops.gla.chunk import chunk_gla_triton
    from x_transformers.ops.gla.fused_recurrent import fused_recurrent_gla_triton

    # the Triton entry points (after the public functions' checks), which also prepare the inputs and chunk indices
    for K, V, varlen in ((128, 128, False), (100, 64, True)):
        cu, q, k, v, h0 = attention_inputs(K, V, 2, varlen, dtype)
        g = (-torch.rand(1, q.shape[1], 2, K)).requires_grad_()
        for fn in (chunk_gla_triton, fused_recurrent_gla_triton):
            for state in (h0, None):
                o, ht = fn(q, k, v, g, K**-0.5, state, state is not None, cu)
                # the intercepted launches leave garbage in the outputs; only the backward launches matter here
                loss = o.float().sum() + (ht.sum() if ht is not None else 0)
                torch.autograd.grad(loss, [q, k, v, g])


def rotary(dtype):
    from x_transformers.ops.rotary.rotary import RotaryFunction

    # the attention layers' case (strided q / k views of the fused projection, head dim 64) and an odd width
    for B, H, N, D in ((2, 8, 300, 64), (1, 2, 17, 24)):
        qkv = torch.randn(B, N, 3 * H * D, dtype=dtype)
        t = qkv[..., : H * D].unflatten(-1, (H, D)).transpose(1, 2).requires_grad_()
        cos, sin = torch.randn(1, N, D), torch.randn(1, N, D)
        torch.autograd.grad(RotaryFunction.apply(t, cos, sin).float().sum(), [t])


def layer_norm(dtype):
    from x_transformers.ops.layer_norm.layer_norm import LayerNormFunction

    for M, D in ((1000, 512), (37, 100)):
        x = torch.randn(M, D, dtype=dtype, requires_grad=True)
        w = torch.randn(D, requires_grad=True)
        torch.autograd.grad(LayerNormFunction.apply(x, w, 1e-5).float().sum(), [x, w])


FAMILIES = {
    "simple_gla": simple_gla, "hgrn": hgrn, "single_token": single_token, "delta_rule": delta_rule, "gla": gla,
    "conv": conv, "rotary": rotary, "layer_norm": layer_norm,
}

if __name__ == "__main__":
    JITFunction.run = compile_instead_of_launch
    for family in sys.argv[1:] or FAMILIES:
        for dtype in (torch.bfloat16, torch.float32)[: 1 if family == "single_token" else 2]:
            FAMILIES[family](dtype)
    print("all kernels compiled for sm_90")
