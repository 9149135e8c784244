"""Generalized (diagonal plus low-rank) delta rule kernels vs the float64 token-by-token reference: outputs, final
state and every gradient (q, k, v, a, b, gk, initial state).

On CPU the Triton kernels run under TRITON_INTERPRET=1 at tiny shapes (one sequence * head where the case allows: the
interpreter runs programs one after another); on a CUDA machine the same checks also run at real shapes in fp32 and
bf16 (`pytest tests/ops/test_dplr.py -x -q`).
"""

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    # must be set before triton is imported (tests/ops/conftest.py does the same)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F

from x_transformers.ops.delta_rule import chunk_delta_rule_torch
from x_transformers.ops.dplr import (
    chunk_dplr_delta_rule,
    chunk_dplr_delta_rule_torch,
    fused_recurrent_dplr_delta_rule,
    naive_dplr_delta_rule,
)

DEVICE = "cuda" if CUDA else "cpu"
NAMES = ("o", "final_state", "dq", "dk", "dv", "da", "db", "dgk", "dh0")


def make_inputs(B, T, H, K, V, *, decay=1.0, h0=True, rwkv=True, num_seqs=None, seed=0):
    """fp32 inputs. `rwkv`: a = -kappa, b = kappa * lr with kappa an L2-normalised key and lr in (0, 1) (a contractive
    transition, as RWKV-7 builds it); otherwise small unstructured a, b. gk = -decay * U(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    q, k, v = rand(B, T, H, K), rand(B, T, H, K) * K**-0.5, rand(B, T, H, V)
    if rwkv:
        kappa = F.normalize(rand(B, T, H, K), dim=-1)
        a, b = -kappa, kappa * torch.rand(B, T, H, K, generator=gen)
    else:
        a, b = rand(B, T, H, K) * 0.5 * K**-0.5, rand(B, T, H, K) * 0.5 * K**-0.5
    gk = -decay * torch.rand(B, T, H, K, generator=gen)
    N = B if num_seqs is None else num_seqs
    h = rand(N, H, K, V) if h0 else None
    return [x.to(DEVICE) if x is not None else None for x in (q, k, v, a, b, gk, h)]


def run(fn, inputs, dtype, cu_seqlens=None, final_state=True, **kwargs):
    """Forward + backward of `fn` on leaf copies of `inputs` (cast to dtype; the state keeps its own)."""
    leaves = [
        None if x is None else (x if i == 6 else x.to(dtype)).detach().clone().requires_grad_()
        for i, x in enumerate(inputs)
    ]
    q, k, v, a, b, gk, h0 = leaves
    o, ht = fn(q, k, v, a, b, gk, initial_state=h0, output_final_state=final_state, cu_seqlens=cu_seqlens, **kwargs)
    assert o.dtype == dtype and o.shape == v.shape
    gen = torch.Generator().manual_seed(1)
    loss = (o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device)).sum()
    if final_state:
        assert ht.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        loss = loss + (ht.double() * torch.randn(ht.shape, generator=gen, dtype=torch.float64).to(ht.device)).sum()
    else:
        assert ht is None
    loss.backward()
    return [o, ht] + [None if x is None else x.grad for x in leaves]


def check(fn, inputs, dtype=torch.float32, cu_seqlens=None, final_state=True, tol=None, rel_rms=None, **kwargs):
    tol = tol or (5e-3 if dtype == torch.float32 else 3e-2)
    ref_inputs = [None if x is None else x.double() for x in inputs]
    ref = run(naive_dplr_delta_rule, ref_inputs, torch.float64, cu_seqlens, final_state)
    out = run(fn, inputs, dtype, cu_seqlens, final_state, **kwargs)
    for name, a, b in zip(NAMES, out, ref):
        assert (a is None) == (b is None), name
        if a is None:
            continue
        assert a.shape == b.shape, name
        assert torch.isfinite(a).all(), f"{name} has inf/nan"
        err = rel_rms(a, b)
        assert err < tol, f"{name}: relative RMS error {err:.2e} >= {tol:.0e}"


PATHS = {
    "chunk": chunk_dplr_delta_rule,
    "fused_recurrent": fused_recurrent_dplr_delta_rule,
    "chunk_torch": chunk_dplr_delta_rule_torch,
}

# (B, T, H, K, V, options): T not a multiple of the chunk (16), T = 1, odd head dims, several value tiles
CASES = {
    "h0": (1, 37, 1, 12, 20, dict()),
    "t1": (2, 1, 2, 16, 16, dict()),
    "no_h0_two_heads": (1, 21, 2, 16, 8, dict(h0=False)),
    "strong_decay": (1, 35, 1, 16, 16, dict(decay=60.0)),
    "unstructured_ab": (1, 33, 1, 8, 12, dict(rwkv=False)),
    "value_tiles": (1, 18, 1, 16, 80, dict()),
}
# the token-by-token kernel is slow under the interpreter: shorter sequences there
FUSED_T = {"h0": 13, "t1": 1, "no_h0_two_heads": 7, "strong_decay": 9, "unstructured_ab": 9, "value_tiles": 5}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("path", list(PATHS))
def test_matches_naive(path, case, rel_rms_fn):
    B, T, H, K, V, opts = CASES[case]
    if path == "fused_recurrent" and not CUDA:
        T = FUSED_T[case]
    check(PATHS[path], make_inputs(B, T, H, K, V, **opts), rel_rms=rel_rms_fn)


@pytest.mark.parametrize("path", list(PATHS))
def test_output_only(path, rel_rms_fn):
    # no final state requested: no dht enters the backward
    check(PATHS[path], make_inputs(1, 20, 1, 16, 16), final_state=False, rel_rms=rel_rms_fn)


@pytest.mark.parametrize("path", list(PATHS))
def test_varlen(path, rel_rms_fn):
    # packed sequences with empty and uneven segments; the state resets between them
    cu = [0, 0, 17, 17, 36, 41] if path != "fused_recurrent" or CUDA else [0, 0, 7, 7, 12, 15]
    inputs = make_inputs(1, cu[-1], 1, 16, 16, num_seqs=len(cu) - 1)
    check(PATHS[path], inputs, cu_seqlens=torch.tensor(cu, device=DEVICE), rel_rms=rel_rms_fn)


@pytest.mark.parametrize("path", ["chunk", "fused_recurrent"])
def test_bf16(path, rel_rms_fn):
    T = 35 if path == "chunk" or CUDA else 9
    check(PATHS[path], make_inputs(1, T, 1, 16, 32), dtype=torch.bfloat16, rel_rms=rel_rms_fn)


def test_long_sequence_stays_finite(rel_rms_fn):
    # many chunks of carried state, strong and mild decay: no overflow, no NaN gradient, still matches
    T = 2048 if CUDA else 120
    for decay in (0.02, 80.0):
        q, k, v, a, b, gk, h0 = make_inputs(1, T, 1, 16, 16, decay=decay)
        gk.requires_grad_()
        ref_o, ref_h = naive_dplr_delta_rule(q, k, v, a, b, gk, initial_state=h0, output_final_state=True)
        o, ht = chunk_dplr_delta_rule(q, k, v, a, b, gk, initial_state=h0, output_final_state=True)
        assert rel_rms_fn(o, ref_o) < 5e-3 and rel_rms_fn(ht, ref_h) < 5e-3
        (o.sum() + ht.sum()).backward()
        assert torch.isfinite(gk.grad).all()


def test_decoding_matches_parallel(rel_rms_fn):
    # one token at a time with the carried state == the whole sequence at once
    q, k, v, a, b, gk, h0 = make_inputs(1, 9, 1, 16, 16)
    o, ht = chunk_dplr_delta_rule(q, k, v, a, b, gk, initial_state=h0, output_final_state=True)
    state, steps = h0, []
    for t in range(q.shape[1]):
        s = slice(t, t + 1)
        o_t, state = fused_recurrent_dplr_delta_rule(
            q[:, s], k[:, s], v[:, s], a[:, s], b[:, s], gk[:, s], initial_state=state, output_final_state=True
        )
        steps.append(o_t)
    assert rel_rms_fn(torch.cat(steps, 1), o) < 1e-5 and rel_rms_fn(state, ht) < 1e-5


def test_gated_delta_rule_is_a_special_case(rel_rms_fn):
    # a = -beta exp(g) k (the delta rule reads the decayed state), b = k, v -> beta v, gk = g in every channel: the
    # gated delta rule
    q, k, v, _, _, _, h0 = make_inputs(1, 40, 2, 16, 16)
    k = F.normalize(k, dim=-1)
    beta, g = torch.rand(1, 40, 2, device=DEVICE), -torch.rand(1, 40, 2, device=DEVICE)
    ref, ref_h = chunk_delta_rule_torch(q, k, v, beta, g, initial_state=h0, output_final_state=True)
    gk = g[..., None].expand_as(k)
    a = -(beta * g.exp())[..., None] * k
    o, ht = chunk_dplr_delta_rule(q, k, v * beta[..., None], a, k, gk, initial_state=h0, output_final_state=True)
    assert rel_rms_fn(o, ref) < 1e-4 and rel_rms_fn(ht, ref_h) < 1e-4


def test_wide_keys_run_token_by_token(rel_rms_fn):
    # keys wider than the chunk kernels hold in registers take the token-by-token kernels
    check(chunk_dplr_delta_rule, make_inputs(1, 3, 1, 136, 16), rel_rms=rel_rms_fn)


def test_empty_sequence():
    q, k, v, a, b, gk, h0 = make_inputs(1, 0, 1, 16, 16)
    o, ht = chunk_dplr_delta_rule(q, k, v, a, b, gk, initial_state=h0, output_final_state=True)
    assert o.shape == v.shape and torch.equal(ht, h0)


@pytest.mark.parametrize("fn", [chunk_dplr_delta_rule, fused_recurrent_dplr_delta_rule])
def test_bad_inputs(fn):
    q, k, v, a, b, gk, _ = make_inputs(2, 8, 2, 16, 16, h0=False)
    with pytest.raises(ValueError, match="`a`"):
        fn(q, k, v, a[..., :8], b, gk)
    with pytest.raises(ValueError, match="`b`"):
        fn(q, k, v, a, b[:, :4], gk)
    with pytest.raises(ValueError, match="`g`"):
        fn(q, k, v, a, b, gk[..., 0])
    with pytest.raises(ValueError, match="initial_state"):
        fn(q, k, v, a, b, gk, initial_state=torch.zeros(2, 2, 16, 8, device=DEVICE))
    with pytest.raises(ValueError, match="cu_seqlens"):
        fn(q, k, v, a, b, gk, cu_seqlens=torch.tensor([0, 8], device=DEVICE))
    with pytest.raises(TypeError, match="`a`"):
        fn(q, k, v, a.long(), b, gk)


# real shapes on a GPU: fp32 and bf16, gradients included
GPU_CASES = {
    "T1000_D64": (2, 1000, 4, 64, 64, None),
    "T2048_D128": (2, 2048, 4, 128, 128, None),
    "varlen_K100_V273": (1, 2048, 4, 100, 273, [0, 0, 300, 300, 1111, 2048]),
}


@pytest.mark.skipif(not CUDA, reason="real shapes need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(GPU_CASES))
@pytest.mark.parametrize("path", ["chunk", "fused_recurrent"])
def test_gpu_real_shapes(path, case, dtype, rel_rms_fn):
    B, T, H, K, V, cu = GPU_CASES[case]
    inputs = make_inputs(B, T, H, K, V, num_seqs=None if cu is None else len(cu) - 1)
    cu = None if cu is None else torch.tensor(cu, device=DEVICE)
    check(PATHS[path], inputs, dtype=dtype, cu_seqlens=cu, rel_rms=rel_rms_fn)
