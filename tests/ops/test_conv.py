"""Causal depthwise short convolution: the Triton kernels vs the PyTorch reference and `F.conv1d` (outputs, new cache
and the gradients of x, weight, bias and cache), decoding step by step, packed sequences, bad input.

On CPU the kernels run under TRITON_INTERPRET=1 (set in conftest.py) at tiny shapes; on a CUDA machine the same checks
run on the GPU, plus the benchmark shape (b=2, n=8192, d=1536): `pytest tests/ops/test_conv.py -x -q`.
"""

import os
import sys

import pytest
import torch
import torch.nn.functional as F

from x_transformers.ops import causal_conv1d
from x_transformers.ops.conv import causal_conv as conv_module
from x_transformers.ops.conv import naive_causal_conv1d

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
NAMES = ("out", "new_cache", "dx", "dweight", "dbias", "dcache")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def make_inputs(B, T, D, W, *, bias=True, cache=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=gen)
    weight = torch.randn(D, W, generator=gen) / W**0.5
    b = torch.randn(D, generator=gen) if bias else None
    c = torch.randn(B, W - 1, D, generator=gen) if cache else None
    return [t.to(DEVICE) if t is not None else None for t in (x, weight, b, c)]


def run(fn, inputs, dtype, activation=None, cu_seqlens=None):
    """Forward and backward (fixed random cotangents for the output and the new cache) of one path; x and the cache
    are cast to dtype, weight and bias stay fp32 (as in a mixer under autocast)."""
    x, weight, bias, cache = leaves = [
        None if t is None else (t.to(dtype) if i in (0, 3) else t).detach().clone().requires_grad_()
        for i, t in enumerate(inputs)
    ]
    out, new_cache = fn(x, weight, bias, activation, cache, cu_seqlens)
    gen = torch.Generator().manual_seed(1)
    loss = (out.float() * torch.randn(out.shape, generator=gen).to(out.device)).sum()
    loss = loss + (new_cache.float() * torch.randn(new_cache.shape, generator=gen).to(out.device)).sum()
    loss.backward()
    return out, new_cache, *(None if t is None else t.grad for t in leaves)


def conv1d_oracle(x, weight, bias, activation, cache, cu_seqlens):
    """Straight from the definition with `F.conv1d` on channels-first fp32 inputs (no varlen)."""
    W = weight.shape[1]
    full = torch.cat((cache, x), dim=1) if cache is not None else F.pad(x, (0, 0, W - 1, 0))
    out = F.conv1d(full.float().transpose(1, 2), weight[:, None], bias, groups=weight.shape[0]).transpose(1, 2)
    if activation == "silu":
        out = F.silu(out)
    return out.to(x.dtype), full[:, full.shape[1] - (W - 1) :]


def check(inputs, dtype=torch.float32, activation=None, cu_seqlens=None, ref_fn=naive_causal_conv1d, kernel_check=None):
    out = run(causal_conv1d, inputs, dtype, activation, cu_seqlens)
    ref = run(ref_fn, inputs, torch.float32, activation, cu_seqlens)
    assert out[0].dtype == dtype and out[1].dtype == dtype
    # a width-1 kernel has an empty cache: equal shapes are all there is to compare
    keep = [i for i, t in enumerate(ref) if t is None or t.numel() > 0]
    assert all(o is None or o.shape == r.shape for o, r in zip(out, ref) if r is not None)
    kernel_check.assert_all_close(*([seq[i] for i in keep] for seq in (NAMES, out, ref)), TOL[dtype], f"{dtype}")


T_SMALL = 37 if not CUDA else 3000  # several row blocks, not a multiple of one
BLOCK_NAMES = ("FWD_BLOCKS", "BWD_WEIGHT_BLOCKS", "BWD_INPUT_BLOCKS")
DEFAULT_BLOCKS = {name: getattr(conv_module, name) for name in BLOCK_NAMES}


@pytest.fixture(autouse=True)
def small_blocks_exact_reference(monkeypatch):
    """On CPU, blocks of 16 rows and 32 channels: the tiny test shapes then span several of each (and end in partial
    ones), as real shapes do with the default blocks."""
    if not CUDA:
        for name in BLOCK_NAMES:
            monkeypatch.setattr(conv_module, name, (16, 32, 4))
    # the fp32 references through cuDNN must not round to TF32
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@pytest.mark.parametrize("W, bias, activation, cache", [
    (4, False, None, False), (4, True, None, False), (4, False, "silu", False), (4, True, "silu", True),
    (4, False, None, True), (3, False, None, False), (3, True, "silu", True), (2, False, None, False),
    (2, True, "silu", True),
])
def test_matches_reference(W, bias, activation, cache, kernel_check):
    check(make_inputs(2, T_SMALL, 40, W, bias=bias, cache=cache), activation=activation, kernel_check=kernel_check)


