"""Tensor product attention (TPA) and multi-product attention (MPA): against a plain float64 formula, with both
decoding caches, padding and refusals."""

import math

import pytest
import torch

from x_transformers import AutoregressiveWrapper, Decoder, TransformerWrapper
from x_transformers.positional import RotaryEmbedding, RotaryTable
from x_transformers.tensor_product_attention import TensorProductAttention


def reference(module, x, rotary=None, key_mask=None):
    """softmax(q k^T / sqrt(d)) v per head, causal, with q, k, v summed from rank-1 outer products written out."""
    w = module.to_factors.weight.double()
    heads, d = module.heads, module.dim_head
    parts = (x.double() @ w.t()).split(module.splits, dim=-1)
    qkv = []
    for index, rank in enumerate(module.ranks):
        a = parts[2 * index].reshape(*x.shape[:2], rank, heads)
        b = parts[2 * index + 1].reshape(*x.shape[:2], rank, d)
        if module.multi_product and index > 0:
            a = a.sigmoid()
        if rotary is not None and index < 2:
            b = rotate(b, rotary)
        t = sum(a[:, :, r, :, None] * b[:, :, r, None, :] for r in range(rank)) / rank  # (b, n, h, d)
        qkv.append(t.transpose(1, 2))
    q, k, v = qkv
    n = x.shape[1]
    sim = q @ k.transpose(-1, -2) / math.sqrt(d)
    keep = torch.ones(n, n, dtype=torch.bool).tril()
    if key_mask is not None:
        keep = keep & key_mask[:, None, None, :]
    sim = sim.masked_fill(~keep, float("-inf"))
    out = (sim.softmax(-1) @ v).transpose(1, 2).reshape(*x.shape[:2], heads * d)
    return out @ module.to_out.weight.double().t()


def rotate(b, freqs):
    # standard interleaved-pairs rotary on the token factors (b, n, r, d), positions 0..n-1
    cos, sin = freqs.cos().double()[:, :, None, :], freqs.sin().double()[:, :, None, :]
    x1, x2 = b[..., 0::2], b[..., 1::2]
    rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    return b * cos + rotated * sin


@pytest.mark.parametrize("multi_product", [False, True])
@pytest.mark.parametrize("use_rotary", [False, True])
def test_matches_the_outer_product_formula(multi_product, use_rotary):
    torch.manual_seed(0)
    module = TensorProductAttention(24, heads=3, dim_head=8, causal=True, q_rank=4, k_rank=2, v_rank=3,
                                    multi_product=multi_product).double()
    x = torch.randn(2, 9, 24, dtype=torch.double)
    rotary = RotaryEmbedding(8)(torch.arange(9)) if use_rotary else None
    out = module(x, rotary_pos_emb=RotaryTable.cast(rotary) if use_rotary else None)
    torch.testing.assert_close(out, reference(module, x, rotary[0] if use_rotary else None), rtol=1e-9, atol=1e-9)
    if multi_product:
        assert module.ranks[1:] == (1, 1)


def test_key_padding_matches_the_formula():
    torch.manual_seed(1)
    module = TensorProductAttention(16, heads=2, dim_head=8, causal=True).double()
    x = torch.randn(2, 7, 16, dtype=torch.double)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, :3] = False  # left padding
    out = module(x, mask=mask)
    expected = reference(module, x, key_mask=mask).masked_fill(~mask[..., None], 0.0)
    torch.testing.assert_close(out[mask], expected[mask], rtol=1e-9, atol=1e-9)


def build(**kwargs):
    return TransformerWrapper(
        num_tokens=40, max_seq_len=64,
        attn_layers=Decoder(dim=32, depth=2, heads=4, attn_dim_head=8, attn_tensor_product=True, **kwargs),
    ).eval()


@pytest.mark.parametrize("kwargs", [
    dict(rotary_pos_emb=True),
    dict(attn_tensor_product_multi_product=True, alibi_pos_bias=True),
    dict(linear_attn="gated_deltanet", hybrid_pattern="LN", rotary_pos_emb=True, attn_tensor_product_q_rank=2),
])
def test_caches_decode_like_no_cache(kwargs):
    torch.manual_seed(2)
    model = AutoregressiveWrapper(build(**kwargs))
    prompts = torch.randint(0, 40, (2, 5))
    expected = model.generate(prompts, 8, temperature=0.0, cache_kv=False)
    assert torch.equal(model.generate(prompts, 8, temperature=0.0, fast_decode=False), expected)
    assert torch.equal(model.generate(prompts, 8, temperature=0.0, fast_decode="eager"), expected)


def test_cache_keeps_factors_only():
    module = TensorProductAttention(512, heads=8, dim_head=64, q_rank=6, k_rank=2, v_rank=2)
    ours, mha = module.cache_numbers_per_token()
    assert (ours, mha) == ((2 + 2) * (8 + 64), 2 * 8 * 64)
    _, inter = module(torch.randn(1, 5, 512), return_intermediates=True)
    assert [tuple(t.shape) for t in inter.cached_kv] == [(1, 2, 5, 72), (1, 2, 5, 72)]


def test_refusals_name_the_flag():
    with pytest.raises(ValueError, match="attn_qk_norm"):
        build(attn_qk_norm=True)
    with pytest.raises(ValueError, match="add_value_residual"):
        build(add_value_residual=True)
    with pytest.raises(ValueError, match="need `attn_tensor_product=True`"):
        TransformerWrapper(num_tokens=8, max_seq_len=8,
                           attn_layers=Decoder(dim=16, depth=1, heads=2, attn_tensor_product_q_rank=2))
    with pytest.raises(ValueError, match="q_rank >= 1"):
        TensorProductAttention(16, q_rank=0)
    with pytest.raises(ValueError, match="rotary_xpos"):
        build(rotary_pos_emb=True, rotary_xpos=True)(torch.randint(0, 40, (1, 4)))
