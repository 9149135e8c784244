"""Packed sequences: several documents side by side in one row, none of them seeing another.

A packed batch is described by one of
- `seq_lens`: the document lengths of each row (a list of ints for one row, a list of lists, a 1-D tensor for one
  row, or a 2-D tensor (b, max docs) whose zero entries are ignored); each row's lengths sum to the row length;
- `cu_seqlens`: (N + 1) offsets of the documents of a single row (the flash-attn convention);
- `pos`: position ids (b, n) or (n,) that restart at 0 where a document starts (the Hugging Face convention).

`build_packing` turns any of them into one `Packing`, built once per batch and handed to every layer. The rows are
flattened into one sequence of b * n tokens, so `cu_seqlens` indexes that flat sequence: the kernels, which take
packed documents with batch 1, see each row's documents as documents of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from x_transformers.utils import exists


@dataclass(eq=False)
class Packing:
    cu_seqlens: Tensor  # (N + 1,) int32, document offsets into the flattened (b * n) tokens
    doc_ids: Tensor  # (b, n) long, the document of every token (numbered over the whole batch)
    positions: Tensor  # (b, n) long, every token's position within its document
    max_seqlen: int  # the longest document
    _doc_mask: Tensor | None = field(default=None, repr=False)
    _padded_index: tuple | None = field(default=None, repr=False)

    @property
    def batch(self) -> int:
        return self.doc_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.doc_ids.shape[1]

    @property
    def num_docs(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    def doc_mask(self) -> Tensor:
        """(b, 1, n, n) bool, True where query and key lie in the same document: the exact (dense) path's mask."""
        if self._doc_mask is None:
            self._doc_mask = (self.doc_ids[:, :, None] == self.doc_ids[:, None, :])[:, None]
        return self._doc_mask

    def padded_index(self) -> tuple[Tensor, Tensor]:
        """(index, valid), both (N, max_seqlen): the flat token at each position of each document, and whether that
        position exists (the rest is right padding)."""
        if self._padded_index is None:
            offsets = torch.arange(self.max_seqlen, device=self.cu_seqlens.device)
            starts, lens = self.cu_seqlens[:-1].long(), self.cu_seqlens.diff().long()
            valid = offsets[None, :] < lens[:, None]
            index = (starts[:, None] + offsets[None, :]).clamp(max=self.batch * self.seq_len - 1)
            self._padded_index = (index, valid)
        return self._padded_index

    def to_padded(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (b, n, ...) -> one document per row (N, max_seqlen, ...), right-padded with zeros, and its keep-mask."""
        index, valid = self.padded_index()
        flat = x.reshape(self.batch * self.seq_len, *x.shape[2:])
        padded = flat[index]
        keep = valid.reshape(*valid.shape, *((1,) * (padded.ndim - 2)))
        return padded.masked_fill(~keep, 0), valid

    def from_padded(self, y: Tensor) -> Tensor:
        """The inverse of `to_padded`: (N, max_seqlen, ...) -> (b, n, ...). Documents lie in flat order."""
        _, valid = self.padded_index()
        return y[valid].reshape(self.batch, self.seq_len, *y.shape[2:])


def _from_row_lengths(rows: list[list[int]], batch: int, seq_len: int, device) -> Packing:
    if len(rows) != batch:
        raise ValueError(f"seq_lens has {len(rows)} rows, the batch has {batch}")
    lengths = []
    for index, row in enumerate(rows):
        if any(length < 0 for length in row):
            raise ValueError(f"seq_lens row {index} has a negative document length: {row}")
        if sum(row) != seq_len:
            raise ValueError(
                f"seq_lens row {index} sums to {sum(row)}, the rows have {seq_len} tokens: every token must belong to "
                "a document (give trailing padding a document of its own and leave it out of the loss)"
            )
        # empty documents take no tokens: leave them out
        lengths.extend(length for length in row if length > 0)
    lens = torch.tensor(lengths, dtype=torch.long, device=device)
    cu_seqlens = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
    doc_ids = torch.repeat_interleave(torch.arange(len(lengths), device=device), lens)
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lens)
    positions = torch.arange(batch * seq_len, device=device) - starts
    return Packing(
        cu_seqlens=cu_seqlens,
        doc_ids=doc_ids.reshape(batch, seq_len),
        positions=positions.reshape(batch, seq_len),
        max_seqlen=max(lengths),
    )


def _seq_lens_rows(seq_lens, batch: int) -> list[list[int]]:
    if torch.is_tensor(seq_lens):
        if seq_lens.is_floating_point() or seq_lens.dtype == torch.bool or seq_lens.ndim not in (1, 2):
            raise ValueError(f"seq_lens must be an integer tensor (docs,) or (batch, docs), got {seq_lens.dtype} "
                             f"of shape {tuple(seq_lens.shape)}")
        seq_lens = seq_lens.tolist()
    if not isinstance(seq_lens, (list, tuple)) or not seq_lens:
        raise ValueError(f"seq_lens must be a non-empty list or tensor of document lengths, got {seq_lens!r}")
    if all(isinstance(length, int) for length in seq_lens):
        if batch != 1:
            raise ValueError(f"a flat seq_lens describes one row, the batch has {batch}; give one list per row")
        return [list(seq_lens)]
    if not all(isinstance(row, (list, tuple)) and all(isinstance(n, int) for n in row) for row in seq_lens):
        raise ValueError("seq_lens must be a list of ints (one row) or a list of lists of ints (one per row)")
    return [list(row) for row in seq_lens]


def _pos_rows(pos: Tensor, batch: int, seq_len: int) -> list[list[int]]:
    if pos.ndim == 1:
        pos = pos[None].expand(batch, -1)
    if pos.shape != (batch, seq_len):
        raise ValueError(f"packed position ids must be ({batch}, {seq_len}) or ({seq_len},), got {tuple(pos.shape)}")
    prev = torch.nn.functional.pad(pos[:, :-1], (1, 0), value=-1)
    if not ((pos == 0) | (pos == prev + 1)).all():
        raise ValueError("packed position ids must start every document at 0 and count up by 1 within it")
    rows = []
    for starts in (pos == 0).tolist():
        bounds = [index for index, start in enumerate(starts) if start] + [seq_len]
        rows.append([end - begin for begin, end in zip(bounds[:-1], bounds[1:])])
    return rows


def pos_restarts(pos) -> bool:
    """Whether integer position ids `pos` restart at 0 after the first token of a row: the packed-batch convention."""
    if not torch.is_tensor(pos) or pos.is_floating_point() or pos.ndim not in (1, 2) or pos.shape[-1] < 2:
        return False
    return bool((pos[..., 1:] == 0).any())


def build_packing(batch: int, seq_len: int, device, seq_lens=None, cu_seqlens=None, pos=None, flash_pack_seq_kwargs=None):
    """One `Packing` from whichever description is given (at most one), or None for an unpacked batch.
    `flash_pack_seq_kwargs` is flash-attn's varlen form (`cu_seqlens_q` / `cu_seqlens_k`, `max_seqlen_q` / `_k`):
    for self attention q and k share their offsets, which serve as `cu_seqlens`."""
    if exists(flash_pack_seq_kwargs):
        unknown = sorted(set(flash_pack_seq_kwargs) - {"cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"})
        if unknown:
            raise ValueError(f"flash_pack_seq_kwargs got unknown keys {unknown}")
        cu_q, cu_k = flash_pack_seq_kwargs.get("cu_seqlens_q"), flash_pack_seq_kwargs.get("cu_seqlens_k")
        if not exists(cu_q) and not exists(cu_k):
            raise ValueError("flash_pack_seq_kwargs needs `cu_seqlens_q` (and / or `cu_seqlens_k`)")
        if exists(cu_q) and exists(cu_k) and not torch.equal(torch.as_tensor(cu_q).cpu(), torch.as_tensor(cu_k).cpu()):
            raise ValueError("packed self attention needs cu_seqlens_q == cu_seqlens_k (each document attends to itself)")
        if exists(cu_seqlens):
            raise ValueError("give either cu_seqlens or flash_pack_seq_kwargs, not both")
        cu_seqlens = cu_q if exists(cu_q) else cu_k
    given = [name for name, value in (("seq_lens", seq_lens), ("cu_seqlens", cu_seqlens), ("pos", pos)) if exists(value)]
    if len(given) > 1:
        raise ValueError(f"describe a packed batch one way only, got {given}")
    if not given:
        return None
    if exists(seq_lens):
        rows = _seq_lens_rows(seq_lens, batch)
    elif exists(cu_seqlens):
        cu = torch.as_tensor(cu_seqlens)
        if cu.ndim != 1 or cu.numel() < 2 or cu.is_floating_point():
            raise ValueError(f"cu_seqlens must be integer offsets (N + 1,), got shape {tuple(cu.shape)}")
        if batch != 1:
            raise ValueError(f"cu_seqlens packs documents into one row (batch 1), the batch has {batch}; use seq_lens")
        cu = cu.tolist()
        if cu[0] != 0 or cu[-1] != seq_len or any(b < a for a, b in zip(cu[:-1], cu[1:])):
            raise ValueError(f"cu_seqlens must rise from 0 to the sequence length {seq_len}, got {cu}")
        rows = [[b - a for a, b in zip(cu[:-1], cu[1:])]]
    else:
        rows = _pos_rows(pos, batch, seq_len)
    return _from_row_lengths(rows, batch, seq_len, device)
