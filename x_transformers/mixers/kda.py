"""Kimi Delta Attention (KDA, arXiv:2510.26692): gated DeltaNet with a forget gate per key channel.

`S_t = (I - beta_t k_t^T k_t) diag(alpha_t) S_{t-1} + beta_t k_t^T v_t`, `o_t = q_t S_t`, with short SiLU convolutions
on q, k, v, L2-normalised q, k, `beta_t = sigmoid(W_b x_t)` (times 2 with `allow_neg_eigval`, so that the transition
may have negative eigenvalues) and a low-rank per-channel gate `log alpha_t = -exp(A_log) softplus(W_up W_down x_t +
dt_bias)`, then a per-head RMS norm gated by `sigmoid` of a low-rank projection of x.

`num_v_heads` different from `heads` groups them: with more value heads, each key head serves
`num_v_heads // heads` of them (each with its own state, gate and beta); with fewer, each value head is shared by
`heads // num_v_heads` key heads. One must divide the other; for wider values use `expand_v`.
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
    QKVProjection,
    fused_linear,
    l2_normalize,
    masked_fill_zero,
    pick_state,
    run_kernel,
    upcast,
)
from x_transformers.ops.kda import chunk_kda, fused_recurrent_kda
from x_transformers.utils import exists


class KDA(Mixer):
    name = "kda"
    packed_path = "cu_seqlens"

    def __init__(self, dim, heads, causal=True, expand_k=1.0, expand_v=1.0, num_v_heads=None, use_short_conv=True,
                 conv_size=4, allow_neg_eigval=False, output_norm=True, output_gate="sigmoid", dt_min=1e-3,
                 dt_max=0.1):
        super().__init__(dim, heads, causal)
        num_v_heads = heads if num_v_heads is None else num_v_heads
        if num_v_heads < 1 or max(heads, num_v_heads) % min(heads, num_v_heads):
            raise ValueError(
                f"linear_attn='kda': num_v_heads ({num_v_heads}) and heads ({heads}) must be positive and one must "
                "divide the other; for wider values use expand_v"
            )
        self.dim_k = int(dim * expand_k) // heads
        self.dim_v = int(dim * expand_v) // heads
        if self.dim_k < 1 or self.dim_v < 1:
            raise ValueError(
                f"linear_attn='kda': dim * expand_k and dim * expand_v must be at least heads ({heads}), got "
                f"{dim * expand_k}, {dim * expand_v}"
            )
        self.num_v_heads = num_v_heads
        # the kernel runs one head per (key head, value head) pair: the larger of the two counts
        self.kernel_heads = kernel_heads = max(heads, num_v_heads)
        self.allow_neg_eigval = allow_neg_eigval
        # one matmul and one convolution for q, k (heads) and v (num_v_heads): split into heads in `mix`
        self.qkv = QKVProjection(dim, 1, heads * self.dim_k, num_v_heads * self.dim_v, use_short_conv, conv_size)
        self.to_beta = nn.Linear(dim, kernel_heads, bias=False)
        # the per-channel gate through a rank dim_v bottleneck
        self.to_f = nn.Sequential(
            nn.Linear(dim, self.dim_v, bias=False), nn.Linear(self.dim_v, kernel_heads * self.dim_k, bias=False)
        )
        # A in [1, 16] and dt log-uniform in [dt_min, dt_max] (per key channel), as Mamba2 initialises them
        self.A_log = nn.Parameter(torch.empty(kernel_heads).uniform_(1, 16).log())
        dt = torch.exp(
            torch.rand(kernel_heads * self.dim_k) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        )
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.out = HeadOutput(dim, kernel_heads, self.dim_v, norm=output_norm, gate=output_gate)
        if exists(output_gate):
            # the output gate through the same low-rank bottleneck
            self.out.to_gate = nn.Sequential(
                nn.Linear(dim, self.dim_v, bias=False), nn.Linear(self.dim_v, kernel_heads * self.dim_v)
            )

    def log_gate(self, f):
        """Per-channel log decay (b, n, kernel_heads, dim_k) from the gate logits f (b, n, kernel_heads * dim_k)."""
        f = upcast(f)
        g = F.softplus(f + self.dt_bias.to(f.dtype))
        g = rearrange(g, "b n (h d) -> b n h d", h=self.kernel_heads)
        return -self.A_log.to(f.dtype).exp()[:, None] * g

    def mix(self, x, mask, state, want_state, pack=None):
        x = masked_fill_zero(x, mask)
        q, k, v, conv_state = self.qkv(x, pick_state(state, 1), pack=pack)
        if self.qkv.conv is None:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        q, k = (rearrange(t, "b n 1 (h d) -> b n h d", h=self.heads) for t in (q, k))
        v = rearrange(v, "b n 1 (h d) -> b n h d", h=self.num_v_heads)
        q, k = l2_normalize(q), l2_normalize(k)
        # grouped heads: repeat the fewer side so that every kernel head has its own q, k, v
        if self.heads < self.kernel_heads:
            q, k = (t.repeat_interleave(self.kernel_heads // self.heads, dim=2) for t in (q, k))
        if self.num_v_heads < self.kernel_heads:
            v = v.repeat_interleave(self.kernel_heads // self.num_v_heads, dim=2)
        # beta, the gate's and the output gate's low-rank inputs: the small projections of x as one matmul
        gate_down = self.out.to_gate[0] if exists(self.out.to_gate) else None
        beta, f, gate = fused_linear(x, self.to_beta, self.to_f[0], gate_down)
        beta = upcast(beta).sigmoid() * (2.0 if self.allow_neg_eigval else 1.0)
        g = self.log_gate(self.to_f[1](f))
        gate = self.out.to_gate[1](gate) if exists(gate) else None
        k, v, g, beta = (masked_fill_zero(t, mask) for t in (k, v, g, beta))
        o, s = run_kernel(
            chunk_kda, fused_recurrent_kda, q, k, v, g, beta,
            scale=self.dim_k**-0.5, initial_state=pick_state(state, 0), want_state=want_state, pack=pack,
        )
        return self.out(o, x, gate=gate), (s, conv_state) if want_state else None
