"""Dispatch and input checks shared by every kernel family in `x_transformers.ops`."""

from __future__ import annotations

import functools
import os
import warnings

import torch
from torch import Tensor

# Triton releases the kernels are tested on: from the first (inclusive) to the second (exclusive); setup.py's extras
# state the same range
TRITON_TESTED = ((3, 6), (3, 10))
TRITON_INSTALL = "pip install 'triton>=3.6,<3.10'"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether triton imports. It is imported only here and in the kernel modules, which the ops load on their first
    Triton launch, so CPU-only installs never need it."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_version_tested(version: str) -> bool:
    from packaging.version import Version

    return TRITON_TESTED[0] <= Version(version).release[:2] < TRITON_TESTED[1]


def check_triton_version():
    """One warning where the installed Triton lies outside the tested range (refusing would be worse: later releases
    usually work)."""
    import triton

    if not triton_version_tested(triton.__version__):
        lo, hi = TRITON_TESTED
        warnings.warn(
            f"x_transformers.ops kernels are tested on Triton {lo[0]}.{lo[1]} up to (not including) {hi[0]}.{hi[1]}, "
            f"found {triton.__version__}: if they fail, {TRITON_INSTALL}",
            RuntimeWarning,
            stacklevel=4,
        )


_triton_checked = False


def require_triton(why: str):
    """Called before a Triton kernel launches: a clear error where triton is missing, one warning for a Triton release
    outside the tested range, and the interpreter fixes under TRITON_INTERPRET=1. After the first call the checks are
    one flag test: cheap on every launch, and nothing for torch.compile to trace."""
    global _triton_checked
    if not _triton_checked:
        if not triton_available():
            raise ModuleNotFoundError(
                f"x_transformers.ops: {why}, and triton is not installed: {TRITON_INSTALL} "
                "(or pip install 'x-transformers-hybrid[triton]'). Without it, CPU tensors take the PyTorch path."
            )
        check_triton_version()
        _triton_checked = True
    if interpreting():
        from x_transformers.ops.common.interpreter_compat import patch

        patch()


# X_TRANSFORMERS_FUSED=0 keeps the model's rotary and LayerNorm on their PyTorch formulas (for A/B benchmarks)
_FUSED = os.environ.get("X_TRANSFORMERS_FUSED", "1") != "0"


def fused_kernels_enabled() -> bool:
    """Whether the model layers may use the fused Triton rotary / LayerNorm kernels on CUDA tensors."""
    return _FUSED and triton_available()


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; off CUDA (the interpreter, the offline sm_90 compile check) an
    H100's 132, so that tests see the launch shapes such a GPU gets."""
    if device.type != "cuda":
        return 132
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def fill_sm_tiles(
    SK: int, SV: int, K: int, V: int, NH: int, dtype: torch.dtype, device: torch.device
) -> tuple[int, int]:
    """Key / value tiles of a sequential state pass (one program per key tile, value tile, sequence * head, each
    walking every chunk in turn): starting from SK, SV they halve, the key tile first so half precision keeps SV >= SK
    (see narrow_value_tiles), down to `min_dot_tile(dtype)`, until the programs fill the SMs. With few sequences *
    heads (long single sequences) that turns a few long chains of large products into more, shorter ones."""
    floor, sms = min_dot_tile(dtype), sm_count(device)
    while NH * -(-K // SK) * -(-V // SV) < sms and max(SK, SV) > floor:
        if SK >= SV:
            SK //= 2
        else:
            SV //= 2
    return SK, SV


def pow2_block(n: int, lo: int = 1, hi: int | None = None) -> int:
    """The block of a kernel over a dimension of size n: the smallest power of two >= n (Triton tiles are powers of
    two, masked beyond n), at most `hi` (a wider dim takes several blocks) and at least `lo` (`min_dot_tile(dtype)`
    for a `tl.dot` operand); `lo` wins where the two cross. Plain integer arithmetic, so it needs no triton import."""
    block = 1 << max(n - 1, 0).bit_length()
    if hi is not None:
        block = min(block, hi)
    return max(block, lo)


def min_dot_tile(dtype: torch.dtype) -> int:
    """Narrowest side of a `tl.dot` tile for inputs of this dtype. Triton allows 16; fp16 / bf16 get 32 because
    Triton 3.6 miscompiles 16-wide half-precision tiles on Hopper (an H200 showed illegal memory accesses in
    chunk_gla's kernels and the delta rule's wy_fwd, and wrong values from the delta rule at V = 16; checked with
    benchmarks/check_configs.py). A wider tile over a narrow head is masked, so only the tile changes, not the math."""
    return 32 if dtype in (torch.float16, torch.bfloat16) else 16


def narrow_value_tiles(dtype: torch.dtype, BK: int, BV: int) -> bool:
    """Whether half-precision chunk kernels would multiply with a value tile narrower than the key tile and under 64
    wide. Triton 3.6 gets those wrong on Hopper: an H200 gave wrong values (relative error 0.1 - 1) or illegal memory
    accesses at K = 64, V = 16 (32-wide value tiles) in the gla, simple gla and delta-rule kernels, and in chunk_gla
    with 32-wide output tiles at K = V = 64, while every shape with BV >= BK passed (benchmarks/check_configs.py,
    tests/ops/*.py on the GPU), and so did the delta rule's 64-wide value tiles under its 128-wide key block (K = V =
    128: GPU tests in bf16, gradients included). Such calls compute in fp32 instead, where all tile shapes pass; fp32
    is several times slower (the delta rule at K = V = 128 went from 2 to 100 ms forward + backward when this rule
    also caught 64-wide tiles), so the rule stays as narrow as the failures."""
    return dtype in (torch.float16, torch.bfloat16) and BV < BK and BV < 64


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: Tensor | None) -> bool:
    """Triton kernels for CUDA tensors, and for any tensors under `TRITON_INTERPRET=1`; the torch path otherwise.
    Taking the kernels needs triton: without it this raises, naming what to install."""
    if interpreting():
        require_triton("TRITON_INTERPRET=1 runs the Triton kernels in its interpreter")
        return True
    if not all(t.is_cuda for t in tensors if t is not None):
        return False
    require_triton("CUDA tensors run the Triton kernels")
    return True


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
    # offsets index the packed time axis: anything else would read out of bounds inside the kernels
    if cu_seqlens.numel() < 2 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total:
        raise ValueError(f"{where}: `cu_seqlens` must start at 0 and end at T={total}, got {cu_seqlens.tolist()}")
    if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        raise ValueError(f"{where}: `cu_seqlens` must be non-decreasing, got {cu_seqlens.tolist()}")


