"""RWKV-7 "Goose" time mixing (arXiv:2503.14456): a generalized delta rule with vector-valued decay and in-context
learning rate, on the DPLR kernel (`x_transformers.ops.dplr`).

Token shift mixes each channel with the previous token (learned lerps per branch). From the shifted inputs:
receptance r, key k, value v, decay `log w = -exp(-0.5) sigmoid(w0 + tanh(x W1) W2)` in (-exp(-0.5), 0), in-context
learning rate `a = sigmoid(a0 + x A1 A2)`, output gate `g = sigmoid(x G1) G2`. With kappa the L2-normalised
`k * k_k` and the key adjusted to `k (1 + (a - 1) k_a)`, the state update in the `[K, V]` layout is

    S_t = diag(w_t) S_{t-1} - (kappa_t a_t)^T (kappa_t S_{t-1}) + k_t^T v_t,      o_t = r_t S_t

i.e. the DPLR kernel with a = -kappa, b = kappa * a. Value residual: every layer after the first lerps its values
towards the first RWKV-7 layer's (`value_first`, handed on by the layer stack), with a data-dependent gate. The head
outputs go through a per-head GroupNorm, plus the bonus `(r . (r_k * k)) v`, times the gate.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from x_transformers.mixers.base import Mixer, acc_dtype, l2_normalize, masked_fill_zero, pick_state, run_kernel
from x_transformers.mixers.rwkv6 import shift_right
from x_transformers.ops.dplr import chunk_dplr_delta_rule, fused_recurrent_dplr_delta_rule

# the decay bound: log w = -exp(-0.5) sigmoid(.) keeps w in (exp(-exp(-0.5)), 1) ~ (0.545, 1)
LOG_DECAY_BOUND = math.exp(-0.5)


class LowRank(nn.Module):
    """x -> act(x W_down) W_up (+ bias): the small data-dependent projections of RWKV-7."""

    def __init__(self, dim, rank, out_dim, activation=None, bias=None):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, out_dim, bias=False)
        nn.init.uniform_(self.up.weight, -1e-2, 1e-2)
        self.activation = activation
        self.bias = nn.Parameter(bias) if bias is not None else None

    def forward(self, x):
        h = self.down(x)
        h = self.activation(h) if self.activation is not None else h
        out = self.up(h)
        return out + self.bias.to(out.dtype) if self.bias is not None else out


class RWKV7(Mixer):
    name = "rwkv7"
    packed_path = "cu_seqlens"
    cast_input = False
    stack_inputs = ("value_first",)

    def __init__(self, dim, heads, causal=True, decay_low_rank_dim=64, a_low_rank_dim=64, v_low_rank_dim=16,
                 gate_low_rank_dim=128):
        super().__init__(dim, heads, causal)
        if dim % heads:
            raise ValueError(f"rwkv7: dim ({dim}) must be divisible by heads ({heads})")
        self.dim_head = dh = dim // heads
        # token shift: one learned lerp towards the previous token per branch (r, w, k, v, a, g)
        ramp = torch.arange(dim) / dim
        self.shift_mix = nn.Parameter(torch.stack([1 - ramp**p for p in (0.2, 0.9, 0.7, 0.7, 0.9, 0.2)]))
        self.to_r = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        # decay biases spread from slow to fast channels, as RWKV-7 initialises them
        w0 = -7 + 5 * (torch.arange(dim) / max(dim - 1, 1)) ** 0.85 + 0.5
        self.decay = LowRank(dim, decay_low_rank_dim, dim, torch.tanh, bias=w0)
        self.iclr = LowRank(dim, a_low_rank_dim, dim, bias=torch.zeros(dim))
        self.value_gate = LowRank(dim, v_low_rank_dim, dim, bias=torch.ones(dim))
        self.gate = LowRank(dim, gate_low_rank_dim, dim, torch.sigmoid)
        nn.init.xavier_uniform_(self.gate.up.weight, gain=0.1)
        self.k_k = nn.Parameter(torch.full((dim,), 0.85))
        self.k_a = nn.Parameter(torch.ones(dim))
        self.r_k = nn.Parameter(torch.full((heads, dh), -0.04))
        self.norm = nn.GroupNorm(heads, dim, eps=dh * 1e-5)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def mix(self, x, mask, state, want_state, value_first=None, pack=None):
        x = masked_fill_zero(x, mask)
        b, n, d = x.shape
        if value_first is not None and value_first.shape != (b, n, self.heads, self.dim_head):
            raise ValueError(
                f"rwkv7: value_first must be (batch, seq, heads, dim_head) = {(b, n, self.heads, self.dim_head)}, "
                f"got {tuple(value_first.shape)}"
            )
        split = lambda t: rearrange(t, "b n (h d) -> b n h d", h=self.heads)  # noqa: E731
        acc = acc_dtype(x.dtype)

        delta = shift_right(x, pick_state(state, 1), pack) - x
        xr, xw, xk, xv, xa, xg = (x + delta * m.to(x.dtype) for m in self.shift_mix)
        r, k, v = split(self.to_r(xr)), split(self.to_k(xk)), split(self.to_v(xv))
        log_w = split(-LOG_DECAY_BOUND * self.decay(xw).to(acc).sigmoid())
        iclr = split(self.iclr(xa).sigmoid())
        gate = self.gate(xg)

        # value residual - mix in the first layer's values (arXiv:2410.17897); the first layer gets none and mixes its
        # own values with themselves (the identity), which keeps every parameter in the graph
        v_first = v if value_first is None else value_first.to(v.dtype)
        v = torch.lerp(v, v_first, split(self.value_gate(xv).sigmoid()))

        k_k, k_a = (rearrange(p.to(k.dtype), "(h d) -> h d", h=self.heads) for p in (self.k_k, self.k_a))
        kappa = l2_normalize(k * k_k)
        k = k * (1 + (iclr - 1) * k_a)
        k, v, kappa, log_w = (masked_fill_zero(t, mask) for t in (k, v, kappa, log_w))
        o, s = run_kernel(
            chunk_dplr_delta_rule, fused_recurrent_dplr_delta_rule, r, k, v, -kappa, kappa * iclr, log_w,
            scale=1.0, initial_state=pick_state(state, 0), want_state=want_state, pack=pack,
        )

        # per-head group norm in the accumulation dtype (a half-precision model keeps its affine parameters in half
        # precision, which the CPU group norm does not mix with fp32 inputs)
        norm = self.norm
        o = F.group_norm(rearrange(o.to(acc), "b n h d -> (b n) (h d)"), norm.num_groups, norm.weight.to(acc),
                         norm.bias.to(acc), norm.eps)
        o = rearrange(o, "(b n) (h d) -> b n h d", b=b, h=self.heads)
        bonus = (r.to(acc) * k.to(acc) * self.r_k.to(acc)).sum(-1, keepdim=True)
        o = o + bonus * v.to(acc)
        out = self.to_out(rearrange(o, "b n h d -> b n (h d)").to(x.dtype) * gate)
        new_state = (s, x[:, -1]) if want_state else None
        return out, new_state, {"values": v_first}
