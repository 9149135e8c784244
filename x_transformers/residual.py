"""How a block's output rejoins the residual stream, and wrappers that scale a block's output.

Residual protocol (AttentionLayers calls it around every block):
    branch_input, residual, residual_kwargs = residual_fn.prepare(x)
    out = block(branch_input)
    x = residual_fn(out, residual, **residual_kwargs)
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.nn import Module

from x_transformers.cache import static_cache_refusal
from x_transformers.utils import default, exists


def _scale_first(out, gamma):
    # blocks may return (out, intermediates, ...); only the output gets scaled
    if isinstance(out, Tensor):
        return out * gamma
    out, *rest = out
    return (out * gamma, *rest)


class Residual(Module):
    def __init__(self, dim, scale_residual=False, scale_residual_constant=1.0, **kwargs):
        super().__init__()
        # normformer residual scaling, arXiv 2110.09456
        self.residual_scale = nn.Parameter(torch.ones(dim)) if scale_residual else None
        self.scale_residual_constant = scale_residual_constant

    def prepare(self, residual):
        return residual, residual, dict()

    def forward(self, x, residual, **kwargs):
        if exists(self.residual_scale):
            residual = residual * self.residual_scale

        if self.scale_residual_constant != 1:
            residual = residual * self.scale_residual_constant

        return x + residual


class GRUGating(Module):
    """Gated residual, arXiv 1910.06764: a GRU cell decides how much of the block output enters the stream."""

    def __init__(self, dim, scale_residual=False, **kwargs):
        super().__init__()
        self.gru = nn.GRUCell(dim, dim)
        self.residual_scale = nn.Parameter(torch.ones(dim)) if scale_residual else None

    def prepare(self, residual):
        return residual, residual, dict()

    def forward(self, x, residual, **kwargs):
        if exists(self.residual_scale):
            residual = residual * self.residual_scale

        # the block output is the GRU input, the residual its hidden state
        gated = self.gru(rearrange(x, "b n d -> (b n) d"), rearrange(residual, "b n d -> (b n) d"))
        return gated.reshape_as(x)


class HyperConnection(Module):
    """Dynamic hyper-connections, arXiv 2409.19606 (appendix J, algorithm 2).

    The residual is `num_residual_streams` parallel streams, folded into the batch as `(b s) n d`. Before the
    block, learned (static + input-dependent) weights `alpha` mix the streams into the block input(s) and into
    updated streams; after it, weights `beta` spread the block output back over the streams.
    """

    def __init__(self, dim, *, layer_index, num_residual_streams, num_input_views=1, tanh=True, **kwargs):
        super().__init__()
        self.act = nn.Tanh() if tanh else nn.Identity()
        self.norm = nn.LayerNorm(dim, bias=False)

        self.num_residual_streams = num_residual_streams
        self.layer_index = layer_index
        self.num_input_views = num_input_views

        self.static_beta = nn.Parameter(torch.ones(num_residual_streams))

        # at init, layer l reads stream (l mod s) and passes every stream through unchanged
        init_alpha0 = torch.zeros((num_residual_streams, num_input_views))
        init_alpha0[layer_index % num_residual_streams, :] = 1.0
        self.static_alpha = nn.Parameter(torch.cat((init_alpha0, torch.eye(num_residual_streams)), dim=1))

        self.dynamic_alpha_fn = nn.Parameter(torch.zeros(dim, num_residual_streams + num_input_views))
        self.dynamic_alpha_scale = nn.Parameter(torch.ones(()) * 1e-2)

        self.dynamic_beta_fn = nn.Parameter(torch.zeros(dim))
        self.dynamic_beta_scale = nn.Parameter(torch.ones(()) * 1e-2)

    def prepare(self, residuals):
        residuals = rearrange(residuals, "(b s) n d -> b n s d", s=self.num_residual_streams)
        normed = self.norm(residuals)

        alpha = self.act(normed @ self.dynamic_alpha_fn) * self.dynamic_alpha_scale + self.static_alpha
        beta = self.act(normed @ self.dynamic_beta_fn) * self.dynamic_beta_scale + self.static_beta

        # width connection: (b n s d) -> (b n views+s d)
        mixed = torch.einsum("... s t, ... s d -> ... t d", alpha, residuals)

        views = self.num_input_views
        branch_input, residuals = mixed[..., :views, :], mixed[..., views:, :]

        if views == 1:
            branch_input = branch_input[..., 0, :]
        else:
            branch_input = rearrange(branch_input, "... v d -> v ... d")

        return branch_input, residuals, dict(beta=beta)

    def forward(self, x, residuals, *, beta):
        residuals = torch.einsum("b n d, b n s -> b n s d", x, beta) + residuals
        return rearrange(residuals, "b n s d -> (b s) n d")


# post-branch wrappers


class Scale(Module):
    """Multiply a block's output by a constant (macaron's half-step feedforwards, arXiv 1906.02762)."""

    def __init__(self, value, fn):
        super().__init__()
        self.value = value
        self.fn = fn

    def forward(self, x, **kwargs):
        return _scale_first(self.fn(x, **kwargs), self.value)

    def static_decode_refusal(self):
        return static_cache_refusal(self.fn)


class LayerScale(Module):
    """Learned per-feature scale on a block's output, arXiv 2103.17239."""

    def __init__(self, fn: Module, dim, init_value=0.0, unit_offset=False):
        super().__init__()
        self.unit_offset = unit_offset
        self.fn = fn
        self.gamma = nn.Parameter(torch.full((dim,), init_value - float(unit_offset)))

    def forward(self, x, **kwargs):
        return _scale_first(self.fn(x, **kwargs), self.gamma + float(self.unit_offset))

    def static_decode_refusal(self):
        return static_cache_refusal(self.fn)


class AdaptiveLayerScale(Module):
    """Output scale predicted from a condition (adaLN-Zero style gate, arXiv 2212.09748), sigmoid(-2) at init."""

    def __init__(self, fn: Module, dim, dim_condition=None, init_bias_value=-2.0):
        super().__init__()
        self.fn = fn
        self.to_gamma = nn.Linear(default(dim_condition, dim), dim)
        nn.init.zeros_(self.to_gamma.weight)
        nn.init.constant_(self.to_gamma.bias, init_bias_value)

    def forward(self, x, *, condition, **kwargs):
        if condition.ndim == 2:
            condition = condition[:, None, :]
        gamma = self.to_gamma(condition).sigmoid()
        return _scale_first(self.fn(x, **kwargs), gamma)

    def static_decode_refusal(self):
        return static_cache_refusal(self.fn)
