"""Chunked scalar-decay linear attention in plain PyTorch: the CPU path. Work inside a chunk is one batched einsum over
all chunks; only the inter-chunk state pass loops (over chunks, not tokens). Autograd provides the gradients."""

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


def _chunk_one(q, k, v, g, scale, h0, chunk_size):
    # q, k: (b, t, h, dk); v: (b, t, h, dv); g: (b, t, h) or None; h0: (b, h, dk, dv) fp32 (fp64) or None
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    acc = _acc_dtype(q, k, v)
    if T == 0:
        S = h0.to(acc) if h0 is not None else q.new_zeros(B, H, K, V, dtype=acc)
        return q.new_zeros(B, 0, H, V, dtype=acc), S
    pad = (-T) % C
    q, k, v = (F.pad(t.to(acc), (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
    g = F.pad(g.to(acc), (0, 0, 0, pad)) if g is not None else q.new_zeros(B, T + pad, H)
    q, k, v = (rearrange(t, "b (n c) h d -> b h n c d", c=C) for t in (q, k, v))
    # cumulative log gate restarted at every chunk, so every exp below is of a non-positive number
    gc = rearrange(g, "b (n c) h -> b h n c", c=C).cumsum(-1)
    g_last = gc[..., -1:]  # (b, h, n, 1)

    # intra-chunk: causal attention with decay exp(G_i - G_j)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    decay = (gc[..., :, None] - gc[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    attn = torch.einsum("bhnik,bhnjk->bhnij", q, k) * decay
    o = torch.einsum("bhnij,bhnjv->bhniv", attn, v)

    # each chunk's contribution to the state at its end
    k_end = k * (g_last - gc).exp()[..., None]
    contrib = torch.einsum("bhnck,bhncv->bhnkv", k_end, v)
    chunk_decay = g_last.exp()[..., None]  # (b, h, n, 1, 1)

    S = h0.to(acc) if h0 is not None else q.new_zeros(B, H, K, V)
    states = []
    for n in range(q.shape[2]):
        states.append(S)
        S = S * chunk_decay[:, :, n] + contrib[:, :, n]
    states = torch.stack(states, 2)  # state before every chunk: (b, h, n, dk, dv)
    o = o + torch.einsum("bhnck,bhnkv->bhncv", q * gc.exp()[..., None], states)
    o = rearrange(o * scale, "b h n c v -> b (n c) h v")[:, :T]
    return o, S


def chunk_simple_gla_torch(q, k, v, g=None, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                           chunk_size=64):
    """Same contract as `chunk_simple_gla`; packed sequences are handled one at a time."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if cu_seqlens is None:
        o, ht = _chunk_one(q, k, v, g, scale, initial_state, chunk_size)
        return o.to(v.dtype), (ht if output_final_state else None)
    bounds = cu_seqlens.tolist()
    outs, finals = [], []
    for n, (bos, eos) in enumerate(zip(bounds[:-1], bounds[1:])):
        sl = slice(bos, eos)
        h0 = initial_state[n : n + 1] if initial_state is not None else None
        o, ht = _chunk_one(q[:, sl], k[:, sl], v[:, sl], g[:, sl] if g is not None else None, scale, h0, chunk_size)
        outs.append(o)
        finals.append(ht)
    o = torch.cat(outs, 1).to(v.dtype)
    return o, (torch.cat(finals) if output_final_state else None)
