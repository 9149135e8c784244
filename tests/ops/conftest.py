"""Shared setup for the kernel tests: without CUDA, Triton kernels run under the interpreter (TRITON_INTERPRET=1),
which must be set before triton is first imported."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/ops/conftest.py could set TRITON_INTERPRET=1")
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401, E402
except ImportError:
    pytest.skip("the kernel tests need triton: pip install -e '.[test]'", allow_module_level=True)

from x_transformers.ops.common.interpreter_compat import patch  # noqa: E402

patch()


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "slow: a long interpreter case whose kernels and code paths faster cases also run; .ci/run leaves these out "
        "of its second tests/ops pass (the newest Triton of the tested range)",
    )


def rel_rms(a, b):
    """Relative RMS error of `a` against the reference `b`, in float64."""
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp(min=1e-12)).item()


def grad_leaves(inputs, dtype, cast):
    """Fresh leaf copies of `inputs` that require grad; those at the indices in `cast` are cast to `dtype` (the rest,
    gates or states, keep theirs); None stays None."""
    return [
        None if x is None else (x.to(dtype) if i in cast else x).detach().clone().requires_grad_()
        for i, x in enumerate(inputs)
    ]


def backward_random(out, state):
    """Backprop fixed random cotangents through the output and (when returned) the final state, so that a kernel and
    its reference receive the same ones."""
    gen = torch.Generator().manual_seed(1)
    loss = (out.float() * torch.randn(out.shape, generator=gen).to(out.device)).sum()
    if state is not None:
        loss = loss + (state * torch.randn(state.shape, generator=gen).to(state.device)).sum()
    loss.backward()


def assert_all_close(names, out, ref, tol, label):
    """Every tensor of `out` (outputs, final state, gradients) within relative RMS `tol` of `ref`, finite, and None
    exactly where the reference has None."""
    for name, a, b in zip(names, out, ref):
        if b is None:
            assert a is None, f"{label}: {name} should be None"
            continue
        assert torch.isfinite(a).all(), f"{label}: {name} has NaN/inf"
        err = rel_rms(a, b)
        assert err < tol, f"{label}: {name} rel rms {err:.2e} >= {tol:.0e}"


def hopper_compile(family):
    """Compile one family's kernels for sm_90 in a fresh process (hopper_compile.py, interpreter off); fail with its
    output."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "hopper_compile.py")
    res = subprocess.run([sys.executable, script, family], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.fixture
def rel_rms_fn():
    return rel_rms


@pytest.fixture
def kernel_check():
    """The helpers above for the test modules (a conftest is not importable by name: several share it)."""
    return SimpleNamespace(
        rel_rms=rel_rms, grad_leaves=grad_leaves, backward_random=backward_random, assert_all_close=assert_all_close,
        hopper_compile=hopper_compile,
    )
