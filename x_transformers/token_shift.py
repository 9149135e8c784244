"""Token shifting (feature chunks shifted along the sequence, as in RWKV) and axial folding of a sequence."""

from __future__ import annotations

import math

from einops import rearrange
from torch import cat
from torch.nn import Module
from torch.utils._pytree import tree_flatten, tree_unflatten

from x_transformers.utils import exists, pad_at_dim


def shift(t, amount, mask=None):
    """Shift t (b, n, d) along the sequence by `amount` (> 0 towards the future), filling with zeros.

    Masked (padding) positions are zeroed first so that they never leak into real tokens."""
    if amount == 0:
        return t

    seq_len = t.shape[1]
    amount = max(min(amount, seq_len), -seq_len)

    if exists(mask):
        t = t.masked_fill(~mask[..., None], 0.0)

    return pad_at_dim(t, (amount, -amount), dim=-2, value=0.0)


class ShiftTokens(Module):
    """Split the features into len(shifts) equal chunks, shift chunk k by shifts[k], leave the remainder."""

    def __init__(self, shifts, fn):
        super().__init__()
        self.fn = fn
        self.shifts = tuple(shifts)

    def forward(self, x, **kwargs):
        mask = kwargs.get("mask", None)
        segments = len(self.shifts)
        chunks = x.split(x.shape[-1] // segments, dim=-1)
        to_shift, rest = chunks[:segments], chunks[segments:]
        shifted = [shift(chunk, amount, mask=mask) for chunk, amount in zip(to_shift, self.shifts)]
        return self.fn(cat((*shifted, *rest), dim=-1), **kwargs)


class FoldAxially(Module):
    """Run fn on `axial_dim` interleaved sub-sequences: positions p, p + axial_dim, p + 2 axial_dim, ... form one.

    The sequence is zero-padded to a multiple of axial_dim and the padding cut from the output; only the first
    output (of a possibly nested tuple) is unfolded, the rest passes through."""

    def __init__(self, axial_dim, fn: Module):
        super().__init__()
        self.fn = fn
        self.axial_dim = axial_dim

    def forward(self, x, **kwargs):
        if self.axial_dim == 1:
            return self.fn(x, **kwargs)

        seq_len, axial_dim = x.shape[1], self.axial_dim
        padded_len = math.ceil(seq_len / axial_dim) * axial_dim
        x = pad_at_dim(x, (0, padded_len - seq_len), dim=1)
        x = rearrange(x, "b (n axial) ... -> (b axial) n ...", axial=axial_dim)

        (out, *rest), spec = tree_flatten(self.fn(x, **kwargs))

        out = rearrange(out, "(b axial) n ... -> b (n axial) ...", axial=axial_dim)
        return tree_unflatten((out[:, :seq_len], *rest), spec)
