"""Token-by-token fp32 reference for the elementwise gated scan h_t = exp(g_t) * h_{t-1} + x_t (used by tests)."""

from __future__ import annotations

import torch
from torch import Tensor


def naive_hgrn(
    x: Tensor,
    g: Tensor,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
):
    """x, g: (b, t, d). Returns (h in fp32, final state (n, d) or None)."""
    if cu_seqlens is None:
        segments = [(b, 0, x.shape[1]) for b in range(x.shape[0])]
    else:
        bounds = cu_seqlens.tolist()
        segments = [(0, bos, eos) for bos, eos in zip(bounds[:-1], bounds[1:])]
    outs, finals = [], []
    for n, (b, bos, eos) in enumerate(segments):
        h = initial_state[n].float() if initial_state is not None else x.new_zeros(x.shape[-1], dtype=torch.float32)
        hs = []
        for t in range(bos, eos):
            h = g[b, t].float().exp() * h + x[b, t].float()
            hs.append(h)
        outs.append(torch.stack(hs) if hs else x.new_zeros(0, x.shape[-1], dtype=torch.float32))
        finals.append(h)
    o = torch.stack(outs) if cu_seqlens is None else torch.cat(outs)[None]
    return o, (torch.stack(finals) if output_final_state else None)
