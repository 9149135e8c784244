"""Token-by-token fp32 reference for the `gla` family (per-key-channel decay), written for clarity, used by tests.

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,    o_t = scale * q_t S_t
"""

from __future__ import annotations

import torch
from torch import Tensor


def _acc_dtype(*tensors) -> torch.dtype:
    """fp32 for half precision and fp32 inputs, fp64 for fp64 ones: the CPU path never computes below its inputs."""
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def naive_recurrent_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """q, k, g: [B, T, H, K]; v: [B, T, H, V]; states [N, H, K, V] fp32. Differentiable through plain torch ops."""
    dtype = v.dtype
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    acc = _acc_dtype(q, k, v)
    q, k, v, g = (t.to(acc) for t in (q, k, v, g))

    if cu_seqlens is None:
        # (b, h, k, v) state stepped over time; the batch is the set of independent sequences
        spans = [(b, 0, T) for b in range(B)]
    else:
        offsets = cu_seqlens.tolist()
        spans = [(0, bos, eos) for bos, eos in zip(offsets[:-1], offsets[1:])]

    outputs = torch.zeros(B, T, H, V, dtype=acc, device=q.device)
    finals = []
    for n, (b, bos, eos) in enumerate(spans):
        S = q.new_zeros(H, K, V) if initial_state is None else initial_state[n].to(acc)
        rows = []
        for t in range(bos, eos):
            S = S * g[b, t].exp()[..., None] + k[b, t][..., None] * v[b, t][:, None, :]
            rows.append(torch.einsum("hk,hkv->hv", q[b, t] * scale, S))
        if rows:
            outputs[b, bos:eos] = torch.stack(rows)
        finals.append(S)

    # an empty batch has no sequences to stack
    final_state = (torch.stack(finals) if finals else q.new_zeros(0, H, K, V)) if output_final_state else None
    return outputs.to(dtype), final_state
