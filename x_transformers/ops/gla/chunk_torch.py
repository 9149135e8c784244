"""Chunked PyTorch path of `chunk_gla` for CPU users: vectorised over chunks with einsum, autograd through torch ops.

Per-channel decay cannot be factored as exp(G_t) q_t . exp(-G_s) k_s over a whole chunk (exp(-G_s) overflows with
strong decay), so each chunk of 64 is split into sub-chunks of 16:
- blocks below the diagonal use the first position of the query sub-chunk as a reference point: both factors
  exp(G_t - G_ref) and exp(G_ref - G_s) have non-positive exponents, so they can only underflow, never overflow;
- blocks on the diagonal are formed pair-wise from exp of masked differences exp(G_t - G_s), s <= t;
- the state pass between chunks uses exp(G_last - G_s) and exp(G_t), again non-positive exponents.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

CHUNK = 64
SUB = 16


def _acc_dtype(*tensors) -> torch.dtype:
    """fp32 for half precision and fp32 inputs, fp64 for fp64 ones: the CPU path never computes below its inputs."""
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _chunk_gla_torch_single(q, k, v, g, scale, h0):
    """One batch of equal-length sequences. q, k, g: [B, T, H, K]; v: [B, T, H, V]; h0: [B, H, K, V] fp32 or None."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    acc = _acc_dtype(q, k, v)
    if T == 0:
        return q.new_zeros(B, 0, H, V, dtype=acc), (q.new_zeros(B, H, K, V, dtype=acc) if h0 is None else h0.to(acc))
    pad = (-T) % CHUNK
    # zero padding at the end: g = 0 keeps the decay of the last real token, k = v = 0 adds nothing to the state
    q, k, v, g = (F.pad(t.to(acc), (0, 0, 0, 0, 0, pad)) for t in (q, k, v, g))
    n_sub = CHUNK // SUB
    q, k, g = (rearrange(t, "b (n s c) h k -> b h n s c k", s=n_sub, c=SUB) for t in (q, k, g))
    v = rearrange(v, "b (n c) h v -> b h n c v", c=CHUNK)

    # cumulative log decay inside each chunk, from the chunk start (inclusive)
    G = rearrange(g, "b h n s c k -> b h n (s c) k").cumsum(dim=-2)
    G = rearrange(G, "b h n (s c) k -> b h n s c k", s=n_sub)
    G_ref = G[..., :1, :]  # (b h n s 1 k): first position of each sub-chunk

    # off-diagonal sub-chunk blocks, query sub-chunk i against key sub-chunk j < i, via the reference of i
    below = torch.ones(n_sub, n_sub, dtype=torch.bool, device=q.device).tril(-1)
    q_ref = q * (G - G_ref).exp()
    rel = G_ref.unsqueeze(4) - G.unsqueeze(3)  # (b h n i j c k): G_ref(i) - G_s, s in sub-chunk j
    rel = rel.masked_fill(~below[:, :, None, None], float("-inf"))
    k_ref = k.unsqueeze(3) * rel.exp()
    A_off = torch.einsum("bhnick,bhnijdk->bhnijcd", q_ref, k_ref)

    # diagonal sub-chunk blocks, pair-wise: exp(G_t - G_s) for s <= t
    causal = torch.ones(SUB, SUB, dtype=torch.bool, device=q.device).tril()
    diff = (G.unsqueeze(-2) - G.unsqueeze(-3)).masked_fill(~causal[:, :, None], float("-inf"))
    A_diag = torch.einsum("bhnsck,bhnsdk,bhnscdk->bhnscd", q, k, diff.exp())

    eye = torch.eye(n_sub, dtype=torch.bool, device=q.device)
    A = A_off + A_diag.unsqueeze(3) * eye[:, :, None, None]
    A = rearrange(A, "b h n i j c d -> b h n (i c) (j d)") * scale
    o = A @ v

    # inter-chunk: per-chunk state increments, then a short loop over chunks for the recurrence
    q, k, G = (rearrange(t, "b h n s c k -> b h n (s c) k") for t in (q, k, G))
    G_last = G[..., -1, :]  # (b h n k)
    k_last = k * (G_last.unsqueeze(-2) - G).exp()
    increments = torch.einsum("bhnck,bhncv->bhnkv", k_last, v)
    decays = G_last.exp()

    S = q.new_zeros(B, H, K, V) if h0 is None else h0.to(acc)
    starts = []
    for n in range(increments.shape[2]):
        starts.append(S)
        S = decays[:, :, n, :, None] * S + increments[:, :, n]
    starts = torch.stack(starts, dim=2)  # (b h n k v): state entering each chunk

    o = o + torch.einsum("bhnck,bhnkv->bhncv", q * G.exp() * scale, starts)
    o = rearrange(o, "b h n c v -> b (n c) h v")[:, :T]
    return o, S


def chunk_gla_torch(q, k, v, g, scale, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Same contract as `chunk_gla`; used for CPU tensors outside the Triton interpreter."""
    dtype = v.dtype
    if cu_seqlens is None:
        o, S = _chunk_gla_torch_single(q, k, v, g, scale, initial_state)
        return o.to(dtype), (S if output_final_state else None)

    # segments are independent: run each on its own (a loop over segments, not over time)
    offsets = cu_seqlens.tolist()
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    outs, finals = [], []
    for n, (bos, eos) in enumerate(zip(offsets[:-1], offsets[1:])):
        h0 = None if initial_state is None else initial_state[n : n + 1]
        if eos == bos:
            acc = _acc_dtype(q, k, v)
            outs.append(v.new_zeros(1, 0, H, V, dtype=acc))
            finals.append(q.new_zeros(1, H, K, V, dtype=acc) if h0 is None else h0.to(acc))
            continue
        seg = [t[:, bos:eos] for t in (q, k, v, g)]
        o, S = _chunk_gla_torch_single(*seg, scale, h0)
        outs.append(o)
        finals.append(S)
    o = torch.cat(outs, dim=1).to(dtype)
    return o, (torch.cat(finals) if output_final_state else None)
