"""NeoMLP (openreview A8Vuf2e8y6): an MLP recast as message passing over a fully connected graph of input, hidden and
output nodes, i.e. self attention over one token per node (see also LVSM, haian-jin.github.io/projects/LVSM)."""

from __future__ import annotations

import math

import torch
from einops import rearrange, repeat, pack, unpack
from torch import nn
from torch.nn import Module

from x_transformers.x_transformers import Encoder


class RandomFourierEmbed(Module):
    """Fixed random Fourier features of a scalar, cos(2 pi (w t + b))."""

    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Linear(1, dim)
        self.proj.requires_grad_(False)

    def forward(self, times):
        times = rearrange(times, "... -> ... 1")
        return torch.cos(2 * math.pi * self.proj(times))


class NeoMLP(Module):
    def __init__(
        self,
        *,
        dim_in,
        dim_hidden,
        dim_out,
        dim_model,
        depth,
        encoder_kwargs: dict = dict(attn_dim_head=16, heads=4),
    ):
        super().__init__()

        # one learned embedding per node
        self.input_embed = nn.Parameter(torch.randn(dim_in, dim_model) * 0.02)
        self.hidden_embed = nn.Parameter(torch.randn(dim_hidden, dim_model) * 0.02)
        self.output_embed = nn.Parameter(torch.randn(dim_out, dim_model) * 0.02)

        # each continuous input feature enters through random Fourier features
        self.random_fourier = nn.Sequential(RandomFourierEmbed(dim_model), nn.Linear(dim_model, dim_model))

        # message passing between all nodes is self attention over the node tokens
        self.transformer = Encoder(dim=dim_model, depth=depth, **encoder_kwargs)

        # each output node reads out its own scalar
        self.to_output_weights = nn.Parameter(torch.randn(dim_out, dim_model))
        self.to_output_bias = nn.Parameter(torch.zeros(dim_out))

    def forward(self, x, return_embeds=False):
        no_batch = x.ndim == 1

        if no_batch:
            x = rearrange(x, "d -> 1 d")

        batch = x.shape[0]

        input_embed = self.random_fourier(x) + self.input_embed
        hidden_embed = repeat(self.hidden_embed, "n d -> b n d", b=batch)
        output_embed = repeat(self.output_embed, "n d -> b n d", b=batch)

        embed, packed_shape = pack([input_embed, hidden_embed, output_embed], "b * d")
        embed = self.transformer(embed)
        input_embed, hidden_embed, output_embed = unpack(embed, packed_shape, "b * d")

        output = (output_embed * self.to_output_weights).sum(dim=-1) + self.to_output_bias

        if no_batch:
            output = rearrange(output, "1 n -> n")

        if not return_embeds:
            return output

        return output, (input_embed, hidden_embed, output_embed)
