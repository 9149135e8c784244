"""Flash attention in Triton: softmax attention computed block by block with an online softmax, never a (T, T) matrix.

Logits are s_ij = scale * q_i . k_j + c_i - c_j, where c is the cumulative sum of the log forget gate g within each
document (the Forgetting Transformer; c = 0 without a gate), for keys j <= i of the same document (causal) or all
keys of the document (non-causal). Packed documents (`cu_seqlens`) are walked block by block inside their own bounds,
so they never see each other and cost no work for the pairs across documents.

  forward:  per query block, the key blocks fully below the diagonal without masks, then the diagonal ones masked;
            stores o and the row log-sum-exp (base 2, fp32).
  backward: delta_i = do_i . o_i; per key block (and every query head sharing its kv head) dk, dv and the column
            sums of ds (the gate gradient of its keys); per query block dq and the row sums of ds, which it adds:
            dc_t = sum_j ds_tj - sum_i ds_it. The row sums vanish in exact arithmetic, but not with delta taken from
            the rounded output (a bf16 o is off by 2**-9 in every row), and dg, the reverse cumsum of dc over the
            document, would add those per-row errors up over thousands of rows; with both sums every ds enters dg
            once with each sign, and the errors stay near their rows.

The gate enters as the bias c_i - c_j only, but c itself grows without bound along a document (-1e4 after 1000 steps
of -10): rounded to fp32 it would carry an error of ulp(c) / 2 ~ 5e-4 into every bias, 10x the fp32 tolerance. So c
(times log2(e)) is summed in fp64 and passed as two fp32 parts, hi + lo; the kernels subtract the hi parts first,
which rounds once relative to the difference itself (not to |c|), then the small lo parts.

All softmax arithmetic is fp32 in base 2 (exp2 with log2(e) folded into the scale and into c); products take the
inputs' dtype with fp32 accumulation (fp32 inputs exact "ieee" products, not TF32). Offsets inside one document are
int32 (T * H * max(K, V) < 2**31 per document), document starts int64. Query head h reads kv head h // (H // HK), as
flash-attn and SDPA's enable_gqa do.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from x_transformers.ops.attention.gate_cumsum import forget_cumsum, forget_cumsum_backward
from x_transformers.ops.common.bounds import chunk_bounds
from x_transformers.ops.common.chunk_index import prepare_chunk_indices
from x_transformers.ops.common.tiles import load_tile, store_tile
from x_transformers.ops.common.utils import interpreting, min_dot_tile

# log2(e), for the kernels (a constexpr) and for the host
LOG2E = tl.constexpr(math.log2(math.e))

# Block sizes (query rows x key rows) and launch options; module constants so that bench_ops.py --set can try others.
# The forward and dq kernels walk key blocks of BN under a query block of BM (BM a multiple of BN), the dk / dv kernel
# query blocks of BM under a key block of BN (BN a multiple of BM). For half inputs at D = 128 these compile for
# sm_90 without register spills in their loops (up to 255 registers per thread in the gated forward and dk / dv
# kernels, the latter with 8 bytes of stack written before its walk and read after it; the Hopper compile test in
# tests/ops/test_attention_kernel.py prints them); not yet tuned on a GPU.
FWD_BM, FWD_BN, FWD_WARPS, FWD_STAGES = 128, 64, 8, 3
DKDV_BM, DKDV_BN, DKDV_WARPS, DKDV_STAGES = 64, 64, 8, 2
DQ_BM, DQ_BN, DQ_WARPS, DQ_STAGES = 64, 64, 8, 2
# widest head dim the kernels take: wider tiles spill their registers
MAX_HEAD_DIM = 128


@triton.jit
def _grid_block(NBH, H, BM: tl.constexpr, T, cu_seqlens, chunk_indices, IS_VARLEN: tl.constexpr, REVERSE: tl.constexpr):
    """(batch-head, head, block within its document, first token of the document, document length) of this program.
    The 1-D grid runs every head of one block before the next block; REVERSE starts with the last blocks, which under
    a causal mask carry the most work, so that the short ones fill in at the end."""
    pid = tl.program_id(0)
    i_bh = pid % NBH
    i_t = pid // NBH
    if REVERSE:
        i_t = tl.num_programs(0) // NBH - 1 - i_t
    i_t, _, bos, T = chunk_bounds(i_t, i_bh // H, T, cu_seqlens, chunk_indices, BM, IS_VARLEN)
    return i_bh, i_bh % H, i_t, bos, T


@triton.jit
def _gate_diff(b_hr, b_lr, ch, cl, o_c, m_c, H: tl.constexpr):
    """[rows, cols] tile of c_row - c_col (base 2) for rows given as (hi, lo) vectors and the columns at positions o_c:
    hi minus hi first (exact where the bias matters), then the lo parts. Swapping rows and columns gives exactly the
    negated tile, so the forward and both backward kernels see bit-identical biases."""
    b_hc = tl.load(ch + o_c * H, mask=m_c, other=0)
    b_lc = tl.load(cl + o_c * H, mask=m_c, other=0)
    return (b_hr[:, None] - b_hc[None, :]) + (b_lr[:, None] - b_lc[None, :])


@triton.jit
def _fwd_step(
    b_q, b_chi, b_clo, k, v, ch, cl, j0, o_m, T, b_m, b_l, b_acc, qk_scale,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, USE_G: tl.constexpr, PREC: tl.constexpr,
):
    """One key block of the online softmax: the running row max b_m, row sum b_l and output b_acc, updated."""
    o_n = j0 + tl.arange(0, BN)
    m_n = o_n < T
    o_d = tl.arange(0, BD)
    b_kt = load_tile(k, o_d, o_d < K, 1, o_n, m_n, HK * K)
    b_s = tl.dot(b_q, b_kt, input_precision=PREC) * qk_scale
    if USE_G:
        b_s += _gate_diff(b_chi, b_clo, ch, cl, o_n, m_n, H)
    if MASK:
        keep = m_n[None, :]
        if CAUSAL:
            keep = keep & (o_m[:, None] >= o_n[None, :])
        b_s = tl.where(keep, b_s, float("-inf"))
    # every row sees key 0 in the first block it walks, so the running max is finite from then on
    b_mn = tl.maximum(b_m, tl.max(b_s, 1))
    b_p = tl.exp2(b_s - b_mn[:, None])
    b_alpha = tl.exp2(b_m - b_mn)
    b_v = load_tile(v, o_n, m_n, HK * V, o_d, o_d < V, 1)
    b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PREC)
    return b_mn, b_l * b_alpha + tl.sum(b_p, 1), b_acc


@triton.jit
def attn_fwd_kernel(
    q, k, v, ch, cl, o, lse, cu_seqlens, chunk_indices, qk_scale, T, NBH,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BD: tl.constexpr, CAUSAL: tl.constexpr, USE_G: tl.constexpr, PREC: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """grid (query blocks * B * H,). o and lse (base 2) of one query block of one head."""
    i_bh, i_h, i_t, bos, T = _grid_block(NBH, H, BM, T, cu_seqlens, chunk_indices, IS_VARLEN, CAUSAL)
    i_hk = i_h // (H // HK)
    i0 = i_t * BM
    o_m = i0 + tl.arange(0, BM)
    m_m = o_m < T
    o_d = tl.arange(0, BD)
    q += (bos * H + i_h) * K
    k += (bos * HK + i_hk) * K
    v += (bos * HK + i_hk) * V
    b_q = load_tile(q, o_m, m_m, H * K, o_d, o_d < K, 1)
    b_chi = tl.zeros([BM], dtype=tl.float32)
    b_clo = tl.zeros([BM], dtype=tl.float32)
    if USE_G:
        ch += bos * H + i_h
        cl += bos * H + i_h
        b_chi = tl.load(ch + o_m * H, mask=m_m, other=0)
        b_clo = tl.load(cl + o_m * H, mask=m_m, other=0)

    b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, BD], dtype=tl.float32)
    # key blocks every row of the block sees in full, then those that need the causal / length mask
    if CAUSAL:
        full, end = i0, tl.minimum(i0 + BM, T)
    else:
        full, end = (T // BN) * BN, T
    for j0 in range(0, full, BN):
        b_m, b_l, b_acc = _fwd_step(b_q, b_chi, b_clo, k, v, ch, cl, j0, o_m, T, b_m, b_l, b_acc, qk_scale,
                                    H, HK, K, V, BN, BD, False, CAUSAL, USE_G, PREC)
    for j0 in range(full, end, BN):
        b_m, b_l, b_acc = _fwd_step(b_q, b_chi, b_clo, k, v, ch, cl, j0, o_m, T, b_m, b_l, b_acc, qk_scale,
                                    H, HK, K, V, BN, BD, True, CAUSAL, USE_G, PREC)

    store_tile(o + (bos * H + i_h) * V, b_acc / b_l[:, None], o_m, m_m, H * V, o_d, o_d < V, 1)
    tl.store(lse + bos * H + i_h + o_m * H, b_m + tl.log2(b_l), mask=m_m)


@triton.jit
def attn_bwd_delta_kernel(o, do, delta, R, V: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    """grid (cdiv(R, BR),) over the R = B * T * H rows of o: delta = rowsum(o * do) in fp32."""
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    m_r = o_r < R
    o_d = tl.arange(0, BD)
    b_o = load_tile(o, o_r, m_r, V, o_d, o_d < V, 1).to(tl.float32)
    b_do = load_tile(do, o_r, m_r, V, o_d, o_d < V, 1).to(tl.float32)
    tl.store(delta + o_r, tl.sum(b_o * b_do, 1), mask=m_r)


@triton.jit
def _dkdv_step(
    b_k, b_v, b_chj, b_clj, q, do, ch, cl, lse, delta, i0, o_n, T, b_dk, b_dv, b_dc, qk_scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
    MASK: tl.constexpr, USE_G: tl.constexpr, PREC: tl.constexpr,
):
    """One query block against the key block, in the key-major orientation (rows = keys)."""
    o_m = i0 + tl.arange(0, BM)
    m_m = o_m < T
    o_d = tl.arange(0, BD)
    b_q = load_tile(q, o_m, m_m, H * K, o_d, o_d < K, 1)
    b_do = load_tile(do, o_m, m_m, H * V, o_d, o_d < V, 1)
    # rows past the end get lse = inf: their p is 0 whatever their logits
    b_lse = tl.load(lse + o_m * H, mask=m_m, other=float("inf"))
    b_delta = tl.load(delta + o_m * H, mask=m_m, other=0)
    b_st = tl.dot(b_k, tl.trans(b_q), input_precision=PREC) * qk_scale
    if USE_G:
        b_st -= _gate_diff(b_chj, b_clj, ch, cl, o_m, m_m, H)
    if MASK:
        # masked before the exponential: future pairs' exponents can overflow under strong gates
        b_st = tl.where(o_m[None, :] >= o_n[:, None], b_st, float("-inf"))
    b_pt = tl.exp2(b_st - b_lse[None, :])
    b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PREC)
    b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PREC)
    b_dst = b_pt * (b_dpt - b_delta[None, :])
    b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=PREC)
    if USE_G:
        b_dc -= tl.sum(b_dst, 1)
    return b_dk, b_dv, b_dc


@triton.jit
def attn_bwd_dkdv_kernel(
    q, k, v, ch, cl, lse, delta, do, dk, dv, dc, cu_seqlens, chunk_indices, scale, qk_scale, T, NBH,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BD: tl.constexpr, CAUSAL: tl.constexpr, USE_G: tl.constexpr, PREC: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """grid (key blocks * B * HK,). dk, dv of one key block of one kv head, summed over the query heads that share
    it, and dc = -(column sums of ds) (one row per query head) of its keys. Causal grids run in order: the first key
    blocks carry the most work."""
    i_bhk, i_hk, i_t, bos, T = _grid_block(NBH, HK, BN, T, cu_seqlens, chunk_indices, IS_VARLEN, False)
    j0 = i_t * BN
    o_n = j0 + tl.arange(0, BN)
    m_n = o_n < T
    o_d = tl.arange(0, BD)
    b_k = load_tile(k + (bos * HK + i_hk) * K, o_n, m_n, HK * K, o_d, o_d < K, 1)
    b_v = load_tile(v + (bos * HK + i_hk) * V, o_n, m_n, HK * V, o_d, o_d < V, 1)
    b_dk = tl.zeros([BN, BD], dtype=tl.float32)
    b_dv = tl.zeros([BN, BD], dtype=tl.float32)
    # query blocks on the diagonal (masked), then those below it, which see all of this key block
    if CAUSAL:
        start, full = j0, tl.minimum(j0 + BN, T)
    else:
        start, full = 0, 0
    for i_g in range(H // HK):
        i_h = i_hk * (H // HK) + i_g
        row = bos * H + i_h
        p_ch, p_cl = ch, cl
        b_chj = tl.zeros([BN], dtype=tl.float32)
        b_clj = tl.zeros([BN], dtype=tl.float32)
        if USE_G:
            p_ch, p_cl = ch + row, cl + row
            b_chj = tl.load(p_ch + o_n * H, mask=m_n, other=0)
            b_clj = tl.load(p_cl + o_n * H, mask=m_n, other=0)
        b_dc = tl.zeros([BN], dtype=tl.float32)
        for i0 in range(start, full, BM):
            b_dk, b_dv, b_dc = _dkdv_step(b_k, b_v, b_chj, b_clj, q + row * K, do + row * V, p_ch, p_cl, lse + row,
                                          delta + row, i0, o_n, T, b_dk, b_dv, b_dc, qk_scale, H, K, V, BM, BD, True,
                                          USE_G, PREC)
        for i0 in range(full, T, BM):
            b_dk, b_dv, b_dc = _dkdv_step(b_k, b_v, b_chj, b_clj, q + row * K, do + row * V, p_ch, p_cl, lse + row,
                                          delta + row, i0, o_n, T, b_dk, b_dv, b_dc, qk_scale, H, K, V, BM, BD, False,
                                          USE_G, PREC)
        if USE_G:
            tl.store(dc + row + o_n * H, b_dc, mask=m_n)
    store_tile(dk + (bos * HK + i_hk) * K, b_dk * scale, o_n, m_n, HK * K, o_d, o_d < K, 1)
    store_tile(dv + (bos * HK + i_hk) * V, b_dv, o_n, m_n, HK * V, o_d, o_d < V, 1)


@triton.jit
def _dq_step(
    b_q, b_do, b_chi, b_clo, b_lse, b_delta, k, v, ch, cl, j0, o_m, T, b_dq, b_dc, qk_scale,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, USE_G: tl.constexpr, PREC: tl.constexpr,
):
    o_n = j0 + tl.arange(0, BN)
    m_n = o_n < T
    o_d = tl.arange(0, BD)
    b_k = load_tile(k, o_n, m_n, HK * K, o_d, o_d < K, 1)
    b_vt = load_tile(v, o_d, o_d < V, 1, o_n, m_n, HK * V)
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * qk_scale
    if USE_G:
        b_s += _gate_diff(b_chi, b_clo, ch, cl, o_n, m_n, H)
    if MASK:
        keep = m_n[None, :]
        if CAUSAL:
            keep = keep & (o_m[:, None] >= o_n[None, :])
        b_s = tl.where(keep, b_s, float("-inf"))
    b_p = tl.exp2(b_s - b_lse[:, None])
    b_ds = b_p * (tl.dot(b_do, b_vt, input_precision=PREC) - b_delta[:, None])
    if USE_G:
        b_dc += tl.sum(b_ds, 1)
    return b_dq + tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PREC), b_dc


@triton.jit
def attn_bwd_dq_kernel(
    q, k, v, ch, cl, lse, delta, do, dq, dc, cu_seqlens, chunk_indices, scale, qk_scale, T, NBH,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BD: tl.constexpr, CAUSAL: tl.constexpr, USE_G: tl.constexpr, PREC: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """grid (query blocks * B * H,). dq of one query block of one head, walking key blocks as the forward does; adds
    the row sums of ds to the dc that the dk / dv kernel left."""
    i_bh, i_h, i_t, bos, T = _grid_block(NBH, H, BM, T, cu_seqlens, chunk_indices, IS_VARLEN, CAUSAL)
    i_hk = i_h // (H // HK)
    i0 = i_t * BM
    o_m = i0 + tl.arange(0, BM)
    m_m = o_m < T
    o_d = tl.arange(0, BD)
    row = bos * H + i_h
    b_q = load_tile(q + row * K, o_m, m_m, H * K, o_d, o_d < K, 1)
    b_do = load_tile(do + row * V, o_m, m_m, H * V, o_d, o_d < V, 1)
    b_lse = tl.load(lse + row + o_m * H, mask=m_m, other=float("inf"))
    b_delta = tl.load(delta + row + o_m * H, mask=m_m, other=0)
    b_chi = tl.zeros([BM], dtype=tl.float32)
    b_clo = tl.zeros([BM], dtype=tl.float32)
    if USE_G:
        ch += row
        cl += row
        b_chi = tl.load(ch + o_m * H, mask=m_m, other=0)
        b_clo = tl.load(cl + o_m * H, mask=m_m, other=0)
    k += (bos * HK + i_hk) * K
    v += (bos * HK + i_hk) * V
    b_dq = tl.zeros([BM, BD], dtype=tl.float32)
    b_dc = tl.zeros([BM], dtype=tl.float32)
    if CAUSAL:
        full, end = i0, tl.minimum(i0 + BM, T)
    else:
        full, end = (T // BN) * BN, T
    for j0 in range(0, full, BN):
        b_dq, b_dc = _dq_step(b_q, b_do, b_chi, b_clo, b_lse, b_delta, k, v, ch, cl, j0, o_m, T, b_dq, b_dc,
                              qk_scale, H, HK, K, V, BN, BD, False, CAUSAL, USE_G, PREC)
    for j0 in range(full, end, BN):
        b_dq, b_dc = _dq_step(b_q, b_do, b_chi, b_clo, b_lse, b_delta, k, v, ch, cl, j0, o_m, T, b_dq, b_dc,
                              qk_scale, H, HK, K, V, BN, BD, True, CAUSAL, USE_G, PREC)
    store_tile(dq + row * K, b_dq * scale, o_m, m_m, H * K, o_d, o_d < K, 1)
    if USE_G:
        p_dc = dc + row + o_m * H
        tl.store(p_dc, tl.load(p_dc, mask=m_m, other=0) + b_dc, mask=m_m)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs keep exact fp32 products; half inputs use the tensor cores anyway
    return "ieee" if dtype == torch.float32 else "tf32"


def _grid_blocks(cu_seqlens, B, T, size):
    """(chunk_indices, blocks per head) of a grid walking blocks of `size` tokens (packed: every document's)."""
    if cu_seqlens is None:
        return None, triton.cdiv(T, size)
    chunk_indices = prepare_chunk_indices(cu_seqlens, size)
    return chunk_indices, len(chunk_indices)


def _tiles(dtype, *sizes):
    """Block sizes for inputs of `dtype`: halved for fp32, whose exact products run on the FMA units and spill their
    registers at the half-precision blocks (10 - 15 KB per thread on sm_90 at D = 128), never narrower than the dot
    minimum (see min_dot_tile)."""
    shrink = 2 if dtype == torch.float32 else 1
    return [max(s // shrink, min_dot_tile(dtype)) for s in sizes]


def head_tile(K: int, V: int, dtype: torch.dtype) -> int:
    """One tile width for both head dims: a value tile narrower than the key tile miscompiles for half inputs on
    Hopper (see narrow_value_tiles), and K = V is the common case anyway."""
    return max(triton.next_power_of_2(max(K, V)), min_dot_tile(dtype))


def flash_attn_fwd(q, k, v, c, scale, causal, cu_seqlens):
    B, T, H, K = q.shape
    HK, V = k.shape[2], v.shape[-1]
    BM, BN = _tiles(q.dtype, FWD_BM, FWD_BN)
    chunk_indices, NB = _grid_blocks(cu_seqlens, B, T, BM)
    o = torch.empty(B, T, H, V, dtype=v.dtype, device=q.device)
    lse = torch.empty(B, T, H, dtype=torch.float32, device=q.device)
    ch, cl = (None, None) if c is None else c.unbind()
    attn_fwd_kernel[(NB * B * H,)](
        q, k, v, ch, cl, o, lse, cu_seqlens, chunk_indices, scale * LOG2E.value, T, B * H,
        H=H, HK=HK, K=K, V=V, BM=BM, BN=BN, BD=head_tile(K, V, q.dtype), CAUSAL=causal, USE_G=c is not None,
        PREC=_precision(q.dtype), IS_VARLEN=cu_seqlens is not None, num_warps=FWD_WARPS, num_stages=FWD_STAGES,
    )
    return o, lse


def flash_attn_bwd(q, k, v, c, o, lse, do, scale, causal, cu_seqlens):
    B, T, H, K = q.shape
    HK, V = k.shape[2], v.shape[-1]
    BD = head_tile(K, V, q.dtype)
    common = dict(H=H, HK=HK, K=K, V=V, BD=BD, CAUSAL=causal, USE_G=c is not None, PREC=_precision(q.dtype),
                  IS_VARLEN=cu_seqlens is not None)
    ch, cl = (None, None) if c is None else c.unbind()

    delta = torch.empty(B, T, H, dtype=torch.float32, device=q.device)
    R = B * T * H
    BR = 64 if not interpreting() else 256
    attn_bwd_delta_kernel[(triton.cdiv(R, BR),)](o, do, delta, R, V=V, BR=BR, BD=triton.next_power_of_2(V))

    dk, dv = torch.empty_like(k), torch.empty_like(v)
    # the dk / dv kernel stores minus the column sums of ds, the dq kernel adds the row sums
    dc = torch.empty(B, T, H, dtype=torch.float32, device=q.device) if c is not None else None
    BM, BN = _tiles(q.dtype, DKDV_BM, DKDV_BN)
    chunk_indices, NB = _grid_blocks(cu_seqlens, B, T, BN)
    attn_bwd_dkdv_kernel[(NB * B * HK,)](
        q, k, v, ch, cl, lse, delta, do, dk, dv, dc, cu_seqlens, chunk_indices, scale, scale * LOG2E.value, T, B * HK,
        BM=BM, BN=BN, **common, num_warps=DKDV_WARPS, num_stages=DKDV_STAGES,
    )

    dq = torch.empty_like(q)
    BM, BN = _tiles(q.dtype, DQ_BM, DQ_BN)
    chunk_indices, NB = _grid_blocks(cu_seqlens, B, T, BM)
    attn_bwd_dq_kernel[(NB * B * H,)](
        q, k, v, ch, cl, lse, delta, do, dq, dc, cu_seqlens, chunk_indices, scale, scale * LOG2E.value, T, B * H,
        BM=BM, BN=BN, **common, num_warps=DQ_WARPS, num_stages=DQ_STAGES,
    )
    return dq, dk, dv, dc


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, scale, causal, cu_seqlens):
        c = forget_cumsum(g, cu_seqlens) if g is not None else None
        o, lse = flash_attn_fwd(q, k, v, c, scale, causal, cu_seqlens)
        ctx.save_for_backward(q, k, v, c, o, lse, cu_seqlens)
        ctx.scale, ctx.causal = scale, causal
        ctx.g_dtype = g.dtype if g is not None else None
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, c, o, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv, dc = flash_attn_bwd(q, k, v, c, o, lse, do.contiguous(), ctx.scale, ctx.causal, cu_seqlens)
        # c = cumsum(g) within documents, so dg is the reverse cumsum of dc within them
        dg = forget_cumsum_backward(dc, cu_seqlens, ctx.g_dtype) if ctx.needs_input_grad[3] else None
        return dq, dk, dv, dg, None, None, None


def flash_attention_triton(q, k, v, g, scale, causal, cu_seqlens):
    """`flash_attention` on the Triton kernels, for inputs it has checked (T > 0, scale set)."""
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int64).contiguous()
    return FlashAttentionFunction.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous() if g is not None else None,
        scale, causal, cu_seqlens,
    )
