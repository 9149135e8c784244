"""Elementwise gated scan `h_t = exp(g_t) * h_{t-1} + x_t` (HGRN, minGRU) in Triton.

Each program owns a slice of channels of one sequence and walks it in blocks of BT tokens; inside a block the
recurrence is a parallel `tl.associative_scan` over pairs (log gate, value), combined in log space so a decay factor is
only ever `exp` of a sum of gates (never of a negated one). The carry from the previous block enters as
`exp(cumulative gate) * carry`. The backward pass is the same scan run from the end with the gates shifted by one:
`dh_t = do_t + exp(g_{t+1}) dh_{t+1}`, then `dx_t = dh_t` and `dg_t = dh_t * exp(g_t) * h_{t-1}`.

Long sequences with few channels leave that one-program-per-sequence walk with too few programs; they go
chunk-parallel instead: every chunk's summary (summed gate, zero-carry scan at its end), the same walk over the
summaries (the state at every chunk boundary), then every chunk rescanned from its incoming state.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from x_transformers.ops.common.bounds import seq_bounds
from x_transformers.ops.common.chunk_index import prepare_chunk_indices, prepare_chunk_offsets
from x_transformers.ops.common.utils import num_seqs, pow2_block

BT = 64


# masks that include a scalar condition are `tl.where(cond, m_d, False)`: `m_d & cond` gives an int32 mask in Triton
# 3.9's interpreter, which it refuses


@triton.jit
def _combine(a1, b1, a2, b2):
    # (a1, b1) then (a2, b2): gates add in log space, the earlier value decays by the later gate
    return a1 + a2, b1 * tl.exp(a2) + b2


@triton.jit
def hgrn_fwd_kernel(
    x, g, h, h0, ht, cu_seqlens, T,
    D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """grid (cdiv(D, BD), N). x, g, h: [B, T, D]; h0 / ht: [N, D] fp32."""
    i_d, i_n = tl.program_id(0), tl.program_id(1)
    bos, T = seq_bounds(i_n, T, cu_seqlens, IS_VARLEN)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    o_r = tl.arange(0, BT)

    b_h = tl.zeros([BD], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + i_n.to(tl.int64) * D + o_d, mask=m_d, other=0).to(tl.float32)
    for i_t in range(tl.cdiv(T, BT)):
        o_t = i_t * BT + o_r
        m = (o_t < T)[:, None] & m_d[None, :]
        offs = (bos + o_t)[:, None] * D + o_d[None, :]
        b_x = tl.load(x + offs, mask=m, other=0).to(tl.float32)
        b_g = tl.load(g + offs, mask=m, other=0).to(tl.float32)
        # padded rows have gate 0 and value 0, so the carry passes through them unchanged
        b_a, b_y = tl.associative_scan((b_g, b_x), axis=0, combine_fn=_combine)
        b_y += tl.exp(b_a) * b_h[None, :]
        tl.store(h + offs, b_y.to(h.dtype.element_ty), mask=m)
        b_h = tl.sum(tl.where((o_r == BT - 1)[:, None], b_y, 0), axis=0)

    if STORE_FINAL_STATE:
        tl.store(ht + i_n.to(tl.int64) * D + o_d, b_h, mask=m_d)


@triton.jit
def hgrn_bwd_kernel(
    g, h, h0, do, dht, dx, dg, dh0, cu_seqlens, T,
    D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, USE_FINAL_STATE_GRADIENT: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """grid (cdiv(D, BD), N). Blocks are visited from the end and read back to front (row r = token T-1-r-...),
    so the reverse recurrence is again a forward associative scan."""
    i_d, i_n = tl.program_id(0), tl.program_id(1)
    bos, T = seq_bounds(i_n, T, cu_seqlens, IS_VARLEN)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    o_r = tl.arange(0, BT)

    b_dh = tl.zeros([BD], dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        b_dh += tl.load(dht + i_n.to(tl.int64) * D + o_d, mask=m_d, other=0).to(tl.float32)
    b_h0 = tl.zeros([BD], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h0 += tl.load(h0 + i_n.to(tl.int64) * D + o_d, mask=m_d, other=0).to(tl.float32)

    for i_t in range(tl.cdiv(T, BT)):
        o_t = T - 1 - (i_t * BT + o_r)
        m_t = o_t >= 0
        m = m_t[:, None] & m_d[None, :]
        offs = (bos + o_t)[:, None] * D + o_d[None, :]
        b_do = tl.load(do + offs, mask=m, other=0).to(tl.float32)
        # the gate that carries dh_{t+1} back to t; zero past the end, where the carry is dht itself
        m_next = (o_t + 1 < T)[:, None] & m
        b_gn = tl.load(g + offs + D, mask=m_next, other=0).to(tl.float32)
        b_a, b_y = tl.associative_scan((b_gn, b_do), axis=0, combine_fn=_combine)
        b_y += tl.exp(b_a) * b_dh[None, :]
        tl.store(dx + offs, b_y.to(dx.dtype.element_ty), mask=m)

        b_g = tl.load(g + offs, mask=m, other=0).to(tl.float32)
        m_prev = (o_t > 0)[:, None] & m
        b_hp = tl.load(h + offs - D, mask=m_prev, other=0).to(tl.float32)
        b_hp = tl.where((o_t == 0)[:, None], b_h0[None, :], b_hp)
        tl.store(dg + offs, (b_y * tl.exp(b_g) * b_hp).to(dg.dtype.element_ty), mask=m)
        b_dh = tl.sum(tl.where((o_r == BT - 1)[:, None], b_y, 0), axis=0)

    if USE_INITIAL_STATE:
        b_g0 = tl.load(g + bos * D + o_d, mask=tl.where(T > 0, m_d, False), other=0).to(tl.float32)
        tl.store(dh0 + i_n.to(tl.int64) * D + o_d, b_dh * tl.exp(b_g0), mask=m_d)


@triton.jit
def _chunk_of(i_t, i_b, T, cu_seqlens, chunk_indices, chunk_offsets, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    # -> (sequence, chunk within it, first token, sequence length, its chunk count, its first chunk)
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_t * 2).to(tl.int64)
        i_t = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int32)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        T = (tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos).to(tl.int32)
        boc = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        i_n = i_b.to(tl.int64)
        bos = i_n * T
        boc = i_n * tl.cdiv(T, BT)
    return i_n, i_t, bos, T, tl.cdiv(T, BT), boc


@triton.jit
def hgrn_chunk_fwd_kernel(
    x, g, h, h0, sa, sy, states, cu_seqlens, chunk_indices, chunk_offsets, T,
    D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    OUTPUT: tl.constexpr, USE_INITIAL_STATE: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """grid (cdiv(D, BD), NT, B): one chunk per program, for long sequences with few channels. Pass 1
    (OUTPUT=False) writes each chunk's summary: its summed gate `sa` and its zero-carry scan at the end `sy`
    ([NT_total, D] fp32). A scan over the summaries gives `states` (the state after every chunk); pass 2
    (OUTPUT=True) rescans each chunk from the state before it and writes h."""
    i_d, i_t, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_t, bos, T, NT, boc = _chunk_of(i_t, i_b, T, cu_seqlens, chunk_indices, chunk_offsets, BT, IS_VARLEN)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    o_r = tl.arange(0, BT)
    o_t = i_t * BT + o_r
    m = (o_t < T)[:, None] & m_d[None, :]
    offs = (bos + o_t)[:, None] * D + o_d[None, :]
    b_x = tl.load(x + offs, mask=m, other=0).to(tl.float32)
    b_g = tl.load(g + offs, mask=m, other=0).to(tl.float32)
    b_a, b_y = tl.associative_scan((b_g, b_x), axis=0, combine_fn=_combine)
    if OUTPUT:
        b_c = tl.load(states + (boc + i_t - 1) * D + o_d, mask=tl.where(i_t > 0, m_d, False), other=0)
        if USE_INITIAL_STATE:
            b_c += tl.load(h0 + i_n * D + o_d, mask=tl.where(i_t == 0, m_d, False), other=0).to(tl.float32)
        b_y += tl.exp(b_a) * b_c[None, :]
        tl.store(h + offs, b_y.to(h.dtype.element_ty), mask=m)
    else:
        m_end = (o_r == BT - 1)[:, None]
        tl.store(sa + (boc + i_t) * D + o_d, tl.sum(tl.where(m_end, b_a, 0), axis=0), mask=m_d)
        tl.store(sy + (boc + i_t) * D + o_d, tl.sum(tl.where(m_end, b_y, 0), axis=0), mask=m_d)


@triton.jit
def hgrn_chunk_bwd_kernel(
    g, h, h0, do, dht, dx, dg, dh0, sa, sy, states, cu_seqlens, chunk_indices, chunk_offsets, T,
    D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, OUTPUT: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, USE_FINAL_STATE_GRADIENT: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """grid (cdiv(D, BD), NT, B): the backward of `hgrn_chunk_fwd_kernel`, each chunk read back to front.
    `states` holds the state gradient at the first token of every chunk (from a reverse scan over summaries)."""
    i_d, i_t, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_t, bos, T, NT, boc = _chunk_of(i_t, i_b, T, cu_seqlens, chunk_indices, chunk_offsets, BT, IS_VARLEN)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    o_r = tl.arange(0, BT)
    # row r holds token i_t * BT + BT - 1 - r; rows past the sequence end come first and carry nothing
    o_t = i_t * BT + BT - 1 - o_r
    m_t = o_t < T
    m = m_t[:, None] & m_d[None, :]
    offs = (bos + o_t)[:, None] * D + o_d[None, :]
    b_do = tl.load(do + offs, mask=m, other=0).to(tl.float32)
    b_gn = tl.load(g + offs + D, mask=(o_t + 1 < T)[:, None] & m, other=0).to(tl.float32)
    b_a, b_y = tl.associative_scan((b_gn, b_do), axis=0, combine_fn=_combine)
    m_first = (o_r == BT - 1)[:, None]
    if OUTPUT:
        b_c = tl.load(states + (boc + i_t + 1) * D + o_d, mask=tl.where(i_t + 1 < NT, m_d, False), other=0)
        if USE_FINAL_STATE_GRADIENT:
            b_c += tl.load(dht + i_n * D + o_d, mask=tl.where(i_t + 1 == NT, m_d, False), other=0).to(tl.float32)
        b_y += tl.exp(b_a) * b_c[None, :]
        tl.store(dx + offs, b_y.to(dx.dtype.element_ty), mask=m)
        b_g = tl.load(g + offs, mask=m, other=0).to(tl.float32)
        b_hp = tl.load(h + offs - D, mask=(o_t > 0)[:, None] & m, other=0).to(tl.float32)
        if USE_INITIAL_STATE:
            b_h0 = tl.load(h0 + i_n * D + o_d, mask=m_d, other=0).to(tl.float32)
            b_hp = tl.where((o_t == 0)[:, None], b_h0[None, :], b_hp)
            b_dh = tl.sum(tl.where(m_first, b_y * tl.exp(b_g), 0), axis=0)
            tl.store(dh0 + i_n * D + o_d, b_dh, mask=tl.where(i_t == 0, m_d, False))
        tl.store(dg + offs, (b_y * tl.exp(b_g) * b_hp).to(dg.dtype.element_ty), mask=m)
    else:
        tl.store(sa + (boc + i_t) * D + o_d, tl.sum(tl.where(m_first, b_a, 0), axis=0), mask=m_d)
        tl.store(sy + (boc + i_t) * D + o_d, tl.sum(tl.where(m_first, b_y, 0), axis=0), mask=m_d)


def _block_d(D: int, N: int) -> int:
    # fewer channels per program when there are few sequences, to keep the GPU's SMs busy
    BD = pow2_block(D, hi=32)
    while BD > 8 and N * triton.cdiv(D, BD) < 256:
        BD //= 2
    return BD


def hgrn_fwd(x, g, h0, output_final_state, cu_seqlens, chunked=None):
    B, T, D = x.shape
    N = num_seqs(B, cu_seqlens)
    h = torch.empty_like(x)
    ht = x.new_empty(N, D, dtype=torch.float32) if output_final_state else None
    BD = _block_d(D, N)
    if N == 0:
        return h, ht
    if not (_chunked(N, T, D, BD) if chunked is None else chunked):
        hgrn_fwd_kernel[(triton.cdiv(D, BD), N)](
            x, g, h, h0, ht, cu_seqlens, T, D=D, BT=BT, BD=BD,
            USE_INITIAL_STATE=h0 is not None, STORE_FINAL_STATE=output_final_state, IS_VARLEN=cu_seqlens is not None,
        )
        return h, ht
    meta = _chunk_meta(B, T, cu_seqlens)
    # chunks give the parallelism here: wider channel blocks for coalesced rows
    BD = pow2_block(D, hi=32)
    sa, sy = (x.new_empty(meta["num_chunks"], D, dtype=torch.float32) for _ in range(2))
    flags = dict(D=D, BT=BT, BD=BD, USE_INITIAL_STATE=h0 is not None, IS_VARLEN=cu_seqlens is not None)
    args = (cu_seqlens, meta["indices"], meta["offsets"], T)
    hgrn_chunk_fwd_kernel[meta["grid"](D, BD)](x, g, h, h0, sa, sy, None, *args, OUTPUT=False, **flags)
    # the state after every chunk: the same scan, one step per chunk
    states, ht = hgrn_fwd(meta["pack"](sy), meta["pack"](sa), h0, output_final_state, meta["summary_cu"], False)
    hgrn_chunk_fwd_kernel[meta["grid"](D, BD)](x, g, h, h0, None, None, states, *args, OUTPUT=True, **flags)
    return h, ht


def hgrn_bwd(g, h, h0, do, dht, cu_seqlens, chunked=None):
    B, T, D = g.shape
    N = num_seqs(B, cu_seqlens)
    dx, dg = torch.empty_like(h), torch.empty_like(g)
    dh0 = g.new_empty(N, D, dtype=torch.float32) if h0 is not None else None
    BD = _block_d(D, N)
    if N == 0:
        return dx, dg, dh0
    if not (_chunked(N, T, D, BD) if chunked is None else chunked):
        hgrn_bwd_kernel[(triton.cdiv(D, BD), N)](
            g, h, h0, do, dht, dx, dg, dh0, cu_seqlens, T, D=D, BT=BT, BD=BD,
            USE_INITIAL_STATE=h0 is not None, USE_FINAL_STATE_GRADIENT=dht is not None,
            IS_VARLEN=cu_seqlens is not None,
        )
        return dx, dg, dh0
    meta = _chunk_meta(B, T, cu_seqlens)
    BD = pow2_block(D, hi=32)
    if dh0 is not None:
        # empty sequences own no chunk: their initial-state gradient is the final-state one
        dh0.copy_(dht) if dht is not None else dh0.zero_()
    sa, sy = (g.new_empty(meta["num_chunks"], D, dtype=torch.float32) for _ in range(2))
    flags = dict(D=D, BT=BT, BD=BD, USE_INITIAL_STATE=h0 is not None, USE_FINAL_STATE_GRADIENT=dht is not None,
                 IS_VARLEN=cu_seqlens is not None)
    args = (cu_seqlens, meta["indices"], meta["offsets"], T)
    hgrn_chunk_bwd_kernel[meta["grid"](D, BD)](
        g, h, h0, do, dht, dx, dg, dh0, sa, sy, None, *args, OUTPUT=False, **flags
    )
    # gradient at the first token of every chunk: a scan over the summaries from the last chunk back, run as a
    # forward scan over the reversed summaries (sequences and their order reversed)
    rev_cu = meta["summary_cu"]
    if rev_cu is not None:
        rev_cu = (rev_cu[-1] - rev_cu.flip(0)).contiguous()
    rev_dht = dht.flip(0).contiguous() if (dht is not None and cu_seqlens is not None) else dht
    states, _ = hgrn_fwd(
        meta["pack"](sy).flip(1).contiguous(), meta["pack"](sa).flip(1).contiguous(), rev_dht, False, rev_cu, False
    )
    states = states.flip(1).contiguous()
    hgrn_chunk_bwd_kernel[meta["grid"](D, BD)](
        g, h, h0, do, dht, dx, dg, dh0, None, None, states, *args, OUTPUT=True, **flags
    )
    return dx, dg, dh0


# below this many programs (sequences x channel blocks) the one-program-per-sequence kernels leave the GPU idle, and
# long sequences go chunk-parallel instead (summaries, a short scan over them, then every chunk again)
CHUNKED_BELOW_PROGRAMS = 512
CHUNKED = None  # tests force one path or the other


def _chunked(N, T, D, BD):
    if CHUNKED is not None:
        return CHUNKED
    return N * triton.cdiv(D, BD) < CHUNKED_BELOW_PROGRAMS and T >= 8 * BT


def _chunk_meta(B, T, cu_seqlens):
    if cu_seqlens is None:
        NT = triton.cdiv(T, BT)
        return dict(
            num_chunks=B * NT, indices=None, offsets=None, summary_cu=None,
            grid=lambda D, BD: (triton.cdiv(D, BD), NT, B),
            pack=lambda s: s.view(B, NT, -1),
        )
    indices = prepare_chunk_indices(cu_seqlens, BT)
    offsets = prepare_chunk_offsets(cu_seqlens, BT)
    return dict(
        num_chunks=len(indices), indices=indices, offsets=offsets, summary_cu=offsets.long(),
        grid=lambda D, BD: (triton.cdiv(D, BD), len(indices), 1),
        pack=lambda s: s.view(1, len(indices), -1),
    )


class HGRNScanFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g, initial_state, output_final_state, cu_seqlens, chunked=None):
        h0 = initial_state.float().contiguous() if initial_state is not None else None
        h, ht = hgrn_fwd(x, g, h0, output_final_state, cu_seqlens, chunked)
        ctx.save_for_backward(g, h, h0, cu_seqlens)
        ctx.h0_dtype = initial_state.dtype if initial_state is not None else None
        ctx.chunked = chunked
        return h, ht

    @staticmethod
    def backward(ctx, do, dht):
        g, h, h0, cu_seqlens = ctx.saved_tensors
        dht = dht.float().contiguous() if dht is not None else None
        dx, dg, dh0 = hgrn_bwd(g, h, h0, do.contiguous(), dht, cu_seqlens, ctx.chunked)
        return dx, dg, dh0.to(ctx.h0_dtype) if dh0 is not None else None, None, None, None


def chunk_hgrn_triton(x, g, initial_state, output_final_state, cu_seqlens, chunked=None):
    """`chunk_hgrn` / `fused_recurrent_hgrn` on the Triton kernels, for inputs they have checked and flattened to
    [B, T, D] (T > 0). chunked: None picks the chunk-parallel passes for long sequences with few programs, False
    keeps the one-program-per-sequence walk (token by token), True forces the chunk-parallel passes."""
    return HGRNScanFunction.apply(
        x.contiguous(), g.contiguous(), initial_state, output_final_state, cu_seqlens, chunked
    )
