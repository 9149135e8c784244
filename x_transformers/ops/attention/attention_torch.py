"""PyTorch path of `flash_attention` for CPU users: one document at a time through SDPA, so that at most one
document's (n, n) logits exist at once (none at all where SDPA runs its fused kernel, without a forget gate)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from x_transformers.ops.attention.naive import _acc_dtype


def _documents(B: int, T: int, cu_seqlens: Tensor | None):
    """(batch row, first token, end) of every document: the rows of a batch, or the packed segments."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    bounds = cu_seqlens.tolist()
    return [(0, bos, eos) for bos, eos in zip(bounds[:-1], bounds[1:])]


def attention_torch(q, k, v, g, scale: float, causal: bool, cu_seqlens: Tensor | None) -> Tensor:
    """Same contract as `flash_attention` (inputs checked, T > 0, scale set); computes in fp32 (fp64 for fp64
    inputs) and returns v's dtype."""
    B, T, H, _ = q.shape
    groups = H // k.shape[2]
    acc = _acc_dtype(q, k, v, g)
    outs = []
    for b, bos, eos in _documents(B, T, cu_seqlens):
        if eos == bos:
            continue
        # (h, n, d) per document; kv heads repeated for their query heads (h reads kv head h // groups)
        qd = q[b, bos:eos].transpose(0, 1).to(acc)
        kd, vd = (t[b, bos:eos].transpose(0, 1).to(acc).repeat_interleave(groups, 0) for t in (k, v))
        if g is None:
            od = F.scaled_dot_product_attention(qd, kd, vd, is_causal=causal, scale=scale)
        else:
            # c summed in fp64 and split into hi + lo in the compute dtype: c reaches -1e4 on long documents, where an
            # fp32 c is off by ulp(c) / 2 ~ 5e-4 in every bias; hi - hi rounds relative to the difference only
            c = g[b, bos:eos].double().cumsum(0).transpose(0, 1)  # (h, n)
            hi = c.to(acc)
            lo = (c - hi).to(acc)
            bias = (hi[:, :, None] - hi[:, None, :]) + (lo[:, :, None] - lo[:, None, :])
            n = eos - bos
            future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
            bias = bias.masked_fill(future, float("-inf"))
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=bias, scale=scale)
        outs.append(od.transpose(0, 1))
    if cu_seqlens is None:
        return torch.stack(outs).to(v.dtype)
    return torch.cat(outs)[None].to(v.dtype)
