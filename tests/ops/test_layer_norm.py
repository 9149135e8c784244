"""Triton LayerNorm vs F.layer_norm: output, input and gain gradients (odd widths, rows not a multiple of the block,
half inputs), and the LayerNorm module's dispatch."""

import os

import pytest
import torch
import torch.nn.functional as F

from x_transformers.norms import LayerNorm
from x_transformers.ops.layer_norm import fused_layer_norm

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(3, 37, 64), (5, 100), (1, 1, 24)], ids=["3d", "odd_width", "one_row"])
def test_matches_torch(shape, dtype, tol):
    torch.manual_seed(0)
    x = (torch.randn(shape, device=DEVICE) * 3 + 1).to(dtype)
    w = torch.randn(shape[-1], device=DEVICE).to(dtype)
    a, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    b, wb = x.float().clone().requires_grad_(), w.float().clone().requires_grad_()
    out, ref = fused_layer_norm(a, wa), F.layer_norm(b, (shape[-1],), weight=wb)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    dy = torch.randn(shape, device=DEVICE)
    out.backward(dy.to(dtype))
    ref.backward(dy.to(dtype).float())
    torch.testing.assert_close(a.grad.float(), b.grad, atol=tol * 4, rtol=tol * 4)
    torch.testing.assert_close(wa.grad.float(), wb.grad, atol=tol * 10, rtol=tol * 4)


def test_bad_weight():
    with pytest.raises(ValueError, match="weight of shape"):
        fused_layer_norm(torch.randn(2, 8, device=DEVICE), torch.ones(7, device=DEVICE))


def test_module_dispatch(monkeypatch):
    """LayerNorm takes the kernel for CUDA tensors only (F.layer_norm on CPU, also under the interpreter), and
    unit_offset's gain still gets its gradient."""
    import x_transformers.ops.layer_norm as ln_ops

    calls = []
    real = ln_ops.fused_layer_norm
    monkeypatch.setattr(ln_ops, "fused_layer_norm", lambda *a: calls.append(1) or real(*a))
    norm = LayerNorm(16, unit_offset=True).to(DEVICE)
    x = torch.randn(2, 5, 16, device=DEVICE)
    norm(x).sum().backward()
    assert len(calls) == (1 if CUDA else 0)
    torch.testing.assert_close(norm(x), F.layer_norm(x, (16,)), atol=1e-5, rtol=1e-5)
    assert norm.gamma.grad is not None


@pytest.mark.skipif(os.environ.get("HOPPER_COMPILE") != "1", reason="slow; set HOPPER_COMPILE=1 to run")
def test_kernels_compile_for_hopper(kernel_check):
    """Compile the kernels for sm_90 without a GPU (catches what the interpreter cannot)."""
    kernel_check.hopper_compile("layer_norm")
