"""Scalar-decay linear attention kernels vs the fp32 token-by-token reference: outputs, final state and every gradient.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (set in conftest.py) at tiny shapes; on a CUDA machine the same
checks also run at real shapes in fp32 and bf16: `pytest tests/ops/test_simple_gla.py -x -q`.
"""

import os
import sys

import pytest
import torch

from x_transformers.ops import chunk_simple_gla, fused_recurrent_simple_gla
from x_transformers.ops.simple_gla import chunk_simple_gla_torch, naive_simple_gla

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
NAMES = ("o", "final_state", "dq", "dk", "dv", "dg", "dh0")
TOL = {torch.float32: 5e-3, torch.bfloat16: 2e-2}


PATHS = {"chunk": chunk_simple_gla, "fused_recurrent": fused_recurrent_simple_gla, "torch": chunk_simple_gla_torch}


def make_inputs(B, T, H, K, V, *, gate=True, decay=1.0, h0=True, num_seqs=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, d, generator=gen) for d in (K, K, V))
    g = -decay * torch.rand(B, T, H, generator=gen) if gate else None
    N = B if num_seqs is None else num_seqs
    h = torch.randn(N, H, K, V, generator=gen) if h0 else None
    return [x.to(DEVICE) if x is not None else None for x in (q, k, v, g, h)]


@pytest.fixture
def check(kernel_check):
    """check(path, inputs, ...): forward + backward of one path against the fp32 token-by-token reference."""

    def run(fn, inputs, dtype, cu_seqlens, final_state):
        # q, k, v cast to dtype; gates and state stay fp32
        q, k, v, g, h0 = leaves = kernel_check.grad_leaves(inputs, dtype, cast=(0, 1, 2))
        o, ht = fn(q, k, v, g, initial_state=h0, output_final_state=final_state, cu_seqlens=cu_seqlens)
        assert o.shape == v.shape
        if final_state:
            assert ht.dtype == torch.float32
        kernel_check.backward_random(o, ht)
        return o, ht, *(x.grad if x is not None else None for x in leaves)

    def check(path, inputs, dtype=torch.float32, cu_seqlens=None, final_state=True):
        out = run(PATHS[path], inputs, dtype, cu_seqlens, final_state)
        ref = run(naive_simple_gla, inputs, torch.float32, cu_seqlens, final_state)
        assert out[0].dtype == dtype
        kernel_check.assert_all_close(NAMES, out, ref, TOL[dtype], f"{path} {dtype}")

    return check


# Triton paths under the interpreter are slow, token-by-token ones especially: keep CPU shapes tiny
T_CHUNK = 80 if not CUDA else 1000  # not a multiple of the chunk size (64)
T_STEP = 19 if not CUDA else 1000


@pytest.mark.parametrize("path", ["chunk", "torch", "fused_recurrent"])
def test_matches_reference(path, check):
    T = T_STEP if path == "fused_recurrent" else T_CHUNK
    check(path, make_inputs(2, T, 2, 20, 24))


@pytest.mark.parametrize("path", ["chunk", "torch", "fused_recurrent"])
def test_single_token(path, check):
    check(path, make_inputs(2, 1, 2, 16, 16))


@pytest.mark.parametrize("path", ["chunk", "torch", "fused_recurrent"])
def test_no_gate_no_initial_state(path, check):
    """g=None is plain (causal) linear attention."""
    T = T_STEP if path == "fused_recurrent" else T_CHUNK
    check(path, make_inputs(1, T, 2, 32, 16, gate=False, h0=False))
    check(path, make_inputs(1, T, 2, 32, 16, gate=False, h0=False), final_state=False)


@pytest.mark.parametrize("path", ["chunk", "torch", "fused_recurrent"])
def test_varlen_empty_and_uneven(path, check):
    bounds = [0, 5, 5, 13, 20] if path == "fused_recurrent" else [0, 10, 10, 75, 100, 100]
    cu = torch.tensor(bounds, dtype=torch.int64, device=DEVICE)
    check(path, make_inputs(1, bounds[-1], 2, 16, 32, num_seqs=len(bounds) - 1), cu_seqlens=cu)


@pytest.mark.parametrize("path", ["chunk", "torch", "fused_recurrent"])
def test_strong_decay(path, check):
    """g down to -20 per step: decays of exp(-1280) inside one chunk, no overflow, no NaN."""
    T = T_STEP if path == "fused_recurrent" else T_CHUNK
    check(path, make_inputs(2, T, 2, 16, 16, decay=20.0))


