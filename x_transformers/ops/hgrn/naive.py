"""Token-by-token fp32 reference for the elementwise gated scan h_t = exp(g_t) * h_{t-1} + x_t (used by tests)."""

from __future__ import annotations

import torch
from torch import Tensor


def _acc_dtype(*tensors) -> torch.dtype:
    """fp32 for half precision and fp32 inputs, fp64 for fp64 ones: the CPU path never computes below its inputs."""
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


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
    acc = _acc_dtype(x)
    if not segments:
        # an empty batch: nothing to scan (and nothing to stack)
        return x.new_zeros(x.shape, dtype=acc), (x.new_zeros(0, x.shape[-1], dtype=acc) if output_final_state else None)
    outs, finals = [], []
    for n, (b, bos, eos) in enumerate(segments):
        h = initial_state[n].to(acc) if initial_state is not None else x.new_zeros(x.shape[-1], dtype=acc)
        hs = []
        for t in range(bos, eos):
            h = g[b, t].to(acc).exp() * h + x[b, t].to(acc)
            hs.append(h)
        outs.append(torch.stack(hs) if hs else x.new_zeros(0, x.shape[-1], dtype=acc))
        finals.append(h)
    o = torch.stack(outs) if cu_seqlens is None else torch.cat(outs)[None]
    return o, (torch.stack(finals) if output_final_state else None)
