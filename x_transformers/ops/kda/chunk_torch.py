"""Chunked KDA in plain PyTorch: the CPU path, differentiated by autograd.

Per chunk of 64 with G the cumulative log-gate inside the chunk ([64, K], one decay per key channel) and S0 the
state entering it:

    Akk[t, s] = sum_c k_tc k_sc exp(G_tc - G_sc)  (s < t),    Aqk[t, s] = the same with q_t  (s <= t)
    A = (I + diag(beta) Akk)^-1,  w = A (beta k exp(G)),  u = A (beta v)     (WY representation)
    d = u - w S0,  o = scale ((q exp(G)) S0 + Aqk d),  S_next = diag(exp(G_last)) S0 + (k exp(G_last - G))^T d

Per-channel decays cannot be factored as exp(G_t) . exp(-G_s) over a chunk (exp(-G_s) overflows under strong
decay), so the intra-chunk matrices are built as in `gla/chunk_torch.py`, from sub-chunks of 16: blocks below the
diagonal through the first row of the query sub-chunk (both factors have non-positive exponents), diagonal blocks
pair-wise from masked differences. Work inside a chunk is batched over all chunks; only the state pass loops.
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


def _decayed_scores(a, k, G, strict):
    """`[b, h, n, 64, 64]`: sum_c a_tc k_sc exp(G_tc - G_sc) for s <= t (s < t if `strict`), zero above.

    a, k, G: `[b, h, n, s, c, K]` (chunks split into sub-chunks); G non-increasing along the sub-chunk rows."""
    n_sub, c = G.shape[3], G.shape[4]
    # blocks below the diagonal through the first row of the query sub-chunk: exp(G_t - G_ref) exp(G_ref - G_s)
    G_ref = G[..., :1, :]
    below = torch.ones(n_sub, n_sub, dtype=torch.bool, device=G.device).tril(-1)
    rel = (G_ref.unsqueeze(4) - G.unsqueeze(3)).masked_fill(~below[:, :, None, None], float("-inf"))
    off = torch.einsum("bhnick,bhnijdk->bhnijcd", a * (G - G_ref).exp(), k.unsqueeze(3) * rel.exp())
    # diagonal blocks pair-wise, masked before the exp so that no factor exceeds 1
    causal = torch.ones(c, c, dtype=torch.bool, device=G.device).tril(-1 if strict else 0)
    diff = (G.unsqueeze(-2) - G.unsqueeze(-3)).masked_fill(~causal[:, :, None], float("-inf"))
    diag = torch.einsum("bhnsck,bhnsdk,bhnscdk->bhnscd", a, k, diff.exp())
    eye = torch.eye(n_sub, dtype=torch.bool, device=G.device)
    scores = off + diag.unsqueeze(3) * eye[:, :, None, None]
    return rearrange(scores, "b h n i j c d -> b h n (i c) (j d)")


def _chunk_one(q, k, v, g, beta, scale, h0):
    # q, k, g (b, t, h, dk); v (b, t, h, dv); beta (b, t, h); h0 (b, h, dk, dv) or None; all in the acc dtype
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    if t == 0:
        return v.new_zeros(v.shape), q.new_zeros(b, h, dk, dv) if h0 is None else h0
    # padded steps have k = v = beta = g = 0, which leaves the state untouched
    pad = (-t) % CHUNK
    q, k, v, g = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v, g))
    beta = F.pad(beta, (0, 0, 0, pad))
    sub = lambda x: rearrange(x, "b (n s c) h d -> b h n s c d", s=CHUNK // SUB, c=SUB)  # noqa: E731
    flat = lambda x: rearrange(x, "b h n s c d -> b h n (s c) d")  # noqa: E731
    G = sub(g).flatten(3, 4).cumsum(-2).unflatten(3, (CHUNK // SUB, SUB))
    q_s, k_s = sub(q), sub(k)
    Akk = _decayed_scores(k_s, k_s, G, strict=True)
    Aqk = _decayed_scores(q_s, k_s, G, strict=False)
    q, k, G = flat(q_s), flat(k_s), flat(G)
    v = rearrange(v, "b (n c) h d -> b h n c d", c=CHUNK)
    beta = rearrange(beta, "b (n c) h -> b h n c", c=CHUNK)

    eye = torch.eye(CHUNK, dtype=q.dtype, device=q.device)
    lower = Akk * beta[..., None] + eye
    a = torch.linalg.solve_triangular(lower, eye.expand_as(lower), upper=False, unitriangular=True)
    w = a @ (k * G.exp() * beta[..., None])
    u = a @ (v * beta[..., None])

    G_last = G[..., -1, :]  # (b h n k)
    k_to_end = k * (G_last.unsqueeze(-2) - G).exp()
    state = q.new_zeros(b, h, dk, dv) if h0 is None else h0
    deltas, inters = [], []
    for n in range(q.shape[2]):
        delta = u[:, :, n] - w[:, :, n] @ state
        inters.append((q[:, :, n] * G[:, :, n].exp()) @ state)
        deltas.append(delta)
        state = state * G_last[:, :, n, :, None].exp() + k_to_end[:, :, n].transpose(-1, -2) @ delta
    delta, inter = torch.stack(deltas, 2), torch.stack(inters, 2)
    o = scale * (inter + Aqk @ delta)
    o = rearrange(o, "b h n c d -> b (n c) h d")[:, :t]
    return o, state


def chunk_kda_torch(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """The chunked PyTorch path behind `chunk_kda` for non-Triton tensors (computes in fp32, fp64 inputs in fp64)."""
    dtype = v.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc = _acc_dtype(q, k, v)
    q, k, v, g, beta = (x.to(acc) for x in (q, k, v, g, beta))
    h0 = initial_state.to(acc) if initial_state is not None else None
    if cu_seqlens is None:
        o, ht = _chunk_one(q, k, v, g, beta, scale, h0)
    else:
        outs, states = [], []
        bounds = cu_seqlens.tolist()
        for n, (bos, eos) in enumerate(zip(bounds[:-1], bounds[1:])):
            seg = slice(bos, eos)
            o_n, h_n = _chunk_one(
                q[:, seg], k[:, seg], v[:, seg], g[:, seg], beta[:, seg], scale,
                h0[n : n + 1] if h0 is not None else None,
            )
            outs.append(o_n)
            states.append(h_n)
        o, ht = torch.cat(outs, 1), torch.cat(states, 0)
    return o.to(dtype), ht if output_final_state else None
