"""KDA kernels (chunked Triton, token-by-token Triton, chunked PyTorch) vs the float64 step-by-step reference:
outputs, final state and every gradient (q, k, v, g, beta, initial state).

On CPU the Triton kernels run under TRITON_INTERPRET=1 at tiny shapes; on a CUDA machine the same checks also run at
real shapes in fp32 and bf16 (`pytest tests/ops/test_kda.py -x -q`).
"""

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    # must be set before triton is imported (tests/ops/conftest.py does the same)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F

from x_transformers.ops.kda import chunk_kda, chunk_kda_torch, fused_recurrent_kda, naive_kda

DEVICE = "cuda" if CUDA else "cpu"
NAMES = ("o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dh0")


def rel_rms(a, b):
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp(min=1e-12)).item()


def make_inputs(B, T, H, K, V, *, decay=1.0, h0=True, key_norm=None, num_seqs=None, seed=0):
    """fp32 inputs (q, k, v, g, beta, h0); keys L2-normalised unless `key_norm` asks for plain small-norm keys; g a
    per-channel log decay in [-decay, 0]."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    q, k, v = rand(B, T, H, K), rand(B, T, H, K), rand(B, T, H, V)
    k = F.normalize(k, dim=-1) if key_norm is None else k * key_norm / K**0.5
    g = -decay * torch.rand(B, T, H, K, generator=gen)
    beta = torch.rand(B, T, H, generator=gen)
    N = B if num_seqs is None else num_seqs
    h = rand(N, H, K, V) if h0 else None
    return [x.to(DEVICE) if x is not None else None for x in (q, k, v, g, beta, h)]


def run(fn, inputs, dtype, cu_seqlens=None, final_state=True):
    """Forward + backward of `fn` on leaf copies of `inputs` (q, k, v cast to dtype; gates, beta and the state keep
    theirs) with fixed random cotangents."""
    leaves = [
        None if x is None else (x.to(dtype) if i < 3 else x).detach().clone().requires_grad_()
        for i, x in enumerate(inputs)
    ]
    q, k, v, g, beta, h0 = leaves
    o, ht = fn(q, k, v, g, beta, initial_state=h0, output_final_state=final_state, cu_seqlens=cu_seqlens)
    assert o.dtype == dtype and o.shape == v.shape
    gen = torch.Generator().manual_seed(1)
    loss = (o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device)).sum()
    if final_state:
        assert ht.shape == (q.shape[0] if cu_seqlens is None else len(cu_seqlens) - 1, *q.shape[2:], v.shape[-1])
        loss = loss + (ht.double() * torch.randn(ht.shape, generator=gen, dtype=torch.float64).to(ht.device)).sum()
    else:
        assert ht is None
    loss.backward()
    return [o, ht, *(None if x is None else x.grad for x in leaves)]


def check(fn, inputs, dtype=torch.float32, cu_seqlens=None, final_state=True, tol=None):
    tol = tol or (2e-3 if dtype == torch.float32 else 2e-2)
    ref = run(naive_kda, [None if x is None else x.double() for x in inputs], torch.float64, cu_seqlens, final_state)
    out = run(fn, inputs, dtype, cu_seqlens, final_state)
    for name, a, b in zip(NAMES, out, ref):
        assert (a is None) == (b is None), name
        if a is None:
            continue
        assert a.shape == b.shape, name
        assert torch.isfinite(a).all(), f"{name} has inf/nan"
        err = rel_rms(a, b)
        assert err < tol, f"{name}: relative RMS error {err:.2e} >= {tol:.0e}"


PATHS = {"chunk": chunk_kda, "fused_recurrent": fused_recurrent_kda, "chunk_torch": chunk_kda_torch}

# (B, T, H, K, V, options): T no multiple of the chunk (32 for fp32 kernels, 64 for the PyTorch path), T = 1, odd
# head dims (several value tiles in the state passes), strong decay (G spans thousands inside a chunk)
CASES = {
    "odd_dims_h0": (2, 45, 1, 20, 36, dict()),
    "t1": (1, 1, 2, 16, 16, dict()),
    "strong_decay": (1, 37, 1, 16, 16, dict(decay=200.0, h0=False)),
    "small_keys": (1, 70, 1, 16, 24, dict(key_norm=0.5)),
}
# the token-by-token kernel is slow under the interpreter: shorter sequences there
FUSED_T = {"odd_dims_h0": 13, "t1": 1, "strong_decay": 10, "small_keys": 9}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("path", list(PATHS))
def test_matches_naive(path, case):
    B, T, H, K, V, opts = CASES[case]
    if path == "fused_recurrent" and not CUDA:
        T = FUSED_T[case]
    check(PATHS[path], make_inputs(B, T, H, K, V, **opts))


@pytest.mark.parametrize("path", list(PATHS))
def test_varlen(path):
    # packed sequences with empty and uneven segments, one across a chunk boundary; state resets between them
    cu = [0, 0, 17, 17, 52, 57] if path != "fused_recurrent" or CUDA else [0, 0, 7, 7, 15, 18]
    inputs = make_inputs(1, cu[-1], 1, 16, 24, num_seqs=len(cu) - 1)
    check(PATHS[path], inputs, cu_seqlens=torch.tensor(cu, device=DEVICE))


def test_output_only():
    # no final state requested: no dht enters the backward
    check(chunk_kda, make_inputs(1, 30, 1, 16, 16), final_state=False)


@pytest.mark.parametrize("path", ["chunk", "fused_recurrent"])
def test_bf16(path):
    # 64-step chunks, and keys narrower than MIN_HALF_K zero-padded
    T = 70 if path == "chunk" or CUDA else 12
    check(PATHS[path], make_inputs(1, T, 1, 16, 32), dtype=torch.bfloat16)


@pytest.mark.parametrize("path", ["chunk", "chunk_torch"])
def test_future_gates_do_not_reach_past_outputs(path):
    # an extreme gate at step 40 (and beyond) changes nothing before it, and the gradients stay finite
    q, k, v, g, beta, h0 = make_inputs(1, 50, 1, 16, 16)
    o, _ = PATHS[path](q, k, v, g, beta, initial_state=h0)
    g2 = g.clone()
    g2[:, 40:] = -1e4
    g2 = g2.requires_grad_()
    o2, _ = PATHS[path](q, k, v, g2, beta, initial_state=h0)
    assert torch.equal(o2[:, :40], o[:, :40])
    o2.square().sum().backward()
    assert torch.isfinite(g2.grad).all()


def test_decoding_matches_parallel():
    # one token at a time with the carried state == the whole sequence at once
    q, k, v, g, beta, h0 = make_inputs(1, 9, 2, 16, 16)
    o, ht = chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    state, steps = h0, []
    for t in range(q.shape[1]):
        s = slice(t, t + 1)
        o_t, state = fused_recurrent_kda(q[:, s], k[:, s], v[:, s], g[:, s], beta[:, s], initial_state=state,
                                         output_final_state=True)
        steps.append(o_t)
    assert rel_rms(torch.cat(steps, 1), o) < 1e-5 and rel_rms(state, ht) < 1e-5


def test_scale_and_empty_input():
    q, k, v, g, beta, h0 = make_inputs(1, 20, 1, 16, 16)
    o1, _ = chunk_kda(q, k, v, g, beta, scale=0.3)
    ref, _ = naive_kda(q, k, v, g, beta, scale=0.3)
    assert rel_rms(o1, ref) < 2e-3
    o, ht = chunk_kda(q[:, :0], k[:, :0], v[:, :0], g[:, :0], beta[:, :0], initial_state=h0, output_final_state=True)
    assert o.shape == (1, 0, 1, 16) and torch.equal(ht, h0)


@pytest.mark.parametrize("fn", [chunk_kda, fused_recurrent_kda])
def test_bad_inputs(fn):
    q, k, v, g, beta, _ = make_inputs(2, 8, 2, 16, 16, h0=False)
    with pytest.raises(ValueError, match="beta"):
        fn(q, k, v, g, beta[..., :1])
    with pytest.raises(ValueError, match="`g`"):
        fn(q, k, v, g[..., 0], beta)
    with pytest.raises(ValueError, match="`k`"):
        fn(q, k[..., :8], v, g, beta)
    with pytest.raises(ValueError, match="initial_state"):
        fn(q, k, v, g, beta, initial_state=torch.zeros(2, 2, 16, 8, device=DEVICE))
    with pytest.raises(ValueError, match="cu_seqlens"):
        fn(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 8], device=DEVICE))
    with pytest.raises(TypeError, match="beta"):
        fn(q, k, v, g, beta.long())


# real shapes on a GPU: fp32 and bf16, gradients included
GPU_CASES = {
    "T1000_D64": (2, 1000, 4, 64, 64, None),
    "T2048_D128": (2, 2048, 4, 128, 128, None),
    "varlen_K100_V273": (1, 2048, 4, 100, 273, [0, 0, 300, 300, 1111, 2048]),
    # keys wider than 256: chunk_kda runs the token-by-token kernels
    "K273_V100": (1, 300, 2, 273, 100, None),
}


@pytest.mark.skipif(not CUDA, reason="real shapes need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(GPU_CASES))
@pytest.mark.parametrize("path", ["chunk", "fused_recurrent"])
def test_gpu_real_shapes(path, case, dtype):
    B, T, H, K, V, cu = GPU_CASES[case]
    inputs = make_inputs(B, T, H, K, V, decay=0.1, num_seqs=None if cu is None else len(cu) - 1)
    cu = None if cu is None else torch.tensor(cu, device=DEVICE)
    check(PATHS[path], inputs, dtype=dtype, cu_seqlens=cu)


@pytest.mark.skipif(CUDA, reason="the interpreter's fp32 runs take 32-step chunks; a GPU runs both sizes above")
def test_fp32_in_64_step_chunks(monkeypatch):
    # four 16-step sub-chunks per chunk (blocks two and three off the diagonal), held to fp32 tolerances
    from x_transformers.ops.kda import chunk as kda_chunk

    monkeypatch.setattr(kda_chunk, "_launch", lambda dtype, K: (64, "tf32x3", 4))
    check(chunk_kda, make_inputs(1, 75, 1, 16, 16, decay=5.0))
