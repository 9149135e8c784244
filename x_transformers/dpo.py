"""Direct preference optimization (arXiv:2305.18290) of a `TransformerWrapper` against a frozen copy of itself."""

from __future__ import annotations

from copy import deepcopy

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Module

from x_transformers.utils import exists
from x_transformers.utils import masked_mean as masked_mean_over
from x_transformers.x_transformers import TransformerWrapper


def freeze_all_layers_(module):
    for param in module.parameters():
        param.requires_grad = False


def log_prob_from_model_and_seq(model, seq):
    """Log-probability the model gives to each next token of `seq`: (b, n) -> (b, n - 1)."""
    inp, target = seq[:, :-1], seq[:, 1:]
    log_probs = model(inp).log_softmax(dim=-1)
    return log_probs.gather(-1, target[..., None])[..., 0]


def masked_mean(log_probs, mask=None):
    # a mask over the whole sequence is aligned to the predicted tokens (all but the first)
    if exists(mask) and mask.shape[-1] == log_probs.shape[-1] + 1:
        mask = mask[:, 1:]

    return masked_mean_over(log_probs, mask, dim=-1)


def maybe_and_mask(*masks):
    masks = [mask for mask in masks if exists(mask)]
    if len(masks) == 0:
        return None

    mask, *rest = masks
    for other in rest:
        mask = mask & other
    return mask


class DPO(Module):
    def __init__(self, model: TransformerWrapper, *, beta=0.1, pad_id=None):
        super().__init__()
        self.policy_model = model

        # reference policy: a frozen copy of the starting model
        self.ref_model = deepcopy(model)
        freeze_all_layers_(self.ref_model)

        self.beta = beta
        self.pad_id = pad_id

    def parameters(self):
        return self.policy_model.parameters()

    def forward(
        self,
        preferred_seq: Tensor,
        unpreferred_seq: Tensor,
        *,
        prompt_mask: Tensor,
        preferred_seq_mask: Tensor | None = None,
        unpreferred_seq_mask: Tensor | None = None,
    ):
        if preferred_seq.ndim != 2 or preferred_seq.shape != unpreferred_seq.shape:
            raise ValueError("preferred and unpreferred sequences must both be (batch, seq) of the same shape")

        if exists(self.pad_id):
            if not exists(preferred_seq_mask):
                preferred_seq_mask = preferred_seq != self.pad_id

            if not exists(unpreferred_seq_mask):
                unpreferred_seq_mask = unpreferred_seq != self.pad_id

        with torch.no_grad():
            self.ref_model.eval()
            ref_preferred_logprob = log_prob_from_model_and_seq(self.ref_model, preferred_seq)
            ref_unpreferred_logprob = log_prob_from_model_and_seq(self.ref_model, unpreferred_seq)

        policy_preferred_logprob = log_prob_from_model_and_seq(self.policy_model, preferred_seq)
        policy_unpreferred_logprob = log_prob_from_model_and_seq(self.policy_model, unpreferred_seq)

        # only the response tokens count, not the prompt
        preferred_seq_mask = maybe_and_mask(~prompt_mask, preferred_seq_mask)
        unpreferred_seq_mask = maybe_and_mask(~prompt_mask, unpreferred_seq_mask)

        ref_preferred_logprob = masked_mean(ref_preferred_logprob, preferred_seq_mask)
        policy_preferred_logprob = masked_mean(policy_preferred_logprob, preferred_seq_mask)
        ref_unpreferred_logprob = masked_mean(ref_unpreferred_logprob, unpreferred_seq_mask)
        policy_unpreferred_logprob = masked_mean(policy_unpreferred_logprob, unpreferred_seq_mask)

        # DPO objective, appendix B of arXiv:2305.18290
        policy_logratios = policy_preferred_logprob - policy_unpreferred_logprob
        ref_logratios = ref_preferred_logprob - ref_unpreferred_logprob

        losses = -F.logsigmoid(self.beta * (policy_logratios - ref_logratios))
        return losses.mean()
