"""Masked 2-D tile loads and stores for the chunked kernels (Triton helpers, inlined into every kernel that calls
them).

A tile is rows `o_r` and columns `o_c` of a matrix at pointer `p` with strides `s_r`, `s_c`; entries whose row or
column mask is off read as zero and are not written. Callers point `p` at the first row of their chunk with an int64
offset, so the offsets here stay small and int32 however long the sequence. Passing the strides the other way round
loads the transposed tile directly (as the tensor-core products want it), without a transpose in registers."""

import triton
import triton.language as tl


@triton.jit
def load_tile(p, o_r, m_r, s_r, o_c, m_c, s_c):
    """[len(o_r), len(o_c)] tile of the matrix at p, zero outside the masks, in the matrix's dtype."""
    return tl.load(p + o_r[:, None] * s_r + o_c[None, :] * s_c, mask=m_r[:, None] & m_c[None, :], other=0)


@triton.jit
def store_tile(p, b, o_r, m_r, s_r, o_c, m_c, s_c):
    """Write tile b, cast to the matrix's dtype, where both masks are on."""
    tl.store(p + o_r[:, None] * s_r + o_c[None, :] * s_c, b.to(p.dtype.element_ty), mask=m_r[:, None] & m_c[None, :])
