"""`flash_attention` (softmax attention over packed documents, with the Forgetting Transformer gate) vs the dense
float64 reference: outputs and the gradients of q, k, v and g.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (set in conftest.py) at tiny shapes; on a CUDA machine the same
checks also run at real shapes: `pytest tests/ops/test_attention_kernel.py -x -q`.
"""

import importlib
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from x_transformers.ops.attention import attention_torch, flash_attention, naive_attention
from x_transformers.ops.common.utils import use_triton

FLASH = importlib.import_module("x_transformers.ops.attention.flash")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
NAMES = ("o", "dq", "dk", "dv", "dg")
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def make_inputs(B, T, H, K, V=None, *, HK=None, gate=True, decay=None, seed=0):
    """fp32 q, k, v and a log forget gate: logsigmoid of a normal (as FoX's gates), or -decay * U(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    HK = H if HK is None else HK
    q = torch.randn(B, T, H, K, generator=gen)
    k = torch.randn(B, T, HK, K, generator=gen)
    v = torch.randn(B, T, HK, K if V is None else V, generator=gen)
    g = None
    if gate:
        g = F.logsigmoid(torch.randn(B, T, H, generator=gen) + 2.0) if decay is None else -decay * torch.rand(
            B, T, H, generator=gen)
    return [x.to(DEVICE) if x is not None else None for x in (q, k, v, g)]


def run(fn, inputs, dtype, do=None, **kwargs):
    """o and the gradients of q, k, v, g (g stays fp32) under the cotangent `do` (default: fixed random ones)."""
    q, k, v, g = leaves = [
        None if x is None else (x.to(dtype) if i < 3 else x).detach().clone().requires_grad_()
        for i, x in enumerate(inputs)
    ]
    o = fn(q, k, v, g, **kwargs)
    if do is None:
        do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(o.device)
    (o.double() * do).sum().backward()
    return [o] + [None if x is None else x.grad for x in leaves]


def reference(inputs, dtype, **kwargs):
    """The dense reference in float64, on the inputs rounded to `dtype` first."""
    rounded = [None if x is None else (x.to(dtype) if i < 3 else x).double() for i, x in enumerate(inputs)]
    return run(naive_attention, rounded, torch.float64, **kwargs)


@pytest.fixture
def check(kernel_check):
    def check(inputs, dtype=torch.float32, fn=flash_attention, tol=None, **kwargs):
        out = run(fn, inputs, dtype, **kwargs)
        assert out[0].dtype == dtype and out[0].shape == (*inputs[0].shape[:3], inputs[2].shape[-1])
        ref = reference(inputs, dtype, **kwargs)
        kernel_check.assert_all_close(NAMES, out, ref, TOL[dtype] if tol is None else tol, f"{fn.__name__} {dtype}")
        return out

    return check


def torch_path(q, k, v, g, scale=None, causal=True, cu_seqlens=None):
    return attention_torch(q, k, v, g, q.shape[-1] ** -0.5 if scale is None else scale, causal, cu_seqlens)


PATHS = {"triton": flash_attention, "torch": torch_path}


def test_dispatch():
    q = torch.zeros(1, 2, 1, 16, device=DEVICE)
    assert use_triton(q), "CUDA tensors / TRITON_INTERPRET=1 should take the Triton kernels"


# T not a multiple of any block (fp32 blocks: 64 x 32 forward, 32 x 32 backward), odd head dims
@pytest.mark.parametrize("path", ["triton", "torch"])
@pytest.mark.parametrize("gate,causal", [(True, True), (False, True), (False, False)], ids=["fox", "causal", "full"])
def test_matches_reference(path, gate, causal, check):
    check(make_inputs(2, 77, 2, 24, gate=gate), fn=PATHS[path], causal=causal)


@pytest.mark.parametrize("path", ["triton", "torch"])
def test_single_token(path):
    """One key: o = v, dv = do, and q, k, g get no gradient (zero in the reference, so compared absolutely)."""
    inputs = make_inputs(2, 1, 2, 16)
    out, ref = run(PATHS[path], inputs, torch.float32), reference(inputs, torch.float32)
    for name, a, b in zip(NAMES, out, ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("HK", [1, 2])
def test_grouped_kv_heads(HK, check):
    """Query head h reads kv head h // (H // HK); dk, dv sum over the query heads sharing one."""
    check(make_inputs(1, 70, 4, 16, HK=HK))
    check(make_inputs(1, 40, 4, 16, HK=HK, gate=False), causal=False)


