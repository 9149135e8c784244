"""Belief state transformer (Hu et al., arXiv:2410.23506): a forward decoder over the prefix and a backward decoder over
the reversed suffix, whose paired embeddings predict both the next token of the prefix and the previous token of the
suffix. Training on every valid (prefix, suffix) pair teaches a representation of the whole belief state, and
decoding can be conditioned on a goal suffix."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange, repeat, pack, unpack
from torch import nn, Tensor
from torch.nn import Module

from x_transformers.autoregressive_wrapper import eval_decorator, min_p, _resolve_filter
from x_transformers.utils import exists, default
from x_transformers.x_transformers import TransformerWrapper


def flip_valid(t: Tensor, lens: Tensor | None = None):
    """Reverse the first `lens[i]` positions of each row along dim 1, leaving the padding after them in place."""
    if not exists(lens):
        return t.flip(1)

    seq_len = t.shape[1]
    positions = torch.arange(seq_len, device=t.device)
    indices = torch.where(positions < lens[:, None], lens[:, None] - 1 - positions, positions)  # (b, n)

    if t.ndim == 3:
        indices = repeat(indices, "b n -> b n d", d=t.shape[-1])

    return t.gather(1, indices)


class BeliefStateWrapper(Module):
    """Figure 13 of arXiv:2410.23506."""

    def __init__(
        self,
        forward_decoder: TransformerWrapper,
        backward_decoder: TransformerWrapper | None = None,
        train_frac_forward_backward_pairs: float = 1.0,
        text_head: Module | None = None,
        backward_ar_loss_weight: float = 1.0,
        pred_distance=False,  # also predict how far apart prefix and suffix are
        pred_distance_loss_weight: float = 1.0,
        max_pred_distance: int | None = None,
    ):
        super().__init__()

        # one shared decoder may play both parts, telling the directions apart by the suffix token
        backward_decoder = backward_decoder if exists(backward_decoder) else forward_decoder

        assert forward_decoder.emb_dim == backward_decoder.emb_dim, "both decoders need the same embedding dimension"
        assert forward_decoder.num_tokens == backward_decoder.num_tokens, "both decoders need the same vocabulary"

        dim = forward_decoder.emb_dim
        num_tokens = forward_decoder.num_tokens
        self.num_tokens = num_tokens

        # learned start token of the backward (suffix) sequence
        self.suffix_token = nn.Parameter(torch.randn(dim) * 0.02)

        # text head - from a (prefix, suffix) embedding pair to logits of the next and of the previous token
        if not exists(text_head):
            text_head = nn.Sequential(
                nn.Linear(dim * 2, dim),
                nn.LeakyReLU(),
                nn.Linear(dim, num_tokens * 2),
            )

        self.text_head = text_head

        # distance prediction - classify the gap between prefix end and suffix start (capped at max_pred_distance)
        self.max_pred_distance = default(max_pred_distance, forward_decoder.max_seq_len)

        self.to_distance_logits = (
            nn.Sequential(nn.Linear(dim * 2, dim), nn.LeakyReLU(), nn.Linear(dim, self.max_pred_distance))
            if pred_distance
            else None
        )

        self.pred_distance_loss_weight = pred_distance_loss_weight

        self.forward_decoder = forward_decoder
        self.backward_decoder = backward_decoder

        # train on a random fraction of the O(n^2) pairs to save memory
        assert 0 < train_frac_forward_backward_pairs <= 1.0, "train_frac_forward_backward_pairs must be in (0, 1]"
        self.train_frac_fb_pairs = train_frac_forward_backward_pairs
        self.needs_subsample_fb_pairs = train_frac_forward_backward_pairs < 1.0

        self.backward_ar_loss_weight = backward_ar_loss_weight
        self.needs_loss_weight = backward_ar_loss_weight != 1.0
        self.register_buffer("loss_weights", torch.tensor([1.0, backward_ar_loss_weight]))

        self.max_seq_len = forward_decoder.max_seq_len

    def backward_embeds(self, seq: Tensor, lens: Tensor | None = None):
        """Backward decoder embeddings aligned to `seq`: (b, n + 1, d), position i having read tokens i .. end
        (position n has read only the suffix start token)."""
        batch, seq_len = seq.shape
        suffix_sos = repeat(self.suffix_token, "d -> b 1 d", b=batch)

        embeds = self.backward_decoder(flip_valid(seq, lens), prepend_embeds=suffix_sos, return_embeddings=True)

        if embeds.shape[1] != seq_len + 1:
            raise ValueError(
                "the backward decoder must return an embedding for its prepended suffix token as well "
                f"(expected {seq_len + 1} positions, got {embeds.shape[1]})"
            )

        # the start token and the valid tokens, lens + 1 positions, are reversed back into sequence order
        return flip_valid(embeds, lens + 1 if exists(lens) else None)

    @torch.no_grad()
    @eval_decorator
    def generate_with_suffix_cond(
        self,
        prompts,
        seq_len,
        temperature=1.25,
        cache_kv=False,
        suffix: Tensor | None = None,  # goal the continuation should lead to
        filter_logits_fn: str | Callable = min_p,
        filter_kwargs: dict = dict(min_p=0.1),
        **kwargs,
    ):
        greedy = temperature == 0.0
        filter_logits_fn = _resolve_filter(filter_logits_fn)

        prompts, packed_shape = pack([prompts], "* n")
        batch, prompt_len = prompts.shape

        # the suffix is read once; without one, the backward side has read only its start token
        if not exists(suffix):
            suffix = torch.empty((batch, 0), dtype=torch.long, device=prompts.device)
        elif suffix.ndim == 1:
            suffix = repeat(suffix, "n -> b n", b=batch)

        suffix_embed = self.backward_embeds(suffix)[:, :1]

        should_cache = cache_kv and self.forward_decoder.can_cache_kv

        out = prompts
        cache = None

        for _ in range(seq_len):
            embeds, new_cache = self.forward_decoder(
                out, return_intermediates=True, return_embeddings=True, cache=cache, **kwargs
            )

            if should_cache:
                cache = new_cache

            # only the next-token half of the head is used when decoding forwards
            paired = torch.cat((embeds[:, -1:], suffix_embed), dim=-1)
            logits, _ = self.text_head(paired).chunk(2, dim=-1)
            logits = logits[:, -1]

            if greedy:
                sample = logits.argmax(dim=-1, keepdim=True)
            else:
                probs = (filter_logits_fn(logits, **filter_kwargs) / temperature).softmax(dim=-1)
                sample = torch.multinomial(probs, 1)

            out = torch.cat((out, sample), dim=-1)

        out = out[:, prompt_len:]
        (out,) = unpack(out, packed_shape, "* n")
        return out

    def forward(
        self,
        seq: Tensor,
        lens: Tensor | None = None,  # (b,) valid lengths of a right-padded batch
        loss_weight_by_fb_indices: Callable | None = None,  # (pairs, 2) indices -> (pairs,) or (pairs, 2) weights
    ):
        batch, seq_len, device = *seq.shape, seq.device

        forward_embeds = self.forward_decoder(seq, return_embeddings=True)  # (b, n, d)
        backward_embeds = self.backward_embeds(seq, lens)  # (b, n + 1, d)

        # valid pairs (figure 11): the prefix ends at fi, the suffix starts at bi, at least one token between them;
        # bi = n is the empty suffix
        prefix_ends, suffix_starts = torch.arange(seq_len, device=device), torch.arange(seq_len + 1, device=device)
        fi, bi = torch.cartesian_prod(prefix_ends, suffix_starts).unbind(dim=-1)
        keep = (bi - fi) >= 2
        fi, bi = fi[keep], bi[keep]

        if self.needs_subsample_fb_pairs:
            num_pairs = fi.shape[0]
            num_kept = max(int(num_pairs * self.train_frac_fb_pairs), 1)
            kept = torch.randperm(num_pairs, device=device)[:num_kept]
            fi, bi = fi[kept], bi[kept]

        # the prefix predicts token fi + 1, the suffix token bi - 1; pairs reaching into padding are ignored
        forward_labels, backward_labels = seq[:, fi + 1], seq[:, bi - 1]

        if exists(lens):
            valid = bi[None, :] <= lens[:, None]  # (b, pairs)
            forward_labels = forward_labels.masked_fill(~valid, -1)
            backward_labels = backward_labels.masked_fill(~valid, -1)

        labels = torch.cat((forward_labels, backward_labels), dim=-1)

        fb_embeds = torch.cat((forward_embeds[:, fi], backward_embeds[:, bi]), dim=-1)
        logits = self.text_head(fb_embeds)

        needs_loss_weight = self.needs_loss_weight or exists(loss_weight_by_fb_indices)

        loss = F.cross_entropy(
            rearrange(logits, "b n (fb l) -> b l (fb n)", fb=2),
            labels,
            reduction="none" if needs_loss_weight else "mean",
            ignore_index=-1,
        )

        # per-direction weights, and optionally per-pair weights from the caller
        if needs_loss_weight:
            loss = rearrange(loss, "b (fb n) -> b fb n", fb=2)
            loss = loss * rearrange(self.loss_weights, "fb -> fb 1")

            if exists(loss_weight_by_fb_indices):
                weight = loss_weight_by_fb_indices(torch.stack((fi, bi), dim=-1))
                if weight.ndim == 1:
                    loss = loss * rearrange(weight, "n -> 1 n")
                elif weight.ndim == 2:
                    loss = loss * rearrange(weight, "n fb -> fb n")
                else:
                    raise ValueError("loss_weight_by_fb_indices must return (pairs,) or (pairs, 2) weights")

            valid_labels = rearrange(labels != -1, "b (fb n) -> b fb n", fb=2)
            loss = loss[valid_labels].mean()

        # distance prediction - an auxiliary classification of bi - fi
        if exists(self.to_distance_logits):
            distance_logits = self.to_distance_logits(fb_embeds)
            distance_labels = repeat((bi - fi).clamp(max=self.max_pred_distance - 1), "n -> b n", b=batch)

            if exists(lens):
                distance_labels = distance_labels.masked_fill(~valid, -1)

            distance_loss = F.cross_entropy(
                rearrange(distance_logits, "b n l -> b l n"), distance_labels, ignore_index=-1
            )
            loss = loss + distance_loss * self.pred_distance_loss_weight

        return loss
