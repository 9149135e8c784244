"""Transformers over continuous vectors instead of token ids, and their autoregressive (regression) wrapper."""

from __future__ import annotations

import math

import torch
from einops import rearrange, repeat, pack, unpack
from torch import nn, Tensor
from torch.nn import Module

from x_transformers.autoregressive_wrapper import trim_cached_kv
from x_transformers.utils import exists, default, pad_at_dim, masked_mean
from x_transformers.x_transformers import (
    AttentionLayers,
    ScaledSinusoidalEmbedding,
    AbsolutePositionalEmbedding,
    LayerNorm,
    always,
)


class GaussianNLL(Module):
    """Negative log-likelihood of `target` under a diagonal Gaussian given as stacked (mean, variance)."""

    def forward(self, pred, target):
        mean, variance = pred
        variance = variance.clamp(min=1e-6)
        return 0.5 * (variance.log() + (target - mean) ** 2 / variance + math.log(2 * math.pi))


class ContinuousTransformerWrapper(Module):
    def __init__(
        self,
        *,
        max_seq_len,
        attn_layers: AttentionLayers,
        dim_in=None,
        dim_out=None,
        emb_dim=None,
        max_mem_len=0,
        num_memory_tokens=None,
        post_emb_norm=False,
        emb_dropout=0.0,
        use_abs_pos_emb=True,
        scaled_sinu_pos_emb=False,
        average_pool_embed=False,
        probabilistic=False,  # predict a mean and a variance per output feature
    ):
        super().__init__()
        dim = attn_layers.dim

        self.max_seq_len = max_seq_len
        self.max_mem_len = max_mem_len

        no_abs_pos_emb = max_seq_len == 0 or not (use_abs_pos_emb and not attn_layers.disable_abs_pos_emb)

        if no_abs_pos_emb:
            self.pos_emb = always(0)
        elif scaled_sinu_pos_emb:
            self.pos_emb = ScaledSinusoidalEmbedding(dim)
        else:
            self.pos_emb = AbsolutePositionalEmbedding(dim, max_seq_len)

        self.post_emb_norm = LayerNorm(dim) if post_emb_norm else nn.Identity()
        self.emb_dropout = nn.Dropout(emb_dropout)

        # memory tokens (arXiv:2006.11527), prepended to every sequence
        num_memory_tokens = default(num_memory_tokens, 0)
        self.has_memory_tokens = num_memory_tokens > 0

        if num_memory_tokens > 0:
            self.memory_tokens = nn.Parameter(torch.randn(num_memory_tokens, dim))

        self.attn_layers = attn_layers
        self.average_pool_embed = average_pool_embed

        self.project_in = nn.Linear(dim_in, dim, bias=False) if exists(dim_in) else nn.Identity()

        # probabilistic - the head outputs a mean and a log variance per feature
        self.probabilistic = probabilistic
        assert not (probabilistic and not exists(dim_out)), "probabilistic output needs dim_out"
        out_features = default(dim_out, 0) * (2 if probabilistic else 1)
        self.project_out = nn.Linear(dim, out_features, bias=False) if exists(dim_out) else nn.Identity()

        # memory tokens sit before the sequence, which a key / value cache of the sequence alone cannot reproduce
        self.can_cache_kv = not self.has_memory_tokens and attn_layers.can_cache_kv
        self.can_cache_kv_outside_max_seq_len = no_abs_pos_emb

    def forward(
        self,
        x,
        return_embeddings=False,
        return_intermediates=False,
        return_mems=False,
        mask=None,
        lens=None,
        return_attn=False,
        mems=None,
        mem_masks=None,
        pos=None,
        prepend_embeds=None,
        prepend_mask=None,
        **kwargs,
    ):
        if x.ndim != 3:
            raise ValueError(f"expected continuous input of shape (batch, seq, dim_in), got {tuple(x.shape)}")

        batch, seq, device = *x.shape[:2], x.device

        # sequence lengths are an alternative way to give the padding mask
        if exists(lens):
            assert not exists(mask), "pass either `mask` or `lens`, not both"
            mask = torch.arange(seq, device=device) < lens[:, None]

        orig_mask = mask

        x = self.project_in(x)
        x = x + self.pos_emb(x, pos=pos)
        x = self.post_emb_norm(x)

        if self.has_memory_tokens:
            memory = repeat(self.memory_tokens, "m d -> b m d", b=batch)
            x, mem_packed_shape = pack([memory, x], "b * d")

            if exists(mask):
                mask = pad_at_dim(mask, (memory.shape[-2], 0), dim=-1, value=True)

        # prepended embeddings (PaLI style prefix, arXiv:2209.06794)
        if exists(prepend_embeds):
            prepend_seq, prepend_dim = prepend_embeds.shape[1:]
            assert prepend_dim == x.shape[-1], "prepended embeddings must have the model dimension"

            x = torch.cat((prepend_embeds, x), dim=-2)

            if exists(prepend_mask) or exists(mask):
                mask = default(mask, lambda: torch.ones((batch, seq), device=device, dtype=torch.bool))
                prepend_mask = default(
                    prepend_mask, lambda: torch.ones((batch, prepend_seq), device=device, dtype=torch.bool)
                )
                mask = torch.cat((prepend_mask, mask), dim=-1)

        x = self.emb_dropout(x)

        x, intermediates = self.attn_layers(
            x, mask=mask, mems=mems, mem_masks=mem_masks, return_hiddens=True, **kwargs
        )

        if self.has_memory_tokens:
            memory, x = unpack(x, mem_packed_shape, "b * d")
            intermediates.memory_tokens = memory

        if self.average_pool_embed:
            x = masked_mean(x, orig_mask, dim=1)

        out = self.project_out(x) if not return_embeddings else x

        if not return_embeddings and self.probabilistic:
            mean, log_var = rearrange(out, "... (d mean_log_var) -> mean_log_var ... d", mean_log_var=2)
            out = torch.stack((mean, log_var.exp()))

        if return_intermediates:
            return out, intermediates

        if return_mems:
            new_mems = tuple(t[..., -self.max_mem_len :, :].detach() for t in intermediates.hiddens)
            return out, new_mems

        if return_attn:
            attn_maps = tuple(t.post_softmax_attn for t in intermediates.attn_intermediates)
            return out, attn_maps

        return out


