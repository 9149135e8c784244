"""Positional embeddings and biases: parity with upstream 2.0.1 and the properties each one promises."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from x_transformers.attend import Attend
from x_transformers.positional import (
    AbsolutePositionalEmbedding,
    AlibiPositionalBias,
    CoPE,
    DataDependentAlibi,
    DynamicPositionBias,
    PerRowDataDependentAlibi,
    RelativePositionBias,
    RotaryEmbedding,
    ScaledSinusoidalEmbedding,
    TokenEmbedding,
    apply_rotary_pos_emb,
    rotate_half,
)

_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "make_block_fixtures.py"
_spec = importlib.util.spec_from_file_location("make_block_fixtures", _SCRIPT)
fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixtures)

CASES = fixtures.load_cases("positional")


@pytest.mark.parametrize("spec, record", CASES, ids=[spec["name"] for spec, _ in CASES])
def test_parity_with_upstream(spec, record):
    fixtures.check_parity(spec, record, fixtures.our_namespace())


# rotary


def rotated_dot(rotary, q, k, pos_q, pos_k):
    freqs_q, scale_q = rotary(torch.tensor([pos_q]))
    freqs_k, scale_k = rotary(torch.tensor([pos_k]))
    scale_k = scale_k**-1 if isinstance(scale_k, torch.Tensor) else scale_k
    return (apply_rotary_pos_emb(q, freqs_q, scale_q) * apply_rotary_pos_emb(k, freqs_k, scale_k)).sum()


def test_rotary_depends_only_on_relative_position():
    rotary = RotaryEmbedding(16)
    q, k = torch.randn(2, 1, 1, 16).unbind(0)
    base = rotated_dot(rotary, q, k, 7, 3)
    for shift in (1, 10, 100):
        torch.testing.assert_close(rotated_dot(rotary, q, k, 7 + shift, 3 + shift), base, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(rotated_dot(rotary, q, k, 8, 3), base)


def test_xpos_scales_cancel_to_relative_position():
    # xpos: q scaled by s^t, k by s^-t, so with one call's positions the dot product sees only t_q - t_k
    rotary = RotaryEmbedding(16, use_xpos=True, scale_base=32)
    freqs, scale = rotary.forward_from_seq_len(24)
    q_vec, k_vec = torch.randn(2, 16).unbind(0)
    q_rot = apply_rotary_pos_emb(q_vec.expand(1, 1, 24, 16), freqs, scale)[0, 0]
    k_rot = apply_rotary_pos_emb(k_vec.expand(1, 1, 24, 16), freqs, scale**-1)[0, 0]
    dots = q_rot @ k_rot.T  # (t_q, t_k)
    for offset in (0, 3):
        diagonal = dots.diagonal(-offset)
        torch.testing.assert_close(diagonal, diagonal[:1].expand_as(diagonal), rtol=1e-4, atol=1e-4)
    assert scale.shape == freqs.shape and not torch.allclose(scale, torch.ones(()))


def test_rotary_partial_dims_pass_through_and_norm_is_kept():
    rotary = RotaryEmbedding(8)
    freqs, _ = rotary.forward_from_seq_len(5)
    t = torch.randn(2, 3, 5, 12)
    out = apply_rotary_pos_emb(t, freqs)
    torch.testing.assert_close(out[..., 8:], t[..., 8:])
    torch.testing.assert_close(out[..., :8].norm(dim=-1), t[..., :8].norm(dim=-1))


def test_rotary_uses_last_positions_for_cached_queries():
    rotary = RotaryEmbedding(8)
    freqs, _ = rotary.forward_from_seq_len(6)
    t = torch.randn(1, 2, 6, 8)
    torch.testing.assert_close(apply_rotary_pos_emb(t[..., -2:, :], freqs), apply_rotary_pos_emb(t, freqs)[..., -2:, :])


def test_rotary_interpolation_divides_positions():
    plain, interp = RotaryEmbedding(8), RotaryEmbedding(8, interpolation_factor=4.0)
    torch.testing.assert_close(interp(torch.arange(8) * 4.0)[0], plain(torch.arange(8).float())[0])
    with pytest.raises(ValueError, match="interpolation_factor"):
        RotaryEmbedding(8, interpolation_factor=0.5)


def test_rotate_half_pairs():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert rotate_half(x).tolist() == [-2.0, 1.0, -4.0, 3.0]


# biases


def test_alibi_matches_explicit_bias_and_custom_positions():
    alibi = AlibiPositionalBias(heads=3, total_heads=4)
    bias = alibi(4, 6)
    slopes = torch.tensor(AlibiPositionalBias._get_slopes(3))
    q_pos, k_pos = torch.arange(2, 6), torch.arange(6)
    expected = -(q_pos[:, None] - k_pos[None, :]).abs() * slopes[:, None, None]
    torch.testing.assert_close(bias[:3], expected.float())
    assert (bias[3] == 0).all()
    torch.testing.assert_close(alibi.forward_custom_pos(q_pos, k_pos), bias)


def test_alibi_slopes():
    assert AlibiPositionalBias._get_slopes(8) == [2 ** -(k + 1) for k in range(8)]
    slopes = AlibiPositionalBias._get_slopes(6)
    assert len(slopes) == 6 and slopes[:4] == AlibiPositionalBias._get_slopes(4)


def test_alibi_as_attend_bias_matches_on_both_paths():
    q, k, v = torch.randn(3, 2, 4, 6, 8).unbind(0)
    bias = AlibiPositionalBias(heads=4)(6, 6)
    out_math, _ = Attend(causal=True)(q, k, v, attn_bias=bias)
    out_sdpa, _ = Attend(causal=True, flash=True)(q, k, v, attn_bias=bias)
    torch.testing.assert_close(out_sdpa, out_math, rtol=1e-4, atol=1e-5)


def test_t5_buckets():
    bucket = RelativePositionBias._relative_position_bucket
    rel = torch.arange(-200, 201)
    causal = bucket(rel, causal=True, num_buckets=32, max_distance=128)
    # future keys all share bucket 0, exact buckets up to 15 behind, monotone, clamped at the end
    assert (causal[rel >= 0] == 0).all()
    assert causal[rel == -15].item() == 15 and causal[rel == -16].item() == 16
    assert (causal[rel <= 0].flip(0).diff() >= 0).all()
    assert causal.max() == 31 and (causal[rel <= -128] == 31).all()
    bidir = bucket(rel, causal=False, num_buckets=32, max_distance=128)
    assert set(bidir[rel > 0].tolist()) <= set(range(16, 32)) and set(bidir[rel < 0].tolist()) <= set(range(16))


def test_t5_bias_cached_rows_are_last_rows():
    t5 = RelativePositionBias(scale=1.0, heads=2, num_buckets=8, max_distance=16)
    torch.testing.assert_close(t5(3, 10), t5(10, 10)[:, -3:])


def test_dynamic_position_bias_depends_on_distance_and_supports_cache():
    dpb = DynamicPositionBias(dim=8, heads=2, depth=2, log_distance=True, norm=True)
    full = dpb(6, 6)
    assert full.shape == (2, 6, 6)
    torch.testing.assert_close(full[:, 1:, 1:], full[:, :-1, :-1])  # Toeplitz
    torch.testing.assert_close(dpb(2, 6), full[:, -2:])
    with pytest.raises(ValueError, match="depth"):
        DynamicPositionBias(dim=8, heads=2, depth=0)


def test_data_dependent_alibi_sums_log_gates():
    dda = DataDependentAlibi(dim=8, heads=2, causal=True)
    x = torch.randn(1, 5, 8)
    bias = dda(x)
    log_gates = torch.nn.functional.logsigmoid(dda.to_forget_gates[0](x)).transpose(1, 2)  # (b, h, n)
    # bias[i, j] for j <= i = sum of log gates over j < t <= i
    for i in range(5):
        for j in range(i + 1):
            torch.testing.assert_close(bias[0, :, i, j], log_gates[0, :, j + 1 : i + 1].sum(-1), atol=1e-5, rtol=1e-5)
    assert (bias[..., torch.ones(5, 5, dtype=torch.bool).tril()] <= 1e-6).all()


def test_data_dependent_alibi_bidirectional_shape_and_diagonal():
    bias = DataDependentAlibi(dim=8, heads=2, causal=False)(torch.randn(2, 5, 8))
    assert bias.shape == (2, 2, 5, 5)
    assert (bias.diagonal(dim1=-2, dim2=-1) == 0).all()


def test_per_row_data_dependent_alibi_is_causal_penalty():
    bias = PerRowDataDependentAlibi(dim=8, heads=2, dim_head=4)(torch.randn(2, 5, 8))
    assert bias.shape == (2, 2, 5, 5)
    assert (bias <= 0).all() and (bias.triu() == 0).all()
    with pytest.raises(ValueError, match="causal"):
        PerRowDataDependentAlibi(dim=8, heads=2, causal=False)


def test_cope_soft_onehot_works_and_approaches_interpolation():
    # upstream 2.0.1 crashes on soft_onehot=True; ours computes a softmax over the integer positions
    query, logits = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 5)
    hard = CoPE(dim=4, heads=2, max_pos=8)
    soft = CoPE(dim=4, heads=2, max_pos=8, soft_onehot=True, soft_onehot_temp=1e-3)
    torch.nn.init.normal_(hard.pos_emb)
    soft.pos_emb.data.copy_(hard.pos_emb.data)
    out_soft = soft(query, logits)
    assert out_soft.shape == (1, 2, 5, 5) and torch.isfinite(out_soft).all()
    # at an integer position both agree: zero logits give positions 0.5 * (count of keys), integers for even counts
    pos = torch.sigmoid(logits).flip(-1).cumsum(-1).flip(-1)
    integer = (pos - pos.round()).abs() < 1e-2
    torch.testing.assert_close(out_soft[integer], hard(query, logits)[integer], rtol=1e-2, atol=1e-2)


# embeddings


def test_absolute_positional_embedding_errors_and_start_positions():
    emb = AbsolutePositionalEmbedding(dim=8, max_seq_len=4)
    with pytest.raises(ValueError, match="max_seq_len 4"):
        emb(torch.randn(1, 5, 8))
    out = emb(torch.randn(2, 4, 8), seq_start_pos=torch.tensor([0, 2]))
    torch.testing.assert_close(out[1, 2], emb.emb.weight[0] * 8**-0.5)
    torch.testing.assert_close(out[1, 0], out[1, 2])  # positions before the start clamp to 0


def test_scaled_sinusoidal_with_start_positions():
    # upstream 2.0.1 crashes when seq_start_pos is given; ours shifts positions per sequence
    emb = ScaledSinusoidalEmbedding(8)
    x = torch.randn(2, 5, 8)
    out = emb(x, seq_start_pos=torch.tensor([0, 2]))
    assert out.shape == (2, 5, 8)
    torch.testing.assert_close(out[1, 2:], emb(x)[:3])
    torch.testing.assert_close(out[0], emb(x))
    with pytest.raises(ValueError, match="even"):
        ScaledSinusoidalEmbedding(7)


def test_scaled_sinusoidal_formula():
    emb = ScaledSinusoidalEmbedding(4, theta=100)
    out = emb(torch.zeros(1, 3, 4))
    pos = torch.arange(3).float()[:, None]
    inv_freq = torch.tensor([1.0, 100**-0.5])
    expected = torch.cat(((pos * inv_freq).sin(), (pos * inv_freq).cos()), -1) * 0.5
    torch.testing.assert_close(out, expected)


def test_token_embedding():
    emb = TokenEmbedding(dim=8, num_tokens=10, l2norm_embed=True)
    emb.init_()
    out = emb(torch.randint(0, 10, (2, 5)))
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2, 5))
    ids = torch.randint(0, 10, (2, 5))
    torch.testing.assert_close(emb(ids.float()), emb(ids))  # upstream casts float ids
    assert math.isclose(emb.emb.weight.std().item(), 1e-5, rel_tol=0.5)