@pytest.mark.parametrize("W, bias, activation, cache", [(3, True, "silu", True), (4, False, None, False)])
def test_transposed_taps(W, bias, activation, cache, monkeypatch, kernel_check):
    """Many tokens read the weight transposed to [w, d] (16-byte loads of each tap): same results."""
    monkeypatch.setattr(conv_module, "TRANSPOSE_WEIGHT_FROM", 0)
    check(make_inputs(2, T_SMALL, 40, W, bias=bias, cache=cache), activation=activation, kernel_check=kernel_check)


@pytest.mark.parametrize("activation, cache", [(None, False), ("silu", True)])
def test_matches_conv1d(activation, cache, kernel_check):
    check(make_inputs(2, T_SMALL, 24, 4, cache=cache), activation=activation, ref_fn=conv1d_oracle,
          kernel_check=kernel_check)


@pytest.mark.parametrize("activation, cache", [(None, False), ("silu", True)])
def test_bf16(activation, cache, kernel_check):
    check(make_inputs(2, T_SMALL, 40, 4, cache=cache), torch.bfloat16, activation, kernel_check=kernel_check)


@pytest.mark.parametrize("W", [1, 8])
def test_widths_one_and_eight(W, kernel_check):
    check(make_inputs(1, 20, 16, W, cache=W > 1), activation="silu", kernel_check=kernel_check)


def test_wider_than_eight_takes_the_torch_path(kernel_check):
    check(make_inputs(1, 20, 8, 9, cache=True), ref_fn=conv1d_oracle, kernel_check=kernel_check)


def test_short_input_without_cache_pads_the_new_cache():
    x, weight, bias, _ = make_inputs(2, 2, 8, 4)
    out, new_cache = causal_conv1d(x, weight, bias)
    assert new_cache.shape == (2, 3, 8)
    assert (new_cache[:, 0] == 0).all() and torch.equal(new_cache[:, 1:], x)
    assert torch.allclose(out, naive_causal_conv1d(x, weight, bias)[0], atol=1e-6)


def test_decode_steps_equal_one_parallel_call():
    """A prefill chunk, then one token at a time through the cache: the same outputs and final cache as one call."""
    x, weight, bias, cache = make_inputs(2, 9, 24, 4, cache=True)
    full, full_cache = causal_conv1d(x, weight, bias, "silu", cache)
    outs, c = [], cache
    out, c = causal_conv1d(x[:, :5], weight, bias, "silu", c)
    outs.append(out)
    for t in range(5, 9):
        out, c = causal_conv1d(x[:, t : t + 1], weight, bias, "silu", c)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c, full_cache)


