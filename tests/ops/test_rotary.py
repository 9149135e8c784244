"""Fused rotary kernel vs the PyTorch formula: outputs and input gradients, strided q / k views, xpos tables, and the
model's dispatch (on CUDA tensors the attention layers rotate through it; elsewhere through the formula)."""

import os

import pytest
import torch
from einops import rearrange

from x_transformers.ops.rotary import fused_rotary, naive_rotary
from x_transformers.positional import RotaryEmbedding, RotaryTable

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def tables(b, n, d, rot_dim=None, keys=False, xpos=False):
    rotary = RotaryEmbedding(rot_dim or d, use_xpos=xpos).to(DEVICE)
    table = RotaryTable.cast(rotary.forward_from_seq_len(n))
    if b > 1:
        table = RotaryTable(table.freqs.expand(b, -1, -1), table.xpos_scale)
    return table.table(d, keys)


def check(t, cos, sin, dtype, tol):
    a = t.to(dtype).detach().requires_grad_()
    b = t.to(dtype).detach().requires_grad_()
    out, ref = fused_rotary(a, cos, sin), naive_rotary(b, cos, sin)
    assert out.dtype == dtype and out.shape == t.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    dy = torch.randn_like(out)
    out.backward(dy)
    ref.backward(dy)
    torch.testing.assert_close(a.grad.float(), b.grad.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape,rot_dim", [((2, 3, 37, 16), None), ((1, 2, 5, 24), 8), ((2, 40, 12), None)],
                         ids=["bhnd", "partial", "bnd"])
def test_matches_formula(shape, rot_dim, dtype, tol):
    torch.manual_seed(0)
    cos, sin = tables(1, shape[-2], shape[-1], rot_dim)
    check(torch.randn(shape, device=DEVICE), cos, sin, dtype, tol)


def test_strided_views_of_the_fused_projection_and_per_batch_xpos_tables():
    """q and k as they leave one (b, n, (h d)) matmul: non-contiguous (b, h, n, d) views; per-batch key tables."""
    torch.manual_seed(0)
    qkv = torch.randn(2, 33, 3 * 4 * 16, device=DEVICE)
    qk = rearrange(qkv[..., : 8 * 16], "b n (h d) -> b h n d", d=16)
    assert not qk.is_contiguous()
    cos, sin = tables(2, 33, 16, keys=True, xpos=True)
    check(qk, cos, sin, torch.float32, 1e-6)


def test_bad_inputs():
    cos, sin = tables(1, 8, 16)
    with pytest.raises(ValueError, match="d even"):
        fused_rotary(torch.randn(1, 2, 8, 15, device=DEVICE), cos, sin)
    with pytest.raises(ValueError, match="cos, sin of shape"):
        fused_rotary(torch.randn(1, 2, 9, 16, device=DEVICE), cos, sin)
    with pytest.raises(ValueError, match="does not differentiate"):
        fused_rotary(torch.randn(1, 2, 8, 16, device=DEVICE), cos.clone().requires_grad_(), sin)


def test_model_dispatch(monkeypatch):
    """RotaryTable.rotate takes the fused kernel for CUDA tensors only (the formula on CPU, even under the
    interpreter, and inside torch.compile)."""
    import x_transformers.ops.rotary as rotary_ops

    calls = []
    monkeypatch.setattr(rotary_ops, "fused_rotary", lambda *a: calls.append(1) or naive_rotary(*a))
    cos_sin = tables(1, 8, 16)
    table = RotaryTable(torch.zeros(1, 8, 16, device=DEVICE))
    table._tables[(16, False)] = cos_sin
    table.rotate(torch.randn(1, 2, 8, 16, device=DEVICE))
    assert len(calls) == (1 if CUDA else 0)


@pytest.mark.skipif(os.environ.get("HOPPER_COMPILE") != "1", reason="slow; set HOPPER_COMPILE=1 to run")
def test_kernels_compile_for_hopper(kernel_check):
    """Compile the kernels for sm_90 without a GPU (catches what the interpreter cannot)."""
    kernel_check.hopper_compile("rotary")