def test_head_dims(check):
    """Head dims padded to the tile (16, 40 -> 64), value width differing from the key width, and 128."""
    check(make_inputs(1, 40, 2, 16))
    check(make_inputs(1, 40, 2, 40, V=24), scale=0.3)
    check(make_inputs(1, 20, 1, 128))


def test_uneven_blocks(check, monkeypatch):
    """Query blocks twice the key blocks (forward, dq) and key blocks twice the query blocks (dk, dv), small enough
    that T = 50 spans many of both: the mask-free and masked phases meet at every kind of boundary."""
    for name, value in dict(FWD_BM=64, FWD_BN=32, DKDV_BM=32, DKDV_BN=64, DQ_BM=64, DQ_BN=32).items():
        monkeypatch.setattr(FLASH, name, value)
    check(make_inputs(2, 50, 2, 16))
    check(make_inputs(1, 50, 2, 16, HK=1, gate=False), causal=False)
    cu = torch.tensor([0, 1, 17, 17, 50], device=DEVICE)
    check(make_inputs(1, 50, 2, 16), cu_seqlens=cu)


# documents of length 1, shorter than a block, empty, and spanning several blocks
CU = [0, 1, 10, 10, 75, 90]


@pytest.mark.parametrize("path", ["triton", "torch"])
@pytest.mark.parametrize("gate,causal", [(True, True), (False, True), (False, False)], ids=["fox", "causal", "full"])
def test_varlen(path, gate, causal, check):
    cu = torch.tensor(CU, dtype=torch.int32, device=DEVICE)
    check(make_inputs(1, CU[-1], 2, 16, HK=1, gate=gate), fn=PATHS[path], causal=causal, cu_seqlens=cu)


def test_packed_equals_one_by_one():
    """Packing is only a layout: each document's outputs and gradients are those of a call on it alone."""
    inputs = make_inputs(1, CU[-1], 2, 16)
    cu = torch.tensor(CU, device=DEVICE)
    do = torch.randn(*inputs[2].shape[:2], 2, 16, dtype=torch.float64, device=DEVICE)
    packed = run(flash_attention, inputs, torch.float32, do=do, cu_seqlens=cu)
    for bos, eos in zip(CU[:-1], CU[1:]):
        if eos == bos:
            continue
        alone = run(flash_attention, [x[:, bos:eos] for x in inputs], torch.float32, do=do[:, bos:eos])
        for name, a, b in zip(NAMES, packed, alone):
            torch.testing.assert_close(a[:, bos:eos], b, rtol=1e-5, atol=1e-5, msg=f"{name} of [{bos}, {eos})")


@pytest.mark.parametrize("path", ["triton", "torch"])
def test_strong_gates(path, check):
    """Gates down to -20 per step (weights of exp(-1500) across a document) match; gates of -1e4 stay finite and
    leave each query on its own key."""
    check(make_inputs(2, 77, 2, 16, decay=20.0), fn=PATHS[path])
    cu = torch.tensor(CU, device=DEVICE)
    check(make_inputs(1, CU[-1], 2, 16, decay=20.0), fn=PATHS[path], cu_seqlens=cu)
    inputs = make_inputs(1, 40, 2, 16, decay=1e4)
    inputs[3] = inputs[3] - 1e4  # at least 1e4 at every step
    out = run(PATHS[path], inputs, torch.float32)
    for name, t in zip(NAMES, out):
        assert torch.isfinite(t).all(), f"{name} has NaN/inf"
    torch.testing.assert_close(out[0], inputs[2], rtol=1e-5, atol=1e-5)


