"""`gla` kernels (per-key-channel decay) vs the fp32 token-by-token reference: outputs, final state, every gradient.

On CPU the Triton kernels run under TRITON_INTERPRET=1 at tiny shapes; on a CUDA machine the same checks also run at
real shapes in fp32 and bf16: `pytest tests/ops/test_gla.py -x -q`.
"""

import importlib
import os

import pytest
import torch

from x_transformers.ops import chunk_gla, fused_recurrent_gla
from x_transformers.ops.common.utils import use_triton
from x_transformers.ops.gla import naive_recurrent_gla
from x_transformers.ops.gla.chunk_torch import chunk_gla_torch

GLA_CHUNK = importlib.import_module("x_transformers.ops.gla.chunk")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
NAMES = ("o", "final_state", "dq", "dk", "dv", "dg", "dh0")
TOL = {torch.float32: 5e-3, torch.bfloat16: 2e-2}


def make_inputs(B, T, H, K, V, *, decay=1.0, h0=True, num_seqs=None, seed=0):
    """fp32 inputs; g = -decay * U(0, 1) per step and channel (decay=20 is the strong-decay case)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    q, k, v = rand(B, T, H, K), rand(B, T, H, K), rand(B, T, H, V)
    g = -decay * torch.rand(B, T, H, K, generator=gen)
    N = B if num_seqs is None else num_seqs
    h = rand(N, H, K, V) if h0 else None
    return [x.to(DEVICE) if x is not None else None for x in (q, k, v, g, h)]


def chunk_torch(q, k, v, g, scale=None, **kwargs):
    return chunk_gla_torch(q, k, v, g, q.shape[-1] ** -0.5 if scale is None else scale, **kwargs)


@pytest.fixture
def check(kernel_check):
    """check(fn, inputs, dtype, tol, **kwargs): forward + backward of `fn` against the reference fed the same
    (dtype-rounded) values in fp32."""

    def run(fn, inputs, dtype, cu_seqlens=None, final_state=True, **kwargs):
        # q, k, v, g cast to dtype, the state stays fp32
        q, k, v, g, h0 = leaves = kernel_check.grad_leaves(inputs, dtype, cast=(0, 1, 2, 3))
        o, ht = fn(q, k, v, g, initial_state=h0, output_final_state=final_state, cu_seqlens=cu_seqlens, **kwargs)
        assert o.dtype == dtype and o.shape == v.shape
        if final_state:
            assert ht.dtype == torch.float32
        else:
            assert ht is None
        kernel_check.backward_random(o, ht)
        return [o, ht] + [None if x is None else x.grad for x in leaves]

    def check(fn, inputs, dtype=torch.float32, tol=None, **kwargs):
        rounded = [None if x is None else (x if i == 4 else x.to(dtype).float()) for i, x in enumerate(inputs)]
        ref = run(naive_recurrent_gla, rounded, torch.float32, **kwargs)
        out = run(fn, inputs, dtype, **kwargs)
        kernel_check.assert_all_close(NAMES, out, ref, TOL[dtype] if tol is None else tol, f"{fn.__name__} {dtype}")

    return check


PATHS = {"chunk": chunk_gla, "fused_recurrent": fused_recurrent_gla, "chunk_torch": chunk_torch}


def test_dispatch():
    q = torch.zeros(1, 2, 1, 16, device=DEVICE)
    assert use_triton(q), "CUDA tensors / TRITON_INTERPRET=1 should take the Triton kernels"


# tiny shapes under the interpreter: T not a multiple of the chunk (64), odd K / V, initial state + final-state grad
CPU_CASES = {
    "uneven_T": dict(B=2, T=80, H=2, K=20, V=24),
    "T1": dict(B=2, T=1, H=2, K=16, V=16),
    "strong_decay": dict(B=1, T=80, H=2, K=16, V=16, decay=20.0),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CPU_CASES)
def test_against_naive(path, case, check):
    check(PATHS[path], make_inputs(**CPU_CASES[case]))


def mixed_decay_inputs():
    """Chunk 0 mild, chunk 1 strong in the second K tile only (the backward decides per K tile, the forward per
    chunk), chunk 2 (partial) strong everywhere."""
    q, k, v, g, h0 = make_inputs(B=1, T=150, H=2, K=80, V=72)
    g[:, 64:128, :, 64:] *= 20
    g[:, 128:] *= 20
    return [q, k, v, g, h0]


@pytest.mark.parametrize("span, fused, dtype", [
    # slow: the pair-wise path alone (the default cases run it too, on their strong chunks), and fp32 unfused, the
    # same run as fp32 fused (fp32 never fuses: see chunk_gla_bwd)
    pytest.param(span, fused, dtype, id=f"{span_id}-{fused_id}-{dtype_id}",
                 marks=[pytest.mark.slow] if span is not None or (dtype == torch.float32 and not fused) else [])
    for span_id, span in (("default", None), ("pairwise_only", -1.0))
    for fused_id, fused in (("fused", True), ("unfused", False))
    for dtype_id, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
])
def test_intra_paths_on_mild_and_strong_chunks(span, fused, dtype, check, monkeypatch):
    """The tensor-core path (chunks of mild decay: inside the output and dq / dk / dg kernels, or in the backward
    intra kernel for fp32 or with the fusion off) and the pair-wise path (strong decay) in one call, and the pair-wise
    path alone."""
    if span is not None:
        monkeypatch.setattr(GLA_CHUNK, "INTRA_SPAN", span)
    monkeypatch.setattr(GLA_CHUNK, "FUSED_INTRA_BWD", fused)
    check(chunk_gla, mixed_decay_inputs(), dtype=dtype)


@pytest.mark.parametrize("caps", [(128, 32, 128, 128), (16, 16, 16, 16), (64, 64, 32, 64)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tile_caps(caps, dtype, check, monkeypatch):
    """The output / dv V tile, the state passes' tiles and the dq / dk / dg tiles are launch knobs
    (benchmarks/bench_ops.py --set): every setting gives the same results, with per-chunk states and A stored in the
    input dtype (half precision never goes below 32-wide tiles: see min_dot_tile)."""
    for name, cap in zip(("OUT_BV_CAP", "STATE_CAP", "DQKG_BK_CAP", "DQKG_BV_CAP"), caps):
        monkeypatch.setattr(GLA_CHUNK, name, cap)
    check(chunk_gla, make_inputs(B=1, T=70, H=2, K=64, V=64), dtype=dtype)


@pytest.mark.parametrize("K,V", [(64, 16), (32, 32), (64, 64)])
def test_bf16_unsafe_tiles_compute_in_fp32(K, V, check, monkeypatch):
    """Half-precision heads whose tiles Hopper miscompiles (a value tile narrower than the key tile, or K / V below
    64) compute in fp32 with the same results; 64-wide heads stay in bf16."""
    from x_transformers.ops.common import utils

    calls = []
    real = GLA_CHUNK._half_tiles_unsafe
    monkeypatch.setattr(GLA_CHUNK, "_half_tiles_unsafe", lambda *a: calls.append(real(*a)) or calls[-1])
    check(chunk_gla, make_inputs(B=1, T=70, H=2, K=K, V=V), dtype=torch.bfloat16)
    assert calls[0] == (min(K, V) < 64) and calls[1:2] in ([], [False])  # the fp32 call never reroutes
    assert not GLA_CHUNK._half_tiles_unsafe(16, 16, torch.float32)
    assert utils.narrow_value_tiles(torch.float32, 64, 32) is False


def test_state_tiles_narrow_until_the_programs_fill_the_gpu():
    cpu = torch.device("cpu")  # counted as an H100's 132 SMs
    assert GLA_CHUNK._state_tiles(128, 128, 64, torch.bfloat16, cpu) == (64, 64)  # 256 programs already
    assert GLA_CHUNK._state_tiles(128, 128, 16, torch.bfloat16, cpu) == (32, 32)  # 64 -> 256 programs
    assert GLA_CHUNK._state_tiles(16, 16, 1, torch.bfloat16, cpu) == (32, 32)  # never below the half floor
    assert GLA_CHUNK._state_tiles(16, 16, 1, torch.float32, cpu) == (16, 16)


def test_intra_span_guard_is_what_keeps_strong_decay_exact(monkeypatch, rel_rms_fn):
    """With the guard lifted, strong decay overflows the tensor-core path: the threshold is what routes it away."""
    q, k, v, g, _ = make_inputs(B=1, T=64, H=1, K=16, V=16, decay=20.0)
    ref, _ = naive_recurrent_gla(q, k, v, g)
    monkeypatch.setattr(GLA_CHUNK, "INTRA_SPAN", 1e30)
    o, _ = chunk_gla(q, k, v, g)
    assert not (torch.isfinite(o).all() and rel_rms_fn(o, ref) < 1e-2)


@pytest.mark.parametrize("path", PATHS)
def test_varlen_empty_and_uneven(path, check):
    cu_seqlens = torch.tensor([0, 0, 17, 17, 50, 85], device=DEVICE)
    inputs = make_inputs(B=1, T=85, H=2, K=16, V=20, num_seqs=5, decay=3.0)
    check(PATHS[path], inputs, cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("path", ["chunk", "fused_recurrent"])
def test_bf16(path, check):
    check(PATHS[path], make_inputs(B=1, T=70, H=2, K=32, V=32), dtype=torch.bfloat16)


@pytest.mark.parametrize("path", PATHS)
def test_no_state_and_custom_scale(path, check):
    check(PATHS[path], make_inputs(B=1, T=40, H=1, K=16, V=16, h0=False), final_state=False, scale=0.3)


def test_long_sequence_no_overflow(rel_rms_fn):
    # strong and weak channels mixed over many chunks: nothing may overflow, chunk and fused paths agree
    q, k, v, g, h0 = make_inputs(B=1, T=300, H=1, K=16, V=16, decay=20.0)
    g = g * (torch.arange(16, device=DEVICE) % 2)  # half the channels never decay
    o_c, s_c = chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    o_r, s_r = fused_recurrent_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    o_t, s_t = chunk_torch(q, k, v, g, initial_state=h0, output_final_state=True)
    for a in (o_c, s_c, o_r, s_r, o_t, s_t):
        assert torch.isfinite(a).all()
    assert rel_rms_fn(o_c, o_r) < 1e-4 and rel_rms_fn(s_c, s_r) < 1e-4
    assert rel_rms_fn(o_t, o_r) < 1e-4 and rel_rms_fn(s_t, s_r) < 1e-4


def test_torch_path_long_sequence(check):
    # the CPU path on a longer input against the reference, gradients included
    check(chunk_torch, make_inputs(B=1, T=260, H=1, K=24, V=16, decay=5.0))


def test_torch_dispatch(monkeypatch, rel_rms_fn):
    # CPU tensors outside the interpreter take the chunked torch path, with the same results
    q, k, v, g, h0 = (x.cpu() for x in make_inputs(B=1, T=30, H=1, K=16, V=16))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    o, s = chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    o_ref, s_ref = naive_recurrent_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    assert rel_rms_fn(o, o_ref) < 1e-5 and rel_rms_fn(s, s_ref) < 1e-5


@pytest.mark.parametrize("fn", [chunk_gla, fused_recurrent_gla])
def test_bad_inputs(fn):
    q, k, v, g, _ = make_inputs(B=1, T=8, H=2, K=16, V=16, h0=False)
    with pytest.raises(ValueError, match="`g` must have shape"):
        fn(q, k, v, g[..., :8])
    with pytest.raises(ValueError, match="`k` must have shape"):
        fn(q, k[:, :4], v, g)
    with pytest.raises(TypeError, match="`v` must be a floating point"):
        fn(q, k, v.long(), g)
    with pytest.raises(ValueError, match="`initial_state` must have shape"):
        fn(q, k, v, g, initial_state=torch.zeros(1, 2, 16, 8, device=DEVICE))
    with pytest.raises(ValueError, match="cu_seqlens"):
        fn(q, k, v, g, cu_seqlens=torch.tensor([0, 3, 5], device=DEVICE))


# real shapes on a GPU: compiled kernels, fp32 and bf16, gradients included (shapes shared where possible, to keep
# the number of compilations down)
GPU_CASES = {
    "T1000_K64": dict(B=2, T=1000, H=4, K=64, V=64),
    "T2048_K128": dict(B=2, T=2048, H=4, K=128, V=128),
    "T1000_K100_V273": dict(B=1, T=1000, H=2, K=100, V=273),
    "T2048_strong_decay": dict(B=1, T=2048, H=4, K=128, V=128, decay=20.0),
}


@pytest.mark.skipif(not CUDA, reason="real shapes need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("path", ["chunk", "fused_recurrent"])
@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_real_shapes(case, path, dtype, check):
    check(PATHS[path], make_inputs(**GPU_CASES[case]), dtype=dtype)


@pytest.mark.skipif(not CUDA, reason="real shapes need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("path", ["chunk", "fused_recurrent"])
def test_gpu_varlen(path, dtype, check):
    cu_seqlens = torch.tensor([0, 0, 300, 301, 1500, 1500, 2100], device=DEVICE)
    inputs = make_inputs(B=1, T=2100, H=4, K=64, V=64, num_seqs=6, decay=5.0)
    check(PATHS[path], inputs, dtype=dtype, cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("fn", [chunk_gla, fused_recurrent_gla])
def test_empty_input(fn):
    q, k, v, g, h0 = make_inputs(B=2, T=0, H=2, K=16, V=16)
    o, s = fn(q, k, v, g, initial_state=h0, output_final_state=True)
    assert o.shape == v.shape and torch.equal(s, h0)


@pytest.mark.skipif(not CUDA, reason="compiled kernels need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("num_warps", [4, 8])
def test_gpu_launch_configs(num_warps, dtype, monkeypatch, check):
    # Hopper codegen has miscompiled some warp counts for similar kernels: check both we might launch with
    from x_transformers.ops.gla import chunk as chunk_module

    monkeypatch.setattr(chunk_module, "BIG_TILES", dict(num_warps=num_warps, num_stages=2))
    check(chunk_gla, make_inputs(B=1, T=1000, H=2, K=128, V=128, decay=5.0), dtype=dtype)


@pytest.mark.skipif(os.environ.get("HOPPER_COMPILE") != "1", reason="slow; set HOPPER_COMPILE=1 to run")
def test_kernels_compile_for_hopper(kernel_check):
    """Compile every kernel for sm_90 without a GPU (catches what the interpreter cannot)."""
    kernel_check.hopper_compile("gla")
