"""Token shifting (feature chunks shifted along the sequence, as in RWKV) and axial folding of a sequence."""

from __future__ import annotations

import math

from einops import rearrange
from torch import cat
from torch.nn import Module
from torch.utils._pytree import tree_flatten, tree_unflatten

from x_transformers.cache import static_cache_refusal
from x_transformers.utils import exists, pad_at_dim


def last(t, n, dim=-2):
    """The last n positions of t along `dim`; empty for n = 0 (where a slice from -0 would be all of t)."""
    return t.narrow(dim, t.shape[dim] - n, n)


def shift(t, amount, mask=None):
    """Shift t (b, n, d) along the sequence by `amount` (> 0 towards the future), filling with zeros.

    Masked (padding) positions are zeroed first so that they never leak into real tokens. A mask longer than the
    sequence (a key mask over cached positions too) is aligned on its last n columns."""
    if amount == 0:
        return t

    seq_len = t.shape[-2]
    amount = max(min(amount, seq_len), -seq_len)

    if exists(mask):
        t = t.masked_fill(~last(mask, seq_len, dim=-1)[..., None], 0.0)

    return pad_at_dim(t, (amount, -amount), dim=-2, value=0.0)


# `shift_mask` left out: the padding mask is the wrapped block's own `mask` kwarg
_MASK_FROM_KWARGS = object()


def shift_tail(x, length, mask=None, prev_tail=None):
    """The last `length` inputs (b, length, d) that the next tokens shift in (decoding): padding zeroed, zeros before
    the sequence start. `prev_tail` is the tail before `x`; `mask` (b, >= n) aligns on its last n columns."""
    if exists(mask):
        x = x.masked_fill(~last(mask, x.shape[-2], dim=-1)[..., None], 0.0)
    if exists(prev_tail) and x.shape[-2] < length:
        x = cat((prev_tail.to(x.dtype), x), dim=-2)
    x = pad_at_dim(x, (max(length - x.shape[-2], 0), 0), dim=-2, value=0.0)
    return last(x, length)


class ShiftTokens(Module):
    """Split the features into len(shifts) equal chunks, shift chunk k by shifts[k], leave the remainder.

    `shift_mask` (b, n) marks the real tokens whose features may be shifted into their neighbours; without it the
    wrapped block's `mask` kwarg serves. The layer stack passes it to every shifting block, feedforwards included
    (which take no mask of their own), so padding never reaches a real token. `shift_tail` (b, max shift, d): the
    inputs just before `x` (see `shift_tail`), so that a decode step shifts in what the whole sequence would."""

    def __init__(self, shifts, fn):
        super().__init__()
        self.fn = fn
        self.shifts = tuple(shifts)

    def forward(self, x, shift_mask=_MASK_FROM_KWARGS, shift_tail=None, **kwargs):
        mask = kwargs.get("mask", None) if shift_mask is _MASK_FROM_KWARGS else shift_mask
        n = x.shape[-2]
        if exists(shift_tail) and not exists(mask) and min(self.shifts) >= 0:
            return self.fn(self.shift_from_tail(x, shift_tail), **kwargs)
        if exists(mask):
            mask = last(mask, n, dim=-1)
        seq = x
        if exists(shift_tail):
            # the tail was zeroed where it held padding already
            seq = cat((shift_tail.to(x.dtype), x), dim=-2)
            if exists(mask):
                mask = pad_at_dim(mask, (shift_tail.shape[-2], 0), dim=-1, value=True)
        segments = len(self.shifts)
        chunks = seq.split(seq.shape[-1] // segments, dim=-1)
        to_shift, rest = chunks[:segments], chunks[segments:]
        shifted = [last(shift(chunk, amount, mask=mask), n) for chunk, amount in zip(to_shift, self.shifts)]
        return self.fn(cat((*shifted, *(last(chunk, n) for chunk in rest)), dim=-1), **kwargs)

    def shift_from_tail(self, x, tail):
        """The shifted input of tokens x (b, n, d) that follow `tail` (b, >= max shift, d), none of them padding:
        every chunk is a slice of the joined sequence, so the whole shift is two copies (a decoding step's cost)."""
        n, length = x.shape[-2], tail.shape[-2]
        segments = len(self.shifts)
        size = x.shape[-1] // segments
        # a decoding step reads each shifted chunk straight from the tail (n <= every nonzero shift), else from
        # the joined sequence
        all_in_tail = all(amount == 0 or n <= amount for amount in self.shifts)
        seq = None if all_in_tail else cat((tail.to(x.dtype), x), dim=-2)

        def piece(amount, k):
            features = slice(k * size, (k + 1) * size)
            if amount == 0:
                return x[..., features]
            if exists(seq):
                return seq[..., length - amount : length - amount + n, features]
            return tail[..., length - amount : length - amount + n, features].to(x.dtype)

        pieces = [piece(amount, k) for k, amount in enumerate(self.shifts)]
        if segments * size < x.shape[-1]:
            pieces.append(x[..., segments * size :])
        return cat(pieces, dim=-1)

    def static_decode_refusal(self):
        # the tail the next token shifts in is kept by the layer stack, in the cache
        return static_cache_refusal(self.fn)


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

    def static_decode_refusal(self):
        if self.axial_dim == 1:
            return static_cache_refusal(self.fn)
        return "axial folding (`attn_axial_dim` / `axial_dim`) mixes positions far apart: no incremental decoding"
