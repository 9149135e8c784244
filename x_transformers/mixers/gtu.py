"""Gated Toeplitz unit (GTU) of the Toeplitz neural network (TNN, arXiv:2305.04749).

`o = W_o norm(u * (T v))` with `u = silu(W_u x)`, `v = silu(W_v x)` and `T` a Toeplitz matrix per channel,
`T[i, j] = t_c(i - j)`: the kernel value at each relative position comes from a small MLP of the position (the
relative position encoder), times an exponential decay `decay^|i - j|` that makes distant tokens count less.
`T v` is a convolution, computed by FFT in O(n log n) for the whole sequence: over all relative positions
-(n - 1) .. n - 1 in an Encoder, over 0 .. n - 1 (no future tokens) in a Decoder.

One kernel per channel: `heads` is not used. There is no recurrent state (the kernel values change with the sequence
length), so cached decoding is refused: `can_cache_kv = False` tells the layer stack to generate without a cache.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from x_transformers.mixers.base import Mixer, acc_dtype, masked_fill_zero, rms_norm
from x_transformers.utils import exists


class RelativePositionEncoder(nn.Module):
    """MLP from a relative position (a float) to one kernel value per channel."""

    def __init__(self, hidden: int, channels: int, layers: int):
        super().__init__()
        self.to_hidden = nn.Linear(1, hidden)
        self.norms = nn.ModuleList([nn.LayerNorm(hidden) for _ in range(layers + 1)])
        self.layers = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(layers)])
        self.to_out = nn.Linear(hidden, channels)

    def forward(self, pos):
        # in pos's dtype (fp32 at least) whatever the weights': integer positions beyond 2048 are not exact in half
        # precision, and neighbouring positions would collide
        dtype = pos.dtype
        cast = lambda layer: (layer.weight.to(dtype), layer.bias.to(dtype))  # noqa: E731
        h = F.linear(pos[:, None], *cast(self.to_hidden))
        for norm, layer in zip(self.norms, [*self.layers, self.to_out]):
            h = F.layer_norm(h, norm.normalized_shape, *cast(norm), norm.eps)
            h = F.linear(F.relu(h), *cast(layer))
        return h


class GTU(Mixer):
    name = "gtu"
    bidirectional = True
    # the layer stack reads this (AttentionLayers.can_cache_kv) to generate by re-running the whole sequence
    can_cache_kv = False
    # an FFT convolution over the whole row has no per-document restart: documents run one per padded row
    packed_path = "padded"

    def __init__(self, dim, heads=1, causal=True, expand_ratio=1.0, rpe_dim=32, rpe_layers=3, decay=0.99,
                 output_norm=True):
        super().__init__(dim, heads, causal)
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"gtu decay must be in (0, 1], got {decay}")
        if rpe_dim < 1 or rpe_layers < 0:
            raise ValueError(f"gtu needs rpe_dim >= 1 and rpe_layers >= 0, got {rpe_dim}, {rpe_layers}")
        inner = int(dim * expand_ratio)
        if inner < 1:
            raise ValueError(f"gtu expand_ratio {expand_ratio} leaves no channels for dim {dim}")
        self.decay = decay
        self.to_uv = nn.Linear(dim, 2 * inner, bias=False)
        self.rpe = RelativePositionEncoder(rpe_dim, inner, rpe_layers)
        self.norm = nn.RMSNorm(inner, eps=1e-5) if output_norm else None
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x, mask=None, cache=None, return_intermediates=False, **kwargs):
        if exists(cache):
            raise ValueError(
                "linear_attn='gtu' has no decoding cache: its Toeplitz convolution has no recurrent state, so every "
                "step must see the whole sequence again (generate with cache_kv=False)"
            )
        return super().forward(x, mask=mask, cache=cache, return_intermediates=return_intermediates, **kwargs)

    def kernel(self, n, device, dtype):
        """Kernel values (positions, channels) at relative positions 0 .. n - 1 (causal), or 0 .. n - 1 followed by
        -(n - 1) .. -1 (bidirectional)."""
        pos = torch.arange(n, device=device, dtype=dtype)
        if not self.causal:
            pos = torch.cat((pos, pos[1:].flip(0).neg()))
        # decay^|r| as an exp of a product: no host scalar copied to the device (a CUDA graph could not capture one)
        decay = torch.exp(pos.abs() * math.log(self.decay))
        return self.rpe(pos) * decay[:, None]

    def toeplitz(self, v):
        """`(T v)[i] = sum_j t(i - j) v[j]` along dim 1 of v (b, n, c), by FFT: the kernel is laid out circularly in
        a buffer of at least 2n - 1 positions (negative positions at its end), so that the circular convolution
        never wraps a term around."""
        n = v.shape[1]
        size = 1 << (2 * n - 2).bit_length()
        t = self.kernel(n, v.device, v.dtype)
        if not self.causal:
            t = torch.cat((t[:n], t.new_zeros(size - 2 * n + 1, t.shape[1]), t[n:]))
        t_f = torch.fft.rfft(t, n=size, dim=0)
        v_f = torch.fft.rfft(v, n=size, dim=1)
        return torch.fft.irfft(v_f * t_f, n=size, dim=1)[:, :n]

    def mix(self, x, mask, state, want_state):
        x = masked_fill_zero(x, mask)
        u, v = F.silu(self.to_uv(x)).chunk(2, dim=-1)
        v = masked_fill_zero(v, mask)
        # FFTs in fp32 at least: cuFFT takes half precision at power-of-two sizes only, and the long sums lose
        # precision in it
        with torch.autocast(x.device.type, enabled=False):
            tv = self.toeplitz(v.to(acc_dtype(x.dtype)))
        o = u * tv.to(u.dtype)
        if exists(self.norm):
            o = rms_norm(o, self.norm.weight, self.norm.eps)
        return self.to_out(o), None
