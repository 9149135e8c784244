"""Entropy based segmentation from the Byte Latent Transformer (arXiv:2412.09871): a small trained decoder reads the
sequence, and wherever its next-token entropy reaches a threshold the current token ends, so hard-to-predict spans
get short tokens and predictable ones long tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import pack, unpack
from torch import Tensor
from torch.nn import Module
from torch.nn.utils.rnn import pad_sequence

from x_transformers.utils import exists, log


def calc_entropy_from_logits(logits: Tensor):
    probs = logits.softmax(dim=-1)
    return -(probs * log(probs)).sum(dim=-1)


class EntropyBasedTokenizer(Module):
    def __init__(self, decoder: Module, entropy_threshold: float, max_token_size: int | None = None):
        super().__init__()
        assert max_token_size is None or max_token_size >= 1, "max_token_size must be at least 1"

        self.decoder = decoder
        self.entropy_threshold = entropy_threshold
        self.max_token_size = max_token_size

    @torch.no_grad()
    def forward(
        self,
        seq: Tensor,  # (b, n) or (n,) token ids
        lens: Tensor | None = None,  # (b,) valid lengths
        return_segmented_seq=False,
        decoder_forward_kwargs: dict = dict(),
    ):
        """Returns the token lengths (b, num_tokens), zero padded, or the list of segments per sequence."""
        no_batch = seq.ndim == 1
        seq, packed_shape = pack([seq], "* n")
        batch, seq_len, device = *seq.shape, seq.device

        self.decoder.eval()

        logits = self.decoder(seq, **decoder_forward_kwargs)
        entropies = calc_entropy_from_logits(logits)  # (b, n)

        lens = lens if exists(lens) else torch.full((batch,), seq_len, device=device)
        in_seq = torch.arange(seq_len, device=device) < lens[:, None]

        # a token ends where the model is surprised by what comes next, and at the end of every sequence
        boundaries = (entropies >= self.entropy_threshold) & in_seq
        boundaries[torch.arange(batch, device=device), lens - 1] = True

        token_lengths = []

        for one_boundaries in boundaries:
            ends = one_boundaries.nonzero()[:, 0] + 1
            lengths = ends - F.pad(ends[:-1], (1, 0), value=0)

            # cap the token size - repeated patterns would otherwise merge into one long token
            if exists(self.max_token_size):
                lengths = torch.cat([self._split_length(length) for length in lengths.tolist()]).to(device)

            token_lengths.append(lengths)

        token_lengths = pad_sequence(token_lengths, batch_first=True)

        if not return_segmented_seq:
            (token_lengths,) = unpack(token_lengths, packed_shape, "* num_tokens")
            return token_lengths

        segmented_seq = []

        for one_seq, one_len, one_token_lengths in zip(seq, lens.tolist(), token_lengths):
            one_token_lengths = one_token_lengths[one_token_lengths > 0]
            segmented_seq.append(one_seq[:one_len].split(one_token_lengths.tolist()))

        if no_batch:
            return segmented_seq[0]

        return segmented_seq

    def _split_length(self, length: int):
        full, rest = divmod(length, self.max_token_size)
        pieces = [self.max_token_size] * full + ([rest] if rest > 0 else [])
        return torch.tensor(pieces, dtype=torch.long)
