"""Based (arXiv:2402.18668): linear attention with a 2nd-order Taylor feature map of exp(q.k / sqrt(d)).

`phi(x) = [1, x / d^(1/4), (x (x) x) / (sqrt(2) sqrt(d))]` so that `phi(q).phi(k) = 1 + q.k/sqrt(d) + (q.k)^2/(2d)`,
with the classic normaliser `o = phi(q) S / phi(q) z`. The denominator rides along the same kernel call as an
extra all-ones value column. Works non-causally too (Encoder).

`feature_map='rebased'` (ReBased, arXiv:2402.10644) swaps the Taylor map for a learnable quadratic kernel:
`x~ = gamma * LN(x) + beta` (a LayerNorm over each head's `feature_dim` query / key channels, queries and keys with
their own gamma / beta shared by the heads) and `phi(x) = (x~ (x) x~) / sqrt(d)`, so that
`phi(q).phi(k) = (q~.k~)^2 / d` >= 0, normalised over the keys as above: `o_i = sum_j s_ij v_j / (sum_j s_ij + eps)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from x_transformers.mixers.base import (
    HeadOutput, Mixer, QKVProjection, acc_dtype, masked_fill_zero, pick_state, run_kernel,
)
from x_transformers.mixers.linear import bidirectional_linear_attention
from x_transformers.ops import chunk_simple_gla, fused_recurrent_simple_gla

FEATURE_MAPS = ("taylor", "rebased")


def taylor_feature_map(x):
    d = x.shape[-1]
    # the constant scales the d-wide factor, not the d^2-wide product: one pass fewer over the widest tensor
    x2 = rearrange((x / (2**0.5 * d**0.5))[..., :, None] * x[..., None, :], "... i j -> ... (i j)")
    ones = torch.ones_like(x[..., :1])
    return torch.cat((ones, x / d**0.25, x2), dim=-1)


def quadratic_feature_map(x):
    """`phi(x) = (x (x) x) / sqrt(d)`: `phi(q).phi(k) = (q.k)^2 / d`."""
    d = x.shape[-1]
    return rearrange((x / d**0.5)[..., :, None] * x[..., None, :], "... i j -> ... (i j)")


class Based(Mixer):
    name = "based"
    bidirectional = True
    # causal use only: the bidirectional sum over the whole sequence (Encoder) takes the padded path
    packed_path = "cu_seqlens"

    def __init__(self, dim, heads, causal=True, feature_dim=16, feature_map="taylor", expand_v=1.0,
                 use_short_conv=False, conv_size=4, output_norm=False, output_gate=None, eps=1e-6):
        super().__init__(dim, heads, causal)
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"based feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")
        self.feature_map = feature_map
        self.eps = eps
        dim_v = int(dim * expand_v) // heads
        self.qkv = QKVProjection(dim, heads, feature_dim, dim_v, use_short_conv, conv_size)
        # ReBased's learnable affine maps (gamma = 1, beta = 0 at init), one per query / key, over a head's channels
        self.q_norm = nn.LayerNorm(feature_dim) if feature_map == "rebased" else None
        self.k_norm = nn.LayerNorm(feature_dim) if feature_map == "rebased" else None
        self.out = HeadOutput(dim, heads, dim_v, norm=output_norm, gate=output_gate)

    def features(self, t, norm):
        if self.feature_map == "taylor":
            return taylor_feature_map(t)
        t = F.layer_norm(t, norm.normalized_shape, norm.weight.to(t.dtype), norm.bias.to(t.dtype), norm.eps)
        return quadratic_feature_map(t)

    def packs_by_cu_seqlens(self):
        return self.causal and super().packs_by_cu_seqlens()

    def mix(self, x, mask, state, want_state, pack=None):
        x = masked_fill_zero(x, mask)
        q, k, v, conv_state = self.qkv(x, pick_state(state, 1), pack=pack)
        acc = acc_dtype(x.dtype)
        q, k = self.features(q.to(acc), self.q_norm), self.features(k.to(acc), self.k_norm)
        # an all-ones value column gives the normaliser phi(q) z from the same pass
        v = torch.cat((v.to(acc), torch.ones_like(v[..., :1], dtype=acc)), dim=-1)
        k, v = masked_fill_zero(k, mask), masked_fill_zero(v, mask)

        if not self.causal:
            o, new_state = bidirectional_linear_attention(q, k, v, 1.0), None
        else:
            o, s = run_kernel(
                chunk_simple_gla, fused_recurrent_simple_gla, q, k, v, None,
                scale=1.0, initial_state=pick_state(state, 0), want_state=want_state, pack=pack,
            )
            new_state = (s, conv_state) if want_state else None
        o = o[..., :-1] / (o[..., -1:] + self.eps)
        return self.out(o, x), new_state
