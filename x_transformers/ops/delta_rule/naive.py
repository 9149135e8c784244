"""Token-by-token fp32 reference for the (gated) delta rule, written for clarity; every kernel is tested against it.

    S' = exp(g_t) S_{t-1}
    S_t = S' + beta_t k_t^T (v_t - k_t S')
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


def _naive_one(q, k, v, beta, g, scale, h0):
    # q, k (b, t, h, dk); v (b, t, h, dv); beta, g (b, t, h); h0 (b, h, dk, dv)
    b, t, h, dk = q.shape
    state = q.new_zeros(b, h, dk, v.shape[-1]) if h0 is None else h0
    outs = []
    for i in range(t):
        if g is not None:
            state = state * g[:, i].exp()[..., None, None]
        k_i = k[:, i]
        pred = torch.einsum("bhk,bhkv->bhv", k_i, state)
        delta = beta[:, i, :, None] * (v[:, i] - pred)
        state = state + torch.einsum("bhk,bhv->bhkv", k_i, delta)
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, i] * scale, state))
    o = torch.stack(outs, 1) if outs else v.new_zeros(v.shape)
    return o, state


def naive_delta_rule(
    q, k, v, beta, g=None, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None
):
    """Same signature and results as `chunk_delta_rule`, computed step by step in fp32 (slow, for tests)."""
    dtype = v.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc = _acc_dtype(q, k, v)
    q, k, v, beta = (x.to(acc) for x in (q, k, v, beta))
    g = g.to(acc) if g is not None else None
    h0 = initial_state.to(acc) if initial_state is not None else None
    if cu_seqlens is None:
        o, ht = _naive_one(q, k, v, beta, g, scale, h0)
    else:
        outs, states = [], []
        bounds = cu_seqlens.tolist()
        for n, (bos, eos) in enumerate(zip(bounds[:-1], bounds[1:])):
            seg = slice(bos, eos)
            o_n, h_n = _naive_one(
                q[:, seg], k[:, seg], v[:, seg], beta[:, seg], g[:, seg] if g is not None else None, scale,
                h0[n : n + 1] if h0 is not None else None,
            )
            outs.append(o_n)
            states.append(h_n)
        o, ht = torch.cat(outs, 1), torch.cat(states, 0)
    return o.to(dtype), ht if output_final_state else None
