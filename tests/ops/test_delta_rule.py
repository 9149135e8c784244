"""(Gated) delta rule kernels vs the fp32 token-by-token reference: outputs, final state and every gradient.

On CPU the Triton kernels run under TRITON_INTERPRET=1 at tiny shapes; on a CUDA machine the same checks also run at
real shapes in fp32 and bf16 (`pytest tests/ops/test_delta_rule.py -x -q`).
"""

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    # must be set before triton is imported (tests/ops/conftest.py does the same)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F

from x_transformers.ops import chunk_delta_rule, fused_recurrent_delta_rule
from x_transformers.ops.common.utils import use_triton
from x_transformers.ops.delta_rule import chunk_delta_rule_torch, naive_delta_rule

DEVICE = "cuda" if CUDA else "cpu"
NAMES = ("o", "final_state", "dq", "dk", "dv", "dbeta", "dg", "dh0")


def rel_rms(a, b):
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp(min=1e-12)).item()


def make_inputs(B, T, H, K, V, *, gate=True, decay=1.0, h0=True, key_norm=None, num_seqs=None, seed=0):
    """fp32 inputs; keys L2-normalised unless `key_norm` asks for plain small-norm keys."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    q, k, v = rand(B, T, H, K), rand(B, T, H, K), rand(B, T, H, V)
    k = F.normalize(k, dim=-1) if key_norm is None else k * key_norm / K**0.5
    beta = torch.rand(B, T, H, generator=gen)
    g = -decay * torch.rand(B, T, H, generator=gen) if gate else None
    N = B if num_seqs is None else num_seqs
    h = rand(N, H, K, V) if h0 else None
    return [x.to(DEVICE) if x is not None else None for x in (q, k, v, beta, g, h)]


def run(fn, inputs, dtype, cu_seqlens=None, final_state=True, **kwargs):
    """Forward + backward of `fn` on leaf copies of `inputs` (cast to dtype, the state stays fp32)."""
    leaves = [
        None if x is None else (x if i == 5 else x.to(dtype)).detach().clone().requires_grad_()
        for i, x in enumerate(inputs)
    ]
    q, k, v, beta, g, h0 = leaves
    o, ht = fn(q, k, v, beta, g, initial_state=h0, output_final_state=final_state, cu_seqlens=cu_seqlens, **kwargs)
    assert o.dtype == dtype and o.shape == v.shape
    gen = torch.Generator().manual_seed(1)
    loss = (o.float() * torch.randn(o.shape, generator=gen).to(o.device)).sum()
    if final_state:
        assert ht.dtype == torch.float32
        loss = loss + (ht * torch.randn(ht.shape, generator=gen).to(ht.device)).sum()
    else:
        assert ht is None
    loss.backward()
    grads = [None if x is None else x.grad for x in leaves]
    return [o, ht, grads[0], grads[1], grads[2], grads[3], grads[4], grads[5]]


def check(fn, inputs, dtype=torch.float32, cu_seqlens=None, final_state=True, tol=None, **kwargs):
    tol = tol or (5e-3 if dtype == torch.float32 else 2e-2)
    ref = run(naive_delta_rule, inputs, torch.float32, cu_seqlens, final_state)
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
    "chunk": chunk_delta_rule,
    "fused_recurrent": fused_recurrent_delta_rule,
    "chunk_torch": chunk_delta_rule_torch,
}

# (B, T, H, K, V, options): T not a multiple of the chunk (64), T = 1, odd head dims, several value tiles
CASES = {
    "gated_h0": (2, 80, 2, 20, 36, dict()),
    "t1": (2, 1, 2, 16, 16, dict()),
    "no_gate_no_h0": (1, 70, 2, 32, 80, dict(gate=False, h0=False)),
    "strong_decay": (1, 75, 2, 16, 16, dict(decay=20.0)),
    "small_keys": (1, 66, 2, 16, 24, dict(key_norm=0.5)),
}
# the token-by-token kernel is slow under the interpreter: shorter sequences there
FUSED_T = {"gated_h0": 24, "t1": 1, "no_gate_no_h0": 10, "strong_decay": 20, "small_keys": 12}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("path", list(PATHS))
def test_matches_naive(path, case):
    B, T, H, K, V, opts = CASES[case]
    if path == "fused_recurrent" and not CUDA:
        T = FUSED_T[case]
    check(PATHS[path], make_inputs(B, T, H, K, V, **opts))


@pytest.mark.parametrize("path", list(PATHS))
def test_output_only(path):
    # no final state requested: no dht enters the backward
    check(PATHS[path], make_inputs(1, 30, 2, 16, 16), final_state=False)


@pytest.mark.parametrize("path", list(PATHS))
def test_varlen(path):
    # packed sequences with empty and uneven segments; state resets between them
    cu = [0, 0, 17, 17, 70, 75] if path != "fused_recurrent" or CUDA else [0, 0, 7, 7, 15, 18]
    inputs = make_inputs(1, cu[-1], 2, 16, 24, num_seqs=len(cu) - 1)
    check(PATHS[path], inputs, cu_seqlens=torch.tensor(cu, device=DEVICE))


@pytest.mark.parametrize("path", ["chunk", "fused_recurrent"])
def test_bf16(path):
    T = 80 if path == "chunk" or CUDA else 16
    check(PATHS[path], make_inputs(2, T, 2, 16, 32), dtype=torch.bfloat16)


def test_varlen_equals_separate_calls():
    q, k, v, beta, g, h0 = make_inputs(1, 90, 2, 16, 16, num_seqs=2)
    cu = torch.tensor([0, 40, 90], device=DEVICE)
    o, ht = chunk_delta_rule(q, k, v, beta, g, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    for n, (bos, eos) in enumerate([(0, 40), (40, 90)]):
        s = slice(bos, eos)
        o_n, h_n = chunk_delta_rule(q[:, s], k[:, s], v[:, s], beta[:, s], g[:, s], initial_state=h0[n : n + 1],
                                    output_final_state=True)
        assert rel_rms(o[:, s], o_n) < 1e-5 and rel_rms(ht[n : n + 1], h_n) < 1e-5


def test_long_sequence_stays_finite():
    # many chunks of carried state, mild and strong gates, unnormalised keys: no overflow, still matches
    T = 2048 if CUDA else 640
    for decay, key_norm in ((0.05, None), (20.0, 1.0)):
        inputs = make_inputs(1, T, 1, 16, 16, decay=decay, key_norm=key_norm)
        q, k, v, beta, g, h0 = inputs
        ref_o, ref_h = naive_delta_rule(q, k, v, beta, g, initial_state=h0, output_final_state=True)
        for fn in (chunk_delta_rule, chunk_delta_rule_torch):
            o, ht = fn(q, k, v, beta, g, initial_state=h0, output_final_state=True)
            assert torch.isfinite(o).all() and torch.isfinite(ht).all()
            assert rel_rms(o, ref_o) < 5e-3 and rel_rms(ht, ref_h) < 5e-3


def test_decoding_matches_parallel():
    # one token at a time with the carried state == the whole sequence at once
    q, k, v, beta, g, h0 = make_inputs(1, 9, 2, 16, 16)
    o, ht = chunk_delta_rule(q, k, v, beta, g, initial_state=h0, output_final_state=True)
    state, steps = h0, []
    for t in range(q.shape[1]):
        s = slice(t, t + 1)
        o_t, state = fused_recurrent_delta_rule(q[:, s], k[:, s], v[:, s], beta[:, s], g[:, s],
                                                initial_state=state, output_final_state=True)
        steps.append(o_t)
    assert rel_rms(torch.cat(steps, 1), o) < 1e-5 and rel_rms(state, ht) < 1e-5


def test_scale():
    q, k, v, beta, g, _ = make_inputs(1, 20, 1, 16, 16, h0=False)
    o1, _ = chunk_delta_rule(q, k, v, beta, g, scale=0.3)
    o2, _ = chunk_delta_rule(q * 0.3 * 16**0.5, k, v, beta, g)
    ref, _ = naive_delta_rule(q, k, v, beta, g, scale=0.3)
    assert rel_rms(o1, ref) < 5e-3 and rel_rms(o1, o2) < 1e-4


def test_dispatch():
    q, k, v, beta, g, _ = make_inputs(1, 4, 1, 16, 16, h0=False)
    assert use_triton(q) == (CUDA or os.environ.get("TRITON_INTERPRET") == "1")


@pytest.mark.parametrize("fn", [chunk_delta_rule, fused_recurrent_delta_rule])
def test_bad_inputs(fn):
    q, k, v, beta, g, _ = make_inputs(2, 8, 2, 16, 16, h0=False)
    with pytest.raises(ValueError, match="beta"):
        fn(q, k, v, beta[..., :1], g)
    with pytest.raises(ValueError, match="`k`"):
        fn(q, k[..., :8], v, beta, g)
    with pytest.raises(ValueError, match="initial_state"):
        fn(q, k, v, beta, g, initial_state=torch.zeros(2, 2, 16, 8, device=DEVICE))
    with pytest.raises(ValueError, match="cu_seqlens"):
        fn(q, k, v, beta, g, cu_seqlens=torch.tensor([0, 8], device=DEVICE))
    with pytest.raises(TypeError, match="beta"):
        fn(q, k, v, beta.long(), g)


@pytest.mark.skipif(not use_triton(torch.zeros(1, device=DEVICE)), reason="kernel dispatch (GPU or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("K,V,half", [(128, 128, True), (128, 64, True), (64, 16, False), (128, 32, False)])
def test_half_heads_stay_half_unless_tiles_are_narrow(K, V, half, monkeypatch):
    """bf16 heads reach the kernels in bf16 unless their value tile is narrower than the key block and under 64
    (rerouted to fp32, see narrow_value_tiles): K = V = 128 must never take the several-times slower fp32 path."""
    from x_transformers.ops.delta_rule import chunk as delta_chunk

    seen = []
    real = delta_chunk.ChunkDeltaRuleFunction.apply
    monkeypatch.setattr(delta_chunk.ChunkDeltaRuleFunction, "apply", lambda q, *a: seen.append(q.dtype) or real(q, *a))
    q, k, v, beta, g, _ = make_inputs(1, 20, 1, K, V)
    o, _ = chunk_delta_rule(q.bfloat16(), k.bfloat16(), v.bfloat16(), beta.bfloat16(), g)
    assert seen == [torch.bfloat16 if half else torch.float32] and o.dtype == torch.bfloat16
    ref, _ = naive_delta_rule(q, k, v, beta, g)
    assert rel_rms(o.float(), ref) < 2e-2


# real shapes on a GPU: fp32 and bf16, gradients included
GPU_CASES = {
    "T1000_D64": (2, 1000, 4, 64, 64, None),
    "T2048_D128": (2, 2048, 4, 128, 128, None),
    "varlen_K100_V273": (1, 2048, 4, 100, 273, [0, 0, 300, 300, 1111, 2048]),
    # keys wider than 256: chunk_delta_rule runs the token-by-token kernels
    "K273_V100": (1, 300, 2, 273, 100, None),
}


@pytest.mark.skipif(not CUDA, reason="real shapes need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(GPU_CASES))
@pytest.mark.parametrize("path", ["chunk", "fused_recurrent"])
def test_gpu_real_shapes(path, case, dtype):
    B, T, H, K, V, cu = GPU_CASES[case]
    inputs = make_inputs(B, T, H, K, V, num_seqs=None if cu is None else len(cu) - 1)
    cu = None if cu is None else torch.tensor(cu, device=DEVICE)
    check(PATHS[path], inputs, dtype=dtype, cu_seqlens=cu)


@pytest.mark.skipif(not CUDA, reason="real shapes need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("gate", [True, False], ids=["gated", "plain"])
def test_gpu_benchmark_shape(gate, dtype):
    # the benchmark's shape and flags: no initial state, no final state (so no dht), 64 sequences * heads
    check(chunk_delta_rule, make_inputs(4, 4096, 16, 128, 128, gate=gate, h0=False), dtype=dtype, final_state=False)


@pytest.mark.skipif(os.environ.get("HOPPER_COMPILE") != "1", reason="slow (~7 min on 2 cores); set HOPPER_COMPILE=1")
def test_kernels_compile_for_hopper(kernel_check):
    """Compile every kernel and state-flag combination for sm_90 without a GPU (dtype mismatches in tl.dot, shared
    memory overflows: what the interpreter cannot see)."""
    kernel_check.hopper_compile("delta_rule")
