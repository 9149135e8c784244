"""Plain PyTorch causal depthwise convolution: the reference for the Triton kernels, and the path for CPU tensors.

`out[t, c] = bias[c] + sum_j weight[c, j] * x[t - (w - 1) + j, c]`, with the inputs before the first token taken from
`cache` (or zero), as `F.conv1d(..., groups=d)` computes it. Vectorised over time: one grouped conv1d per call (one per
sequence of a packed batch), computed in fp32 and returned in x's dtype.
"""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor


def last_inputs(x: Tensor, cache: Tensor | None, width: int, cu_seqlens: Tensor | None = None) -> Tensor:
    """The decode cache after x: the last `width - 1` inputs of (cache, x) in x's dtype, zero-padded on the left when
    there are fewer. (b, w - 1, d), or one row per sequence (N, w - 1, d) of a packed batch."""
    past = width - 1
    if cu_seqlens is not None:
        # token `end - past + i` of each sequence, zero where it falls before the sequence's start
        bos, eos = cu_seqlens[:-1].long(), cu_seqlens[1:].long()
        idx = eos[:, None] - past + torch.arange(past, device=x.device)
        valid = (idx >= bos[:, None])[..., None]
        return x[0, idx.clamp(min=0)] * valid.to(x.dtype)
    if cache is not None:
        x = torch.cat((cache.to(x.dtype), x), dim=1)
    if x.shape[1] >= past:
        return x[:, x.shape[1] - past :]
    return F.pad(x, (0, 0, past - x.shape[1], 0))


def _conv(x: Tensor, weight: Tensor, bias: Tensor | None, cache: Tensor | None) -> Tensor:
    # (b, n, d) -> (b, n, d) in fp32; the cache (or zeros) supplies the w - 1 inputs before x
    past = weight.shape[1] - 1
    if x.shape[1] == 0:
        return x.new_zeros(x.shape, dtype=torch.float32)
    x = x.float()
    if cache is not None:
        x = torch.cat((cache.float(), x), dim=1)
    else:
        x = F.pad(x, (0, 0, past, 0))
    out = F.conv1d(x.transpose(1, 2), weight.float()[:, None], bias.float() if bias is not None else None,
                   groups=weight.shape[0])
    return out.transpose(1, 2)


def naive_causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    cache: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """x: (b, n, d); weight: (d, w); bias: (d,); cache: (b, w - 1, d). Returns (out in x's dtype, new cache).
    Inputs are not checked: call `causal_conv1d`, which validates and dispatches here for CPU tensors."""
    # a reference in fp32 whatever autocast is active around it
    with torch.autocast(device_type=x.device.type, enabled=False):
        if cu_seqlens is None:
            out = _conv(x, weight, bias, cache)
        else:
            # no mixing across the packed sequences: each is convolved on its own, from zeros
            bounds = cu_seqlens.tolist()
            out = torch.cat([_conv(x[:, s:e], weight, bias, None) for s, e in pairwise(bounds)], dim=1)
        if activation is not None:
            out = F.silu(out)
    return out.to(x.dtype), last_inputs(x, cache, weight.shape[1], cu_seqlens)
