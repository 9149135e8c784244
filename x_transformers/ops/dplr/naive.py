"""Token-by-token reference for the generalized (diagonal plus low-rank) delta rule, written for clarity; every kernel
is tested against it. In the `[K, V]` state layout of the other families:

    S_t = (Diag(exp(gk_t)) + b_t a_t^T) S_{t-1} + k_t^T v_t
        = exp(gk_t) * S_{t-1} + b_t^T (a_t S_{t-1}) + k_t^T v_t
    o_t = scale q_t S_t

(the transpose of the `[V, K]` form S_t = S_{t-1} (Diag(w_t) + a_t b_t^T) + v_t k_t^T). `a_t S_{t-1}` reads the state
before this step's decay.
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


def _naive_one(q, k, v, a, b, gk, scale, h0):
    # q, k, a, b, gk (n, t, h, dk); v (n, t, h, dv); h0 (n, h, dk, dv) or None
    n, t, h, dk = q.shape
    state = q.new_zeros(n, h, dk, v.shape[-1]) if h0 is None else h0
    outs = []
    for i in range(t):
        read = torch.einsum("bhk,bhkv->bhv", a[:, i], state)
        state = state * gk[:, i].exp()[..., None]
        state = state + torch.einsum("bhk,bhv->bhkv", b[:, i], read)
        state = state + torch.einsum("bhk,bhv->bhkv", k[:, i], v[:, i])
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, i] * scale, state))
    o = torch.stack(outs, 1) if outs else v.new_zeros(v.shape)
    return o, state


def naive_dplr_delta_rule(
    q, k, v, a, b, gk, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None
):
    """Same signature and results as `chunk_dplr_delta_rule`, computed step by step in fp32 (fp64 for fp64 inputs;
    slow, for tests and CPU decoding)."""
    dtype = v.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc = _acc_dtype(q, k, v, a, b)
    q, k, v, a, b, gk = (x.to(acc) for x in (q, k, v, a, b, gk))
    h0 = initial_state.to(acc) if initial_state is not None else None
    if cu_seqlens is None:
        o, ht = _naive_one(q, k, v, a, b, gk, scale, h0)
    else:
        outs, states = [], []
        bounds = cu_seqlens.tolist()
        for n, (bos, eos) in enumerate(zip(bounds[:-1], bounds[1:])):
            seg = slice(bos, eos)
            o_n, h_n = _naive_one(
                *(x[:, seg] for x in (q, k, v, a, b, gk)), scale, h0[n : n + 1] if h0 is not None else None
            )
            outs.append(o_n)
            states.append(h_n)
        o, ht = torch.cat(outs, 1), torch.cat(states, 0)
    return o.to(dtype), ht if output_final_state else None
