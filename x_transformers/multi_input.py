"""A `TransformerWrapper` whose tokens are several parallel id streams (say note, pitch and tone for music), each with
its own embedding summed into one, and its own output head."""

from __future__ import annotations

import torch
from torch import nn, Tensor
from torch.nn import Module, ModuleDict

from x_transformers.utils import exists, default
from x_transformers.x_transformers import (
    add_memory_tokens,
    remove_memory_tokens,
    AttentionLayers,
    Decoder,
    ScaledSinusoidalEmbedding,
    AbsolutePositionalEmbedding,
    LayerIntermediates,
    LayerNorm,
    always,
)


class MultiInputTransformerWrapper(Module):
    def __init__(
        self,
        *,
        num_tokens: dict[str, int] = dict(),
        max_seq_len,
        attn_layers: AttentionLayers,
        emb_dim=None,
        max_mem_len=0,
        shift_mem_down=0,
        emb_dropout=0.0,
        post_emb_norm=False,
        num_memory_tokens=None,
        memory_tokens_interspersed_every=None,
        return_only_embed=False,
        use_abs_pos_emb=True,
        scaled_sinu_pos_emb=False,
        emb_frac_gradient=1.0,  # scale of the gradient reaching the embeddings, GLM-130B / CogView (arXiv:2105.13290)
        attn_z_loss_weight=1e-4,
    ):
        super().__init__()
        assert len(num_tokens) > 0, "num_tokens must name at least one input, e.g. dict(note=128)"

        dim = attn_layers.dim
        emb_dim = default(emb_dim, dim)
        self.emb_dim = emb_dim

        self.max_seq_len = max_seq_len
        self.max_mem_len = max_mem_len
        self.shift_mem_down = shift_mem_down

        no_abs_pos_emb = max_seq_len == 0 or not (use_abs_pos_emb and not attn_layers.disable_abs_pos_emb)

        if no_abs_pos_emb:
            self.pos_emb = always(0)
        elif scaled_sinu_pos_emb:
            self.pos_emb = ScaledSinusoidalEmbedding(emb_dim)
        else:
            self.pos_emb = AbsolutePositionalEmbedding(emb_dim, max_seq_len)

        # one embedding table per named input, all summed
        self.embeds = ModuleDict({f"{name}_embed": nn.Embedding(count, emb_dim) for name, count in num_tokens.items()})

        self.emb_frac_gradient = emb_frac_gradient

        self.post_emb_norm = LayerNorm(emb_dim) if post_emb_norm else nn.Identity()
        self.emb_dropout = nn.Dropout(emb_dropout)

        self.project_emb = nn.Linear(emb_dim, dim) if emb_dim != dim else nn.Identity()
        self.attn_layers = attn_layers

        # one output head per named input
        if return_only_embed:
            self.to_logits = None
        else:
            self.to_logits = ModuleDict(
                {name: nn.Linear(dim, count, bias=False) for name, count in num_tokens.items()}
            )

        # memory tokens (arXiv:2006.11527), optionally interspersed every few tokens
        num_memory_tokens = default(num_memory_tokens, 0)
        self.num_memory_tokens = num_memory_tokens
        if num_memory_tokens > 0:
            self.memory_tokens = nn.Parameter(torch.randn(num_memory_tokens, dim))

        self.memory_tokens_interspersed_every = memory_tokens_interspersed_every
        self.attn_z_loss_weight = attn_z_loss_weight

        self.can_cache_kv = self.num_memory_tokens == 0 and getattr(attn_layers, "can_cache_kv", True)
        self.can_cache_kv_outside_max_seq_len = no_abs_pos_emb

    def forward(
        self,
        x: dict[str, Tensor],
        return_embeddings=False,
        return_logits_and_embeddings=False,
        return_intermediates=False,
        mask=None,
        return_mems=False,
        return_attn=False,
        mems=None,
        mem_masks=None,
        pos=None,
        prepend_embeds=None,
        prepend_mask=None,
        sum_embeds=None,
        return_attn_z_loss=False,
        attn_z_loss_weight=None,
        seq_start_pos=None,
        cache: LayerIntermediates | None = None,
        **kwargs,
    ):
        if not isinstance(x, dict) or len(x) == 0:
            raise ValueError("x must be a non-empty dict of token id tensors, one per named input")

        unknown = [name for name in x if f"{name}_embed" not in self.embeds]
        if len(unknown) > 0 or len(x) != len(self.embeds):
            raise ValueError(f"expected inputs {sorted(k[:-6] for k in self.embeds)}, got {sorted(x)}")

        first_input = next(iter(x.values()))
        b, n, device = *first_input.shape, first_input.device
        num_mems, has_memory_tokens = self.num_memory_tokens, self.num_memory_tokens > 0

        return_embeddings = return_embeddings or not exists(self.to_logits)

        token_emb = sum(self.embeds[f"{name}_embed"](ids) for name, ids in x.items())

        # positions given as floats are precomputed positional embeddings
        external_pos_emb = exists(pos) and pos.dtype != torch.long
        pos_emb = self.pos_emb(first_input, pos=pos, seq_start_pos=seq_start_pos) if not external_pos_emb else pos
        x = token_emb + pos_emb

        # summed embeddings, e.g. self conditioning of the non-autoregressive wrapper
        if exists(sum_embeds):
            x = x + sum_embeds

        x = self.post_emb_norm(x)

        if exists(prepend_embeds):
            prepend_seq, prepend_dim = prepend_embeds.shape[1:]
            assert prepend_dim == x.shape[-1], "prepended embeddings must have the embedding dimension"

            x = torch.cat((prepend_embeds, x), dim=-2)

            if exists(prepend_mask) or exists(mask):
                mask = default(mask, lambda: torch.ones((b, n), device=device, dtype=torch.bool))
                prepend_mask = default(
                    prepend_mask, lambda: torch.ones((b, prepend_seq), device=device, dtype=torch.bool)
                )
                mask = torch.cat((prepend_mask, mask), dim=-1)

        # embedding gradient fraction - arXiv:2105.13290, only part of the gradient flows into the embeddings
        if self.emb_frac_gradient < 1:
            frac = self.emb_frac_gradient
            x = x * frac + x.detach() * (1 - frac)

        x = self.emb_dropout(x)
        x = self.project_emb(x)

        mem_every = self.memory_tokens_interspersed_every

        if has_memory_tokens:
            x, mask, mem_packed_shape = add_memory_tokens(
                x, self.memory_tokens, mask, mem_every, isinstance(self.attn_layers, Decoder)
            )

        if self.shift_mem_down and exists(mems):
            mems = [*mems[self.shift_mem_down :], *mems[: self.shift_mem_down]]

        x, intermediates = self.attn_layers(
            x,
            mask=mask,
            mems=mems,
            mem_masks=mem_masks,
            cache=cache,
            return_hiddens=True,
            seq_start_pos=seq_start_pos,
            **kwargs,
        )

        if has_memory_tokens:
            x, intermediates.memory_tokens = remove_memory_tokens(x, mem_packed_shape, num_mems, mem_every, n)

        if not return_embeddings:
            logits = {name: to_logits(x) for name, to_logits in self.to_logits.items()}

        if return_logits_and_embeddings:
            out = (logits, x)
        elif return_embeddings:
            out = x
        else:
            out = logits

        # attention z-loss - arXiv:2202.08906, keeps attention logits small
        if return_attn_z_loss:
            from x_transformers.x_transformers import calc_z_loss

            pre_softmax_attns = [t.pre_softmax_attn for t in intermediates.attn_intermediates]
            weight = default(attn_z_loss_weight, self.attn_z_loss_weight)
            intermediates.attn_z_loss = calc_z_loss(pre_softmax_attns, weight=weight)
            return_intermediates = True

        if return_mems:
            hiddens = intermediates.hiddens
            new_mems = [torch.cat(pair, dim=-2) for pair in zip(mems, hiddens)] if exists(mems) else hiddens
            new_mems = [t[..., -self.max_mem_len :, :].detach() for t in new_mems]

            if not return_intermediates:
                return out, new_mems

            intermediates.mems = new_mems

        if return_intermediates:
            return out, intermediates

        if return_attn:
            return out, [t.post_softmax_attn for t in intermediates.attn_intermediates]

        return out
