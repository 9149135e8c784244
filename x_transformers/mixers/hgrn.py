"""HGRN (arXiv:2311.04823): hierarchically gated linear RNN, elementwise.

`f_t = lb + (1 - lb) sigmoid(W_f x_t)`, `i_t = silu(W_i x_t)`, `h_t = f_t h_{t-1} + (1 - f_t) i_t`, then
`o_t = W_o (norm(h_t) * silu(W_g x_t))`. The lower bound `lb` grows with depth in the paper: a fixed float
`lower_bound`, or `lower_bound='learned'`, where the layer stack passes each layer its own bound per channel
(`mixers/lower_bounds.py`) as the `lower_bound` input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from x_transformers.mixers.base import Mixer, masked_fill_zero, pick_state, rms_norm, run_kernel, upcast
from x_transformers.ops import chunk_hgrn, fused_recurrent_hgrn


def check_lower_bound(name: str, lower_bound) -> bool:
    """Whether the bound is learned; a fixed one must be a float in [0, 1)."""
    if lower_bound == "learned":
        return True
    if isinstance(lower_bound, str) or not 0.0 <= lower_bound < 1.0:
        raise ValueError(f"{name} lower_bound must be a float in [0, 1) or 'learned', got {lower_bound!r}")
    return False


def learned_forget_gate(name: str, f_logit: Tensor, lower_bound: Tensor | None, gate_shape: tuple[int, ...]):
    """(log f, 1 - f), both in f_logit's dtype (pass it upcast), of `f = lb + (1 - lb) sigmoid(f_logit)` with the
    layer's bound `lower_bound` (gate width,), laid out as the trailing `gate_shape` of f_logit."""
    width = math.prod(gate_shape)
    if lower_bound is None:
        raise ValueError(f"linear_attn='{name}' with lower_bound='learned' needs the layer's `lower_bound` ({width},)")
    if not torch.is_tensor(lower_bound) or lower_bound.shape != (width,):
        shape = tuple(lower_bound.shape) if torch.is_tensor(lower_bound) else type(lower_bound).__name__
        raise ValueError(f"linear_attn='{name}' lower_bound must be a tensor of shape ({width},), got {shape}")
    lb = lower_bound.to(f_logit.dtype).reshape(gate_shape)
    f = lb + (1 - lb) * f_logit.sigmoid()
    # the first layer's bound is 0: kept off log(0) for a saturated logit
    log_f = f.clamp_min(torch.finfo(f.dtype).tiny).log()
    return log_f, (1 - lb) * torch.sigmoid(-f_logit)


class LayerBoundInput:
    """For a mixer whose `lower_bound` input is the layer's (gate width,), with no batch dim: the base runs an empty
    batch as one zero row and adds that row to every stack input as to a batch-first one, so the bound goes round
    that step and reaches `mix` through `empty_batch_bound`."""

    empty_batch_bound = None

    def mix_empty_batch(self, x, mask, state, want_state, lower_bound=None):
        self.empty_batch_bound = lower_bound
        try:
            return super().mix_empty_batch(x, mask, state, want_state)
        finally:
            self.empty_batch_bound = None


class HGRN(LayerBoundInput, Mixer):
    name = "hgrn"
    packed_path = "cu_seqlens"

    def __init__(self, dim, heads=1, causal=True, expand_ratio=1.0, lower_bound=0.0):
        super().__init__(dim, heads, causal)
        self.learned_bound = check_lower_bound("hgrn", lower_bound)
        self.lower_bound = lower_bound
        inner = int(dim * expand_ratio)
        # the width of the forget gate, the size of a learned lower bound (LayerLowerBounds(num_layers, gate_width))
        self.gate_width = inner
        if self.learned_bound:
            self.stack_inputs = ("lower_bound",)
        self.to_i = nn.Linear(dim, inner, bias=False)
        self.to_f = nn.Linear(dim, inner, bias=False)
        self.to_g = nn.Linear(dim, inner, bias=False)
        self.norm = nn.RMSNorm(inner, eps=1e-5)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def mix(self, x, mask, state, want_state, lower_bound=None, pack=None):
        x = masked_fill_zero(x, mask)
        f_logit = upcast(self.to_f(x))
        lb = self.lower_bound
        if self.learned_bound:
            lower_bound = lower_bound if lower_bound is not None else self.empty_batch_bound
            log_f, one_minus_f = learned_forget_gate(self.name, f_logit, lower_bound, (self.gate_width,))
        elif lb == 0.0:
            log_f, one_minus_f = F.logsigmoid(f_logit), torch.sigmoid(-f_logit)
        else:
            log_f = (lb + (1 - lb) * f_logit.sigmoid()).log()
            one_minus_f = (1 - lb) * torch.sigmoid(-f_logit)
        # SiLU in the activation dtype; the product with the fp32 gate is the scan's fp32 input
        inp = one_minus_f * F.silu(self.to_i(x))
        inp, log_f = masked_fill_zero(inp, mask), masked_fill_zero(log_f, mask)
        h, s = run_kernel(
            chunk_hgrn, fused_recurrent_hgrn, inp, log_f, initial_state=pick_state(state, 0), want_state=want_state,
            pack=pack,
        )
        o = rms_norm(h.to(x.dtype), self.norm.weight, self.norm.eps) * F.silu(self.to_g(x))
        return self.to_out(o), (s,) if want_state else None
