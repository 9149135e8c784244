"""Token-by-token reference for Kimi Delta Attention (KDA), written for clarity; every kernel is tested against it.

The delta rule with a per-key-channel forget gate: with S [K, V], k_t, q_t rows [K], v_t a row [V],

    S' = diag(exp(g_t)) S_{t-1}
    S_t = S' + beta_t k_t^T (v_t - k_t S')      i.e. (I - beta_t k_t^T k_t) diag(exp(g_t)) S_{t-1} + beta_t k_t^T v_t
    o_t = scale q_t S_t
"""

from __future__ import annotations

import torch


def _acc_dtype(*tensors) -> torch.dtype:
    """fp32 for half precision and fp32 inputs, fp64 for fp64 ones: the CPU path never computes below its inputs."""
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _naive_one(q, k, v, g, beta, scale, h0):
    # q, k, g (b, t, h, dk); v (b, t, h, dv); beta (b, t, h); h0 (b, h, dk, dv) or None
    b, t, h, dk = q.shape
    state = q.new_zeros(b, h, dk, v.shape[-1]) if h0 is None else h0
    outs = []
    for i in range(t):
        state = state * g[:, i].exp()[..., None]
        k_i = k[:, i]
        pred = torch.einsum("bhk,bhkv->bhv", k_i, state)
        delta = beta[:, i, :, None] * (v[:, i] - pred)
        state = state + torch.einsum("bhk,bhv->bhkv", k_i, delta)
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, i] * scale, state))
    o = torch.stack(outs, 1) if outs else v.new_zeros(v.shape)
    return o, state


def naive_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Same signature and results as `chunk_kda`, computed step by step in fp32 (fp64 for fp64 inputs; slow, for
    tests and as the CPU decoding path)."""
    dtype = v.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc = _acc_dtype(q, k, v)
    q, k, v, g, beta = (x.to(acc) for x in (q, k, v, g, beta))
    h0 = initial_state.to(acc) if initial_state is not None else None
    if cu_seqlens is None:
        o, ht = _naive_one(q, k, v, g, beta, scale, h0)
    else:
        outs, states = [], []
        bounds = cu_seqlens.tolist()
        for n, (bos, eos) in enumerate(zip(bounds[:-1], bounds[1:])):
            seg = slice(bos, eos)
            o_n, h_n = _naive_one(
                q[:, seg], k[:, seg], v[:, seg], g[:, seg], beta[:, seg], scale,
                h0[n : n + 1] if h0 is not None else None,
            )
            outs.append(o_n)
            states.append(h_n)
        o, ht = torch.cat(outs, 1), torch.cat(states, 0)
    return o.to(dtype), ht if output_final_state else None