def num_seqs(batch: int, cu_seqlens: Tensor | None) -> int:
    """N, the number of independent sequences: the batch, or the packed segments of `cu_seqlens`."""
    return batch if cu_seqlens is None else cu_seqlens.numel() - 1


def default_scale(q: Tensor, scale: float | None) -> float:
    """The attention scale, 1 / sqrt(K) unless given."""
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def check_linear_attn_inputs(where, q, k, v, g, initial_state, cu_seqlens, *, g_per_channel: bool, same_dtype=True):
    """Validate a `[B, T, H, *]` linear-attention call (simple_gla, gla); returns (B, T, H, K, V, N).

    g is the log decay: [B, T, H] and optional (simple_gla), or [B, T, H, K] and required (`g_per_channel`, gla)."""
    for name, t in (("q", q), ("k", k), ("v", v)) + ((("g", g),) if g_per_channel else ()):
        if not isinstance(t, Tensor):
            raise TypeError(f"{where}: `{name}` must be a tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v), ("g", g), ("initial_state", initial_state)):
        check_float(name, t, where)
    if q.ndim != 4:
        raise ValueError(f"{where}: `q` must have shape (B, T, H, K), got {tuple(q.shape)}")
    B, T, H, K = q.shape
    check_shape("k", k, (B, T, H, K), where)
    check_shape("v", v, (B, T, H, None), where)
    check_shape("g", g, (B, T, H, K) if g_per_channel else (B, T, H), where)
    if same_dtype and not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{where}: `q`, `k`, `v` must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_cu_seqlens(cu_seqlens, B, T, where)
    N, V = num_seqs(B, cu_seqlens), v.shape[-1]
    check_shape("initial_state", initial_state, (N, H, K, V), where)
    return B, T, H, K, V, N


def check_delta_inputs(where, q, k, v, beta, g, initial_state, cu_seqlens):
    """Validate a `[B, T, H, *]` delta-rule call (beta and the optional gate g are `[B, T, H]`); returns
    (B, T, H, K, V, N) with N the number of sequences. q, k may differ in dtype from v (L2-normalising them under
    autocast gives fp32): the ops compute in v's dtype."""
    if not isinstance(beta, Tensor):
        raise TypeError(f"{where}: `beta` must be a tensor, got {type(beta).__name__}")
    check_float("beta", beta, where)
    B, T, H, K, V, N = check_linear_attn_inputs(
        where, q, k, v, g, initial_state, cu_seqlens, g_per_channel=False, same_dtype=False
    )
    check_shape("beta", beta, (B, T, H), where)
    return B, T, H, K, V, N


def empty_input_result(out_like: Tensor, state_shape: tuple, initial_state: Tensor | None, output_final_state: bool):
    """(output, final state) for T = 0, where no kernel can be launched: nothing decays, the state passes through."""
    o = out_like.new_zeros(out_like.shape)
    if not output_final_state:
        return o, None
    if initial_state is None:
        return o, out_like.new_zeros(state_shape, dtype=torch.float32)
    return o, initial_state.float().reshape(state_shape)
