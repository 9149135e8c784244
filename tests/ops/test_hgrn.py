"""Elementwise gated scan (`chunk_hgrn`, `fused_recurrent_hgrn`) vs the fp32 token-by-token reference: outputs,
final state and every gradient, on every path.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (set in conftest.py) at tiny shapes; on a CUDA machine the same
checks also run at real shapes in fp32 and bf16: `pytest tests/ops/test_hgrn.py -x -q`.
"""

import os

import pytest
import torch

from x_transformers.ops import chunk_hgrn, fused_recurrent_hgrn
from x_transformers.ops.hgrn import chunk_hgrn_torch, naive_hgrn, recurrent_hgrn_torch
from x_transformers.ops.hgrn import scan as hgrn_scan_module

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
NAMES = ("h", "final_state", "dx", "dg", "dh0")
TOL = {torch.float32: 5e-3, torch.bfloat16: 2e-2}


def recurrent_torch(x, g, h0, final_state, cu_seqlens):
    """The token loop of `fused_recurrent_hgrn`'s torch path, on [B, T, D] or [B, T, H, D] inputs."""
    B, T = x.shape[:2]
    h0 = h0.reshape(h0.shape[0], -1) if h0 is not None else None
    h, ht = recurrent_hgrn_torch(x.reshape(B, T, -1), g.reshape(B, T, -1), h0, final_state, cu_seqlens)
    return h.view(x.shape), (ht.view(ht.shape[0], *x.shape[2:]) if ht is not None else None)


# "triton": one program per sequence and channel block; "chunked": chunk-parallel (long sequences, few programs);
# "recurrent": fused_recurrent_hgrn, the per-sequence kernel whatever CHUNKED says
PATHS = {
    "triton": chunk_hgrn,
    "chunked": chunk_hgrn,
    "torch": chunk_hgrn_torch,
    "recurrent": fused_recurrent_hgrn,
    "recurrent_torch": recurrent_torch,
}


def make_inputs(B, T, D, *, decay=1.0, h0=True, num_seqs=None, heads=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (B, T, D) if heads is None else (B, T, heads, D)
    x = torch.randn(*shape, generator=gen)
    g = -decay * torch.rand(*shape, generator=gen)
    N = B if num_seqs is None else num_seqs
    h = torch.randn(N, *shape[2:], generator=gen) if h0 else None
    return [t.to(DEVICE) if t is not None else None for t in (x, g, h)]


@pytest.fixture
def check(kernel_check):
    """check(path, inputs, ...): forward + backward of one path against the fp32 token-by-token reference."""

    def run(fn, inputs, dtype, cu_seqlens, final_state):
        # x, g cast to dtype; the state stays fp32
        x, g, h0 = leaves = kernel_check.grad_leaves(inputs, dtype, cast=(0, 1))
        h, ht = fn(x, g, h0, final_state, cu_seqlens)
        assert h.shape == x.shape
        if final_state:
            assert ht.dtype == torch.float32
        kernel_check.backward_random(h, ht)
        # an input that does not reach the loss (g at T = 1 without a state) has gradient None: zero
        return h, ht, *(None if t is None else t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves)

    def check(path, inputs, dtype=torch.float32, cu_seqlens=None, final_state=True):
        # the recurrent entry must ignore CHUNKED = True
        hgrn_scan_module.CHUNKED = {"triton": False, "chunked": True, "recurrent": True}.get(path)
        try:
            out = run(PATHS[path], inputs, dtype, cu_seqlens, final_state)
        finally:
            hgrn_scan_module.CHUNKED = None
        ref = run(naive_hgrn_any, inputs, torch.float32, cu_seqlens, final_state)
        assert out[0].dtype == dtype
        kernel_check.assert_all_close(NAMES, out, ref, TOL[dtype], f"{path} {dtype}")

    return check


def naive_hgrn_any(x, g, h0, final_state, cu_seqlens):
    """The reference on flattened [B, T, H * D] inputs, shaped back."""
    B, T = x.shape[:2]
    N = h0.shape[0] if h0 is not None else None
    h, ht = naive_hgrn(x.reshape(B, T, -1), g.reshape(B, T, -1), h0.reshape(N, -1) if h0 is not None else None,
                       final_state, cu_seqlens)
    return h.view(x.shape), (ht.view(ht.shape[0], *x.shape[2:]) if ht is not None else None)


T_SMALL = 100 if not CUDA else 3000  # several blocks of 64, not a multiple of 64


# slow: chunked, whose path test_strong_decay runs on fewer channels
# "recurrent" (the same kernel as "triton") needs no separate long case
@pytest.mark.parametrize("path", ["triton", pytest.param("chunked", marks=pytest.mark.slow), "torch", "recurrent_torch"])
def test_matches_reference(path, check):
    check(path, make_inputs(2, T_SMALL, 40))


ALL_PATHS = ["triton", "chunked", "torch", "recurrent", "recurrent_torch"]


@pytest.mark.parametrize("path", ALL_PATHS)
def test_single_token_no_initial_state(path, check):
    check(path, make_inputs(2, 1, 16, h0=False))
    check(path, make_inputs(2, 1, 16, h0=False), final_state=False)


@pytest.mark.parametrize("path", ALL_PATHS)
def test_heads_layout(path, check):
    """[B, T, H, D] inputs are scanned as H * D channels; states keep the [N, H, D] shape."""
    check(path, make_inputs(1, 70, 8, heads=3))


@pytest.mark.parametrize("path", ALL_PATHS)
def test_varlen_empty_and_uneven(path, check):
    bounds = [0, 10, 10, 75, 140, 140]
    cu = torch.tensor(bounds, dtype=torch.int64, device=DEVICE)
    check(path, make_inputs(1, bounds[-1], 24, num_seqs=len(bounds) - 1), cu_seqlens=cu)


@pytest.mark.parametrize("path", ALL_PATHS)
def test_strong_decay(path, check):
    check(path, make_inputs(2, 100, 16, decay=20.0))


@pytest.mark.parametrize("h0", [True, False])
@pytest.mark.parametrize("triton", [True, False])
def test_decoding_step_is_the_scan_exactly(h0, triton, monkeypatch):
    """One token (decoding): fused_recurrent_hgrn returns exactly what chunk_hgrn does, output and state, so moving
    the mixers' decoding onto it changed no number."""
    if not triton:
        if CUDA:
            pytest.skip("the torch path runs on CPU tensors")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, g, h = make_inputs(3, 1, 40, h0=h0, heads=2)
    a = chunk_hgrn(x, g, initial_state=h, output_final_state=True)
    b = fused_recurrent_hgrn(x, g, initial_state=h, output_final_state=True)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_recurrent_kernel_never_goes_chunk_parallel(monkeypatch):
    def refuse(*args):
        raise AssertionError("fused_recurrent_hgrn launched the chunk-parallel passes")

    monkeypatch.setattr(hgrn_scan_module, "_chunk_meta", refuse)
    monkeypatch.setattr(hgrn_scan_module, "CHUNKED", True)
    x, g, h0 = make_inputs(1, 5, 8)
    x.requires_grad_()
    h, ht = fused_recurrent_hgrn(x, g, initial_state=h0, output_final_state=True)
    (h.sum() + ht.sum()).backward()


def test_recurrent_torch_path_gradcheck_fp64():
    gen = torch.Generator().manual_seed(0)
    x, g, h0 = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((1, 9, 3), (1, 9, 3), (2, 3)))
    g = -g.abs()
    cu = torch.tensor([0, 4, 9])
    for t in (x, g, h0):
        t.requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: recurrent_hgrn_torch(*a, True, cu), (x, g, h0))
    assert torch.autograd.gradcheck(lambda *a: recurrent_hgrn_torch(*a, True), (x[0, None], g[0, None], h0[:1]))


