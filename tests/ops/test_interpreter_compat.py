"""The interpreter fixes of x_transformers/ops/common/interpreter_compat.py still do their job on the installed Triton
(conftest.py applies them): run-time loop bounds, bf16 products and round-to-nearest-even bf16 casts."""

import pytest
import torch
import triton
import triton.language as tl

if torch.cuda.is_available():
    pytest.skip("interpreter fixes: only the CPU runs the interpreter", allow_module_level=True)


@triton.jit
def loop_kernel(x, y, T):
    b_acc = tl.zeros([1], dtype=tl.float32)
    for i_t in range(T):
        b_acc += tl.load(x + i_t + tl.arange(0, 1))
    tl.store(y + tl.arange(0, 1), b_acc)


@triton.jit
def dot_kernel(a, b, c, BM: tl.constexpr):
    o_m = tl.arange(0, BM)
    p = o_m[:, None] * BM + o_m[None, :]
    tl.store(c + p, tl.dot(tl.load(a + p), tl.load(b + p)))


@triton.jit
def cast_kernel(x, y, BM: tl.constexpr):
    o_m = tl.arange(0, BM)
    tl.store(y + o_m, tl.load(x + o_m).to(tl.bfloat16))


def test_run_time_loop_bounds():
    y = torch.zeros(1)
    loop_kernel[(1,)](torch.ones(7), y, 7)
    assert y.item() == 7


def test_bf16_dot():
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(16, 16, generator=gen).bfloat16() for _ in range(2))
    c = torch.zeros(16, 16)
    dot_kernel[(1,)](a, b, c, BM=16)
    torch.testing.assert_close(c, a.float() @ b.float(), rtol=1e-5, atol=1e-5)


def test_bf16_cast_rounds_to_nearest_even():
    # halfway and above-halfway cases, where truncation and rounding differ
    x = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-10, -(1 + 2**-8 + 2**-10)] * 4)
    y = torch.zeros(16, dtype=torch.bfloat16)
    cast_kernel[(1,)](x, y, BM=16)
    assert torch.equal(y, x.bfloat16())
