"""Chunked (WY representation) delta rule in plain PyTorch: the CPU path, differentiated by autograd.

Work inside a chunk is batched over all chunks with einsum; only the inter-chunk state pass loops, once per chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange


def _acc_dtype(*tensors) -> torch.dtype:
    """fp32 for half precision and fp32 inputs, fp64 for fp64 ones: the CPU path never computes below its inputs."""
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _chunk_one(q, k, v, beta, g, scale, h0, chunk_size):
    # q, k (b, t, h, dk); v (b, t, h, dv); beta, g (b, t, h); h0 (b, h, dk, dv) or None; all fp32
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    if t == 0:
        return v.new_zeros(v.shape), q.new_zeros(b, h, dk, dv) if h0 is None else h0
    if g is None:
        g = beta.new_zeros(beta.shape)
    # padded steps have k = v = beta = g = 0, which leaves the state untouched
    pad = (-t) % chunk_size
    q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
    beta, g = (F.pad(x, (0, 0, 0, pad)) for x in (beta, g))
    c = chunk_size
    q, k, v = (rearrange(x, "b (n c) h d -> b h n c d", c=c) for x in (q, k, v))
    beta, g = (rearrange(x, "b (n c) h -> b h n c", c=c) for x in (beta, g))

    # decays relative to points inside the chunk, masked before exp so no factor ever exceeds 1
    gc = g.cumsum(-1)
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    decay = (gc[..., :, None] - gc[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    to_end = (gc[..., -1:] - gc).exp()

    # WY representation: A = (I + strict_tril(diag(beta) K K^T * decay))^-1, w = A (beta e^G k), u = A (beta v)
    kk = torch.einsum("bhnik,bhnjk->bhnij", k, k) * decay * beta[..., None]
    eye = torch.eye(c, dtype=q.dtype, device=q.device)
    lower = kk.masked_fill(causal.logical_not() | eye.bool(), 0.0) + eye
    a = torch.linalg.solve_triangular(lower, eye.expand_as(lower), upper=False, unitriangular=True)
    w = a @ (k * (beta * gc.exp())[..., None])
    u = a @ (v * beta[..., None])

    state = q.new_zeros(b, h, dk, dv) if h0 is None else h0
    deltas, inters = [], []
    for n in range(q.shape[2]):
        delta = u[:, :, n] - w[:, :, n] @ state
        inters.append((q[:, :, n] * gc[:, :, n, :, None].exp()) @ state)
        deltas.append(delta)
        k_to_end = k[:, :, n] * to_end[:, :, n, :, None]
        state = state * gc[:, :, n, -1, None, None].exp() + k_to_end.transpose(-1, -2) @ delta
    delta, inter = torch.stack(deltas, 2), torch.stack(inters, 2)
    scores = torch.einsum("bhnik,bhnjk->bhnij", q, k) * decay
    o = scale * (inter + scores @ delta)
    o = rearrange(o, "b h n c d -> b (n c) h d")[:, :t]
    return o, state


def chunk_delta_rule_torch(
    q, k, v, beta, g=None, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, chunk_size=64
):
    """The chunked PyTorch path behind `chunk_delta_rule` for non-Triton tensors (computes in fp32, fp64 inputs in
    fp64)."""
    dtype = v.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc = _acc_dtype(q, k, v)
    q, k, v, beta = (x.to(acc) for x in (q, k, v, beta))
    g = g.to(acc) if g is not None else None
    h0 = initial_state.to(acc) if initial_state is not None else None
    if cu_seqlens is None:
        o, ht = _chunk_one(q, k, v, beta, g, scale, h0, chunk_size)
    else:
        outs, states = [], []
        bounds = cu_seqlens.tolist()
        for n, (bos, eos) in enumerate(zip(bounds[:-1], bounds[1:])):
            seg = slice(bos, eos)
            o_n, h_n = _chunk_one(
                q[:, seg], k[:, seg], v[:, seg], beta[:, seg], g[:, seg] if g is not None else None, scale,
                h0[n : n + 1] if h0 is not None else None, chunk_size,
            )
            outs.append(o_n)
            states.append(h_n)
        o, ht = torch.cat(outs, 1), torch.cat(states, 0)
    return o.to(dtype), ht if output_final_state else None
