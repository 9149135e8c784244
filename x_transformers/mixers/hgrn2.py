"""HGRN2 (arXiv:2404.07904): gated linear RNN with state expansion, the forget gate tied to the key.

`f_t = lb + (1 - lb) sigmoid(W_f x_t)` (lower bound `lb`), key `k_t = 1 - f_t`, query `q_t = silu(W_q x_t)`:
`S_t = diag(f_t) S_{t-1} + k_t^T v_t`, `o_t = q_t S_t` on the per-channel decay kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from x_transformers.mixers.base import (
    HeadOutput, Mixer, fused_linear, masked_fill_zero, pick_state, run_kernel, upcast,
)
from x_transformers.ops import chunk_gla, fused_recurrent_gla


class HGRN2(Mixer):
    name = "hgrn2"

    def __init__(self, dim, heads, causal=True, expand_k=1.0, lower_bound=0.0, output_norm=True, output_gate="swish"):
        super().__init__(dim, heads, causal)
        if not 0.0 <= lower_bound < 1.0:
            raise ValueError(f"hgrn2 lower_bound must be in [0, 1), got {lower_bound}")
        self.dim_k = int(dim * expand_k) // heads
        self.dim_v = dim // heads
        self.lower_bound = lower_bound
        self.to_q = nn.Linear(dim, heads * self.dim_k, bias=False)
        self.to_f = nn.Linear(dim, heads * self.dim_k, bias=False)
        self.to_v = nn.Linear(dim, heads * self.dim_v, bias=False)
        self.out = HeadOutput(dim, heads, self.dim_v, norm=output_norm, gate=output_gate)

    def mix(self, x, mask, state, want_state):
        x = masked_fill_zero(x, mask)
        split = lambda t: rearrange(t, "b n (h d) -> b n h d", h=self.heads)  # noqa: E731
        # query, forget gate and output gate read x through one matmul (the value gets its own: contiguous for the
        # kernel)
        q, f_logit, gate = fused_linear(x, self.to_q, self.to_f, self.out.to_gate)
        q, f_logit = F.silu(split(q)), split(f_logit)
        lb = self.lower_bound
        # log f (fp32, for the kernel's running sums) and 1 - f (in the activation dtype, as a key), both from the
        # logit: stable for saturated gates
        if lb == 0.0:
            g, k = F.logsigmoid(upcast(f_logit)), torch.sigmoid(-f_logit)
        else:
            g = (lb + (1 - lb) * torch.sigmoid(upcast(f_logit))).log()
            k = (1 - lb) * torch.sigmoid(-f_logit)
        v = split(self.to_v(x))
        k, v, g = (masked_fill_zero(t, mask) for t in (k, v, g))
        o, s = run_kernel(
            chunk_gla, fused_recurrent_gla, q, k, v, g,
            scale=1.0, initial_state=pick_state(state, 0), want_state=want_state,
        )
        return self.out(o, x, gate=gate), (s,) if want_state else None
