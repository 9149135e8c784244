"""Gated DeltaProduct (arXiv:2502.10297): n_h delta-rule (Householder) steps per token, with a gated DeltaNet forget
gate applied once per token.

    S_t = alpha_t S_{t-1}, then for j = 1..n_h:  S_t <- S_t + beta_tj k_tj^T (v_tj - k_tj S_t),      o_t = q_t S_t

Each step multiplies the state by the generalized Householder matrix (I - beta k^T k): with `allow_neg_eigval`
beta lies in (0, 2), so the transition can have negative eigenvalues (state tracking beyond TC0, arXiv:2411.12537).
It runs on the gated delta-rule kernel with the n_h keys / values of a token interleaved along time: the gate sits on
the first of each group (zero log-gate on the others) and the output is read at the last.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from x_transformers.mixers.base import (
    HeadOutput,
    Mixer,
    ShortConvolution,
    l2_normalize,
    masked_fill_zero,
    pick_state,
    run_kernel,
    upcast,
)
from x_transformers.ops import chunk_delta_rule, fused_recurrent_delta_rule
from x_transformers.utils import exists


class GatedDeltaProduct(Mixer):
    name = "gated_deltaproduct"
    packed_path = "cu_seqlens"

    def __init__(self, dim, heads, causal=True, num_householder=2, allow_neg_eigval=False, expand_k=1.0,
                 expand_v=1.0, use_short_conv=True, conv_size=4, output_norm=True, output_gate="swish",
                 dt_min=1e-3, dt_max=0.1):
        super().__init__(dim, heads, causal)
        if num_householder < 1:
            raise ValueError(f"gated_deltaproduct: num_householder must be >= 1, got {num_householder}")
        self.num_householder = nh = num_householder
        self.allow_neg_eigval = allow_neg_eigval
        self.dim_k = dk = int(dim * expand_k) // heads
        dv = int(dim * expand_v) // heads
        # one query, n_h keys and n_h values per token, in one projection and one short convolution
        self.splits = [heads * dk, nh * heads * dk, nh * heads * dv]
        self.to_qkv = nn.Linear(dim, sum(self.splits), bias=False)
        self.conv = ShortConvolution(sum(self.splits), conv_size) if use_short_conv else None
        self.to_beta = nn.Linear(dim, nh * heads, bias=False)
        # the forget gate of gated DeltaNet: A in [1, 16] and dt log-uniform in [dt_min, dt_max], as Mamba2 sets them
        self.to_a = nn.Linear(dim, heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(heads).uniform_(1, 16).log())
        dt = torch.exp(torch.rand(heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.out = HeadOutput(dim, heads, dv, norm=output_norm, gate=output_gate)

    def recurrence(self, q, k, v, beta, g, scale, initial_state=None, want_state=False, pack=None):
        """The product of n_h gated Householder steps per token on the delta-rule kernel.

        q (b, n, h, dk); k (b, n, j, h, dk); v (b, n, j, h, dv); beta (b, n, j, h); g (b, n, h) log gate.
        `pack`: packed documents; interleaved, a document of m tokens spans m * n_h kernel steps."""
        nh = self.num_householder
        cu_seqlens = dict(cu_seqlens=pack.cu_seqlens * nh) if exists(pack) else {}
        interleave = lambda t: rearrange(t, "b n j ... -> b (n j) ...")  # noqa: E731
        # the query sits on the last step of each token (zeros elsewhere: those outputs are dropped)
        q_steps = F.pad(q[:, :, None], (0, 0, 0, 0, nh - 1, 0))
        g_steps = F.pad(g[:, :, None], (0, 0, 0, nh - 1))
        o, s = run_kernel(
            chunk_delta_rule, fused_recurrent_delta_rule, interleave(q_steps), interleave(k), interleave(v),
            interleave(beta), g=interleave(g_steps), scale=scale, initial_state=initial_state, want_state=want_state,
            **cu_seqlens,
        )
        return o[:, nh - 1 :: nh], s

    def mix(self, x, mask, state, want_state, pack=None):
        x = masked_fill_zero(x, mask)
        nh, h = self.num_householder, self.heads
        qkv, conv_state = self.to_qkv(x), None
        if self.conv is not None:
            qkv, conv_state = self.conv(qkv, cache=pick_state(state, 1), pack=pack)
        else:
            qkv = F.silu(qkv)
        q, k, v = qkv.split(self.splits, dim=-1)
        q = l2_normalize(rearrange(q, "b n (h d) -> b n h d", h=h))
        k = l2_normalize(rearrange(k, "b n (j h d) -> b n j h d", j=nh, h=h))
        v = rearrange(v, "b n (j h d) -> b n j h d", j=nh, h=h)
        beta = rearrange(upcast(self.to_beta(x)).sigmoid(), "b n (j h) -> b n j h", j=nh)
        # negative eigenvalues - beta in (0, 2) lets each Householder factor reflect (arXiv:2411.12537)
        if self.allow_neg_eigval:
            beta = beta * 2
        a = upcast(self.to_a(x))
        g = -self.A_log.to(a.dtype).exp() * F.softplus(a + self.dt_bias.to(a.dtype))
        k, v, beta, g = (masked_fill_zero(t, mask) for t in (k, v, beta, g))
        o, s = self.recurrence(q, k, v, beta, g, self.dim_k**-0.5, pick_state(state, 0), want_state, pack)
        return self.out(o, x), (s, conv_state) if want_state else None
