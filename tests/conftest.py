"""Test-wide setup.

Without CUDA, Triton kernels can only run under the interpreter, and `TRITON_INTERPRET=1` must be set before triton
is first imported: it is set here, before any test module loads. The kernel tests under `tests/ops` then run the
Triton kernels in the interpreter; every other test runs the chunked PyTorch path, as a CPU user gets it (the
interpreter is far too slow for whole models).
"""

import os
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
OPS_TESTS = Path(__file__).resolve().parent / "ops"

if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def cpu_tests_take_the_torch_path(request, monkeypatch):
    if not CUDA and OPS_TESTS not in Path(str(request.path)).resolve().parents:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