@pytest.mark.parametrize("path", ["triton", "torch"])
def test_long_sequence(path, check):
    T = 1000 if not CUDA else 20000
    check(path, make_inputs(1, T, 16, decay=0.01))


@pytest.mark.parametrize("path", ["triton", "chunked"])
def test_bf16(path, check):
    check(path, make_inputs(2, 100, 32), dtype=torch.bfloat16)


@pytest.mark.parametrize("fn", [chunk_hgrn, fused_recurrent_hgrn])
def test_bad_inputs_raise_clearly(fn):
    x, g, h0 = make_inputs(2, 9, 8)
    with pytest.raises(ValueError, match=f"{fn.__name__}: `g` must have shape"):
        fn(x, g[:, :4])
    with pytest.raises(ValueError, match="initial_state"):
        fn(x, g, initial_state=h0[:1])
    with pytest.raises(ValueError, match="batch size must be 1"):
        fn(x, g, cu_seqlens=torch.tensor([0, 4, 9], device=DEVICE))
    with pytest.raises(TypeError, match="floating point"):
        fn(x.long(), g)
    with pytest.raises(ValueError, match=r"\(B, T, D\)"):
        fn(x[0], g[0])
    with pytest.raises(ValueError, match="start at 0 and end at T=9"):
        fn(x[:1], g[:1], cu_seqlens=torch.tensor([0, 4, 8], device=DEVICE))
    with pytest.raises(ValueError, match="non-decreasing"):
        fn(x[:1], g[:1], cu_seqlens=torch.tensor([0, 6, 4, 9], device=DEVICE))


@pytest.mark.parametrize("fn", [chunk_hgrn, fused_recurrent_hgrn])
@pytest.mark.parametrize("heads", [None, 3])
def test_empty_input(heads, fn):
    x, g, h0 = make_inputs(2, 0, 8, heads=heads)
    h, s = fn(x, g, initial_state=h0, output_final_state=True)
    assert h.shape == x.shape and torch.equal(s, h0)
    _, s = fn(x, g, output_final_state=True)
    assert s.shape == h0.shape and not s.any()


@pytest.mark.skipif(not CUDA, reason="real shapes need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", ["triton", "chunked"])
def test_gpu_real_shapes(dtype, path, check):
    check(path, make_inputs(2, 4096, 16, heads=64), dtype=dtype)
    cu = torch.tensor([0, 0, 333, 1000, 1001, 2048], device=DEVICE)
    check(path, make_inputs(1, 2048, 1024, decay=20.0, num_seqs=5), dtype=dtype, cu_seqlens=cu)


@pytest.mark.skipif(os.environ.get("HOPPER_COMPILE") != "1", reason="slow; set HOPPER_COMPILE=1 to run")
def test_kernels_compile_for_hopper(kernel_check):
    kernel_check.hopper_compile("hgrn")
