"""Based (arXiv:2402.18668): linear attention with a 2nd-order Taylor feature map of exp(q.k / sqrt(d)).

`phi(x) = [1, x / d^(1/4), (x (x) x) / (sqrt(2) sqrt(d))]` so that `phi(q).phi(k) = 1 + q.k/sqrt(d) + (q.k)^2/(2d)`,
with the classic normaliser `o = phi(q) S / phi(q) z`. The denominator rides along the same kernel call as an
extra all-ones value column. Works non-causally too (Encoder).
"""

from __future__ import annotations

import torch
from einops import rearrange

from x_transformers.mixers.base import (
    HeadOutput, Mixer, QKVProjection, acc_dtype, masked_fill_zero, pick_state, run_kernel,
)
from x_transformers.mixers.linear import bidirectional_linear_attention
from x_transformers.ops import chunk_simple_gla, fused_recurrent_simple_gla


def taylor_feature_map(x):
    d = x.shape[-1]
    # the constant scales the d-wide factor, not the d^2-wide product: one pass fewer over the widest tensor
    x2 = rearrange((x / (2**0.5 * d**0.5))[..., :, None] * x[..., None, :], "... i j -> ... (i j)")
    ones = torch.ones_like(x[..., :1])
    return torch.cat((ones, x / d**0.25, x2), dim=-1)


class Based(Mixer):
    name = "based"
    bidirectional = True

    def __init__(self, dim, heads, causal=True, feature_dim=16, expand_v=1.0, use_short_conv=False, conv_size=4,
                 output_norm=False, output_gate=None, eps=1e-6):
        super().__init__(dim, heads, causal)
        self.eps = eps
        dim_v = int(dim * expand_v) // heads
        self.qkv = QKVProjection(dim, heads, feature_dim, dim_v, use_short_conv, conv_size)
        self.out = HeadOutput(dim, heads, dim_v, norm=output_norm, gate=output_gate)

    def mix(self, x, mask, state, want_state):
        x = masked_fill_zero(x, mask)
        q, k, v, conv_state = self.qkv(x, pick_state(state, 1))
        acc = acc_dtype(x.dtype)
        q, k = taylor_feature_map(q.to(acc)), taylor_feature_map(k.to(acc))
        # an all-ones value column gives the normaliser phi(q) z from the same pass
        v = torch.cat((v.to(acc), torch.ones_like(v[..., :1], dtype=acc)), dim=-1)
        k, v = masked_fill_zero(k, mask), masked_fill_zero(v, mask)

        if not self.causal:
            o, new_state = bidirectional_linear_attention(q, k, v, 1.0), None
        else:
            o, s = run_kernel(
                chunk_simple_gla, fused_recurrent_simple_gla, q, k, v, None,
                scale=1.0, initial_state=pick_state(state, 0), want_state=want_state,
            )
            new_state = (s, conv_state) if want_state else None
        o = o[..., :-1] / (o[..., -1:] + self.eps)
        return self.out(o, x), new_state