def test_gate_cumsum():
    """The kernels' c (hi + lo parts of c * log2(e), 48 bits) is the cumsum of g within documents, and dg the
    suffix sums of dc; documents longer than a chunk (256 tokens), empty and of one token."""
    gate_cumsum = importlib.import_module("x_transformers.ops.attention.gate_cumsum")
    gen = torch.Generator().manual_seed(0)
    g = (-10 * torch.rand(1, 600, 3, generator=gen)).to(DEVICE)
    dc = torch.randn(1, 600, 3, generator=gen).to(DEVICE)
    for bounds in ([0, 1, 300, 300, 600], [0, 600]):
        want_c, want_dg = torch.empty_like(g, dtype=torch.float64), torch.empty_like(dc, dtype=torch.float64)
        for bos, eos in zip(bounds[:-1], bounds[1:]):
            want_c[:, bos:eos] = g[:, bos:eos].double().cumsum(1) * math.log2(math.e)
            want_dg[:, bos:eos] = dc[:, bos:eos].double().flip(1).cumsum(1).flip(1)
        cu = torch.tensor(bounds, device=DEVICE) if len(bounds) > 2 else None
        c = gate_cumsum.forget_cumsum(g, cu)
        assert c.dtype == torch.float32 and c.shape == (2, *g.shape)
        torch.testing.assert_close(c[0].double() + c[1].double(), want_c, rtol=1e-13, atol=1e-12)
        dg = gate_cumsum.forget_cumsum_backward(dc, cu, torch.float64)
        torch.testing.assert_close(dg, want_dg, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", ["triton", "torch"])
def test_large_cumulative_gate(path, check):
    """Only c_i - c_j matters, but c itself reaches -3e4 here (where 3000 tokens of -10 gates take it): an fp32 c
    would be off by ulp(3e4) / 2 ~ 1e-3 in every bias, 10x the fp32 tolerance. The first gate shifts every c of its
    document and nothing else, so the outputs are those without the shift; packed, a later document starts deep."""
    inputs = make_inputs(1, 100, 2, 16)
    shifted = [x.clone() for x in inputs]
    shifted[3][:, 0] -= 3e4
    out = check(shifted, fn=PATHS[path])
    torch.testing.assert_close(out[0], run(PATHS[path], inputs, torch.float32)[0], rtol=1e-4, atol=1e-5)
    cu = torch.tensor(CU, device=DEVICE)
    inputs = make_inputs(1, CU[-1], 2, 16)
    inputs[3][:, CU[3]] -= 3e4
    check(inputs, fn=PATHS[path], cu_seqlens=cu)


def test_gate_gradient_long_document(check):
    """dg is a reverse cumsum of dc over the whole document. delta = do . o comes from the output rounded to bf16
    (2**-9 per row), so the row sums of ds are not quite zero; taking dc from the column sums alone (the row sums
    assumed zero) would add those row errors up along the document, to 4.5e-2 of dg here."""
    check(make_inputs(1, 400, 1, 16, decay=1.0), dtype=torch.bfloat16)


@pytest.mark.parametrize("path", ["triton", "torch"])
def test_future_gates_do_not_matter(path):
    """The output at i depends on the gates up to i only: changing later gates leaves o[:, :t] as it was, and a loss
    on o[:, :t] gives the later gates, and the first gate of the document (a shift of every c), no gradient."""
    inputs = make_inputs(1, 60, 2, 16)
    t = 37
    fn = PATHS[path]
    q, k, v, g = inputs
    g = g.clone().requires_grad_()
    o = fn(q, k, v, g)
    changed = g.detach().clone()
    changed[:, t:] = -5 * torch.rand_like(changed[:, t:])
    torch.testing.assert_close(fn(q, k, v, changed)[:, :t], o[:, :t], rtol=0, atol=1e-6)
    (dg,) = torch.autograd.grad(o[:, :t].sum(), g)
    assert (dg[:, t:] == 0).all()
    assert dg[:, 0].abs().max() < 1e-5
    assert dg[:, 1:t].abs().max() > 1e-3
    # packed: a loss on the start of the second document reaches none of the gates after it, in any document
    cu = torch.tensor([0, 20, 45, 60], device=DEVICE)
    o = fn(q, k, v, g, cu_seqlens=cu)
    (dg,) = torch.autograd.grad(o[:, 20:t].sum(), g)
    assert (dg[:, :20] == 0).all() and (dg[:, t:] == 0).all()
    assert dg[:, 20].abs().max() < 1e-5
    assert dg[:, 21:t].abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("path", ["triton", "torch"])
def test_half_precision(dtype, path, check):
    check(make_inputs(2, 70, 2, 32), dtype=dtype, fn=PATHS[path])
    cu = torch.tensor(CU, device=DEVICE)
    check(make_inputs(1, CU[-1], 4, 32, HK=2), dtype=dtype, fn=PATHS[path], cu_seqlens=cu)


def test_gate_without_grad_and_empty():
    q, k, v, g = make_inputs(1, 20, 2, 16)
    q.requires_grad_()
    o = flash_attention(q, k, v, g)
    o.sum().backward()
    assert q.grad is not None and g.grad is None
    empty = flash_attention(q[:, :0], k[:, :0], v[:, :0], g[:, :0])
    assert empty.shape == (1, 0, 2, 16)


def test_fp64_takes_the_exact_path():
    """fp64 runs one document at a time through SDPA (no Triton kernel takes it), agreeing with the reference to
    rounding."""
    inputs = [x.double() for x in make_inputs(1, 30, 2, 16)]
    cu = torch.tensor([0, 12, 30], device=DEVICE)
    out = flash_attention(*inputs, cu_seqlens=cu)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, naive_attention(*inputs, cu_seqlens=cu), rtol=1e-10, atol=1e-10)


