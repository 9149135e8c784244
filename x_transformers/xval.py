"""xVal (arXiv:2310.02989): numbers enter as one shared [NUM] token embedding scaled by their value, and a separate
regression head predicts the value wherever the model predicts [NUM]; generalizes better on arithmetic."""

from __future__ import annotations

from collections import namedtuple
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange, repeat, pack, unpack
from einops.layers.torch import Rearrange
from torch import nn, Tensor

from x_transformers.autoregressive_wrapper import top_k, _resolve_filter
from x_transformers.utils import exists, default, pad_at_dim
from x_transformers.x_transformers import (
    AttentionLayers,
    TokenEmbedding,
    ScaledSinusoidalEmbedding,
    AbsolutePositionalEmbedding,
    always,
)

LossBreakdown = namedtuple("LossBreakdown", ["cross_entropy_loss", "numerical_mse_loss"])

GenerateReturn = namedtuple("GenerateReturn", ["sampled_token_ids", "sampled_numbers", "is_number_mask"])


class XValTransformerWrapper(nn.Module):
    def __init__(
        self,
        *,
        num_tokens,
        max_seq_len,
        numerical_token_id,
        attn_layers: AttentionLayers,
        emb_dim=None,
        logits_dim=None,
        tie_embedding=False,
        max_mem_len=0,
        num_memory_tokens=None,
        emb_dropout=0.0,
        use_abs_pos_emb=True,
        scaled_sinu_pos_emb=False,
    ):
        super().__init__()
        dim = attn_layers.dim
        emb_dim = default(emb_dim, dim)

        self.emb_dim = emb_dim
        self.token_emb = TokenEmbedding(emb_dim, num_tokens)

        self.numerical_token_id = numerical_token_id
        self.max_seq_len = max_seq_len
        self.max_mem_len = max_mem_len

        if not (use_abs_pos_emb and not attn_layers.disable_abs_pos_emb):
            self.pos_emb = always(0)
        elif scaled_sinu_pos_emb:
            self.pos_emb = ScaledSinusoidalEmbedding(dim)
        else:
            self.pos_emb = AbsolutePositionalEmbedding(dim, max_seq_len)

        self.emb_dropout = nn.Dropout(emb_dropout)

        num_memory_tokens = default(num_memory_tokens, 0)
        self.has_memory_tokens = num_memory_tokens > 0

        if num_memory_tokens > 0:
            self.memory_tokens = nn.Parameter(torch.randn(num_memory_tokens, dim))

        self.attn_layers = attn_layers

        logits_dim = default(logits_dim, num_tokens)
        self.to_logits = (
            nn.Linear(dim, logits_dim) if not tie_embedding else lambda t: t @ self.token_emb.emb.weight.t()
        )

        # regression head for the value of a [NUM] token
        self.to_numerical_output = nn.Sequential(nn.Linear(dim, 1), Rearrange("... 1 -> ..."))

    def forward(
        self,
        x: Tensor,
        x_num: Tensor,
        return_embeddings=False,
        return_intermediates=False,
        return_mems=False,
        mask=None,
        return_attn=False,
        mems=None,
        pos=None,
        prepend_embeds=None,
        **kwargs,
    ):
        if x.shape != x_num.shape:
            raise ValueError(f"token ids {tuple(x.shape)} and numbers {tuple(x_num.shape)} must have the same shape")

        batch = x.shape[0]
        is_number_mask = x == self.numerical_token_id

        # xVal embedding - the [NUM] embedding is multiplied by the number; other tokens are left as they are
        x = self.token_emb(x)
        scale = torch.where(is_number_mask, x_num, 1.0)
        x = x * rearrange(scale, "... -> ... 1")

        x = x + self.pos_emb(x, pos=pos)

        if self.has_memory_tokens:
            memory = repeat(self.memory_tokens, "m d -> b m d", b=batch)
            x, mem_packed_shape = pack([memory, x], "b * d")

            if exists(mask):
                mask = pad_at_dim(mask, (memory.shape[-2], 0), dim=-1, value=True)

        if exists(prepend_embeds):
            assert prepend_embeds.shape[-1] == x.shape[-1], "prepended embeddings must have the model dimension"
            x = torch.cat((prepend_embeds, x), dim=-2)

        x = self.emb_dropout(x)

        x, intermediates = self.attn_layers(x, mask=mask, mems=mems, return_hiddens=True, **kwargs)

        if self.has_memory_tokens:
            memory, x = unpack(x, mem_packed_shape, "b * d")
            intermediates.memory_tokens = memory

        if not return_embeddings:
            out = (self.to_logits(x), self.to_numerical_output(x))
        else:
            out = x

        if return_intermediates:
            return out, intermediates

        if return_mems:
            new_mems = tuple(t[..., -self.max_mem_len :, :].detach() for t in intermediates.hiddens)
            return out, new_mems

        if return_attn:
            attn_maps = tuple(t.post_softmax_attn for t in intermediates.attn_intermediates)
            return out, attn_maps

        return out


