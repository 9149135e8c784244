"""minGRU (arXiv:2410.01201): a GRU with gates that depend only on the input, so it trains as a parallel scan.

`z_t = sigmoid(W_z x_t)`, `h~_t = g(W_h x_t)` with `g(x) = x + 0.5 if x >= 0 else sigmoid(x)` (positive),
`h_t = (1 - z_t) h_{t-1} + z_t h~_t` — the elementwise scan with log decay `log(1 - z_t) = -softplus(W_z x_t)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from x_transformers.mixers.base import Mixer, masked_fill_zero, pick_state, run_kernel, upcast
from x_transformers.ops import chunk_hgrn, fused_recurrent_hgrn


def positive_activation(x):
    return torch.where(x >= 0, x + 0.5, x.sigmoid())


class MinGRU(Mixer):
    name = "mingru"
    packed_path = "cu_seqlens"
    cast_input = False

    def __init__(self, dim, heads=1, causal=True, expansion_factor=1.0):
        super().__init__(dim, heads, causal)
        self.dim_inner = int(dim * expansion_factor)
        self.to_hidden_and_gate = nn.Linear(dim, self.dim_inner * 2, bias=False)
        self.to_out = nn.Linear(self.dim_inner, dim, bias=False) if expansion_factor != 1.0 else nn.Identity()

    def mix(self, x, mask, state, want_state, pack=None):
        x = masked_fill_zero(x, mask)
        hidden, gate = upcast(self.to_hidden_and_gate(x)).chunk(2, dim=-1)
        log_decay = -F.softplus(gate)
        inp = gate.sigmoid() * positive_activation(hidden)
        inp, log_decay = masked_fill_zero(inp, mask), masked_fill_zero(log_decay, mask)
        h, s = run_kernel(
            chunk_hgrn, fused_recurrent_hgrn, inp, log_decay,
            initial_state=pick_state(state, 0), want_state=want_state, pack=pack,
        )
        return self.to_out(h.to(x.dtype)), (s,) if want_state else None