def test_varlen_equals_separate_calls():
    """Packed sequences (one of them empty, one shorter than the kernel) never mix: outputs, per-sequence caches and
    gradients as if each were convolved alone."""
    lens = [13, 0, 2, 22]
    x, weight, bias, _ = make_inputs(1, sum(lens), 40, 4)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=DEVICE)
    packed = run(causal_conv1d, (x, weight, bias, None), torch.float32, "silu", cu)
    outs, caches, dxs = [], [], []
    dw, db = torch.zeros_like(weight), torch.zeros_like(bias)
    gen = torch.Generator().manual_seed(1)
    # the cotangents `run` drew for the packed output and caches, cut per sequence
    g_out = torch.randn(packed[0].shape, generator=gen).to(DEVICE)
    g_cache = torch.randn(packed[1].shape, generator=gen).to(DEVICE)
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        xi, wi, bi = (t.detach().clone().requires_grad_() for t in (x[:, s:e], weight, bias))
        out, c = causal_conv1d(xi, wi, bi, "silu")
        ((out * g_out[:, s:e]).sum() + (c * g_cache[i : i + 1]).sum()).backward()
        outs.append(out)
        caches.append(c)
        dxs.append(xi.grad)
        # an empty sequence does not reach the weights
        if e > s:
            dw += wi.grad
            db += bi.grad
    torch.testing.assert_close(packed[0], torch.cat(outs, dim=1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed[1], torch.cat(caches), rtol=0, atol=0)
    torch.testing.assert_close(packed[2], torch.cat(dxs, dim=1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed[3], dw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[4], db, rtol=1e-5, atol=1e-5)


def test_weight_gradient_is_deterministic():
    inputs = make_inputs(2, T_SMALL, 40, 4)
    a, b = (run(causal_conv1d, inputs, torch.float32) for _ in range(2))
    assert torch.equal(a[3], b[3]) and torch.equal(a[4], b[4])


def test_empty_input():
    x, weight, bias, cache = make_inputs(2, 0, 8, 4, cache=True)
    out, new_cache = causal_conv1d(x, weight, bias, cache=cache)
    assert out.shape == (2, 0, 8) and torch.equal(new_cache, cache)


def test_matches_short_convolution_module():
    """The op on the mixer's `conv.weight` (d, 1, w) reproduces `ShortConvolution`, with and without a cache."""
    try:
        from x_transformers.mixers.base import ShortConvolution
    except Exception as err:  # another helper's file, possibly mid-edit
        pytest.skip(f"mixers.base not importable: {err}")
    conv = ShortConvolution(32, 4).to(DEVICE)
    x, _, _, cache = make_inputs(2, 11, 32, 4, cache=True)
    weight = conv.conv.weight.squeeze(1)
    for c in (None, cache):
        ref, ref_cache = conv(x, cache=c)
        out, new_cache = causal_conv1d(x, weight, activation="silu", cache=c)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(new_cache, ref_cache)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(weight=torch.randn(8, 4)), ValueError, "`weight` must have shape"),
    (dict(weight=torch.randn(16, 1, 4)), ValueError, "`weight` must have shape"),
    (dict(cache=torch.randn(2, 4, 16)), ValueError, "`cache` must have shape"),
    (dict(bias=torch.randn(8)), ValueError, "`bias` must have shape"),
    (dict(activation="relu"), ValueError, "`activation` must be one of"),
    (dict(x=torch.randn(2, 5)), ValueError, "`x` must have shape"),
    (dict(x=torch.ones(2, 5, 16, dtype=torch.long)), TypeError, "`x` must be a floating point"),
    (dict(cu_seqlens=torch.tensor([0, 5])), ValueError, "batch size must be 1"),
    (dict(x=torch.randn(1, 5, 16), cu_seqlens=torch.tensor([0, 4])), ValueError, "must start at 0 and end at T=5"),
    (dict(x=torch.randn(1, 5, 16), cache=torch.randn(1, 3, 16), cu_seqlens=torch.tensor([0, 5])), ValueError,
     "not supported with `cu_seqlens`"),
])
def test_bad_input(kwargs, error, match):
    args = dict(x=torch.randn(2, 5, 16), weight=torch.randn(16, 4)) | kwargs
    with pytest.raises(error, match=match):
        causal_conv1d(**args)


@pytest.mark.skipif(not CUDA, reason="real shapes need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation, bias, cache", [(None, False, False), ("silu", True, True)])
def test_real_shape(dtype, activation, bias, cache, kernel_check):
    """The benchmark shape of the mixers' short convolution: b=2, n=8192, d=3 * 512."""
    check(make_inputs(2, 8192, 1536, 4, bias=bias, cache=cache), dtype, activation, kernel_check=kernel_check)


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_decode_step_on_gpu(kernel_check):
    check(make_inputs(16, 1, 1536, 4, cache=True), torch.bfloat16, "silu", kernel_check=kernel_check)


@pytest.mark.skipif(not CUDA, reason="needs a GPU (the interpreter's kernels cannot be traced)")
def test_decode_step_under_torch_compile():
    """The fast decoder compiles its step with fullgraph=True: the op must trace (Triton launch inside an autograd
    Function) and give the eager results."""
    x, weight, bias, cache = make_inputs(4, 1, 1536, 4, cache=True)
    step = torch.compile(lambda x, w, b, c: causal_conv1d(x, w, b, "silu", c), fullgraph=True, dynamic=False)
    with torch.no_grad():
        for got, want in zip(step(x, weight, bias, cache), causal_conv1d(x, weight, bias, "silu", cache)):
            torch.testing.assert_close(got, want)


@pytest.mark.skipif(os.environ.get("HOPPER_COMPILE") != "1", reason="slow; set HOPPER_COMPILE=1 to run")
def test_compiles_for_hopper(kernel_check):
    kernel_check.hopper_compile("conv")


def test_blocks_shrink_for_short_inputs():
    assert conv_module._blocks((64, 128, 8), 1, 1536) == (16, 128, 8)
    assert conv_module._blocks((64, 128, 8), 8192, 24) == (64, 32, 8)


def test_default_blocks(monkeypatch, kernel_check):
    """The shipped block sizes, over two row blocks and a partial channel block."""
    for name in BLOCK_NAMES:
        monkeypatch.setattr(conv_module, name, DEFAULT_BLOCKS[name])
    check(make_inputs(1, 70, 136, 4, cache=True), activation="silu", kernel_check=kernel_check)


def test_bench_conv_smoke():
    """benchmarks/bench_conv.py runs end to end (tiny shapes; on CPU through the interpreter)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
    import bench_conv

    rows = bench_conv.main(["--smoke"])
    assert [r["impl"] for r in rows] == list(bench_conv.IMPLS)
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in rows)
    assert all(r["max_abs_diff_vs_ours"] < 0.1 for r in rows[1:])
