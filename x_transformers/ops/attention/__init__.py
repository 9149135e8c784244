"""`attention` family: softmax attention, flash style (O(T) memory), over packed documents and with the Forgetting
Transformer's forget gate.

    s_ij = scale * q_i . k_j + c_i - c_j,   c = cumsum(g) within each document,   o_i = softmax_{j <= i}(s_ij) v_j

Triton for CUDA tensors or under TRITON_INTERPRET=1 (the module `flash.py`, loaded on the first such call), one
document at a time through PyTorch's SDPA otherwise (`attention_torch.py`), and fp64 inputs always there.
"""

from __future__ import annotations

import torch
from torch import Tensor

from x_transformers.ops.attention.attention_torch import attention_torch
from x_transformers.ops.attention.naive import naive_attention
from x_transformers.ops.common.utils import check_cu_seqlens, check_float, check_shape, default_scale, use_triton


def check_attention_inputs(where, q, k, v, g, causal, cu_seqlens):
    """Validate a `flash_attention` call; returns (B, T, H, HK, K, V)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{where}: `{name}` must be a tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v), ("g", g)):
        check_float(name, t, where)
    if q.ndim != 4:
        raise ValueError(f"{where}: `q` must have shape (B, T, H, K), got {tuple(q.shape)}")
    B, T, H, K = q.shape
    if k.ndim != 4:
        raise ValueError(f"{where}: `k` must have shape (B, T, HK, K), got {tuple(k.shape)}")
    HK = k.shape[2]
    check_shape("k", k, (B, T, HK, K), where)
    check_shape("v", v, (B, T, HK, None), where)
    if HK == 0 or H % HK != 0:
        raise ValueError(f"{where}: the query heads ({H}) must be a multiple of the key / value heads ({HK})")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{where}: `q`, `k`, `v` must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not isinstance(causal, bool):
        raise TypeError(f"{where}: `causal` must be a bool, got {type(causal).__name__}")
    if g is not None:
        check_shape("g", g, (B, T, H), where)
        if not causal:
            # the bias c_i - c_j is the decay from key j forward to query i: it has no meaning for later keys
            raise ValueError(f"{where}: a forget gate `g` needs causal=True")
    check_cu_seqlens(cu_seqlens, B, T, where)
    for name, t in (("k", k), ("v", v), ("g", g), ("cu_seqlens", cu_seqlens)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{where}: `{name}` is on {t.device}, `q` on {q.device}: all inputs must share a device")
    return B, T, H, HK, K, v.shape[-1]


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    scale: float | None = None,
    causal: bool = True,
    cu_seqlens: Tensor | None = None,
) -> Tensor:
    """Softmax attention without the (T, T) matrix. q: [B, T, H, K]; k: [B, T, HK, K]; v: [B, T, HK, V], HK dividing
    H (query head h reads kv head h // (H // HK)); g: [B, T, H] log forget gate (<= 0, finite; needs causal);
    scale: default 1 / sqrt(K); cu_seqlens: [N + 1] offsets of packed documents (B = 1), which never attend to each
    other. Returns o [B, T, H, V] in v's dtype; differentiable in q, k, v and g. The Triton path takes head dims up
    to 128."""
    B, T, H, HK, K, V = check_attention_inputs("flash_attention", q, k, v, g, causal, cu_seqlens)
    if T == 0:
        return v.new_zeros(B, 0, H, V)
    scale = default_scale(q, scale)
    # fp64 (references, gradient checks) has no tensor-core product: the exact torch path serves it
    if q.dtype != torch.float64 and use_triton(q, k, v, g):
        from x_transformers.ops.attention.flash import MAX_HEAD_DIM, flash_attention_triton

        if max(K, V) > MAX_HEAD_DIM:
            raise ValueError(
                f"flash_attention: the Triton kernels take head dims up to {MAX_HEAD_DIM}, got K={K}, V={V} "
                "(use torch's scaled_dot_product_attention for wider heads)"
            )
        return flash_attention_triton(q, k, v, g, scale, causal, cu_seqlens)
    return attention_torch(q, k, v, g, scale, causal, cu_seqlens)


__all__ = ["flash_attention", "attention_torch", "naive_attention", "check_attention_inputs"]
