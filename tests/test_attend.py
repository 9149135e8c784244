"""Attend: parity with upstream 2.0.1, SDPA path vs math path, masking edge cases, and bad input."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from x_transformers.attend import Attend, Intermediates, causal_keep_mask, create_causal_mask
from x_transformers.positional import CoPE

_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "make_block_fixtures.py"
_spec = importlib.util.spec_from_file_location("make_block_fixtures", _SCRIPT)
fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixtures)

CASES = fixtures.load_cases("attend")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("spec, record", CASES, ids=[spec["name"] for spec, _ in CASES])
def test_parity_with_upstream(spec, record):
    fixtures.check_parity(spec, record, fixtures.our_namespace())


# helpers


def qkv(b=2, h=4, i=6, j=6, d=8, kv_heads=None, device="cpu", dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    kv_heads = kv_heads or h
    shapes = ((b, h, i, d), (b, kv_heads, j, d), (b, kv_heads, j, d))
    return [torch.randn(*s, generator=gen).to(device=device, dtype=dtype) for s in shapes]


def padding_mask(b=2, j=6, device="cpu"):
    # first sequence full, second right-padded, third (if any) fully padded
    mask = torch.ones(b, j, dtype=torch.bool, device=device)
    mask[1, j // 2 :] = False
    if b > 2:
        mask[2] = False
    return mask


def both_paths(**kwargs):
    return Attend(flash=False, **kwargs), Attend(flash=True, **kwargs)


# SDPA path vs math path


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "kwargs, inputs, call",
    [
        (dict(), dict(), dict(mask=True)),
        (dict(causal=True), dict(), dict()),
        (dict(causal=True), dict(), dict(mask=True)),
        (dict(causal=True), dict(i=2, j=6), dict(mask=True)),  # kv-cached chunk
        (dict(causal=True), dict(i=1, j=6), dict()),  # one-token decode
        (dict(causal=True, scale=0.3), dict(kv_heads=2), dict(mask=True, bias=True)),
        (dict(), dict(kv_heads=1), dict(bias=True)),
        (dict(add_zero_kv=True), dict(), dict(mask=True, bias=True)),
        (dict(l2_distance=True), dict(), dict(mask=True)),
        (dict(l2_distance=True, scale=0.2), dict(), dict()),
        (dict(laser=True), dict(), dict(mask=True)),
    ],
)
def test_sdpa_matches_math(device, kwargs, inputs, call):
    q, k, v = qkv(b=3, device=device, **inputs)
    i, j = q.shape[-2], k.shape[-2]
    forward_kwargs = {}
    if call.get("mask"):
        forward_kwargs["mask"] = padding_mask(b=3, j=j, device=device)
    if call.get("bias"):
        forward_kwargs["attn_bias"] = torch.randn(4, i, j, device=device)

    math_attend, sdpa_attend = both_paths(heads=4, **kwargs)
    out_math, inter_math = math_attend(q, k, v, **forward_kwargs)
    out_sdpa, _ = sdpa_attend(q, k, v, **forward_kwargs)

    assert torch.isfinite(out_math).all() and torch.isfinite(out_sdpa).all()
    torch.testing.assert_close(out_sdpa, out_math, rtol=1e-4, atol=1e-5)
    num_keys = j + int(kwargs.get("add_zero_kv", False))
    assert isinstance(inter_math, Intermediates) and inter_math.post_softmax_attn.shape == (3, 4, i, num_keys)


@pytest.mark.parametrize("flash", (False, True))
@pytest.mark.parametrize("causal", (False, True))
def test_fully_masked_rows_give_zeros_and_finite_grads(flash, causal):
    q, k, v = (t.requires_grad_() for t in qkv(b=3))
    mask = padding_mask(b=3)
    bias = torch.randn(4, 6, 6, requires_grad=True)

    for attn_bias in (None, bias):
        out, _ = Attend(flash=flash, causal=causal, heads=4)(q, k, v, mask=mask, attn_bias=attn_bias)
        assert torch.isfinite(out).all()
        assert (out[2] == 0).all()
        out.sum().backward()
        for t in (q, k, v):
            assert torch.isfinite(t.grad).all()
            t.grad = None


def test_rows_masked_by_padding_and_causality_together_give_zeros():
    # left padding plus causal: the first query of sequence 1 can see no key at all
    q, k, v = qkv()
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :2] = False
    for flash in (False, True):
        out, _ = Attend(flash=flash, causal=True)(q, k, v, mask=mask)
        assert (out[1, :, :2] == 0).all() and (out[1, :, 2:] != 0).any()


def test_4d_attention_mask_and_key_padding_mask_agree():
    q, k, v = qkv()
    mask = padding_mask()
    attend = Attend()
    out_2d, _ = attend(q, k, v, mask=mask)
    out_4d, _ = attend(q, k, v, mask=mask[:, None, None, :].expand(2, 4, 6, 6))
    torch.testing.assert_close(out_2d, out_4d)


def test_math_path_matches_plain_formula():
    q, k, v = qkv()
    mask = padding_mask()
    out, inter = Attend(causal=True, scale=0.5)(q, k, v, mask=mask)

    sim = (q @ k.transpose(-1, -2)) * 0.5
    keep = mask[:, None, None, :] & torch.ones(6, 6, dtype=torch.bool).tril()
    attn = sim.masked_fill(~keep, float("-inf")).softmax(dim=-1)
    torch.testing.assert_close(out, attn @ v)
    torch.testing.assert_close(inter.qk_similarities, sim)
    torch.testing.assert_close(inter.post_softmax_attn, attn)


def test_grouped_kv_heads_follow_upstream_head_order():
    # query head h reads kv head h % kv_heads (upstream repeats kv heads as '(r kvh)')
    q, k, v = qkv(kv_heads=2)
    out, _ = Attend()(q, k, v)
    k_full, v_full = (t.repeat(1, 2, 1, 1) for t in (k, v))
    ref, _ = Attend()(q, k_full, v_full)
    torch.testing.assert_close(out, ref)
    assert not torch.allclose(out[:, 1], Attend()(q[:, 1:2], k[:, :1], v[:, :1])[0][:, 0])


def test_three_dim_kv_is_a_single_kv_head():
    q, k, v = qkv(kv_heads=1)
    out_4d, _ = Attend()(q, k, v)
    out_3d, _ = Attend()(q, k[:, 0], v[:, 0])
    torch.testing.assert_close(out_3d, out_4d)


def test_sparse_topk_larger_than_keys_is_plain_softmax():
    q, k, v = qkv(i=3, j=3)
    out_topk, _ = Attend(sparse_topk=8)(q, k, v)
    out_plain, _ = Attend()(q, k, v)
    torch.testing.assert_close(out_topk, out_plain)


def test_sparse_topk_keeps_k_keys():
    q, k, v = qkv()
    _, inter = Attend(sparse_topk=2)(q, k, v)
    assert ((inter.post_softmax_attn > 0).sum(dim=-1) == 2).all()


def test_hard_attention_is_one_hot_with_soft_gradient():
    q, k, v = (t.requires_grad_() for t in qkv())
    out, inter = Attend(hard=True)(q, k, v)
    attn = inter.post_softmax_attn
    assert torch.allclose(attn.max(dim=-1).values, torch.ones(()))
    assert torch.allclose(attn.sum(dim=-1), torch.ones(()))
    out.sum().backward()
    assert q.grad.abs().sum() > 0


def test_selective_attention_only_lowers_later_logits():
    q, k, v = qkv()
    _, plain = Attend(causal=True)(q, k, v)
    _, selective = Attend(causal=True, selective=True)(q, k, v)
    diff = selective.pre_softmax_attn - plain.pre_softmax_attn
    # first query row untouched, all changes are penalties
    assert (diff[..., 0, :] == 0).all()
    assert (diff <= 0).all() and (diff < 0).any()


def test_softclamp_bounds_logits():
    q, k, v = qkv()
    _, inter = Attend(softclamp_logits=True, logit_softclamp_value=2.0)(q * 10, k, v)
    assert inter.pre_softmax_attn.abs().max() <= 2.0


def test_talking_heads_start_as_identity():
    q, k, v = qkv()
    mask = padding_mask()
    out, _ = Attend(heads=4, post_talking_heads=True, pre_scale_post_talking_heads=False)(q, k, v, mask=mask)
    ref, _ = Attend()(q, k, v, mask=mask)
    torch.testing.assert_close(out, ref)


def test_prev_attn_is_added_to_logits():
    q, k, v = qkv()
    prev = torch.randn(2, 4, 6, 6)
    _, inter = Attend()(q, k, v, prev_attn=prev)
    _, plain = Attend()(q, k, v)
    torch.testing.assert_close(inter.qk_similarities, plain.qk_similarities + prev)


def test_cope_changes_logits_and_trains():
    q, k, v = qkv()
    cope = CoPE(dim=8, heads=4, max_pos=4)
    torch.nn.init.normal_(cope.pos_emb)
    out, _ = Attend(causal=True, cope=cope)(q, k, v)
    out.sum().backward()
    assert cope.pos_emb.grad.abs().sum() > 0


def test_laser_is_log_of_attention_over_exp_values():
    q, k, v = qkv()
    out, inter = Attend(laser=True, laser_softclamp_value=3.0)(q, k, v)
    clamped_v = torch.tanh(v / 3.0) * 3.0
    ref = (inter.post_softmax_attn @ clamped_v.exp()).log()
    torch.testing.assert_close(out, ref)


def test_dropout_only_in_training():
    q, k, v = qkv()
    attend = Attend(dropout=0.5)
    attend.eval()
    torch.testing.assert_close(attend(q, k, v)[0], Attend()(q, k, v)[0])
    attend.train()
    assert not torch.allclose(attend(q, k, v)[0], Attend()(q, k, v)[0])


def test_flash_returns_empty_intermediates():
    _, inter = Attend(flash=True)(*qkv())
    assert inter.to_tuple() == (None, None, None)
    assert inter.hybrid_hidden is None and inter.recurrent_state is None


def test_causal_masks():
    keep = causal_keep_mask(2, 4)
    assert keep.tolist() == [[True, True, True, False], [True, True, True, True]]
    assert (create_causal_mask(2, 4) == ~keep).all()


def test_half_precision_math_path_stays_finite():
    q, k, v = qkv(dtype=torch.bfloat16)
    out, _ = Attend(causal=True)(q, k, v, mask=padding_mask())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# bad input


def test_flash_rejects_logit_features():
    with pytest.raises(ValueError, match="talking_heads"):
        Attend(flash=True, heads=4, pre_talking_heads=True)
    with pytest.raises(ValueError, match="sparse_topk"):
        Attend(flash=True, sparse_topk=2)
    with pytest.raises(ValueError, match="prev_attn"):
        Attend(flash=True)(*qkv(), prev_attn=torch.zeros(2, 4, 6, 6))


def test_exclusive_attention_kinds():
    with pytest.raises(ValueError, match="at most one"):
        Attend(sigmoid=True, hard=True)
    with pytest.raises(ValueError, match="causal"):
        Attend(selective=True)
    with pytest.raises(ValueError, match="sdp_kwargs"):
        Attend(flash=True, sdp_kwargs=dict(enable_turbo=True))


def test_bad_masks_raise():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="bool"):
        Attend()(q, k, v, mask=torch.ones(2, 6))
    with pytest.raises(ValueError, match="does not match 6 keys"):
        Attend()(q, k, v, mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="divisible"):
        Attend()(*qkv(kv_heads=3))
    with pytest.raises(ValueError, match="batch, heads, seq, dim_head"):
        Attend()(q[0], k, v)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_sdpa_matches_math_on_gpu_half(dtype):
    q, k, v = (t.requires_grad_() for t in qkv(b=3, i=64, j=64, d=64, kv_heads=2, device="cuda", dtype=dtype))
    mask = padding_mask(b=3, j=64, device="cuda")
    bias = torch.randn(4, 64, 64, device="cuda", dtype=dtype)
    math_attend, sdpa_attend = both_paths(causal=True)
    for attn_bias in (None, bias):
        out_math, _ = math_attend(q, k, v, mask=mask, attn_bias=attn_bias)
        out_sdpa, _ = sdpa_attend(q, k, v, mask=mask, attn_bias=attn_bias)
        torch.testing.assert_close(out_sdpa.float(), out_math.float(), rtol=2e-2, atol=2e-2)
        assert (out_sdpa[2] == 0).all()
        out_sdpa.float().sum().backward()
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_sdpa_unmasked_causal_uses_fused_kernel_on_gpu():
    # no mask, no bias, square causal: SDPA's is_causal path, which flash kernels accept
    q, k, v = qkv(b=2, i=128, j=128, d=64, device="cuda", dtype=torch.bfloat16)
    flash_only = dict(enable_flash=True, enable_math=False, enable_mem_efficient=False)
    attend = Attend(causal=True, flash=True, sdp_kwargs=flash_only)
    out, _ = attend(q, k, v)
    ref, _ = Attend(causal=True)(q, k, v)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("flash", (False, True))
def test_no_host_device_sync_on_gpu(flash):
    from x_transformers.positional import AlibiPositionalBias, RotaryEmbedding, apply_rotary_pos_emb

    q, k, v = qkv(b=3, i=32, j=32, d=16, device="cuda")
    mask = padding_mask(b=3, j=32, device="cuda")
    attend = Attend(causal=True, flash=flash).cuda()
    rotary, alibi = RotaryEmbedding(16, use_xpos=True).cuda(), AlibiPositionalBias(heads=4).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        freqs, scale = rotary.forward_from_seq_len(32)
        q_rot, k_rot = apply_rotary_pos_emb(q, freqs, scale), apply_rotary_pos_emb(k, freqs, scale**-1)
        out, _ = attend(q_rot, k_rot, v, mask=mask, attn_bias=alibi(32, 32))
        out, _ = attend(q_rot[..., -1:, :], k_rot, v, mask=mask)  # one-token decode step
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == (3, 4, 1, 16)
