"""RWKV-6 "Finch" time mixing (arXiv:2404.05892).

Token shift with data-dependent interpolation (ddlerp) feeds receptance r, key k, value v, gate and a
data-dependent per-channel decay `w_t = exp(-exp(d_t))`; the state reads BEFORE the current token is added,
plus a learned per-channel bonus u for the current token:

    o_t = r_t (S_{t-1} + diag(u) k_t^T v_t),      S_t = diag(w_t) S_{t-1} + k_t^T v_t

The per-channel decay kernel computes `q_t S'_t` with S' including token t, so it runs on keys, values and decays
shifted one step right (S'_t = S_{t-1}); the bonus is added in closed form and the true final state is one more
update away.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import nn

from x_transformers.mixers.base import Mixer, acc_dtype, masked_fill_zero, pick_state, run_kernel
from x_transformers.ops import chunk_gla, fused_recurrent_gla


def shift_right(t, first=None, pack=None):
    """(b, n, ...) -> the sequence one step later, `first` (b, ...) or zeros at the front. `pack`: t is flattened
    packed documents (batch 1), each of which starts from zeros too (no previous token)."""
    first = torch.zeros_like(t[:, :1]) if first is None else first[:, None].to(t.dtype)
    shifted = torch.cat((first, t[:, :-1]), dim=1)
    return masked_fill_zero(shifted, pack.positions.reshape(1, -1) > 0) if pack is not None else shifted


class RWKV6(Mixer):
    name = "rwkv6"
    packed_path = "cu_seqlens"
    cast_input = False

    def __init__(self, dim, heads, causal=True, mix_low_rank_dim=32, decay_low_rank_dim=64):
        super().__init__(dim, heads, causal)
        if dim % heads:
            raise ValueError(f"rwkv6: dim ({dim}) must be divisible by heads ({heads})")
        self.dim_head = dim // heads
        # ddlerp: a base mix for the shifted input and low-rank data-dependent mixes for w, k, v, r, g
        self.mix_x = nn.Parameter(torch.rand(dim))
        self.mix_base = nn.Parameter(torch.rand(5, dim))
        self.mix_down = nn.Parameter(torch.zeros(dim, 5 * mix_low_rank_dim))
        self.mix_up = nn.Parameter(torch.empty(5, mix_low_rank_dim, dim).uniform_(-1e-2, 1e-2))
        self.decay_base = nn.Parameter(torch.linspace(-6.0, -1.0, dim))
        self.decay_down = nn.Parameter(torch.zeros(dim, decay_low_rank_dim))
        self.decay_up = nn.Parameter(torch.empty(decay_low_rank_dim, dim).uniform_(-1e-2, 1e-2))
        self.bonus = nn.Parameter(torch.full((heads, self.dim_head), 0.5))
        self.to_r = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_g = nn.Linear(dim, dim, bias=False)
        self.norm = nn.GroupNorm(heads, dim, eps=64e-5)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def mix(self, x, mask, state, want_state, pack=None):
        x = masked_fill_zero(x, mask)
        b, n, d = x.shape
        split = lambda t: rearrange(t, "b n (h d) -> b n h d", h=self.heads)  # noqa: E731

        delta = shift_right(x, pick_state(state, 1), pack) - x
        xx = x + delta * self.mix_x
        lora = rearrange(torch.tanh(xx @ self.mix_down), "b n (five r) -> five b n r", five=5)
        mixes = self.mix_base[:, None, None] + einsum(lora, self.mix_up, "five b n r, five r d -> five b n d")
        xw, xk, xv, xr, xg = (x + delta * m for m in mixes)

        r, k, v = split(self.to_r(xr)), split(self.to_k(xk)), split(self.to_v(xv))
        gate = F.silu(self.to_g(xg))
        acc = acc_dtype(x.dtype)
        log_w = -(self.decay_base + torch.tanh(xw @ self.decay_down) @ self.decay_up).to(acc).exp()
        log_w = split(log_w)
        k, v, log_w = (masked_fill_zero(t, mask) for t in (k, v, log_w))

        # the kernel on inputs shifted one step reads S_{t-1}; the current token enters through the bonus u
        o, s = run_kernel(
            chunk_gla, fused_recurrent_gla, r, shift_right(k, pack=pack), shift_right(v, pack=pack),
            shift_right(log_w, pack=pack), scale=1.0, initial_state=pick_state(state, 0), want_state=want_state,
            pack=pack,
        )
        bonus = einsum(r.to(acc) * self.bonus.to(acc) * k.to(acc), "b n h d -> b n h")
        o = o.to(acc) + bonus[..., None] * v.to(acc)

        # the group norm in the compute dtype, its affine parameters cast to it (a half-precision model keeps them in
        # half precision, which the CPU group norm does not mix with fp32 inputs)
        norm = self.norm
        o = rearrange(o, "b n h d -> (b n) (h d)")
        o = F.group_norm(o, norm.num_groups, norm.weight.to(acc), norm.bias.to(acc), norm.eps)
        o = o.reshape(b, n, d).to(x.dtype)
        out = self.to_out(o * gate)

        new_state = None
        if want_state:
            last = log_w[:, -1].exp()[..., None] * s
            last = last + einsum(k[:, -1].to(acc), v[:, -1].to(acc), "b h k, b h v -> b h k v")
            new_state = (last, x[:, -1])
        return out, new_state
