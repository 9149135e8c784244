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

    def run(q, k, v, g, S):
        # (b, h, k, v) state stepped over time; the outputs stacked, never written into a preallocated tensor (which
        # torch.func.vmap cannot batch)
        rows = []
        for t in range(q.shape[1]):
            S = S * g[:, t].exp()[..., None] + k[:, t][..., None] * v[:, t][..., None, :]
            rows.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
        o = torch.stack(rows, 1) if rows else q.new_zeros(q.shape[0], 0, H, V)
        return o, S

    if cu_seqlens is None:
        S0 = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(acc)
        o, S = run(q, k, v, g, S0)
        return o.to(dtype), (S if output_final_state else None)

    offsets = cu_seqlens.tolist()
    outs, finals = [], []
    for n, (bos, eos) in enumerate(zip(offsets[:-1], offsets[1:])):
        S0 = q.new_zeros(1, H, K, V) if initial_state is None else initial_state[n : n + 1].to(acc)
        o, S = run(*(t[:, bos:eos] for t in (q, k, v, g)), S0)
        outs.append(o)
        finals.append(S)
    o = torch.cat(outs, 1) if outs else q.new_zeros(1, 0, H, V)
    final_state = (torch.cat(finals) if finals else q.new_zeros(0, H, K, V)) if output_final_state else None
    return o.to(dtype), final_state
