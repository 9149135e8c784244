"""HGRN2 (arXiv:2404.07904): gated linear RNN with state expansion, the forget gate tied to the key.

`f_t = lb + (1 - lb) sigmoid(W_f x_t)` (lower bound `lb`), key `k_t = 1 - f_t`, query `q_t = silu(W_q x_t)`:
`S_t = diag(f_t) S_{t-1} + k_t^T v_t`, `o_t = q_t S_t` on the per-channel decay kernel.

`decay='scalar'` keeps one forget gate per head instead of one per key channel, on the scalar-decay kernel. A scalar
`1 - f_t` can no longer serve as the key (every key channel would be equal), so the key gets its own projection and
the input gate stays tied to the forget gate: `S_t = f_t S_{t-1} + (1 - f_t) k_t^T v_t` with
`k_t = silu(W_k x_t)`, `o_t = q_t S_t / sqrt(d_k)`.

`lower_bound='learned'`: the layer stack passes the layer's bound (`mixers/lower_bounds.py`) over the gate's
`gate_width` channels (heads x key channels, or heads for the scalar decay) as the `lower_bound` input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from x_transformers.mixers.base import (
    HeadOutput, Mixer, fused_linear, masked_fill_zero, pick_state, run_kernel, upcast,
)
from x_transformers.mixers.hgrn import LayerBoundInput, check_lower_bound, learned_forget_gate
from x_transformers.ops import chunk_gla, chunk_simple_gla, fused_recurrent_gla, fused_recurrent_simple_gla

DECAYS = ("vector", "scalar")


class HGRN2(LayerBoundInput, Mixer):
    name = "hgrn2"
    packed_path = "cu_seqlens"

    def __init__(self, dim, heads, causal=True, expand_k=1.0, lower_bound=0.0, decay="vector", output_norm=True,
                 output_gate="swish"):
        super().__init__(dim, heads, causal)
        if decay not in DECAYS:
            raise ValueError(f"hgrn2 decay must be one of {DECAYS}, got {decay!r}")
        self.learned_bound = check_lower_bound("hgrn2", lower_bound)
        if self.learned_bound:
            self.stack_inputs = ("lower_bound",)
        self.dim_k = int(dim * expand_k) // heads
        self.dim_v = dim // heads
        self.lower_bound = lower_bound
        self.decay = decay
        scalar = decay == "scalar"
        # the width of the forget gate, the size of a learned lower bound (LayerLowerBounds(num_layers, gate_width))
        self.gate_width = heads if scalar else heads * self.dim_k
        self.to_q = nn.Linear(dim, heads * self.dim_k, bias=False)
        self.to_k = nn.Linear(dim, heads * self.dim_k, bias=False) if scalar else None
        self.to_f = nn.Linear(dim, self.gate_width, bias=False)
        self.to_v = nn.Linear(dim, heads * self.dim_v, bias=False)
        self.out = HeadOutput(dim, heads, self.dim_v, norm=output_norm, gate=output_gate)

    def forget_gate(self, f_logit, lower_bound):
        """(log f in fp32 for the kernel's running sums, 1 - f in the activation dtype), both from the logit: stable
        for saturated gates."""
        lb = self.lower_bound
        if self.learned_bound:
            lower_bound = lower_bound if lower_bound is not None else self.empty_batch_bound
            log_f, one_minus_f = learned_forget_gate(self.name, upcast(f_logit), lower_bound, f_logit.shape[2:])
            return log_f, one_minus_f.to(f_logit.dtype)
        if lb == 0.0:
            return F.logsigmoid(upcast(f_logit)), torch.sigmoid(-f_logit)
        return (lb + (1 - lb) * torch.sigmoid(upcast(f_logit))).log(), (1 - lb) * torch.sigmoid(-f_logit)

    def mix(self, x, mask, state, want_state, lower_bound=None, pack=None):
        x = masked_fill_zero(x, mask)
        split = lambda t: rearrange(t, "b n (h d) -> b n h d", h=self.heads)  # noqa: E731
        # query, (key,) forget gate and output gate read x through one matmul (the value gets its own: contiguous for
        # the kernel)
        q, k, f_logit, gate = fused_linear(x, self.to_q, self.to_k, self.to_f, self.out.to_gate)
        q = F.silu(split(q))
        v = split(self.to_v(x))
        if self.decay == "vector":
            # the key is the input gate itself: k = 1 - f per channel
            g, k = self.forget_gate(split(f_logit), lower_bound)
            chunk_fn, recurrent_fn, scale = chunk_gla, fused_recurrent_gla, 1.0
        else:
            g, input_gate = self.forget_gate(f_logit, lower_bound)
            k = F.silu(split(k)) * input_gate[..., None]
            chunk_fn, recurrent_fn, scale = chunk_simple_gla, fused_recurrent_simple_gla, self.dim_k**-0.5
        k, v, g = (masked_fill_zero(t, mask) for t in (k, v, g))
        o, s = run_kernel(
            chunk_fn, recurrent_fn, q, k, v, g,
            scale=scale, initial_state=pick_state(state, 0), want_state=want_state, pack=pack,
        )
        return self.out(o, x, gate=gate), (s,) if want_state else None
