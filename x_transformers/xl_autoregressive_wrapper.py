"""Transformer-XL style training and decoding: long sequences processed in `max_seq_len` segments with memories."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange, pack, unpack
from torch import nn

from x_transformers.autoregressive_wrapper import (
    _resolve_filter, check_generate_args, check_prompt_length, eval_decorator, mask_after_eos, top_k,
)
from x_transformers.utils import exists


def mixer_states(intermediates) -> list:
    """The linear_attn mixers' recurrent states in a forward's intermediates (one per mixer call), detached."""
    states = [t.recurrent_state for t in intermediates.attn_intermediates if t.layer_type == "l"]
    return [tuple(s.detach() if torch.is_tensor(s) else s for s in state) if exists(state) else None for state in states]


class XLAutoregressiveWrapper(nn.Module):
    """Recurrence over segments (arXiv:1901.02860): each segment attends to the detached hiddens of the previous.

    Linear-attention / RNN mixer layers (`linear_attn`) carry their recurrent state from one segment to the next
    instead (detached, like the memories), so a pure mixer stack over segments computes what it computes over the
    whole sequence at once, and a hybrid's softmax layers still get memories."""

    def __init__(self, net, ignore_index=-100, pad_value=0):
        super().__init__()
        self.pad_value = pad_value
        self.ignore_index = ignore_index

        self.net = net
        self.max_seq_len = net.max_seq_len

    @property
    def has_mixers(self) -> bool:
        return "l" in getattr(getattr(self.net, "attn_layers", None), "layer_types", ())

    def run_segment(self, x, mems, states, **kwargs):
        """(logits, intermediates with .mems) of one segment, continuing the memories and the mixers' states."""
        if self.has_mixers:
            kwargs = dict(kwargs, recurrent_states=states)
        return self.net(x, mems=mems, return_mems=True, return_intermediates=True, **kwargs)

    @torch.no_grad()
    @eval_decorator
    def generate(
        self,
        start_tokens,
        seq_len,
        eos_token=None,
        temperature=1.0,
        filter_logits_fn: str | Callable = top_k,
        filter_kwargs: dict = dict(),
        mems=None,
        cache_kv=True,
        **kwargs,
    ):
        seq_len = check_generate_args(seq_len, temperature)
        max_seq_len, greedy = self.max_seq_len, temperature == 0.0
        filter_logits_fn = _resolve_filter(filter_logits_fn)

        check_prompt_length(start_tokens.shape[-1])
        start_tokens, packed_shape = pack([start_tokens], "* n")
        prompt_len = start_tokens.shape[-1]

        # catch the memories (and the mixers' states) up - every full segment before the one holding the last
        # prompt token
        seg_start, states = 0, None
        while prompt_len - seg_start > max_seq_len:
            segment = start_tokens[:, seg_start : seg_start + max_seq_len]
            _, intermediates = self.run_segment(segment, mems, states, **kwargs)
            mems, states = intermediates.mems, mixer_states(intermediates)
            seg_start += max_seq_len

        should_cache = cache_kv and self.net.can_cache_kv

        out = start_tokens
        cache = None
        is_done = torch.zeros(out.shape[0], dtype=torch.bool, device=out.device)

        for _ in range(seq_len):
            x = out[:, seg_start:]
            segment_is_full = x.shape[-1] == max_seq_len

            # a full segment is run without the cache, as its memories need the hiddens of all of its tokens; a run
            # without the cache starts the mixers from the previous segment's states, the cache holds them already
            use_cache = cache if not segment_is_full else None
            if exists(use_cache):
                logits, intermediates = self.net(
                    x, mems=mems, cache=use_cache, return_mems=True, return_intermediates=True, **kwargs
                )
            else:
                logits, intermediates = self.run_segment(x, mems, states, **kwargs)

            logits = logits[:, -1]

            if greedy:
                sample = logits.argmax(dim=-1, keepdim=True)
            else:
                probs = (filter_logits_fn(logits, **filter_kwargs) / temperature).softmax(dim=-1)
                sample = torch.multinomial(probs, 1)

            # a full segment becomes the memory of the next one, which starts at the token just sampled
            if segment_is_full:
                mems, states = intermediates.mems, mixer_states(intermediates)
                seg_start = out.shape[-1]
                cache = None
            elif should_cache:
                cache = intermediates

            out = torch.cat((out, sample), dim=-1)

            if exists(eos_token):
                is_done = is_done | (sample[:, 0] == eos_token)
                if is_done.all():
                    break

        if exists(eos_token):
            out = mask_after_eos(out, eos_token, self.pad_value)

        out = out[:, prompt_len:]
        (out,) = unpack(out, packed_shape, "* n")
        return out

    def forward(self, x, mems=None, **kwargs):
        ignore_index, max_seq_len = self.ignore_index, self.max_seq_len

        x, labels = x[:, :-1], x[:, 1:]
        total_len = x.shape[1]

        loss_fn = F.nll_loss if getattr(self.net, "output_is_log_prob", False) else F.cross_entropy

        # each segment's mean loss is weighted by its share of the tokens, so the total is a per-token mean
        total_loss = 0.0

        states = None
        for chunk, chunk_labels in zip(x.split(max_seq_len, dim=-1), labels.split(max_seq_len, dim=-1)):
            if self.has_mixers:
                logits, intermediates = self.run_segment(chunk, mems, states, **kwargs)
                mems, states = intermediates.mems, mixer_states(intermediates)
            else:
                logits, mems = self.net(chunk, mems=mems, return_mems=True, **kwargs)

            loss = loss_fn(rearrange(logits, "b n c -> b c n"), chunk_labels, ignore_index=ignore_index)
            total_loss = total_loss + loss * (chunk.shape[-1] / total_len)

        return total_loss