@pytest.mark.parametrize("path", ["chunk", "torch"])
def test_long_sequence(path, check):
    T = 1000 if not CUDA else 8192
    check(path, make_inputs(1, T, 1, 16, 16, decay=0.05), final_state=True)
    o, ht = PATHS[path](*make_inputs(1, T, 1, 16, 16, gate=False, h0=False)[:3], output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(ht).all()


@pytest.mark.parametrize("path", ["chunk", "fused_recurrent"])
def test_bf16(path, check):
    T = T_STEP if path == "fused_recurrent" else T_CHUNK
    check(path, make_inputs(2, T, 2, 32, 32), dtype=torch.bfloat16)


@pytest.mark.parametrize("narrow", [True, False], ids=["fill_sms", "widest"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_state_pass_tiles(narrow, dtype, check, monkeypatch):
    """The state passes narrow their tiles until the programs fill the SMs (few sequences * heads, as at B=1 with long
    sequences); both the narrowed and the widest tiles give the reference's results."""
    from x_transformers.ops.common.utils import fill_sm_tiles
    from x_transformers.ops.simple_gla import chunk_h

    seen = []

    def tiles(SK, SV, *args):
        seen.append(fill_sm_tiles(SK, SV, *args) if narrow else (SK, SV))
        return seen[-1]

    monkeypatch.setattr(chunk_h, "fill_sm_tiles", tiles)
    check("chunk", make_inputs(1, T_CHUNK, 2, 64, 64), dtype=dtype)
    floor = 16 if dtype == torch.float32 else 32
    assert set(seen) == {(floor, floor) if narrow else (64, 64)}
    cpu = torch.device("cpu")  # counted as an H100's 132 SMs
    assert fill_sm_tiles(64, 64, 128, 128, 64, torch.bfloat16, cpu) == (64, 64)  # 256 programs already
    assert fill_sm_tiles(64, 64, 128, 128, 16, torch.bfloat16, cpu) == (32, 32)  # 64 -> 256 programs
    assert fill_sm_tiles(64, 64, 128, 128, 16, torch.float32, cpu) == (32, 32)
    assert fill_sm_tiles(64, 64, 128, 128, 8, torch.float32, cpu) == (16, 32)  # the key tile halves first


def test_dispatch_and_defaults(rel_rms_fn):
    q, k, v, g, h0 = make_inputs(1, 9, 2, 16, 8)
    o1, _ = chunk_simple_gla(q, k, v, g, scale=16**-0.5)
    o2, ht = chunk_simple_gla(q, k, v, g)
    assert ht is None and torch.equal(o1, o2)
    # the public function and the torch path agree whichever one dispatch picked
    o3, _ = chunk_simple_gla_torch(q, k, v, g)
    assert rel_rms_fn(o2, o3) < 1e-5


def test_bad_inputs_raise_clearly():
    q, k, v, g, h0 = make_inputs(2, 9, 2, 16, 8)
    with pytest.raises(ValueError, match="`g` must have shape"):
        chunk_simple_gla(q, k, v, g[..., :1])
    with pytest.raises(ValueError, match="`k` must have shape"):
        fused_recurrent_simple_gla(q, k[:, :5], v, g)
    with pytest.raises(TypeError, match="share a dtype"):
        chunk_simple_gla(q, k, v.double(), g)
    with pytest.raises(ValueError, match="initial_state"):
        chunk_simple_gla(q, k, v, g, initial_state=h0[:1])
    with pytest.raises(ValueError, match="batch size must be 1"):
        chunk_simple_gla(q, k, v, g, cu_seqlens=torch.tensor([0, 4, 9], device=DEVICE))
    with pytest.raises(TypeError, match="floating point"):
        chunk_simple_gla(q.long(), k, v, g)
    q1, k1, v1, g1 = (x[:1] for x in (q, k, v, g))
    for fn in (chunk_simple_gla, fused_recurrent_simple_gla):
        with pytest.raises(ValueError, match="start at 0 and end at T=9"):
            fn(q1, k1, v1, g1, cu_seqlens=torch.tensor([0, 4, 8], device=DEVICE))
        with pytest.raises(ValueError, match="non-decreasing"):
            fn(q1, k1, v1, g1, cu_seqlens=torch.tensor([0, 6, 4, 9], device=DEVICE))


@pytest.mark.parametrize("fn", [chunk_simple_gla, fused_recurrent_simple_gla])
def test_empty_input(fn):
    q, k, v, g, h0 = make_inputs(2, 0, 2, 16, 8)
    o, s = fn(q, k, v, g, initial_state=h0, output_final_state=True)
    assert o.shape == v.shape and torch.equal(s, h0)


@pytest.mark.skipif(not CUDA, reason="real shapes need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,KV", [(1000, 64), (2048, 128), (1000, 100)])
def test_gpu_real_shapes(dtype, T, KV, check):
    check("chunk", make_inputs(2, T, 4, KV, KV), dtype=dtype)
    check("fused_recurrent", make_inputs(1, min(T, 512), 4, KV, KV), dtype=dtype)


@pytest.mark.skipif(not CUDA, reason="real shapes need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_varlen_strong_decay(dtype, check):
    cu = torch.tensor([0, 0, 333, 1000, 1001, 2048], device=DEVICE)
    check("chunk", make_inputs(1, 2048, 4, 64, 64, decay=20.0, num_seqs=5), dtype=dtype, cu_seqlens=cu)


@pytest.mark.skipif(os.environ.get("HOPPER_COMPILE") != "1", reason="slow; set HOPPER_COMPILE=1 to run")
def test_kernels_compile_for_hopper(kernel_check):
    """Compile every kernel for sm_90 without a GPU (catches what the interpreter cannot)."""
    kernel_check.hopper_compile("simple_gla")


@pytest.mark.slow  # the kernels of the tests above, through the benchmark script
def test_bench_ops_smoke():
    """benchmarks/bench_ops.py runs end to end (tiny shapes; on CPU through the interpreter)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
    import bench_ops

    rows = bench_ops.main(["--smoke", "--no-fla", "--ops", "sdpa,chunk_simple_gla,chunk_hgrn,fused_recurrent_simple_gla"])
    assert len(rows) == 4
    for row in rows:
        assert "error" not in row, row
        assert row["fwd_ms"] > 0
