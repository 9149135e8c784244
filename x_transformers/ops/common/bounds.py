"""Inside the kernels: where one sequence starts and how long it is, from `cu_seqlens` for packed batches or from the
row of a `[B, T]` batch otherwise (Triton helpers, inlined into every kernel that calls them)."""

import triton
import triton.language as tl


@triton.jit
def seq_bounds(i_n, T, cu_seqlens, IS_VARLEN: tl.constexpr):
    """(first token as int64, length) of sequence i_n."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        T = (tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos).to(tl.int32)
    else:
        bos = i_n.to(tl.int64) * T
    return bos, T


@triton.jit
def seq_chunk_bounds(i_n, T, cu_seqlens, chunk_offsets, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(first token, length, number of BT-chunks, index of its first chunk among all chunks) of sequence i_n."""
    bos, T = seq_bounds(i_n, T, cu_seqlens, IS_VARLEN)
    NT = tl.cdiv(T, BT)
    if IS_VARLEN:
        boh = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        boh = i_n.to(tl.int64) * NT
    return bos, T, NT, boh


@triton.jit
def chunk_bounds(i_t, i_b, T, cu_seqlens, chunk_indices, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """For grid chunk i_t of batch row i_b: (chunk within its sequence, index among all chunks as int64, first token
    of its sequence, sequence length). Packed batches look the chunk up in `chunk_indices` rows of (sequence, chunk
    within it), and there the grid already enumerates all chunks."""
    i_tg = i_t.to(tl.int64)
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_t * 2).to(tl.int32)
        i_t = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int32)
        bos, T = seq_bounds(i_n, T, cu_seqlens, IS_VARLEN)
    else:
        bos = i_b.to(tl.int64) * T
        i_tg = i_b.to(tl.int64) * tl.cdiv(T, BT) + i_t
    return i_t, i_tg, bos, T