class ContinuousAutoregressiveWrapper(Module):
    def __init__(
        self,
        net: ContinuousTransformerWrapper,
        ignore_index=-100,
        pad_value=0,
        loss_fn: Module | None = None,
        equal_loss_weight_batch=False,  # with a padding mask, weigh every sequence equally rather than every token
    ):
        super().__init__()
        self.net = net
        self.max_seq_len = net.max_seq_len

        self.probabilistic = net.probabilistic
        if not exists(loss_fn):
            loss_fn = GaussianNLL() if self.probabilistic else nn.MSELoss(reduction="none")
        self.loss_fn = loss_fn
        self.equal_loss_weight_batch = equal_loss_weight_batch

    @torch.no_grad()
    def generate(self, start_tokens: Tensor, seq_len, temperature=1.0, cache_kv=True, **kwargs):
        assert start_tokens.ndim in (2, 3), "start tokens must be (seq, dim) or (batch, seq, dim)"
        no_batch = start_tokens.ndim == 2

        if no_batch:
            start_tokens = rearrange(start_tokens, "n d -> 1 n d")

        prompt_len, max_seq_len = start_tokens.shape[1], self.max_seq_len
        should_cache = cache_kv and self.net.can_cache_kv

        was_training = self.net.training
        self.net.eval()

        out = start_tokens
        cache = None

        for _ in range(seq_len):
            # sliding window past max_seq_len, the cache keeping the keys / values of all but the newest token
            if out.shape[1] > max_seq_len and exists(cache):
                if not self.net.can_cache_kv_outside_max_seq_len:
                    cache = None
                else:
                    cache = trim_cached_kv(cache, max_seq_len - 1)

            x = out[:, -max_seq_len:]
            net_out, new_cache = self.net(x, cache=cache, return_intermediates=True, **kwargs)

            last = net_out[..., -1:, :]

            # probabilistic - sample from the predicted Gaussian, its spread scaled by the temperature
            if self.probabilistic:
                mean, variance = last
                last = mean + variance.sqrt() * temperature * torch.randn_like(mean)

            out = torch.cat((out, last), dim=-2)

            if should_cache:
                cache = new_cache

        out = out[:, prompt_len:]

        if no_batch:
            out = rearrange(out, "1 n d -> n d")

        self.net.train(was_training)
        return out

    def forward(self, x, **kwargs):
        inp, target = x[:, :-1], x[:, 1:]

        assert "prepend_embeds" not in kwargs, "prepend_embeds is not supported for autoregressive training"

        # a mask over the whole sequence: the inputs take all but its last column, the targets all but its first
        mask = kwargs.get("mask", None)
        if exists(mask) and mask.shape[1] == x.shape[1]:
            kwargs["mask"] = mask[:, :-1]
            mask = mask[:, 1:]

        out = self.net(inp, **kwargs)
        loss = self.loss_fn(out, target)

        if exists(mask):
            assert loss.ndim > 1, "the loss must not be reduced when a mask is passed in"

            if self.equal_loss_weight_batch:
                loss = masked_mean(loss.mean(dim=-1), mask, dim=1)
            else:
                loss = loss[mask]

        return loss.mean()
