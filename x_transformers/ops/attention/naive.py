"""Dense reference of `flash_attention`, written for clarity (used by tests): the full (T, T) logits of every head,
one mask for causality and documents, the forget-gate bias as a dense matrix.

    s_ij = scale * q_i . k_j + c_i - c_j,   c = cumsum(g) within each document,   o_i = softmax_j(s_ij) v_j
"""

from __future__ import annotations

import torch
from torch import Tensor


def _acc_dtype(*tensors) -> torch.dtype:
    """fp32 for half precision and fp32 inputs, fp64 for fp64 ones: the reference never computes below its inputs."""
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def naive_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    scale: float | None = None,
    causal: bool = True,
    cu_seqlens: Tensor | None = None,
) -> Tensor:
    """q, k: [B, T, H, K] (k may have fewer heads, H a multiple of them: query head h reads kv head h // (H // HK));
    v: [B, T, HK, V]; g: [B, T, H] log forget gate; cu_seqlens: [N + 1] document offsets (B = 1). Returns o
    [B, T, H, V] in fp32 (fp64 for fp64 inputs)."""
    B, T, H, K = q.shape
    scale = K**-0.5 if scale is None else scale
    acc = _acc_dtype(q, k, v, g)
    groups = H // k.shape[2]
    q, k, v = q.to(acc), k.to(acc).repeat_interleave(groups, 2), v.to(acc).repeat_interleave(groups, 2)

    pos = torch.arange(T, device=q.device)
    allowed = torch.ones(T, T, dtype=torch.bool, device=q.device)
    if causal:
        allowed &= pos[:, None] >= pos[None, :]
    bounds = [0, T] if cu_seqlens is None else cu_seqlens.tolist()
    doc = torch.zeros(T, dtype=torch.long, device=q.device)
    for n, (bos, eos) in enumerate(zip(bounds[:-1], bounds[1:])):
        doc[bos:eos] = n
    allowed &= doc[:, None] == doc[None, :]

    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if g is not None:
        c = torch.zeros(B, T, H, dtype=acc, device=q.device)
        for bos, eos in zip(bounds[:-1], bounds[1:]):
            c[:, bos:eos] = g[:, bos:eos].to(acc).cumsum(1)
        c = c.transpose(1, 2)  # (b, h, t)
        s = s + c[..., :, None] - c[..., None, :]
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", s.softmax(-1), v)
