"""linear_attn='kda' (Kimi Delta Attention) beyond the generic mixer tests of tests/test_mixers.py: grouped value
heads, negative eigenvalues, no short convolution, the per-channel gate, the Triton kernels inside the mixer, and
configuration errors."""

import pytest
import torch

from x_transformers import Decoder, TransformerWrapper
from x_transformers.mixers import make_mixer

DIM, HEADS = 32, 2

CONFIGS = {
    "default": {},
    "more_value_heads": dict(num_v_heads=4),
    "fewer_value_heads": dict(num_v_heads=1, expand_v=2.0),
    "neg_eigval_no_conv": dict(allow_neg_eigval=True, use_short_conv=False, output_gate=None),
}


def build(**kwargs):
    torch.manual_seed(0)
    return make_mixer("kda", dim=DIM, heads=HEADS, **kwargs).eval()


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-8)).item()


def stepped(mixer, x, prompt, mask=None):
    """The first `prompt` tokens at once, then one token at a time from the cache."""
    out, cache = mixer(x[:, :prompt], mask=None if mask is None else mask[:, :prompt], return_intermediates=True)
    outs = [out]
    for t in range(prompt, x.shape[1]):
        m = None if mask is None else mask[:, : t + 1]
        out, cache = mixer(x[:, t : t + 1], mask=m, cache=cache, return_intermediates=True)
        outs.append(out)
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("config", list(CONFIGS))
def test_cached_decoding_matches_parallel(config):
    mixer = build(**CONFIGS[config])
    x = torch.randn(2, 75, DIM)
    full = mixer(x)
    # a prompt through the chunked path (> 16 tokens, across the 64-step chunk), then token by token
    out, cache = stepped(mixer, x, prompt=70)
    assert rel_err(out, full) < 1e-5
    state = cache.recurrent_state[0]
    assert state.shape == (2, mixer.kernel_heads, mixer.dim_k, mixer.dim_v) and state.dtype == torch.float32


@pytest.mark.parametrize("config", ["more_value_heads", "fewer_value_heads"])
def test_left_padding_with_grouped_heads(config):
    mixer = build(**CONFIGS[config])
    x = torch.randn(1, 19, DIM)
    padded = torch.cat((torch.randn(1, 4, DIM), x), dim=1)
    mask = torch.arange(23)[None] >= 4
    assert rel_err(mixer(padded, mask=mask)[:, 4:], mixer(x)) < 1e-5


def test_grouped_heads_shapes():
    more, fewer = build(**CONFIGS["more_value_heads"]), build(**CONFIGS["fewer_value_heads"])
    assert (more.kernel_heads, more.qkv.splits) == (4, [32, 32, 64])
    assert (fewer.kernel_heads, fewer.qkv.splits) == (2, [32, 32, 32])
    assert more.A_log.shape == (4,) and more.dt_bias.shape == (4 * 16,)


def test_gate_is_per_channel_non_positive_and_finite_under_strong_decay():
    mixer = build().train()
    f = torch.randn(2, 7, mixer.kernel_heads * mixer.dim_k) * 10
    g = mixer.log_gate(f)
    assert g.shape == (2, 7, mixer.kernel_heads, mixer.dim_k) and (g <= 0).all()
    # channels of one head decay differently
    assert g[..., 0, :].std(-1).min() > 0
    with torch.no_grad():
        mixer.A_log.fill_(8.0)  # decays of thousands per step
    x = torch.randn(2, 40, DIM, requires_grad=True)
    mixer(x).square().mean().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in mixer.parameters())


def test_neg_eigval_doubles_beta():
    # beta in (0, 2): the same weights give a different output than beta in (0, 1)
    a, b = build(), build(allow_neg_eigval=True)
    x = torch.randn(1, 9, DIM)
    assert not torch.allclose(a(x), b(x))


def test_triton_kernels_match_the_torch_path(monkeypatch):
    # the Triton kernels (the CUDA path; the interpreter here) against the PyTorch path, chunked and token by token,
    # gradients included
    pytest.importorskip("triton")
    mixer = build(**CONFIGS["more_value_heads"]).train()
    x = torch.randn(1, 20, DIM)

    def forward_backward():
        mixer.zero_grad()
        xg = x.clone().requires_grad_()
        out = mixer(xg)
        out.square().sum().backward()
        return out, xg.grad, mixer.to_f[0].weight.grad.clone(), mixer.A_log.grad.clone()

    ref, ref_stepped = forward_backward(), stepped(mixer, x, prompt=18)[0]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for a, b in zip(forward_backward(), ref):
        assert rel_err(a, b) < 1e-4
    assert rel_err(stepped(mixer, x, prompt=18)[0], ref_stepped) < 1e-5


def test_in_a_decoder():
    torch.manual_seed(0)
    model = TransformerWrapper(num_tokens=20, max_seq_len=32, attn_layers=Decoder(
        dim=DIM, depth=2, heads=HEADS, linear_attn="kda", hybrid_pattern="LN", linear_attn_num_v_heads=4,
        zero_init_branch_output=True,
    ))
    x = torch.randint(0, 20, (2, 12))
    logits = model(x)
    assert logits.shape == (2, 12, 20) and torch.isfinite(logits).all()
    assert (model.attn_layers.layers[0][1].out.to_out.weight == 0).all()


def test_bad_configurations():
    with pytest.raises(ValueError, match="num_v_heads .3. and heads .2.*expand_v"):
        make_mixer("kda", dim=DIM, heads=HEADS, num_v_heads=3)
    with pytest.raises(ValueError, match="num_v_heads"):
        make_mixer("kda", dim=DIM, heads=HEADS, num_v_heads=0)
    with pytest.raises(ValueError, match="expand_k"):
        make_mixer("kda", dim=DIM, heads=HEADS, expand_k=0.01)
    with pytest.raises(ValueError, match="output gate"):
        make_mixer("kda", dim=DIM, heads=HEADS, output_gate="relu")
    with pytest.raises(ValueError, match="no bidirectional form"):
        make_mixer("kda", dim=DIM, heads=HEADS, causal=False)