def test_bad_inputs():
    q, k, v, g = make_inputs(1, 8, 4, 16)
    with pytest.raises(ValueError, match="needs causal=True"):
        flash_attention(q, k, v, g, causal=False)
    with pytest.raises(ValueError, match="multiple of the key / value heads"):
        flash_attention(q, k[:, :, :3], v[:, :, :3])
    with pytest.raises(ValueError, match="`g` must have shape"):
        flash_attention(q, k, v, g[..., :2])
    with pytest.raises(ValueError, match="`k` must have shape"):
        flash_attention(q, k[..., :8], v)
    with pytest.raises(TypeError, match="share a dtype"):
        flash_attention(q, k, v.half())
    with pytest.raises(TypeError, match="`causal` must be a bool"):
        flash_attention(q, k, v, causal=None)
    with pytest.raises(ValueError, match="batch size must be 1"):
        flash_attention(*(x.expand(2, *x.shape[1:]) for x in (q, k, v)), cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="must start at 0 and end at T=8"):
        flash_attention(q, k, v, cu_seqlens=torch.tensor([0, 5], device=DEVICE))
    wide = torch.zeros(1, 4, 1, 160, device=DEVICE)
    with pytest.raises(ValueError, match="head dims up to 128"):
        flash_attention(wide, wide, wide)


@pytest.mark.skipif(not CUDA, reason="real shapes need a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_real_shapes(dtype, D, check):
    check(make_inputs(2, 1000, 4, D, HK=2), dtype=dtype)
    check(make_inputs(2, 1000, 4, D, gate=False), dtype=dtype, causal=False)
    cu = torch.tensor([0, 0, 333, 1000, 1001, 2048], device=DEVICE)
    check(make_inputs(1, 2048, 4, D, decay=20.0), dtype=dtype, cu_seqlens=cu)


@pytest.mark.slow  # the kernels of the tests above, through the benchmark script
def test_bench_ops_smoke():
    """benchmarks/bench_ops.py times both attention ops end to end (tiny shapes; on CPU through the interpreter)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
    import bench_ops

    rows = bench_ops.main(["--smoke", "--no-fla", "--ops", "flash_attention,forgetting_attention"])
    assert len(rows) == 2
    for row in rows:
        assert "error" not in row, row
        assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0


HOPPER_SCRIPT = r"""
import sys
import torch
sys.path.insert(0, sys.argv[1])
import hopper_compile
from triton.runtime.jit import JITFunction
JITFunction.run = hopper_compile.compile_instead_of_launch
from x_transformers.ops.attention.flash import flash_attention_triton

for dtype in (torch.bfloat16, torch.float32):
    # (head dim, kv heads, gate, causal, packed)
    for D, HK, gate, causal, varlen in ((128, 16, True, True, False), (128, 4, False, False, False),
                                        (64, 16, True, True, True), (16, 2, False, True, False)):
        T, H = 300, 16
        cu = torch.tensor([0, 100, 100, T]) if varlen else None
        q = torch.randn(1, T, H, D, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(1, T, HK, D, dtype=dtype, requires_grad=True) for _ in range(2))
        g = (-torch.rand(1, T, H)).requires_grad_() if gate else None
        o = flash_attention_triton(q, k, v, g, D**-0.5, causal, cu)
        # the intercepted launches leave garbage in the outputs; only the backward launches matter here
        torch.autograd.grad(o.float().sum(), [q, k, v])
print("all kernels compiled for sm_90")
"""


@pytest.mark.skipif(os.environ.get("HOPPER_COMPILE") != "1", reason="slow; set HOPPER_COMPILE=1 to run")
def test_kernels_compile_for_hopper():
    """Compile every kernel for sm_90 without a GPU (tests/ops/hopper_compile.py's launcher; catches what the
    interpreter cannot: dot shapes, shared memory, register spills in its printout)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", HOPPER_SCRIPT, os.path.dirname(__file__)], env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
