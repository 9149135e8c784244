"""Causal depthwise short convolution (kernel width <= 8) on (b, n, d) activations, with a decode cache. Triton
(`causal_conv.py`, loaded on the first such call) for CUDA tensors or under TRITON_INTERPRET=1, PyTorch otherwise."""

from __future__ import annotations

from torch import Tensor

from x_transformers.ops.common.utils import check_cu_seqlens, check_float, check_shape, num_seqs, use_triton
from x_transformers.ops.conv.naive import last_inputs, naive_causal_conv1d

MAX_WIDTH = 8  # wider kernels take the PyTorch path
ACTIVATIONS = (None, "silu", "swish")


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    cache: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Causal depthwise convolution over time, `out[t] = act(bias + sum_j weight[:, j] * x[t - (w - 1) + j])`.

    x: (b, n, d), any float dtype; weight: (d, w); bias: (d,); activation: None or "silu" (fused); cache: (b, w - 1, d),
    the inputs before x (decoding, chunked prefill; n may be 1); cu_seqlens: offsets of packed sequences (b = 1, no
    cache), which never see each other. Returns (out in x's dtype, new cache): the new cache is the last w - 1 inputs
    of (cache, x), zero-padded on the left when there are fewer, or (N, w - 1, d), one per packed sequence.
    Accumulates in fp32; gradients reach x, weight, bias and cache."""
    where = "causal_conv1d"
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("cache", cache)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{where}: `{name}` must be a tensor, got {type(t).__name__}")
        check_float(name, t, where)
    if x.ndim != 3:
        raise ValueError(f"{where}: `x` must have shape (b, n, d), got {tuple(x.shape)}")
    B, T, D = x.shape
    if weight.ndim != 2 or weight.shape[0] != D or weight.shape[1] < 1:
        raise ValueError(f"{where}: `weight` must have shape (d, w) = ({D}, w) with w >= 1, got {tuple(weight.shape)}")
    W = weight.shape[1]
    check_shape("bias", bias, (D,), where)
    check_shape("cache", cache, (B, W - 1, D), where)
    if activation not in ACTIVATIONS:
        raise ValueError(f"{where}: `activation` must be one of {ACTIVATIONS}, got {activation!r}")
    if cu_seqlens is not None and cache is not None:
        raise ValueError(f"{where}: `cache` is not supported with `cu_seqlens` (packed sequences start from zeros)")
    check_cu_seqlens(cu_seqlens, B, T, where)

    if T == 0:
        new_cache = last_inputs(x, cache, W) if cu_seqlens is None else x.new_zeros(num_seqs(B, cu_seqlens), W - 1, D)
        return x.new_zeros(x.shape), new_cache
    if W > MAX_WIDTH or not use_triton(x, weight, bias, cache):
        return naive_causal_conv1d(x, weight, bias, activation, cache, cu_seqlens)
    from x_transformers.ops.conv.causal_conv import causal_conv1d_triton

    return causal_conv1d_triton(x, weight, bias, activation, cache, cu_seqlens)


__all__ = ["causal_conv1d", "naive_causal_conv1d"]
