"""Chunked generalized delta rule in plain PyTorch: the CPU path, differentiated by autograd.

Inside a chunk of C steps, with G the inclusive cumulative log decay (per key channel), G' = G - gk the exclusive one
and S0 the state entering the chunk, the reads u_t = a_t S_{t-1} solve a unit lower-triangular system:

    M_ab[t, s] = sum_c a_tc b_sc exp(G'_tc - G_sc)   (s < t), likewise M_ak with k
    M_qb[t, s] = sum_c q_tc b_sc exp(G_tc - G_sc)    (s <= t), likewise M_qk with k
    P = (I - M_ab)^-1,  w = P (a exp(G')),  u = P M_ak v,  U = u + w S0      (the reads of every step)
    o = scale (q exp(G) S0 + M_qk v + M_qb U)
    S_next = exp(G_last) S0 + (b exp(G_last - G))^T U + (k exp(G_last - G))^T v

Every exponent is <= 0 (the pairwise ones are masked before exp), so strong decay underflows to zero instead of
overflowing. The pairwise decays are one `[C, C, K]` tensor per chunk; the state pass loops once per chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from x_transformers.ops.dplr.naive import _acc_dtype

CHUNK = 16


def _chunk_one(q, k, v, a, b, gk, scale, h0, c):
    # q, k, a, b, gk (n, t, h, dk); v (n, t, h, dv); h0 (n, h, dk, dv) or None; all in the accumulation dtype
    n, t, h, dk = q.shape
    dv = v.shape[-1]
    if t == 0:
        return v.new_zeros(v.shape), q.new_zeros(n, h, dk, dv) if h0 is None else h0
    # padded steps have zero inputs and gk = 0: they leave the state untouched
    pad = (-t) % c
    q, k, v, a, b, gk = (rearrange(F.pad(x, (0, 0, 0, 0, 0, pad)), "b (n c) h d -> b h n c d", c=c)
                         for x in (q, k, v, a, b, gk))
    G = gk.cumsum(-2)
    Gx = G - gk
    strict = torch.ones(c, c, dtype=torch.bool, device=q.device).tril(-1)[..., None]
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()[..., None]
    # (b h n t s k): decay from step s to step t, zero outside the mask (masked before exp: no overflow)
    e_read = (Gx[..., :, None, :] - G[..., None, :, :]).masked_fill(~strict, float("-inf")).exp()
    e_out = (G[..., :, None, :] - G[..., None, :, :]).masked_fill(~causal, float("-inf")).exp()
    pair = lambda x, y, e: torch.einsum("...tk,...sk,...tsk->...ts", x, y, e)  # noqa: E731
    M_ab, M_ak = pair(a, b, e_read), pair(a, k, e_read)
    M_qb, M_qk = pair(q, b, e_out), pair(q, k, e_out)

    eye = torch.eye(c, dtype=q.dtype, device=q.device)
    P = torch.linalg.solve_triangular(eye - M_ab, eye.expand_as(M_ab), upper=False, unitriangular=True)
    w = P @ (a * Gx.exp())
    u = P @ (M_ak @ v)
    G_last = G[..., -1:, :]
    b_end, k_end = b * (G_last - G).exp(), k * (G_last - G).exp()

    state = q.new_zeros(n, h, dk, dv) if h0 is None else h0
    reads, inters = [], []
    for i in range(q.shape[2]):
        U = u[:, :, i] + w[:, :, i] @ state
        reads.append(U)
        inters.append((q[:, :, i] * G[:, :, i].exp()) @ state)
        state = (state * G_last[:, :, i].transpose(-1, -2).exp() + b_end[:, :, i].transpose(-1, -2) @ U
                 + k_end[:, :, i].transpose(-1, -2) @ v[:, :, i])
    U, inter = torch.stack(reads, 2), torch.stack(inters, 2)
    o = scale * (inter + M_qk @ v + M_qb @ U)
    return rearrange(o, "b h n c d -> b (n c) h d")[:, :t], state


def chunk_dplr_delta_rule_torch(
    q, k, v, a, b, gk, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, chunk_size=CHUNK
):
    """The chunked PyTorch path behind `chunk_dplr_delta_rule` for non-Triton tensors (computes in fp32, fp64 inputs
    in fp64)."""
    dtype = v.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc = _acc_dtype(q, k, v, a, b)
    q, k, v, a, b, gk = (x.to(acc) for x in (q, k, v, a, b, gk))
    h0 = initial_state.to(acc) if initial_state is not None else None
    if cu_seqlens is None:
        o, ht = _chunk_one(q, k, v, a, b, gk, scale, h0, chunk_size)
    else:
        outs, states = [], []
        bounds = cu_seqlens.tolist()
        for n, (bos, eos) in enumerate(zip(bounds[:-1], bounds[1:])):
            seg = slice(bos, eos)
            o_n, h_n = _chunk_one(
                *(x[:, seg] for x in (q, k, v, a, b, gk)), scale, h0[n : n + 1] if h0 is not None else None,
                chunk_size,
            )
            outs.append(o_n)
            states.append(h_n)
        o, ht = torch.cat(outs, 1), torch.cat(states, 0)
    return o.to(dtype), ht if output_final_state else None
