"""HGRN (arXiv:2311.04823): hierarchically gated linear RNN, elementwise.

`f_t = lb + (1 - lb) sigmoid(W_f x_t)`, `i_t = silu(W_i x_t)`, `h_t = f_t h_{t-1} + (1 - f_t) i_t`, then
`o_t = W_o (norm(h_t) * silu(W_g x_t))`. The lower bound `lb` grows with depth in the paper; pass `lower_bound`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from x_transformers.mixers.base import Mixer, masked_fill_zero, pick_state, rms_norm, upcast
from x_transformers.ops import hgrn_scan


class HGRN(Mixer):
    name = "hgrn"

    def __init__(self, dim, heads=1, causal=True, expand_ratio=1.0, lower_bound=0.0):
        super().__init__(dim, heads, causal)
        if not 0.0 <= lower_bound < 1.0:
            raise ValueError(f"hgrn lower_bound must be in [0, 1), got {lower_bound}")
        self.lower_bound = lower_bound
        inner = int(dim * expand_ratio)
        self.to_i = nn.Linear(dim, inner, bias=False)
        self.to_f = nn.Linear(dim, inner, bias=False)
        self.to_g = nn.Linear(dim, inner, bias=False)
        self.norm = nn.RMSNorm(inner, eps=1e-5)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def mix(self, x, mask, state, want_state):
        x = masked_fill_zero(x, mask)
        f_logit = upcast(self.to_f(x))
        lb = self.lower_bound
        if lb == 0.0:
            log_f, one_minus_f = F.logsigmoid(f_logit), torch.sigmoid(-f_logit)
        else:
            log_f = (lb + (1 - lb) * f_logit.sigmoid()).log()
            one_minus_f = (1 - lb) * torch.sigmoid(-f_logit)
        # SiLU in the activation dtype; the product with the fp32 gate is the scan's fp32 input
        inp = one_minus_f * F.silu(self.to_i(x))
        inp, log_f = masked_fill_zero(inp, mask), masked_fill_zero(log_f, mask)
        h, s = hgrn_scan(inp, log_f, initial_state=pick_state(state, 0), output_final_state=want_state)
        o = rms_norm(h.to(x.dtype), self.norm.weight, self.norm.eps) * F.silu(self.to_g(x))
        return self.to_out(o), (s,) if want_state else None
