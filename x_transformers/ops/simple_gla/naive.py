"""Token-by-token fp32 reference for the scalar-decay linear recurrence, written for clarity (used by tests).

S_t = exp(g_t) * S_{t-1} + k_t^T v_t,   o_t = scale * q_t S_t
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


def _naive_one(q, k, v, g, scale, h0):
    # q, k: (t, h, dk); v: (t, h, dv); g: (t, h); h0: (h, dk, dv)
    T, H, K = q.shape
    V = v.shape[-1]
    acc = _acc_dtype(q, k, v)
    S = h0.to(acc).clone() if h0 is not None else q.new_zeros(H, K, V, dtype=acc)
    outs = []
    for t in range(T):
        if g is not None:
            S = S * g[t].to(acc).exp()[:, None, None]
        S = S + k[t].to(acc)[:, :, None] * v[t].to(acc)[:, None, :]
        outs.append(scale * torch.einsum("hk,hkv->hv", q[t].to(acc), S))
    o = torch.stack(outs) if outs else v.new_zeros(0, H, V, dtype=acc)
    return o, S


def naive_simple_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
):
    """q, k: (b, t, h, dk); v: (b, t, h, dv); g: (b, t, h) log decay. Returns (o in fp32 - fp64 for fp64 inputs -,
    final state or None)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if q.shape[0] == 0:
        # an empty batch: nothing to step through (and nothing to stack)
        B, T, H, K = q.shape
        acc = _acc_dtype(q, k, v)
        return q.new_zeros(0, T, H, v.shape[-1], dtype=acc), (
            q.new_zeros(0, H, K, v.shape[-1], dtype=acc) if output_final_state else None
        )
    if cu_seqlens is None:
        segments = [(b, 0, q.shape[1]) for b in range(q.shape[0])]
    else:
        bounds = cu_seqlens.tolist()
        segments = [(0, bos, eos) for bos, eos in zip(bounds[:-1], bounds[1:])]
    outs, finals = [], []
    for n, (b, bos, eos) in enumerate(segments):
        h0 = initial_state[n] if initial_state is not None else None
        gn = g[b, bos:eos] if g is not None else None
        o, S = _naive_one(q[b, bos:eos], k[b, bos:eos], v[b, bos:eos], gn, scale, h0)
        outs.append(o)
        finals.append(S)
    if cu_seqlens is None:
        o = torch.stack(outs)
    else:
        o = torch.cat(outs)[None]
    return o, (torch.stack(finals) if output_final_state else None)
