"""Belief state transformer (Hu et al., arXiv:2410.23506): a forward decoder over the prefix and a backward decoder over
the reversed suffix, whose paired embeddings predict both the next token of the prefix and the previous token of the
suffix. Training on every valid (prefix, suffix) pair teaches a representation of the whole belief state, and
decoding can be conditioned on a goal suffix."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat, pack, unpack
from einops.layers.torch import Rearrange
from torch import nn, Tensor
from torch.nn import Module

from x_transformers.autoregressive_wrapper import eval_decorator, min_p, _resolve_filter
from x_transformers.utils import exists
from x_transformers.x_transformers import TransformerWrapper


class BeliefStateWrapper(Module):
    """Figure 13 of arXiv:2410.23506."""

    def __init__(
        self,
        forward_decoder: TransformerWrapper,
        backward_decoder: TransformerWrapper | None = None,
        train_frac_forward_backward_pairs: float = 1.0,
        text_head: Module | None = None,
        backward_ar_loss_weight: float = 1.0,
        pred_terminal=False,
        pred_terminal_loss_weight: float = 1.0,
    ):
        super().__init__()

        # one shared decoder may play both parts, telling the directions apart by the suffix token
        backward_decoder = backward_decoder if exists(backward_decoder) else forward_decoder

        assert forward_decoder.emb_dim == backward_decoder.emb_dim, "both decoders need the same embedding dimension"
        assert forward_decoder.num_tokens == backward_decoder.num_tokens, "both decoders need the same vocabulary"

        dim = forward_decoder.emb_dim
        num_tokens = forward_decoder.num_tokens

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

        # terminal prediction - whether prefix and suffix meet (are exactly one token apart)
        self.to_terminal_logit = (
            nn.Sequential(nn.Linear(dim * 2, dim), nn.LeakyReLU(), nn.Linear(dim, 1), Rearrange("... 1 -> ..."))
            if pred_terminal
            else None
        )

        self.pred_terminal_loss_weight = pred_terminal_loss_weight

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

    def _suffix_embed(self, suffix: Tensor | None, batch: int, device):
        """Embedding of the (reversed) suffix as read by the backward decoder, at its last position: (b, 1, d)."""
        if not exists(suffix):
            suffix = torch.empty((batch, 0), dtype=torch.long, device=device)
        elif suffix.ndim == 1:
            suffix = repeat(suffix, "n -> b n", b=batch)

        suffix_sos = repeat(self.suffix_token, "d -> b 1 d", b=batch)

        embeds = self.backward_decoder(suffix.flip(1), prepend_embeds=suffix_sos, return_embeddings=True)
        return embeds[:, -1:]

    @torch.no_grad()
    @eval_decorator
    def generate_with_suffix_cond(
        self,
        prompts,
        seq_len,
        temperature=1.25,
        cache_kv=False,
        suffix: Tensor | None = None,  # goal the continuation should lead to
        filter_logits_fn=min_p,
        filter_kwargs=dict(min_p=0.1),
        **kwargs,
    ):
        greedy = temperature == 0.0
        filter_logits_fn = _resolve_filter(filter_logits_fn)

        prompts, packed_shape = pack([prompts], "* n")
        batch, prompt_len = prompts.shape

        suffix_embed = self._suffix_embed(suffix, batch, prompts.device)

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

    def forward(self, seq, return_loss_only=False, loss_scale=1.0):
        """Computes the loss and, unless `return_loss_only`, also runs its backward pass (see the memory note)."""
        batch, seq_len, device = *seq.shape, seq.device

        forward_embeds = self.forward_decoder(seq, return_embeddings=True)

        # backward decoder reads the reversed sequence after its start token; flip back to align positions
        suffix_tokens = repeat(self.suffix_token, "d -> b 1 d", b=batch)
        backward_embeds = self.backward_decoder(seq.flip(1), prepend_embeds=suffix_tokens, return_embeddings=True)

        # keep the positions of the sequence tokens (dropping the start token's, if the decoder returns it) and flip,
        # so that backward position i has read tokens i .. n - 1
        backward_embeds = backward_embeds[:, -seq_len:].flip(1)

        # memory - the O(n^2) pair loss is backpropagated into detached embeddings first, then through the decoders
        orig_forward_embeds, forward_embeds = forward_embeds, forward_embeds.detach().requires_grad_()
        orig_backward_embeds, backward_embeds = backward_embeds, backward_embeds.detach().requires_grad_()

        # valid pairs (figure 11): forward position fi, backward position bi with at least one token between them
        positions = torch.arange(seq_len, device=device)
        fb_pairs = torch.cartesian_prod(positions, positions)
        fi, bi = fb_pairs.unbind(dim=-1)
        fb_pairs = fb_pairs[(bi - fi) >= 2]

        if self.needs_subsample_fb_pairs:
            num_pairs = fb_pairs.shape[0]
            num_kept = max(int(num_pairs * self.train_frac_fb_pairs), 1)
            fb_pairs = fb_pairs[torch.randperm(num_pairs, device=device)[:num_kept]]

        fi, bi = fb_pairs.unbind(dim=-1)

        # the forward embedding at fi predicts token fi + 1, the backward embedding at bi predicts token bi - 1
        labels = torch.cat((seq[:, fi + 1], seq[:, bi - 1]), dim=-1)

        fb_embeds = torch.cat((forward_embeds[:, fi], backward_embeds[:, bi]), dim=-1)
        logits = self.text_head(fb_embeds)

        loss = F.cross_entropy(
            rearrange(logits, "b n (fb l) -> b l (fb n)", fb=2),
            labels,
            reduction="none" if self.needs_loss_weight else "mean",
        )

        if exists(self.to_terminal_logit):
            terminal_logits = self.to_terminal_logit(fb_embeds)
            terminal_labels = repeat(((bi - fi) == 2).float(), "n -> b n", b=batch)

            terminal_loss = F.binary_cross_entropy_with_logits(terminal_logits, terminal_labels)
            loss = loss + terminal_loss * self.pred_terminal_loss_weight

        if return_loss_only:
            return loss

        if self.needs_loss_weight:
            loss = rearrange(loss, "b (fb n) -> b fb n", fb=2)
            loss = (loss * rearrange(self.loss_weights, "fb -> fb 1")).mean()

        (loss * loss_scale).backward()

        orig_forward_embeds.backward(forward_embeds.grad)
        orig_backward_embeds.backward(backward_embeds.grad)

        return loss
