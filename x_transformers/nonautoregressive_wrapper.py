"""Non-autoregressive (MaskGIT style, arXiv:2202.04200) training and iterative parallel decoding of masked tokens."""

from __future__ import annotations

import math
from collections import namedtuple
from contextlib import nullcontext
from random import random

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from x_transformers.autoregressive_wrapper import gumbel_noise
from x_transformers.utils import exists, default
from x_transformers.x_transformers import TransformerWrapper

Losses = namedtuple("Losses", ["loss", "generator_loss", "critic_loss"])

# sampling helpers


def top_k(logits, thres=0.9):
    """Keep the top (1 - thres) fraction of logits along the last dimension."""
    k = max(math.ceil((1 - thres) * logits.shape[-1]), 1)
    values, indices = logits.topk(k, dim=-1)
    out = torch.full_like(logits, float("-inf"))
    return out.scatter(-1, indices, values)


def gumbel_sample(t, temperature=1.0, dim=-1):
    return ((t / max(temperature, 1e-10)) + gumbel_noise(t)).argmax(dim=dim)


def sample_prob(prob):
    return random() < prob


def coin_flip():
    return sample_prob(0.5)


def get_mask_subset_prob(mask, prob, min_mask=0):
    """Pick a random `prob` fraction (at least `min_mask`) of the True entries of each row of `mask`."""
    batch, seq, device = *mask.shape, mask.device
    num_to_mask = (mask.sum(dim=-1, keepdim=True) * prob).clamp(min=min_mask)

    # random rank of every kept position, the padded ones ranked first and then shifted out of the way
    logits = torch.rand((batch, seq), device=device).masked_fill(~mask, -1)
    ranks = logits.argsort(dim=-1).argsort(dim=-1).float()
    ranks = ranks - (~mask).sum(dim=-1, keepdim=True)

    return (ranks < num_to_mask) & mask


# schedules - fraction of tokens still masked at time t in [0, 1]


def linear_schedule(t):
    return 1 - t


def cosine_schedule(t):
    """arXiv:2202.04200"""
    return torch.cos(t * math.pi / 2)


