"""Mixture-of-experts feedforward: a top-k router over FeedForward experts, with load-balancing losses.

Built by `AttentionLayers` in place of `FeedForward` when `ff_num_experts` is given. Tokens are grouped by expert
(sorted once) and each expert's tokens go through one grouped matmul (`torch._grouped_mm` where the platform has
it, a loop over experts - never over tokens - otherwise); with a capacity factor the groups are fixed-size buffers
and the whole layer is one batched matmul with no host sync.

Losses (returned already weighted, summed by the layer stack into `LayerIntermediates.aux_loss`):
- Switch Transformer load balancing (arXiv:2101.03961): `E * sum_e f_e P_e`.
- ST-MoE router z-loss (arXiv:2202.08906): `mean(logsumexp(router logits)^2)`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn import Module

from x_transformers.feedforward import FeedForward
from x_transformers.utils import exists


# up to this many (token, expert) pairs a call runs every expert on every token instead of sorting tokens into groups
ALL_EXPERTS_ROWS = 256


def grouped_mm_supported(x: Tensor, w: Tensor) -> bool:
    """Whether `torch._grouped_mm` takes these operands. Eager CPU runs it in fp32 too, but its meta function (what
    torch.compile traces) accepts bf16 only, so a compiled graph takes it for bf16 alone."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if not all(s * x.element_size() % 16 == 0 for s in (x.shape[-1], w.shape[-1])):
        return False
    if torch.compiler.is_compiling():
        return x.dtype == torch.bfloat16
    return x.is_cuda or x.dtype == torch.float32


def squared_relu(t: Tensor) -> Tensor:
    return F.relu(t).square()


def grouped_mm(x: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    """Rows of `x` (sorted by group) times their group's matrix `w[e]`: (T, i) x (E, i, o) -> (T, o)."""
    if grouped_mm_supported(x, w):
        offs = counts.cumsum(0).to(torch.int32)
        return torch._grouped_mm(x, w.to(x.dtype), offs=offs)
    outs = [chunk @ w_e.to(x.dtype) for chunk, w_e in zip(x.split(counts.tolist()), w)]
    return torch.cat(outs, dim=0)


class Experts(Module):
    """`num_experts` two-layer MLPs (GLU optional) with stacked weights, so they run as grouped matmuls."""

    def __init__(self, dim, num_experts, mult=4, glu=False, swish=False, relu_squared=False, dropout=0.0,
                 no_bias=False):
        super().__init__()
        hidden = int(dim * mult)
        self.glu = glu
        self.act = F.silu if swish else (squared_relu if relu_squared else F.gelu)
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, hidden * (2 if glu else 1)))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.b_in = None if no_bias else nn.Parameter(torch.zeros(num_experts, hidden * (2 if glu else 1)))
        self.b_out = None if no_bias else nn.Parameter(torch.zeros(num_experts, dim))
        self.dropout = nn.Dropout(dropout)
        for w, fan_in in ((self.w_in, dim), (self.w_out, hidden)):
            nn.init.uniform_(w, -fan_in**-0.5, fan_in**-0.5)
        # inference copies of the stacked weights in the autocast dtype (the same layout as Attention's fused
        # weights, which a captured decoding graph keeps alive)
        self._fused_weights = {}

    def weight(self, name: str, x: Tensor) -> Tensor:
        """`w_in` / `w_out` in the dtype the matmul with x runs in. Without gradients (decoding) the cast copy is kept
        until the weight changes: under autocast every call would otherwise cast all experts' weights again."""
        w = getattr(self, name)
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        if w.dtype == dtype or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return w.to(dtype)
        key = (w.data_ptr(), w._version, dtype)
        cached = self._fused_weights.get(name)
        if cached is None or cached[0] != key:
            cached = (key, w.detach().to(dtype))
            self._fused_weights[name] = cached
        return cached[1]

    def hidden(self, h):
        if self.glu:
            h, gate = h.chunk(2, dim=-1)
            return self.dropout(h * self.act(gate))
        return self.dropout(self.act(h))

    def forward_sorted(self, x: Tensor, expert_ids: Tensor, counts: Tensor) -> Tensor:
        """x: (T, d) rows sorted by expert; expert_ids (T,) their experts; counts (E,) rows per expert."""
        h = grouped_mm(x, self.w_in, counts)
        if exists(self.b_in):
            h = h + self.b_in[expert_ids].to(h.dtype)
        out = grouped_mm(self.hidden(h), self.w_out, counts)
        if exists(self.b_out):
            out = out + self.b_out[expert_ids].to(out.dtype)
        return out

    def forward_buffers(self, x: Tensor) -> Tensor:
        """x: (E, C, d) fixed-capacity buffers, one per expert -> (E, C, d)."""
        w_in = self.weight("w_in", x)
        h = torch.bmm(x.to(w_in.dtype), w_in)
        if exists(self.b_in):
            h = h + self.b_in[:, None].to(h.dtype)
        w_out = self.weight("w_out", h)
        out = torch.bmm(self.hidden(h).to(w_out.dtype), w_out)
        if exists(self.b_out):
            out = out + self.b_out[:, None].to(out.dtype)
        return out