class XValAutoregressiveWrapper(nn.Module):
    def __init__(self, net: XValTransformerWrapper, ignore_index=-100, pad_value=0, numerical_loss_weight=1.0):
        super().__init__()
        self.net = net
        self.max_seq_len = net.max_seq_len
        self.numerical_loss_weight = numerical_loss_weight
        self.ignore_index = ignore_index
        self.pad_value = pad_value

    @torch.no_grad()
    def generate(
        self,
        start_tokens: Tensor,
        start_numbers: Tensor,
        seq_len,
        filter_logits_fn: str | Callable = top_k,
        filter_kwargs: dict = dict(),
        temperature=1.0,
        **kwargs,
    ):
        assert start_tokens.ndim == 2, "start tokens must be (batch, seq)"
        assert start_tokens.shape == start_numbers.shape, "start tokens and numbers must have the same shape"

        filter_logits_fn = _resolve_filter(filter_logits_fn)
        prompt_len, max_seq_len = start_tokens.shape[-1], self.max_seq_len

        was_training = self.net.training
        self.net.eval()

        out, num_out = start_tokens, start_numbers

        for _ in range(seq_len):
            logits, numerical_pred = self.net(out[:, -max_seq_len:], num_out[:, -max_seq_len:], **kwargs)

            last_logits = logits[:, -1]

            if temperature == 0.0:
                sample = last_logits.argmax(dim=-1, keepdim=True)
            else:
                probs = (filter_logits_fn(last_logits, **filter_kwargs) / temperature).softmax(dim=-1)
                sample = torch.multinomial(probs, 1)

            out = torch.cat((out, sample), dim=-1)
            num_out = torch.cat((num_out, numerical_pred[:, -1:]), dim=-1)

        out, num_out = out[:, prompt_len:], num_out[:, prompt_len:]

        # numbers only mean something where a [NUM] token was sampled
        is_number = out == self.net.numerical_token_id
        num_out = torch.where(is_number, num_out, float("nan"))

        self.net.train(was_training)
        return GenerateReturn(out, num_out, is_number)

    def forward(self, x: Tensor, x_num: Tensor, return_loss_breakdown=False, **kwargs):
        inp, target = x[:, :-1], x[:, 1:]
        x_num_inp, x_num_target = x_num[:, :-1], x_num[:, 1:]

        # ignored positions are fed to the network as padding
        inp = torch.where(inp == self.ignore_index, self.pad_value, inp)

        target_mask = target != self.ignore_index

        # a mask over the whole sequence: the inputs take all but its last column, the targets all but its first
        mask = kwargs.get("mask", None)
        if exists(mask):
            if mask.shape[1] == x.shape[1]:
                kwargs["mask"] = mask[:, :-1]
                mask = mask[:, 1:]
            target_mask = target_mask & mask

        logits, numerical_pred = self.net(inp, x_num_inp, **kwargs)

        cross_entropy_loss = F.cross_entropy(
            rearrange(logits, "b n c -> b c n"), target, reduction="none", ignore_index=self.ignore_index
        )

        # regression loss only where the target is a [NUM] token; other positions may hold nan in `x_num`
        target_is_number = target == self.net.numerical_token_id
        x_num_target = x_num_target.masked_fill(~target_is_number, 0.0)

        numerical_mse_loss = F.mse_loss(numerical_pred, x_num_target, reduction="none")
        numerical_mse_loss = numerical_mse_loss.masked_fill(~(target_is_number & target_mask), 0.0)

        loss = cross_entropy_loss + numerical_mse_loss * self.numerical_loss_weight
        loss = loss[target_mask].mean()

        if not return_loss_breakdown:
            return loss

        return loss, LossBreakdown(cross_entropy_loss, numerical_mse_loss)
