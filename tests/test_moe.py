"""Mixture-of-experts feedforward: grouped dispatch equals a per-token reference, capacity drops overflow,
losses match their definitions, padding is excluded, gradients reach router and experts."""

import pytest
import torch
import torch.nn.functional as F

from x_transformers.moe import MoE

DIM = 16


def reference(moe, x):
    """Per-token loop over the chosen experts: slow, obviously right."""
    e = moe.experts
    tokens = x.reshape(-1, x.shape[-1])
    probs = moe.router(tokens).float().softmax(-1)
    top_p, top_i = probs.topk(moe.top_k, dim=-1)
    w = top_p if moe.top_k == 1 else top_p / top_p.sum(-1, keepdim=True)
    out = torch.zeros_like(tokens)
    for t in range(tokens.shape[0]):
        for j in range(moe.top_k):
            i = top_i[t, j]
            h = tokens[t] @ e.w_in[i] + (e.b_in[i] if e.b_in is not None else 0)
            h = e.hidden(h)
            y = h @ e.w_out[i] + (e.b_out[i] if e.b_out is not None else 0)
            out[t] += w[t, j] * y
    if moe.shared_experts is not None:
        out = out + moe.shared_experts(tokens)
    return out.reshape(x.shape)


@pytest.mark.parametrize("kwargs", [
    dict(num_experts=4, top_k=2),
    dict(num_experts=4, top_k=1, glu=True, swish=True),
    dict(num_experts=3, top_k=2, num_shared_experts=1, no_bias=True),
    dict(num_experts=4, top_k=2, capacity_factor=100.0),
])
@pytest.mark.parametrize("num_tokens", [3, 40])  # dropless buffers (a decoding step) and sorted groups
def test_matches_per_token_reference(kwargs, num_tokens):
    torch.manual_seed(0)
    moe = MoE(DIM, **kwargs).eval()
    x = torch.randn(2, num_tokens, DIM)
    out, aux = moe(x)
    assert torch.allclose(out, reference(moe, x), atol=1e-5)
    assert aux.ndim == 0 and torch.isfinite(aux)


def test_capacity_drops_overflow():
    torch.manual_seed(0)
    moe = MoE(DIM, num_experts=2, top_k=1, capacity_factor=0.5)
    # every token prefers expert 0
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 1.0
    x = torch.rand(1, 8, DIM)
    out, _ = moe(x)
    capacity = 2  # ceil(0.5 * 8 * 1 / 2)
    kept = (out.abs().sum(-1) > 0).sum().item()
    assert kept == capacity
    # the first tokens keep their slots
    assert (out[0, :capacity].abs().sum(-1) > 0).all()


def test_losses_match_definitions():
    torch.manual_seed(0)
    moe = MoE(DIM, num_experts=4, top_k=1, aux_loss_weight=1.0, router_z_loss_weight=0.0)
    x = torch.randn(3, 5, DIM)
    _, aux = moe(x)
    logits = moe.router(x.reshape(-1, DIM)).float()
    probs = logits.softmax(-1)
    frac = F.one_hot(probs.argmax(-1), 4).float().mean(0)
    assert torch.allclose(aux, 4 * (frac * probs.mean(0)).sum(), atol=1e-6)

    moe.aux_loss_weight, moe.router_z_loss_weight = 0.0, 1.0
    _, z = moe(x)
    assert torch.allclose(z, torch.logsumexp(logits, -1).square().mean(), atol=1e-5)


def test_padding_excluded():
    torch.manual_seed(0)
    moe = MoE(DIM, num_experts=4, top_k=2)
    x = torch.randn(1, 6, DIM)
    mask = torch.tensor([[True] * 4 + [False] * 2])
    out, aux = moe(x, mask=mask)
    out_short, aux_short = moe(x[:, :4])
    assert torch.allclose(out[:, :4], out_short, atol=1e-6)
    assert out[:, 4:].abs().max() == 0
    assert torch.allclose(aux, aux_short, atol=1e-6)


def test_gradients_reach_router_and_experts():
    torch.manual_seed(0)
    moe = MoE(DIM, num_experts=4, top_k=2)
    out, aux = moe(torch.randn(2, 5, DIM))
    (out.square().mean() + aux).backward()
    for name, p in moe.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert moe.router.weight.grad.abs().sum() > 0


def test_bad_config():
    with pytest.raises(ValueError, match="top_k"):
        MoE(DIM, num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="capacity_factor"):
        MoE(DIM, num_experts=2, capacity_factor=0)


def test_masked_tokens_take_no_capacity_and_stay_out():
    # a masked token holding NaN neither reaches the others nor takes one of their expert slots
    torch.manual_seed(0)
    moe = MoE(DIM, num_experts=2, top_k=1, capacity_factor=1.0)
    x = torch.randn(1, 6, DIM)
    mask = torch.tensor([[True, True, True, False, False, False]])
    garbage = x.clone()
    garbage[~mask] = float("nan")
    out, loss = moe(garbage, mask=mask)
    assert torch.isfinite(out[mask]).all() and torch.isfinite(loss)
    # capacity is sized by all 6 tokens (3 slots per expert): the 3 real ones all find one
    assert (out[mask].abs().sum(-1) > 0).all()
    clean, _ = moe(x, mask=mask)
    torch.testing.assert_close(out[mask], clean[mask])


def test_compiled_moe_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    moe = MoE(DIM, num_experts=4, top_k=2, relu_squared=True)
    x = torch.randn(2, 5, DIM)
    ref, _ = moe(x)
    out, _ = torch.compile(moe, backend="aot_eager", dynamic=False)(x)
    torch.testing.assert_close(out, ref)
    assert not MoE(DIM, num_experts=2, capacity_factor=1.0).can_cache_kv
