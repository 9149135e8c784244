"""Dispatch and input checks shared by every kernel family in `x_transformers.ops`."""

from __future__ import annotations

import os

import torch
from torch import Tensor


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: Tensor | None) -> bool:
    """Triton kernels for CUDA tensors, and for any tensors under `TRITON_INTERPRET=1`; the torch path otherwise."""
    if not triton_available():
        return False
    if interpreting():
        return True
    return all(t.is_cuda for t in tensors if t is not None)


def check_shape(name: str, t: Tensor | None, shape: tuple, where: str):
    """Raise a clear error when `t` is not of `shape` (entries that are None are free)."""
    if t is None:
        return
    if t.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        want = tuple("*" if s is None else s for s in shape)
        raise ValueError(f"{where}: `{name}` must have shape {want}, got {tuple(t.shape)}")


def check_float(name: str, t: Tensor | None, where: str):
    if t is None:
        return
    if not t.is_floating_point():
        raise TypeError(f"{where}: `{name}` must be a floating point tensor, got {t.dtype}")


def check_cu_seqlens(cu_seqlens: Tensor | None, batch: int, total: int, where: str):
    if cu_seqlens is None:
        return
    if batch != 1:
        raise ValueError(f"{where}: with `cu_seqlens` the batch size must be 1 (packed sequences), got {batch}")
    if cu_seqlens.ndim != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{where}: `cu_seqlens` must be a 1-D int32/int64 tensor of offsets, got {cu_seqlens.dtype}")