class MoE(Module):
    def __init__(
        self,
        dim,
        num_experts,
        top_k=2,
        num_shared_experts=0,
        aux_loss_weight=1e-2,  # Switch load balancing, arXiv:2101.03961
        router_z_loss_weight=1e-3,  # ST-MoE, arXiv:2202.08906
        capacity_factor=None,  # tokens per expert = capacity_factor * tokens * top_k / num_experts; the rest drop
        mult=4,
        glu=False,
        swish=False,
        relu_squared=False,
        dropout=0.0,
        no_bias=False,
        zero_init_output=False,
        **ff_kwargs,
    ):
        super().__init__()
        if num_experts < 1 or not 1 <= top_k <= num_experts:
            raise ValueError(f"MoE needs num_experts >= 1 and 1 <= top_k <= num_experts, got {num_experts}, {top_k}")
        if exists(capacity_factor) and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be positive, got {capacity_factor}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.aux_loss_weight = aux_loss_weight
        self.router_z_loss_weight = router_z_loss_weight
        self.capacity_factor = capacity_factor
        # with a capacity, whether a token is dropped depends on the other tokens of the call (their number and
        # order): a decode step (one token per row) drops differently from the whole sequence, so no cached decoding
        self.can_cache_kv = capacity_factor is None

        self.router = nn.Linear(dim, num_experts, bias=False)
        self.experts = Experts(dim, num_experts, mult, glu, swish, relu_squared, dropout, no_bias)
        # zero-init output: every expert's last layer, as FeedForward zeroes its own
        if zero_init_output:
            nn.init.zeros_(self.experts.w_out)
            if exists(self.experts.b_out):
                nn.init.zeros_(self.experts.b_out)
        # shared experts see every token (DeepSeekMoE, arXiv:2401.06066)
        self.shared_experts = (
            FeedForward(dim, mult=mult * num_shared_experts, glu=glu, swish=swish, relu_squared=relu_squared,
                        dropout=dropout, no_bias=no_bias, zero_init_output=zero_init_output, **ff_kwargs)
            if num_shared_experts > 0
            else None
        )

    def forward(self, x: Tensor, mask: Tensor | None = None, with_aux_loss: bool = True):
        """x (..., d), mask (...) -> (out, aux_loss); `with_aux_loss=False` (a decoding step, whose routing trains
        nothing) skips the losses and returns None for them."""
        shape = x.shape
        tokens = rearrange(x, "... d -> (...) d")
        valid = mask.reshape(-1) if exists(mask) else None
        num_tokens, k, num_experts = tokens.shape[0], self.top_k, self.num_experts
        if exists(valid):
            if valid.shape[0] != num_tokens:
                raise ValueError(f"MoE mask must cover the {num_tokens} tokens of x {tuple(shape)}, got {tuple(mask.shape)}")
            # masked tokens enter as zeros: whatever they hold (inf, NaN) then stays out of the routing, the losses
            # and the shared expert buffers
            tokens = tokens.masked_fill(~valid[:, None], 0.0)

        # routing in fp32 at least (fp64 for a fp64 model)
        logits = self.router(tokens)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        probs = logits.softmax(dim=-1)
        top_probs, top_ids = probs.topk(k, dim=-1)  # (T, k)
        weights = top_probs if k == 1 else top_probs / top_probs.sum(dim=-1, keepdim=True)
        if exists(valid):
            weights = weights.masked_fill(~valid[:, None], 0.0)

        aux_loss = self.losses(logits, probs, top_ids, valid) if with_aux_loss else None

        if exists(self.capacity_factor):
            out = self.dispatch_with_capacity(tokens, top_ids, weights, valid)
        elif num_tokens * num_experts <= ALL_EXPERTS_ROWS:
            # a few tokens (a decoding step): every expert on every token, then each token's chosen ones - the same
            # result in a handful of kernels and no host sync, so the step can be captured in a CUDA graph
            out = self.dispatch_all_experts(tokens, top_ids, weights)
        else:
            out = self.dispatch_sorted(tokens, top_ids, weights)

        if exists(self.shared_experts):
            out = out + self.shared_experts(tokens)
        return out.reshape(shape), aux_loss

    def static_decode_refusal(self):
        if not self.can_cache_kv:
            return "`ff_capacity_factor`: with a capacity, dropping a token depends on the other tokens of the call"
        return None

    def dispatch_all_experts(self, tokens, top_ids, weights):
        every = self.experts.forward_buffers(tokens.expand(self.num_experts, *tokens.shape))  # (E, T, d)
        chosen = every[top_ids, torch.arange(tokens.shape[0], device=tokens.device)[:, None]]  # (T, k, d)
        return torch.einsum("t k d, t k -> t d", chosen, weights.to(chosen.dtype)).to(tokens.dtype)

    def dispatch_sorted(self, tokens, top_ids, weights):
        k = self.top_k
        flat_ids = top_ids.reshape(-1)
        order = flat_ids.argsort(stable=True)
        token_of = order // k
        # a scatter, not torch.bincount, which reads the largest id on the host (a sync, and no CUDA graph)
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=flat_ids.device)
        counts = counts.index_add_(0, flat_ids, torch.ones_like(flat_ids))
        expert_out = self.experts.forward_sorted(tokens[token_of], flat_ids[order], counts)
        expert_out = expert_out * weights.reshape(-1)[order, None].to(expert_out.dtype)
        return torch.zeros_like(tokens).index_add_(0, token_of, expert_out.to(tokens.dtype))

    def dispatch_with_capacity(self, tokens, top_ids, weights, valid=None):
        num_tokens, k, num_experts = tokens.shape[0], self.top_k, self.num_experts
        capacity = max(1, math.ceil(self.capacity_factor * num_tokens * k / num_experts))
        # slot of each (token, choice) inside its expert, first choices first; masked tokens take no slot
        flat_ids = top_ids.t().reshape(-1)  # (k * T), choice-major
        # a comparison, not F.one_hot (which reads the largest id, a value torch.func.vmap cannot read)
        one_hot = (flat_ids[:, None] == torch.arange(num_experts, device=flat_ids.device)).long()
        flat_valid = valid.repeat(k) if exists(valid) else None
        if exists(flat_valid):
            one_hot = one_hot * flat_valid[:, None]
        slot = ((one_hot.cumsum(dim=0) - 1) * one_hot).sum(dim=-1)
        keep = slot < capacity
        if exists(flat_valid):
            keep = keep & flat_valid
        token_of = torch.arange(num_tokens, device=tokens.device).repeat(k)
        flat_weights = weights.t().reshape(-1) * keep

        buffer_index = flat_ids * capacity + slot.clamp(max=capacity - 1)
        buffers = tokens.new_zeros(num_experts * capacity, tokens.shape[-1])
        buffers = buffers.index_put((buffer_index,), tokens[token_of] * keep[:, None].to(tokens.dtype), accumulate=True)
        out = self.experts.forward_buffers(buffers.reshape(num_experts, capacity, -1))
        out = out.reshape(num_experts * capacity, -1)[buffer_index] * flat_weights[:, None].to(out.dtype)
        return torch.zeros_like(tokens).index_add_(0, token_of, out.to(tokens.dtype))

    def losses(self, logits, probs, top_ids, valid):
        num_experts = self.num_experts
        if exists(valid):
            w = valid.to(probs.dtype)
            denom = w.sum().clamp(min=1.0)
        else:
            w, denom = torch.ones_like(probs[:, 0]), probs.shape[0]
        # fraction of routed assignments per expert, and mean router probability per expert
        routed = (top_ids[..., None] == torch.arange(num_experts, device=top_ids.device)).to(w.dtype).sum(dim=1) * w[:, None]
        frac = routed.sum(dim=0) / (denom * self.top_k)
        mean_prob = (probs * w[:, None]).sum(dim=0) / denom
        balance = num_experts * (frac * mean_prob).sum()
        z = (torch.logsumexp(logits, dim=-1).square() * w).sum() / denom
        return self.aux_loss_weight * balance + self.router_z_loss_weight * z