class SelfCritic(nn.Module):
    """Token critic sharing the generator's trunk (after Nijkamp et al., aclanthology 2021.naacl-main.409)."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.to_logits = nn.Linear(net.attn_layers.dim, 1)

    def forward(self, x):
        embed = self.net(x, return_embeddings=True)
        return self.to_logits(embed)


class NonAutoregressiveWrapper(nn.Module):
    """Masked-token training and iterative demasking decoding (arXiv:1904.09324, arXiv:2202.04200)."""

    def __init__(
        self,
        net,
        *,
        mask_id,
        steps=18,
        self_cond=False,  # self conditioning on the previous step's embeddings, arXiv:2208.04202
        self_cond_train_prob=0.75,
        no_replace_prob=0.15,  # fraction of masked positions left unchanged, as in BERT (arXiv:1810.04805)
        random_token_prob=0.1,  # fraction of masked positions replaced by a random token, as in BERT
        schedule="linear",
        can_mask_prev_unmasked=False,  # whether decoding may re-mask tokens it already fixed
        token_critic: TransformerWrapper | None = None,
        self_token_critic=False,
        critic_loss_weight=1.0,
    ):
        super().__init__()
        assert not (self_token_critic and exists(token_critic)), "give either token_critic or self_token_critic"

        self.net = net

        dim = net.emb_dim
        self.dim = dim
        self.num_tokens = net.num_tokens

        self.mask_id = mask_id
        self.no_replace_prob = no_replace_prob
        self.random_token_prob = random_token_prob

        self.max_seq_len = net.max_seq_len
        self.steps = steps

        if callable(schedule):
            self.schedule_fn = schedule
        elif schedule == "linear":
            self.schedule_fn = linear_schedule
        elif schedule == "cosine":
            self.schedule_fn = cosine_schedule
        else:
            raise ValueError(f"invalid schedule {schedule!r}, use 'linear', 'cosine' or a callable")

        self.can_mask_prev_unmasked = can_mask_prev_unmasked

        # self conditioning - feed the previous prediction's embeddings back in, a learned null embedding at first
        self.self_cond = self_cond

        if self_cond:
            self.null_embed = nn.Parameter(torch.randn(dim))
            self.to_self_cond = nn.Linear(dim, dim, bias=False)
            self.self_cond_train_prob = self_cond_train_prob

        # token critic - scores which sampled tokens look wrong, to re-mask those instead of the least confident
        self.token_critic = token_critic

        if self_token_critic:
            self.token_critic = SelfCritic(net)

        self.critic_loss_weight = critic_loss_weight

    @torch.no_grad()
    def generate(self, batch_size=None, start_temperature=1.0, filter_thres=0.7, noise_level_scale=1.0, **kwargs):
        sample_one = not exists(batch_size)
        batch_size = default(batch_size, 1)

        device = next(self.net.parameters()).device

        was_training = self.training
        self.eval()

        times = torch.linspace(0.0, 1.0, self.steps + 1)

        # start fully masked, and unmask along the schedule
        shape = (batch_size, self.max_seq_len)
        seq = torch.full(shape, self.mask_id, device=device)
        mask = torch.full(shape, True, device=device)

        all_mask_num_tokens = (self.schedule_fn(times[1:]) * self.max_seq_len).long()

        last_embed = self.null_embed if self.self_cond else None

        for mask_num_tokens, steps_until_x0 in zip(all_mask_num_tokens.tolist(), reversed(range(self.steps))):
            self_cond = self.to_self_cond(last_embed) if self.self_cond else None

            logits, embeds = self.net(seq, sum_embeds=self_cond, return_logits_and_embeddings=True, **kwargs)

            if self.self_cond:
                last_embed = embeds

            if exists(filter_thres):
                logits = top_k(logits, filter_thres)

            # temperature anneals to zero over the steps
            annealing_scale = steps_until_x0 / self.steps
            temperature = max(start_temperature * annealing_scale, 1e-3)

            sampled_ids = gumbel_sample(logits, temperature=temperature)
            seq = torch.where(mask, sampled_ids, seq)

            # scores: higher means more likely wrong, so re-masked first
            if exists(self.token_critic):
                scores = rearrange(self.token_critic(seq), "b n 1 -> b n")
                scores = scores + noise_level_scale * gumbel_noise(scores) * annealing_scale
            else:
                probs = logits.softmax(dim=-1)
                scores = 1 - probs.gather(-1, rearrange(sampled_ids, "b n -> b n 1"))
                scores = rearrange(scores, "b n 1 -> b n")

            if not self.can_mask_prev_unmasked:
                scores = scores.masked_fill(~mask, -torch.finfo(scores.dtype).max)

            mask_indices = scores.topk(mask_num_tokens, dim=-1).indices
            mask = torch.zeros_like(scores, dtype=torch.bool).scatter(1, mask_indices, True)
            seq = seq.masked_fill(mask, self.mask_id)

        self.train(was_training)

        if sample_one:
            seq = rearrange(seq, "1 n -> n")

        return seq

    def forward(
        self,
        x,
        only_train_generator=False,
        only_train_critic=False,
        generator_sample_temperature=None,
        **kwargs,
    ):
        b, n, device = *x.shape, x.device
        assert n == self.max_seq_len, f"training sequences must have length max_seq_len ({self.max_seq_len}), got {n}"

        orig_seq = x.clone()

        # mask a random fraction of each sequence, drawn from the schedule at a random time
        rand_times = torch.empty(b, device=device).uniform_(0, 1)
        batched_randperm = torch.rand((b, n), device=device).argsort(dim=-1).float()

        num_tokens_mask = (self.schedule_fn(rand_times) * n).clamp(min=1.0)
        mask = batched_randperm < rearrange(num_tokens_mask, "b -> b 1")

        # BERT's recipe - some masked positions keep their token, some get a random one, the rest get [mask]
        replace_mask_id_mask = mask.clone()
        frac_seq_left = 1.0

        if self.no_replace_prob > 0.0 and coin_flip():
            frac_seq_left -= self.no_replace_prob
            no_replace_prob_mask = get_mask_subset_prob(mask, self.no_replace_prob)
            replace_mask_id_mask &= ~no_replace_prob_mask

        if self.random_token_prob > 0.0 and coin_flip():
            random_token_prob_mask = get_mask_subset_prob(replace_mask_id_mask, self.random_token_prob * frac_seq_left)
            random_tokens = torch.randint(0, self.num_tokens, (b, n), device=device)

            x = torch.where(random_token_prob_mask, random_tokens, x)
            replace_mask_id_mask &= ~random_token_prob_mask

        masked = torch.where(replace_mask_id_mask, self.mask_id, x)

        if self.self_cond:
            self_cond = self.null_embed

            if sample_prob(self.self_cond_train_prob):
                with torch.no_grad():
                    self_cond = self.net(masked, return_embeddings=True, **kwargs).detach()

            kwargs.update(sum_embeds=self.to_self_cond(self_cond))

        context = torch.no_grad if only_train_critic else nullcontext

        with context():
            logits = self.net(masked, **kwargs)

        loss_fn = F.nll_loss if getattr(self.net, "output_is_log_prob", False) else F.cross_entropy
        loss = loss_fn(logits[mask], orig_seq[mask])

        if not exists(self.token_critic) or only_train_generator:
            return Losses(loss, loss, None)

        # the critic learns to spot which positions the generator got wrong
        sampled_ids = gumbel_sample(logits, temperature=default(generator_sample_temperature, random()))
        generated = torch.where(mask, sampled_ids, orig_seq)

        critic_logits = self.token_critic(generated)
        critic_labels = (sampled_ids != orig_seq).float()

        critic_loss = F.binary_cross_entropy_with_logits(rearrange(critic_logits, "... 1 -> ..."), critic_labels)

        if only_train_critic:
            total_loss = critic_loss
            loss = None
        else:
            total_loss = loss + critic_loss * self.critic_loss_weight

        return Losses(total_loss, loss, critic_loss)
