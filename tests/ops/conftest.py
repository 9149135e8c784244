"""Shared setup for the kernel tests: without CUDA, Triton kernels run under the interpreter (TRITON_INTERPRET=1),
which must be set before triton is first imported."""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/ops/conftest.py could set TRITON_INTERPRET=1")
    os.environ.setdefault("TRITON_INTERPRET", "1")

from x_transformers.ops.common.interpreter_compat import patch  # noqa: E402

patch()


def rel_rms(a, b):
    """Relative RMS error of `a` against the reference `b`, in float64."""
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp(min=1e-12)).item()


@pytest.fixture
def rel_rms_fn():
    return rel_rms
